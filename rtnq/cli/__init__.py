"""The `rtnq` command line: argument parsing, rich output and exit codes. No math lives here.

One error boundary (`main`): library code raises RtnqError subclasses, which become one red line on
stderr and the exit code from rtnq.errors (RTNQ_DEBUG=1 re-raises for the traceback). Human output
goes to stderr; machine output (`--json`) is the only thing written to stdout.
"""


from __future__ import annotations

import gc
import os
import sys

from rich.markup import escape

# Importing a command module registers it on `app`; the order here is the order of `rtnq --help`.
from rtnq.cli import convert, inspect, verify, dequantize, sample, bench  # noqa: F401,E402
from rtnq.cli.app import app, err
from rtnq.errors import RtnqError

def main() -> None:
    # Everything imported so far (torch, typer, rich) lives until exit: freezing it keeps the cyclic
    # GC from re-scanning it during the run and at interpreter shutdown (0.3-0.6 s with torch loaded).
    gc.freeze()
    try:
        app()
    except RtnqError as e:
        if os.environ.get("RTNQ_DEBUG"):
            raise
        # Messages quote user input and shell commands ("pip install 'rtnq[plot]'"): never markup.
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted", highlight=False)
        sys.exit(130)


