"""`rtnq inspect`: the precision manifest as a table, JSON or a picture."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from rtnq.cli.app import JsonOpt, app, err, out
from rtnq.cli.output import emit_json, print_line, print_totals, rotation_line, tp_summary, warn


@app.command()
def inspect(
    out_dir: Annotated[str, typer.Argument(help="A directory written by `rtnq convert`.")],
    json_out: JsonOpt = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Draw the precision map and the RTN error per tensor into this PNG file (needs matplotlib).")] = None,
) -> None:
    """Show the precision manifest: precision per layer and module, totals and bits per weight."""
    from rtnq.checkpoint import manifest as mf
    from rtnq.commands import precision_map

    if plot:
        from rtnq.commands import plotting

        plotting.pyplot()  # a missing matplotlib fails here, before any table is printed
    m = mf.read(out_dir)
    if json_out:
        emit_json(m.to_json())
    else:
        print_line(f"format: {m.format} (manifest version {m.version})")
        rot = m.defaults.get("rotate")
        if isinstance(rot, dict):  # --rotate: the weights are those of the rotated model
            print_line(escape(rotation_line(rot)))
        _print_precision_map(precision_map.build(m))
        _print_budget(m)
        for w in m.warnings:
            warn(w)
        if m.totals:  # a hand-made manifest may have none; the manifest check vouches for the rest
            # Keys a later rtnq added (the manifest check allows them to be absent): print_totals reads them.
            print_totals({"passthrough_reasons": {}, "bits_per_weight": None, "model_bits_per_weight": None,
                          **m.totals})
        tp = m.totals.get("tp_failures")  # absent in manifests written before rtnq recorded it
        if tp:
            print_line(tp_summary({int(t): [None] * c for t, c in tp.items()}))
    if plot:
        plotting.precision_map_png(precision_map.build(m), plot)
        print_line(f"wrote {plot}", err if json_out else out)  # stdout holds only the JSON under --json


_STYLE = {"int4": "green", "int8": "yellow"}


def _print_precision_map(pm) -> None:
    from rich.table import Table

    from rtnq.commands.precision_map import short_names

    table = Table(title="precision by layer and module")
    table.add_column("layer", justify="right")
    for header in short_names(pm.modules):
        table.add_column(escape(header), overflow="fold")
    for layer in pm.layers:
        row = [str(layer)]
        for module in pm.modules:
            v = pm.cells.get((layer, module), "")
            row.append(f"[{_STYLE[v]}]{v}[/]" if v in _STYLE else escape(v))
        table.add_row(*row)
    out.print(table)
    if pm.other:
        other = Table(title="outside the blocks")
        other.add_column("tensor", overflow="fold")
        other.add_column("precision")
        for name, v in pm.other.items():
            other.add_row(escape(name), escape(v))
        out.print(other)


def _print_budget(m, shown: int = 12) -> None:
    """What --budget ranked and promoted: the best units by score per extra bit."""
    from rtnq.commands import precision_map

    b = m.defaults.get("budget")
    rows = precision_map.budget_ranking(m)
    if not isinstance(b, dict) or not rows:
        return
    from rich.table import Table

    promoted = sum(r.promoted for r in rows)
    table = Table(title=escape(f"budget {b.get('bits_per_weight')} bits per weight by {b.get('score')}: "
                               f"{promoted} of {len(rows)} units {'moved' if b.get('groups') else 'promoted'} "
                               f"({b.get('before')} -> {b.get('after')})"))
    for col in ("rank", "unit", "score", "became"):
        table.add_column(col, overflow="fold")
    for r in rows[:shown]:
        table.add_row(str(r.rank), escape(", ".join(r.modules)), f"{r.score:.4g}", r.became)
    out.print(table)
    if len(rows) > shown:
        print_line(f"({len(rows) - shown} more units ranked; rtnq inspect --json lists every tensor's score and rank)")
