"""Streaming safetensors writer and atomic output directories.

The safetensors library has no streaming writer (it wants every tensor in memory at once), so rtnq
writes the format itself: an 8-byte little-endian header length, a JSON header padded with spaces to
a multiple of 8, then the tensors' bytes back to back in the planned order. Every name, dtype, shape
and offset is fixed before the first byte is written; `write` only checks that what arrives matches
the plan. Outputs live in a temporary sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from rtnq.errors import OutputError, UsageError
from rtnq.source import DTYPES, TORCH_TO_ST

HEADER_ALIGN = 8


@dataclass(frozen=True)
class Entry:
    """One planned output tensor."""

    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def header_bytes(entries: list[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix plus the padded JSON header for `entries` laid out in order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for e in entries:
        if e.name in header or e.name == "__metadata__":
            raise ValueError(f"duplicate output tensor name {e.name}")
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def shard_size(entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    return len(header_bytes(entries, metadata)) + sum(e.nbytes for e in entries)


def _raise_os(path: Path, e: OSError) -> None:
    if e.errno == errno.ENOSPC:
        raise OutputError(f"disk full while writing {path}; free space on that disk or choose another OUT") from None
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


class ShardWriter:
    """Writes one safetensors file whose layout was fixed up front."""

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = entries
        self._next = 0
        try:
            self._f = open(self.path, "wb")
            self._f.write(header_bytes(entries, metadata))
        except OSError as e:
            _raise_os(self.path, e)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor; its name, dtype and shape must match the plan."""
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path.name}: unplanned tensor {name}")
        e = self.entries[self._next]
        got = (name, TORCH_TO_ST.get(tensor.dtype), tuple(tensor.shape))
        if got != (e.name, e.dtype, e.shape):
            raise ValueError(f"{self.path.name}: expected {e.name} {e.dtype} {list(e.shape)}, got {got}")
        self.write_raw(tensor.contiguous().view(torch.uint8).reshape(-1))

    def write_raw(self, data: torch.Tensor) -> None:
        """Append the next planned tensor as raw bytes (uint8, exactly its planned size)."""
        e = self.entries[self._next]
        if data.numel() != e.nbytes:
            raise ValueError(f"{self.path.name}: {e.name} needs {e.nbytes} bytes, got {data.numel()}")
        try:
            self._f.write(memoryview(data.numpy()))
        except OSError as err:
            _raise_os(self.path, err)
        self._next += 1

    def close(self, sync: bool = True) -> None:
        """Finish the file; every planned tensor must have been written."""
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            self._f.close()
            raise ValueError(f"{self.path.name}: closed before {missing} was written")
        try:
            self._f.flush()
            if sync:
                os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            _raise_os(self.path, e)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


def write_json(path: Path, obj: object) -> None:
    try:
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    except OSError as e:
        _raise_os(path, e)


def check_output_location(src: Path, out: Path, force: bool) -> None:
    """Refuse an OUT inside SRC (or equal to it), and an existing OUT unless forced."""
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise UsageError(f"output {out} is inside the source {src}; choose a directory outside it")
    if out_r in src_r.parents:
        raise UsageError(f"output {out} contains the source {src}; choose another directory")
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`; rename it to `out` only if the block completes.

    On any exception (including KeyboardInterrupt) the temporary directory is removed, so a failed
    or interrupted run leaves no OUT behind and an existing OUT (under --force) untouched.
    """
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.rtnq-tmp-", dir=out.parent))
    except OSError as e:
        _raise_os(out.parent, e)
    try:
        yield tmp
        if out.exists():
            if not force:
                raise UsageError(f"output {out} already exists; pass --force to replace it")
            # Move the old output aside first so OUT is never missing a complete version for long.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.rtnq-old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
