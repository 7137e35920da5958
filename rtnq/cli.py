"""The `rtnq` command line: argument parsing, rich output and exit codes. No math lives here.

One error boundary (`main`): library code raises RtnqError subclasses, which become one red line on
stderr and the exit code from rtnq.errors (RTNQ_DEBUG=1 re-raises for the traceback). Human output
goes to stderr; machine output (`--json`) is the only thing written to stdout.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

from rtnq.errors import RtnqError

app = typer.Typer(
    name="rtnq",
    help="Calibration-free selective RTN quantization of LLM checkpoints into the Marlin layout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
out = Console()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def main() -> None:
    try:
        app()
    except RtnqError as e:
        if os.environ.get("RTNQ_DEBUG"):
            raise
        err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
