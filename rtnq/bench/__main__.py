"""`python -m rtnq.bench [OUT] [options]`: the same benchmark as `rtnq bench`, without typer.

For GPU machines that have torch but not rtnq's CLI dependencies (scripts/gpu_check.sh). The options are
the ones of `rtnq bench` (one table, rtnq/bench/options.py); rich is used when installed, plain text
otherwise. Errors map as in `rtnq` itself (rtnq.cli.main): RtnqError -> "error: <message>" on stderr and
its exit_code from rtnq.errors (3 = no GPU / no CUDA library), Ctrl-C -> 130, RTNQ_DEBUG=1 re-raises.
"""

from __future__ import annotations

import sys

from rtnq import errors
from rtnq.bench import options


def main(argv: list[str] | None = None) -> int:
    opts = options.parse(argv)  # bad syntax: argparse's usage line and exit 2, as click does for `rtnq bench`
    from rtnq.bench.app import run
    from rtnq.bench.output import default_printer

    try:
        run(opts, default_printer(), sys.stdout)
    except (errors.RtnqError, KeyboardInterrupt) as e:
        reported = errors.report(e)
        if reported is None:
            raise
        print(f"error: {reported[0]}", file=sys.stderr)
        return reported[1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
