"""The typer application object every command module registers on, and the two rich consoles.

Results (tables, summaries, "wrote OUT") go to `out` on stdout, so `rtnq inspect OUT > file` keeps
them; progress bars, warnings and errors go to `err` on stderr. `--json` bypasses rich altogether
(rtnq.cli.output.emit_json).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console, ConsoleDimensions

app = typer.Typer(
    name="rtnq",
    help="Calibration-free selective RTN quantization of LLM checkpoints into the Marlin layout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

# Wide enough that no table of tensor names reaches it; rich pads nothing beyond a table's own width,
# so a wide console costs no trailing spaces.
PIPE_WIDTH = 10_000


class _ResultConsole(Console):
    """stdout console that never wraps or cuts a tensor name when stdout is a pipe or a file.

    rich sizes every console from whichever of stdin/stdout/stderr is a terminal, so `rtnq inspect OUT
    | head` would still squeeze tables to the terminal's width and cut names with an ellipsis. When
    stdout itself is not a terminal there is no width to fit: tables are printed at their natural
    width instead, whatever COLUMNS says. (Colors need no such care: rich writes no escape codes to
    a non-terminal unless FORCE_COLOR asks for them.)
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


out = _ResultConsole()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
