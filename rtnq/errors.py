"""Every error rtnq raises on purpose, and the exit code each one maps to.

Library code raises these; only `rtnq.cli.main` turns them into a red line on stderr and an exit
code. The table below is the documented contract (README "Exit codes"); tests pin every code.
"""

from __future__ import annotations

import os


class RtnqError(Exception):
    """Base class: a failure with a message a user can act on."""

    exit_code = 1


class UsageError(RtnqError):
    """Bad flags or arguments: unknown option values, unmatched selectors, OUT exists, OUT in SRC."""

    exit_code = 2


class KernelUnavailable(RtnqError):
    """The CUDA library or a GPU is missing, or the library is the wrong ABI version."""

    exit_code = 3


class CheckpointError(RtnqError):
    """The source checkpoint is unreadable: truncated or corrupt safetensors, missing shards,
    unsupported dtypes, pickle-only directories, unknown manifest versions."""

    exit_code = 4


class InvalidWeightError(RtnqError):
    """A weight cannot be quantized: NaN or Inf values."""

    exit_code = 5


class ShapeError(RtnqError):
    """A shape the Marlin layout cannot hold (packing) or, under --strict, a gated tensor."""

    exit_code = 6


class VerifyMismatch(RtnqError):
    """`rtnq verify` found output bytes that differ from a fresh re-derivation."""

    exit_code = 7


class OutputError(RtnqError):
    """Writing the output failed (disk full, permissions); nothing was left behind."""

    exit_code = 8


class KernelError(RtnqError):
    """A CUDA kernel returned a failure status."""

    exit_code = 9


class Interrupted(RtnqError):
    """Ctrl-C during a conversion; the partial output was removed."""

    exit_code = 130


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        RtnqError,
        UsageError,
        KernelUnavailable,
        CheckpointError,
        InvalidWeightError,
        ShapeError,
        VerifyMismatch,
        OutputError,
        KernelError,
        Interrupted,
    )
}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what `timeout`, Slurm, `docker stop` and a closed ssh session send), raised in
    the main thread like Ctrl-C so every `finally` and atomic_dir cleanup runs the same way."""

    def __init__(self, signum: int, name: str):
        super().__init__(name)
        self.signum, self.name = signum, name


def report(exc: BaseException) -> tuple[str, int] | None:
    """The error boundary's policy, shared by `rtnq` (rtnq.cli.main) and `python -m rtnq.bench`: the one
    line to print after "error: " and the exit code, or None when the caller must re-raise (RTNQ_DEBUG=1
    wants the traceback; an exception rtnq did not raise on purpose is a bug and keeps its traceback)."""
    if isinstance(exc, Terminated):
        return f"terminated by {exc.name}; nothing partial was left behind", 128 + exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", Interrupted.exit_code
    if isinstance(exc, RtnqError) and not os.environ.get("RTNQ_DEBUG"):
        return str(exc), exc.exit_code
    return None
