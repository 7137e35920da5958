"""Run the real `rtnq` entry point (rtnq.cli:main) in-process or as a subprocess."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rtnq import cli


@dataclass
class Run:
    code: int
    out: str
    err: str


def run(*args: str | Path) -> Run:
    """`rtnq ARGS` through cli.main(), the function the console script calls."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["rtnq", *map(str, args)]
    code = 0
    cli.err.file = err  # rich Console bound at import time; point it at the capture
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
        cli.err.file = sys.stderr
    return Run(code, out.getvalue(), err.getvalue())


def run_process(*args: str | Path, env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`rtnq ARGS` as a separate process (the installed console script's module); `timeout` bounds a
    case that used to hang."""
    return subprocess.run(
        [sys.executable, "-m", "rtnq.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def leftovers(parent: Path) -> list[str]:
    """Temporary output directories the converter would leave behind on failure."""
    return [p.name for p in Path(parent).iterdir() if ".rtnq-tmp-" in p.name or ".rtnq-old-" in p.name]


def fail_writes_with_enospc(monkeypatch, at: int = 5) -> None:
    """Make the `at`-th write to any output shard fail with ENOSPC, as a full disk would."""
    import errno

    from rtnq.checkpoint import writer

    real_init = writer.ShardWriter.__init__
    calls = {"n": 0}

    class FullDisk:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            calls["n"] += 1
            if calls["n"] == at:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self._f = FullDisk(self._f)

    monkeypatch.setattr(writer.ShardWriter, "__init__", init)


def load_tensors(path: Path) -> dict:
    """Every tensor of every .safetensors file in a directory, read with the safetensors library."""
    from safetensors import safe_open

    tensors = {}
    for p in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors
