"""The options of `rtnq bench`, defined once: the `Options` dataclass is the table.

Each field carries its flag and help text; `specs()` reads them, and both entry points are built from
that list: the typer command `rtnq bench` (rtnq/cli/bench.py) and the argparse parser of
`python -m rtnq.bench` (`parser()`, for GPU machines without typer or rich). A flag added here appears
in both. Booleans that default to True get a `--x/--no-x` pair, those that default to False a plain
`--x` switch. Values are checked in one place, `rtnq.bench.app` (so both entry points give the same
message and exit code); the parsers only convert types.

Plain Python: importing this module imports neither torch nor typer (`rtnq --help` imports it).
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

DEFAULT_BATCHES = "1,16,64,256,1024"
SUMMARY = "Time the quantized linears against cuBLAS and the GPU's measured copy bandwidth and matmul rate."


def _opt(default: Any, flag: str | None, help: str, metavar: str | None = None) -> Any:
    """A field of the table: flag None makes the (optional) positional argument."""
    return field(default=default, metadata={"flag": flag, "help": help, "metavar": metavar})


# Annotations use Optional[...] rather than `X | None`: both parsers evaluate them at run time, and the
# argparse side must also work on the older Pythons of bare GPU images.
@dataclass
class Options:
    out_dir: Optional[Path] = _opt(None, None, "Converted checkpoint directory (omit with --synthetic).", "OUT")
    synthetic: Optional[str] = _opt(
        None, "--synthetic",
        "Random weights of a real model's shapes: llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, llama-3.2-3b, tiny.")
    batches: str = _opt(DEFAULT_BATCHES, "--batch", "Batch sizes M to time (comma list).")
    # None: the checkpoint's dtype, bf16 for --synthetic
    dtype: Optional[str] = _opt(
        None, "--dtype", "Activations: bf16 or fp16 (default: the checkpoint's; bf16 with --synthetic).")
    bits: Optional[str] = _opt(None, "--bits", "With --synthetic: 4, 8 or 4,8 (default 4).")
    group_size: Optional[int] = _opt(None, "--group-size", "With --synthetic: 32, 64, 128 (default) or -1.")
    device: str = _opt(
        "cuda", "--device",
        "cuda, or cpu: the CPU reference path, to check the plumbing (every figure labelled CPU).")
    json: bool = _opt(False, "--json", "Print machine-readable JSON on stdout.")
    plot: Optional[Path] = _opt(
        None, "--plot", "Write speedup vs batch size per shape to this PNG (needs matplotlib).")
    save_dispatch: bool = _opt(
        True, "--save-dispatch", "Write the measured dispatcher thresholds for this GPU (GPU runs only).")
    stack: bool = _opt(True, "--stack", "Also time one forward of all linears at M = 1, 16, 64.")
    shapes: Optional[str] = _opt(None, "--shapes", "Only these shapes (comma list of names, e.g. o,gate_up).")
    peers: bool = _opt(True, "--peers", "Also time PyTorch's int4 (tinygemm) and int8 kernels.")
    checks: bool = _opt(
        True, "--check", "Check each timed variant's result against its dequantized weight (the check column).")
    quick: bool = _opt(False, "--quick", "Fewer samples per point (smoke runs; the JSON says so).")


@dataclass(frozen=True)
class Spec:
    """One option as the parsers need it."""

    name: str  # the Options field
    flag: str | None  # "--batch"; None for the positional OUT
    help: str
    annotation: Any  # the field's type, e.g. Optional[Path]
    type: type  # what a value converts to: str, int, Path or bool
    default: Any
    metavar: str | None

    @property
    def negatable(self) -> bool:
        """True for a `--x/--no-x` pair (a boolean that is on by default)."""
        return self.type is bool and self.default is True

    @property
    def flags(self) -> tuple[str, ...]:
        """Every spelling on the command line (what both parsers must accept)."""
        if self.flag is None:
            return ()
        return (self.flag, "--no-" + self.flag[2:]) if self.negatable else (self.flag,)


def specs() -> list[Spec]:
    hints = typing.get_type_hints(Options)
    out = []
    for f in fields(Options):
        ann = hints[f.name]
        base = next((a for a in typing.get_args(ann) if a is not type(None)), ann)  # Optional[X] -> X
        out.append(Spec(f.name, f.metadata["flag"], f.metadata["help"], ann, base, f.default, f.metadata["metavar"]))
    return out


def parser(prog: str = "python -m rtnq.bench") -> argparse.ArgumentParser:
    """The argparse form of the table (`python -m rtnq.bench`)."""
    p = argparse.ArgumentParser(prog=prog, description=SUMMARY)
    for s in specs():
        text = s.help.replace("%", "%%")  # argparse formats help with %
        if s.flag is None:
            p.add_argument(s.name, nargs="?", type=s.type, default=s.default, metavar=s.metavar, help=text)
        elif s.negatable:
            p.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction, default=True, help=text)
        elif s.type is bool:
            p.add_argument(s.flag, dest=s.name, action="store_true", help=text)
        else:
            metavar = s.flag[2:].upper().replace("-", "_")  # --batch BATCH, as typer spells it
            p.add_argument(s.flag, dest=s.name, type=s.type, default=s.default, metavar=metavar, help=text)
    return p


def parse(argv: list[str] | None = None) -> Options:
    """Options from a command line; bad syntax exits 2 with argparse's usage message."""
    return Options(**vars(parser().parse_args(argv)))
