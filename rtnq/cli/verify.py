"""`rtnq verify`: re-derive every output tensor from the source and compare bytes."""

from __future__ import annotations

from typing import Annotated

import typer

from rtnq.cli.app import JsonOpt, app, err
from rtnq.cli.output import emit_json

@app.command()
def verify(
    out_dir: Annotated[str, typer.Argument(help="A directory written by `rtnq convert`.")],
    against: Annotated[str, typer.Option("--against", help="The source model directory it was converted from.")],
    json_out: JsonOpt = False,
) -> None:
    """Re-derive every output tensor from the source and check the bytes are identical."""
    from rtnq.commands import verify as ver
    from rtnq.errors import VerifyMismatch

    checks = ver.verify(out_dir, against)
    bad = [c for c in checks if not c.ok]
    if json_out:
        emit_json({"ok": not bad, "checked": len(checks), "mismatches": len(bad),
                             "tensors": [c.__dict__ for c in checks]})
    else:
        from rich.table import Table

        table = Table(title=f"verify {out_dir} against {against}")
        for col in ("tensor", "kind", "result", "rel. error"):
            table.add_column(col)
        for c in checks:
            result = "[green]identical[/]" if c.ok else f"[red]{c.detail}[/]"
            table.add_row(c.name, c.kind, result, "" if c.error is None else f"{c.error:.2e}")
        err.print(table)
    if bad:
        raise VerifyMismatch(f"{len(bad)} of {len(checks)} tensors differ, first: {bad[0].name} ({bad[0].detail})")
    if not json_out:
        err.print(f"[green]ok:[/] all {len(checks)} tensors match", highlight=False)


