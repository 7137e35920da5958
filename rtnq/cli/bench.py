"""`rtnq bench`: time the quantized linears on the CUDA runtime (rtnq.bench does the work).

The command's parameters are not written out here: they are generated from the one option table,
rtnq.bench.options.Options, which also builds `python -m rtnq.bench`'s argparse parser, so the two
entry points cannot drift apart. Errors go through rtnq.cli.main's boundary like every command's.
"""

from __future__ import annotations

import inspect
import sys
from typing import Annotated, Any

import typer

from rtnq.bench.options import SUMMARY, Options, Spec, specs
from rtnq.cli.app import app, err

BENCH_EXAMPLES = """
Examples:

  rtnq bench llama-3.1-8b-rtnq/                                   # every quantized shape, M = 1..1024

  rtnq bench --synthetic llama-3.1-8b --bits 4,8 --json > bench.json   # real shapes, random weights

  rtnq bench --synthetic tiny --device cpu --batch 1,16            # plumbing check on the CPU reference path
"""


def _parameter(spec: Spec) -> inspect.Parameter:
    """One typer parameter from a row of the option table."""
    if spec.flag is None:
        info: Any = typer.Argument(help=spec.help, metavar=spec.metavar, show_default=False)
    elif spec.negatable:
        info = typer.Option("/".join(spec.flags), help=spec.help)
    else:
        info = typer.Option(spec.flag, help=spec.help)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default,
                             annotation=Annotated[spec.annotation, info])


def bench(**values: Any) -> None:
    from rtnq.bench.app import run
    from rtnq.bench.output import RichPrinter

    run(Options(**values), RichPrinter(err), sys.stdout)


# typer reads a command's parameters from its signature; this one is the table's.
bench.__signature__ = inspect.Signature([_parameter(s) for s in specs()])  # type: ignore[attr-defined]
bench.__annotations__ = {p.name: p.annotation for p in bench.__signature__.parameters.values()}  # type: ignore[attr-defined]
bench.__doc__ = SUMMARY
app.command(epilog=BENCH_EXAMPLES)(bench)
