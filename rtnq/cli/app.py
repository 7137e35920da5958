"""The typer application object every command module registers on, and the shared stderr console.

Human output (progress, warnings, errors) goes to `err`; results go to stdout (rtnq.cli.output).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    name="rtnq",
    help="Calibration-free selective RTN quantization of LLM checkpoints into the Marlin layout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
