"""The output directory: refused where it would clobber the source, written as a temporary sibling
and renamed into place only when complete (DESIGN.md section 4).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from rtnq.checkpoint import journal
from rtnq.checkpoint.writer import raise_os
from rtnq.errors import UsageError

TMP_INFIX = ".rtnq-tmp-"  # .OUT.rtnq-tmp-XXXX: hidden, and named after OUT so a user can tell what it was


def check_output_location(src: Path, out: Path, force: bool) -> None:
    """Refuse an OUT inside SRC (or equal to it), an existing OUT unless forced, and OUTs that could only
    fail after the whole conversion: a symbolic link (the rename would replace the link, not write where it
    points), the current directory or one above it (a directory in use cannot be renamed away)."""
    if out.is_symlink():
        target = os.readlink(out)
        state = "a dangling symbolic link" if not out.exists() else "a symbolic link"
        raise UsageError(f"output {out} is {state} (to {target}); pass the directory itself, e.g. {out.resolve()}")
    src_r, out_r = src.resolve(), out.resolve()
    cwd = Path.cwd().resolve()
    if out_r == cwd or out_r in cwd.parents:
        raise UsageError(f"output {out} is the current directory or contains it; rtnq replaces OUT as a whole, "
                         "so run it from elsewhere or choose a new directory")
    if out_r == src_r or src_r in out_r.parents:
        raise UsageError(f"output {out} is inside the source {src}; choose a directory outside it")
    if out_r in src_r.parents:
        raise UsageError(f"output {out} contains the source {src}; choose another directory")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")


def stale_temporaries(out: Path, exclude: Path | None = None) -> list[str]:
    """One line per temporary directory an earlier run for `out` left behind (killed with SIGKILL or by
    a power loss, which no handler sees): where and how big, and whether `--resume` can continue it, so
    it is reported rather than left to pile up. `exclude`: the one being resumed now."""
    out = Path(out)
    lines = []
    try:
        found = sorted(p for p in out.parent.glob(f".{out.name}.rtnq-*") if p.is_dir() and p != exclude)
    except OSError:
        return []
    for p in found:
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        head = f"{p} ({size / 1e6:.1f} MB) is left from an interrupted run for {out.name}; "
        done = journal.completed_count(p) if TMP_INFIX in p.name else None
        if done is None:
            lines.append(head + f"rtnq does not reuse it: remove it (rm -r '{p}')")
        else:
            lines.append(head + f"`rtnq convert ... --resume` continues it ({journal.count(done)} complete), "
                                f"or remove it (rm -r '{p}')")
    return lines


def resumable(out: Path) -> Path:
    """The one temporary directory of an interrupted run for `out` that holds a journal (--resume)."""
    out = Path(out)
    try:
        found = sorted(p for p in out.parent.glob(f".{out.name}{TMP_INFIX}*")
                       if p.is_dir() and journal.has_journal(p))
    except OSError:
        found = []
    if not found:
        raise UsageError(f"nothing to resume for {out}: no {out.parent / ('.' + out.name + TMP_INFIX)}* directory "
                         f"holding a {journal.JOURNAL_NAME}; convert without --resume")
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise UsageError(f"several interrupted runs for {out} ({names}); remove all but the one to continue "
                         f"(rm -r DIR), then --resume again")
    if journal.in_use(found[0]):
        raise UsageError(f"{found[0]} is in use by a running rtnq convert; wait for it or stop it first")
    return found[0]


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, reuse: Path | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block completes.

    On any exception (including KeyboardInterrupt) the temporary directory is removed, so a failed
    or interrupted run leaves no OUT behind and an existing OUT (under --force) untouched.
    reuse: an interrupted run's temporary directory to continue (--resume) instead of a new one; it is
    removed on failure like a new one (Ctrl-C means "stop and clean up", as in any other run).
    """
    out = Path(out)
    created = _missing_parents(out)
    tmp: Path | None = None
    try:
        if reuse is not None:
            tmp = Path(reuse)
        else:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                for attempt in range(100):
                    # Named before it exists: SIGTERM/SIGHUP/Ctrl-C raise between any two bytecodes, and one that
                    # lands right after the mkdir must still find the directory in `tmp` to remove it (with
                    # tempfile.mkdtemp the path is only known once it returns; under load that window was hit).
                    tmp = out.parent / f".{out.name}{TMP_INFIX}{secrets.token_hex(4)}"
                    try:
                        os.mkdir(tmp, 0o777)  # the mode mkdir gives OUT (umask applied); mkdtemp's is 0700
                        break
                    except FileExistsError:
                        tmp = None  # someone else's: never removed
                else:
                    raise FileExistsError(f"no free name for a temporary directory beside {out}")
            except OSError as e:
                raise_os(out.parent, e)
        yield tmp
        if out.exists():
            if not force:
                raise UsageError(f"output {out} already exists; pass --force to replace it")
            # Move the old output aside first so OUT is never missing a complete version for long.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.rtnq-old-", dir=out.parent))
            _rename(out, old / "x")
            _rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _rename(a: Path, b: Path) -> None:
    try:
        os.replace(a, b)
    except OSError as e:
        raise_os(b, e)


def _missing_parents(out: Path) -> list[Path]:
    """OUT's ancestors that do not exist yet, deepest first: created for the run, removed if it fails."""
    missing = []
    p = out.absolute().parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first; rmdir leaves any a concurrent process put something in
        try:
            d.rmdir()
        except OSError:
            return
