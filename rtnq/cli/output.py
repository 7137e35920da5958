"""Option parsing callbacks and output helpers shared by the commands.

Everything printed here is a result and goes to `out` (stdout); warnings go to `err` via `warn`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import typer
from rich.markup import escape

from rtnq import formats, params
from rtnq.cli.app import err, out


def split_list(values: Optional[list[str]]) -> list[str]:
    """Options may repeat and hold comma lists: --keep-int8 layers.0,mlp --keep-int8 o."""
    return [part.strip() for v in values or [] for part in v.split(",") if part.strip()]


def _accepted(option: str, value):
    why = params.problem(option, value)
    if why:
        raise typer.BadParameter(why)
    return value


def parse_bits(value: int) -> int:
    return _accepted("--bits", value)


def parse_group(value: int) -> int:
    return _accepted("--group-size", value)


def parse_scale(value: Optional[str]) -> Optional[str]:
    return value if value is None else _accepted("--scale", value)


def parse_budget_score(value: Optional[str]) -> Optional[str]:
    return value if value is None else _accepted("--budget-score", value)


def parse_budget(value: Optional[float]) -> Optional[float]:
    if value is not None and not (value > 0 and value < 1e6):
        raise typer.BadParameter(f"must be a positive number of bits per weight such as 4.5, got {value}")
    return value


def budget_line(scored) -> str:
    """One line on what --budget chose (stdout, with the summary)."""
    units = len(set(scored.promoted.values()))
    moved = "promoted to INT8"
    if scored.groups:  # "moved: 8 to INT8, 34 to groups of 32, ..." by the rule each took
        counts: dict[str, set] = {}
        for name, rank in scored.promoted.items():
            label = scored.selection.decisions[name].rule.split()[1]
            counts.setdefault(label, set()).add(rank)
        words = {"int8": "INT8", "g64": "groups of 64", "g32": "groups of 32"}
        moved = "moved (" + ", ".join(f"{len(counts[k])} to {words[k]}" for k in words if k in counts) + ")"
    return (f"budget {scored.budget:g} bits per weight by {scored.score_name}: {units} units "
            f"({len(scored.promoted)} tensors) {moved}, {scored.floor:.4f} -> {scored.bits_per_weight:.4f} "
            f"bits per weight of the quantized linears (codes and scales); scoring read the weights in "
            f"{scored.seconds:.1f} s")


def rotation_line(record: dict) -> str:
    """One line on a --rotate output's rotation (a manifest's defaults.rotate), for convert and inspect."""
    spare = record.get("spare") or []
    return (f"rotated: {record.get('kind')} of order {record.get('order')} ({record.get('construction')}), "
            f"seed {record.get('seed')}, channels left out: {', '.join(map(str, spare)) if spare else 'none'}")


def parse_dtype(value: Optional[str]) -> Optional[str]:
    return value if value is None else _accepted("--dtype", value)


def parse_format(value: str) -> str:
    if value not in formats.BY_NAME:
        raise typer.BadParameter(f"must be {', '.join(formats.FORMATS[:-1])} or {formats.FORMATS[-1]}")
    return value


def parse_tp(value: Optional[str]) -> list[int]:
    # Called in the command body, not as a click callback, so click cannot name the option itself.
    try:
        degrees = [int(x) for x in (value or "").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("must be a comma list of integers, e.g. 2,4,8", param_hint="--tp") from None
    if any(d < 1 for d in degrees):
        raise typer.BadParameter("degrees must be >= 1", param_hint="--tp")
    return degrees


def emit_json(data) -> None:
    """Plain JSON on stdout (rich would wrap long lines at the console width)."""
    import json

    typer.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def tp_summary(failures: dict[int, list], listed: Sequence[int] = ()) -> str:
    """One line on every run: which tensor-parallel degrees keep every quantized tensor Marlin-loadable.

    `listed`: degrees whose failing tensors this run already printed (convert --dry-run --tp); the
    hint to run that command is only given for the others.
    """
    parts = []
    for t, fails in sorted(failures.items()):
        parts.append(f"TP{t} ok" if not fails else f"TP{t}: {len(fails)} quantized tensors fail")
    line = "tensor parallel (Marlin shape rules per rank): " + ", ".join(parts)
    unlisted = [t for t, f in sorted(failures.items()) if f and t not in listed]
    if unlisted:
        line += f" (rtnq convert --dry-run --tp {','.join(map(str, unlisted))} lists them)"
    return line


def warn(message: str) -> None:
    # Warnings quote tensor names and selectors, which may hold brackets: never markup.
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def print_line(text: str, console=None) -> None:
    """One plain line of result on stdout (or `console`), never wrapped and never read as markup."""
    (console or out).print(text, highlight=False, soft_wrap=True, markup=False)


def print_totals(t: dict, seconds: float | None = None) -> None:
    from rich.table import Table

    c = t["tensors"]
    table = Table(show_header=False, title="summary")
    if t.get("linear_bits_per_weight") is not None:  # absent in manifests written before rtnq recorded it
        share = t["quantized_parameters"] / t["linear_parameters"]
        table.add_row("bits per weight (all linears in the blocks, 16-bit ones included)",
                      f"{t['linear_bits_per_weight']:.4f} ({share:.1%} of their parameters quantized)")
    table.add_row("quantized INT4 / INT8", f"{c['int4']} / {c['int8']} tensors")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t["passthrough_reasons"].items()))
    table.add_row("passed through", f"{c['passthrough']} tensors" + (f" ({reasons})" if reasons else ""))
    table.add_row("bytes in -> out", f"{gb(t['bytes_in'])} -> {gb(t['bytes_out'])}")
    if t["bits_per_weight"] is not None:
        table.add_row("bits per weight (quantized linears, scales included)", f"{t['bits_per_weight']:.4f}")
    if t["model_bits_per_weight"] is not None:
        table.add_row("bits per weight (whole model)", f"{t['model_bits_per_weight']:.4f}")
    if seconds is not None:
        table.add_row("wall time", f"{seconds:.2f} s ({t['bytes_in'] / max(seconds, 1e-9) / 1e9:.2f} GB/s of input)")
    out.print(table)


def print_summary(result) -> None:
    if result.plan.rotation is not None:
        print_line(rotation_line(result.plan.rotation.manifest()))
    if result.plan.budget is not None:
        print_line(budget_line(result.plan.budget))
    print_totals(result.manifest.totals, result.seconds)
    print_line(f"wrote {result.plan.out}")


