"""Streaming safetensors writer: every byte at an offset planned before the first one is written.

The safetensors library has no streaming writer (it wants every tensor in memory at once), so rtnq
writes the format itself: an 8-byte little-endian header length, a JSON header padded with spaces to
a multiple of 8, then the tensors' bytes back to back in the planned order. Every name, dtype, shape
and offset is fixed before the first byte is written; `write` only checks that what arrives matches
the plan. Where the files go (a temporary sibling renamed into place) is rtnq.checkpoint.outdir.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rtnq.errors import OutputError
from rtnq import dtypes
from rtnq.numerics import buffers

HEADER_ALIGN = 8
WRITEBACK_BYTES = 32 * 1024 * 1024  # eager writeback: start the disk after this many new bytes


@dataclass(frozen=True)
class Entry:
    """One planned output tensor."""

    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = dtypes.BY_ST[self.dtype].itemsize
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


def raise_os(path: Path, e: OSError) -> None:
    if e.errno == errno.ENOSPC:
        raise OutputError(f"disk full while writing {path}; free space on that disk or choose another OUT") from None
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None


class ShardWriter:
    """Writes one safetensors file whose layout was fixed up front.

    Every tensor has its planned offset, so tensors may arrive in any order (conversion writes a
    shard's passthrough tensors first, see convert.run) and in parts (`write_part`); each must
    arrive whole and once, and `finish` refuses a file with a tensor missing.

    writeback, if given, is called as writeback(fd, offset, length) for every WRITEBACK_BYTES of new
    data, to start the disk on them early (see `start_writeback`) instead of leaving everything to the
    final fsync; conversion runs it on another thread, since it may wait for the disk. The bytes in
    the file are the same either way.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None, *,
                 writeback: Callable[[int, int, int], None] | None = None, digest: bool = False):
        self.path = Path(path)
        self.entries = entries
        head = header_bytes(entries, metadata)
        # digest: hash every tensor's bytes as they are written (parts arrive in order), so the journal gets the
        # file's DIGEST_KEY without reading the file back from the disk after its fsync.
        part_hash = PART_HASHES[DIGEST_KEY]
        self._hashes = {e.name: part_hash() for e in entries} if digest else None
        self._head_hash = part_hash(head).hexdigest() if digest else None
        self._by_name = {e.name: e for e in entries}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file offset, nbytes)
        offset = len(head)
        for e in entries:
            self._where[e.name] = (offset, e.nbytes)
            offset += e.nbytes
        self._written: dict[str, int] = {}  # name -> bytes written so far
        self._pos = len(head)  # the file position after the last write
        self._writeback = writeback
        self._unkicked = 0  # bytes written since the last writeback kick
        self._end = 0  # the end of the furthest byte written
        try:
            self._f = open(self.path, "wb")
            self._f.write(head)
        except OSError as e:
            raise_os(self.path, e)

    def write(self, name: str, tensor) -> None:
        """Write a planned tensor whole (a torch tensor, or a numpy array of the dtype's storage type,
        dtypes.DType.numpy); its name, dtype and shape must match the plan."""
        e = self._entry(name)
        if not buffers.holds(tensor, e.dtype) or tuple(tensor.shape) != e.shape:
            got = (name, buffers.dtype_of(tensor), tuple(tensor.shape))
            raise ValueError(f"{self.path.name}: expected {e.name} {e.dtype} {list(e.shape)}, got {got}")
        self.write_part(name, buffers.raw_bytes(tensor), whole=True)

    def write_part(self, name: str, data, *, whole: bool = False) -> None:
        """Append raw bytes (a uint8 array or tensor) to tensor `name`, right after its bytes written so far.

        Lets a large passthrough tensor stream through in chunks; whole=True requires `data` to be
        the entire tensor. A zero-length part of a zero-size tensor completes it.
        """
        self._entry(name)
        start, nbytes = self._where[name]
        done = self._written.get(name, 0)
        data = buffers.raw_bytes(data)
        n = data.size
        if (whole and (done or n != nbytes)) or done + n > nbytes or (done == nbytes and nbytes):
            raise ValueError(f"{self.path.name}: {name} needs {nbytes} bytes, got {done} + {n}")
        pos = start + done
        try:
            if n:
                # the hash runs on another thread while this one writes (both release the GIL): the write
                # often waits for the disk, and hashing after it would add its time to every piece's
                hashed = _hasher().submit(self._hashes[name].update, data) if self._hashes is not None else None
                try:
                    if pos != self._pos:
                        self._f.seek(pos)
                    self._f.write(memoryview(data))
                finally:
                    if hashed is not None:
                        hashed.result()
                self._pos = pos + n
                if self._writeback is not None:
                    self._unkicked += n
                    self._end = max(self._end, pos + n)
                    if self._unkicked >= WRITEBACK_BYTES:
                        self._kick()
        except OSError as err:
            raise_os(self.path, err)
        self._written[name] = done + n

    def _entry(self, name: str) -> Entry:
        e = self._by_name.get(name)
        if e is None:
            raise ValueError(f"{self.path.name}: unplanned tensor {name}")
        return e

    def _kick(self) -> None:
        """Hand everything written so far to `writeback`: new bytes start going to disk, and the pages
        of earlier kicks that reached it are dropped, so the next writes reuse them."""
        self._f.flush()
        self._writeback(self._f.fileno(), 0, self._end)
        self._unkicked = 0

    def digest(self) -> str:
        """The finished file's DIGEST_KEY digest (`combine`), from the bytes as written (needs digest=True)."""
        return combine(self._head_hash, [self._hashes[e.name].hexdigest() for e in self.entries])

    def close(self, sync: bool = True) -> None:
        """Finish the file; every planned tensor must have been written."""
        self.finish()
        if sync:
            self.sync_close()
        else:
            try:
                self._f.close()
            except OSError as e:
                raise_os(self.path, e)

    def finish(self) -> None:
        """Check that every planned tensor was written whole and flush (fsync and close are separate)."""
        for e in self.entries:
            if self._written.get(e.name, -1) != e.nbytes:
                self._f.close()
                raise ValueError(f"{self.path.name}: closed before {e.name} was written")
        try:
            self._f.flush()
        except OSError as e:
            raise_os(self.path, e)

    def sync_close(self) -> None:
        """fsync and close a finished file (may run on another thread than the writes)."""
        try:
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise_os(self.path, e)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()


@functools.cache
def _hasher() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtnq-hash")


class Crc32:
    """A running CRC-32 (zlib's) with hashlib's `update`/`hexdigest`, the journal's hash of a shard's parts.

    The journal guards against accidents: a shard torn, truncated or edited after a crash. CRC-32 catches
    any burst of up to 32 changed bits and all but 2**-32 of other changes, which is that job, at 3.7 GB/s
    against sha256's 1.6 on the development machine (issue 15: sha256 was a fifth of convert's CPU). Like
    hashlib, zlib releases the GIL on large buffers, so hashing overlaps the write."""

    __slots__ = ("value",)

    def __init__(self, data=b""):
        self.value = zlib.crc32(data)

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


# journal entry key -> the hash of each part (`combine`). Journals written before issue 15's last step hold
# sha256 "parts_digest"s; they are still checked as such.
PART_HASHES = {"parts_crc32": Crc32, "parts_digest": hashlib.sha256}
DIGEST_KEY = "parts_crc32"  # what ShardWriter.digest computes


def combine(header: str, tensors: list[str]) -> str:
    """A safetensors file's parts digest: sha256 of the hashes (PART_HASHES) of its header (length prefix and
    JSON) and of each tensor's bytes, in file order. Any changed byte changes a part's hash, as it would a
    hash of the whole file, but it can be computed while the tensors are written in any order
    (rtnq.checkpoint.journal.parts_digest reads it back from a file)."""
    return hashlib.sha256("".join([header, *tensors]).encode()).hexdigest()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a file range to disk without waiting for it to finish (best effort).

    POSIX_FADV_DONTNEED on Linux starts writeback of the range's dirty pages and drops the pages
    already clean, so the disk works while the CPU quantizes instead of all at the final fsync, and
    the page cache does not fill up with output: the next writes get recently freed pages, which
    are cheaper than fresh ones (on a VM much cheaper). It can block while the disk's queue is full.
    """
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def write_index(out_dir: Path, shards: list[tuple[str, list[Entry]]], name: str) -> None:
    """`model.safetensors.index.json` for a multi-shard output (nothing for a single file)."""
    if len(shards) < 2:
        return
    weight_map = {e.name: fname for fname, entries in shards for e in entries}
    total = sum(e.nbytes for _, entries in shards for e in entries)
    write_json(out_dir / name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """A small output file (config, manifest, index); a full disk or a permission is an OutputError."""
    try:
        path.write_text(text)
    except OSError as e:
        raise_os(path, e)
