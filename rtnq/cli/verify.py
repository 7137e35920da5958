"""`rtnq verify`: check OUT loads as what `rtnq convert` writes from SRC (rtnq.commands.verify)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

import typer
from rich.markup import escape

from rtnq.cli.app import JsonOpt, app, err, out
from rtnq.cli.output import emit_json


@app.command()
def verify(
    out_dir: Annotated[str, typer.Argument(help="A directory written by `rtnq convert`.")],
    against: Annotated[str, typer.Option("--against", help="The source model directory it was converted from.")],
    show_all: Annotated[bool, typer.Option("--all", help="List every tensor, not only the ones that differ.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check OUT loads as what convert writes from SRC: config.json, shards and index, every tensor's bytes."""
    from rtnq.commands import verify as ver
    from rtnq.errors import VerifyMismatch

    checks = _run_with_progress(ver, out_dir, against)
    bad = [c for c in checks if not c.ok]
    if json_out:
        emit_json({"ok": not bad, "checked": len(checks), "mismatches": len(bad),
                   "tensors": [c.__dict__ for c in checks]})
    else:
        # A thousand "identical" rows would bury the one that matters: by default only failures.
        rows = checks if show_all else bad
        if rows:
            _print_table(rows, f"verify {out_dir} against {against}")
        # config/layout/manifest rows exist only where something failed: the counts are of tensors.
        tensors = [c for c in checks if c.kind not in ver.FILE_KINDS]
        kinds = Counter(c.kind for c in tensors)
        by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        if bad:
            more = "" if show_all else "; --all lists every tensor"
            files = Counter(c.kind for c in checks if c.kind in ver.FILE_KINDS)
            _status("[red]FAILED:[/]", _failed(tensors, files, by_kind) + more)
        else:
            _status("[green]ok:[/]", f"all {len(checks)} tensors match" + (f" ({by_kind})" if checks else ""))
    if bad:
        raise VerifyMismatch(_error_line(bad, checks, ver.FILE_KINDS, out_dir, against))


def _failed(tensors, files: Counter, by_kind: str) -> str:
    """The summary line: how many tensors differ, then the file problems (config, layout, manifest)."""
    bad_tensors = [c for c in tensors if not c.ok]
    text = f"{len(bad_tensors)} of {len(tensors)} tensors differ ({by_kind} checked)"
    if files:
        if not bad_tensors:
            text = f"the bytes of all {len(tensors)} tensors match ({by_kind})"
        text += "; " + ", ".join(f"{n} {k} problem{'s' * (n > 1)}" for k, n in sorted(files.items()))
    return text


def _error_line(bad, checks, file_kinds, out_dir: str, against: str) -> str:
    first = f"first: {bad[0].name} ({bad[0].detail})"
    if any(c.kind in file_kinds for c in bad):  # the output does not load as convert wrote it
        more = f" (and {len(bad) - 1} more problems)" if len(bad) > 1 else ""
        return f"{bad[0].name}: {bad[0].detail}{more}"
    # Every tensor differing, with names and shapes that matched, means "not this source's weights".
    hint = f"; is {against} the checkpoint {out_dir} was converted from?" if len(bad) == len(checks) > 1 else ""
    return f"{len(bad)} of {len(checks)} tensors differ, {first}{hint}"


def _status(label: str, text: str) -> None:
    out.print(f"{label} {escape(text)}", highlight=False, soft_wrap=True)


def _run_with_progress(ver, out_dir: str, against: str):
    if not err.is_terminal:
        return ver.verify(out_dir, against)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("verify", total=None)
        return ver.verify(out_dir, against, lambda done, total: bar.update(task, completed=done, total=total))


def _print_table(checks, title: str) -> None:
    from rich.table import Table

    table = Table(title=escape(title))
    table.add_column("tensor", overflow="fold")  # whole names, folded on a narrow terminal, never cut
    for col in ("kind", "result", "rel. error"):
        table.add_column(col)
    for c in checks:
        result = "[green]identical[/]" if c.ok else f"[red]{escape(c.detail)}[/]"
        table.add_row(escape(c.name), c.kind, result, "" if c.error is None else f"{c.error:.2e}")
    out.print(table)
