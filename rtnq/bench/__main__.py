"""`python -m rtnq.bench [OUT] [options]`: the same benchmark as `rtnq bench`, without typer.

For GPU machines that have torch but not rtnq's CLI dependencies (scripts/gpu_check.sh). rich is
used when installed, plain text otherwise. Errors: one line on stderr and the exit code from
rtnq.errors (3 = no GPU / no CUDA library); RTNQ_DEBUG=1 shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rtnq.bench.app import DEFAULT_BATCHES, Options, run
from rtnq.errors import RtnqError


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m rtnq.bench", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", nargs="?", type=Path, help="converted checkpoint directory (omit with --synthetic)")
    p.add_argument("--synthetic", help="random weights of a model's real shapes: llama-3.1-8b, llama-3.1-70b, ...")
    p.add_argument("--batch", default=DEFAULT_BATCHES, help="comma list of batch sizes M")
    p.add_argument("--dtype", choices=("bf16", "fp16"))
    p.add_argument("--bits", help="--synthetic: comma list of 4 and/or 8 (default 4)")
    p.add_argument("--group-size", type=int, help="--synthetic: 32, 64, 128 (default) or -1")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", action="store_true", help="print the JSON document on stdout")
    p.add_argument("--plot", type=Path, help="write speedup vs batch size to this PNG (needs matplotlib)")
    p.add_argument("--save-dispatch", dest="save_dispatch", action="store_true", default=True)
    p.add_argument("--no-save-dispatch", dest="save_dispatch", action="store_false")
    p.add_argument("--no-stack", dest="stack", action="store_false", help="skip the linear-stack figure")
    p.add_argument("--shapes", help="only these shapes (comma list of names, e.g. o,gate_up)")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="skip PyTorch's int4/int8 kernels")
    p.add_argument("--no-check", dest="checks", action="store_false", help="skip the result check per variant")
    p.add_argument("--quick", action="store_true", help="fewer samples (smoke runs)")
    a = p.parse_args(argv)
    return Options(out_dir=a.out_dir, synthetic=a.synthetic, batches=a.batch, dtype=a.dtype, bits=a.bits,
                   group_size=a.group_size, device=a.device, json=a.json, plot=a.plot,
                   save_dispatch=a.save_dispatch, stack=a.stack, shapes=a.shapes, peers=a.peers,
                   checks=a.checks, quick=a.quick)


def main(argv: list[str] | None = None) -> int:
    from rtnq.bench.output import default_printer

    opts = parse(argv)
    try:
        run(opts, default_printer(), sys.stdout)
    except RtnqError as e:
        if os.environ.get("RTNQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
