"""Source checkpoints: parse safetensors headers, validate them, and read one tensor at a time.

Nothing here maps or holds a whole shard. `scan` reads only the headers. `Reader.read` reads one
tensor with plain file I/O into a fresh torch tensor (verify, tests); `Reader.read_into` reads part of
one into a caller's reused buffer; `Reader.map_array` maps just one chunk of a tensor for as long as it
is in use, which is what conversion does, a few chunks at a time (numpy: conversion runs without torch;
`map_range` is the same as a torch tensor); torch is imported only by the methods that return tensors.
Mapped pages count towards RSS until unmapped, so chunks are unmapped as soon as the quantizer or
writer drops them: peak memory stays at a few chunks regardless of the model size. Pickle checkpoints
(`.bin`, `.pt`) are refused, never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import reprlib
import stat
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtnq import dtypes
from rtnq.checkpoint import jsonfile
from rtnq.checkpoint.layout import INDEX_NAME, index_map, resolve, shard_files
from rtnq.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library enforces too
U64_MAX = 2**64 - 1  # safetensors reads shapes and offsets as 64-bit unsigned integers and refuses larger ones
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python names it from 3.12



@dataclass(frozen=True)
class TensorSpec:
    """One tensor as described by its shard's header. No weight bytes are read to build it."""

    name: str
    dtype: str  # safetensors spelling: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    shard: str  # file name inside the model directory
    offset: int  # absolute byte offset of the data in the shard file
    nbytes: int

    @property
    def torch_dtype(self):
        """The torch.dtype (imports torch)."""
        return dtypes.BY_ST[self.dtype].torch

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _NegativeZero(int):
    """`-0` in a header: Python decodes it as the integer 0, the safetensors library as the float -0.0, which it
    refuses as a shape or an offset. Marked so the strict integer check refuses it too."""

    def __repr__(self) -> str:
        return "-0"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 4, 3, 40, 40


def _brief(value) -> str:
    """A header value for an error line: a repr (escapes newlines) bounded in length, however big the value."""
    return _SHORT.repr(value)


def _name(name: str) -> str:
    """A tensor name or dtype for an error line: as is when printable, else escaped (one line stays one line)."""
    shown = name if name.isprintable() else repr(name)[1:-1]
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _parse_header(path: Path) -> tuple[dict, int, int]:
    """Return (header dict, data start offset, file size) for one shard, checking sizes before trusting them."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait forever for a writer; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(f"{path}: {_kind(st.st_mode)}, not a safetensors file; replace it with the "
                                      "shard it stands for")
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path.name}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); the file is corrupt"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path.name}: header claims {n} bytes but the file has {size}; the file is truncated"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path.name}: the safetensors header is not valid JSON (not UTF-8 at byte {e.start}); "
                              "the file is corrupt") from None
    header = jsonfile.loads(text, f"{path.name}: safetensors header")
    if "-0" in text:  # rare (a name like "layers-0" matches too): decode again, marking negative zeros
        header = json.loads(text, parse_int=lambda t: _NegativeZero(0) if t == "-0" else int(t))
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is not a JSON object; the file is corrupt")
    return header, 8 + n, size


def _u64(value) -> bool:
    # type() rather than isinstance: True is an int to Python but not a number to safetensors (nor is -0)
    return type(value) is int and 0 <= value <= U64_MAX


def _numel(shape: list[int]) -> int | None:
    """The element count, or None where safetensors' 64-bit running product overflows (it multiplies in order,
    so [2**63, 2**63, 0] overflows before the 0 makes it empty, and the file is refused)."""
    n = 1
    for d in shape:
        n *= d
        if n > U64_MAX:
            return None
    return n


def _spec(path: Path, name: str, info, start: int, data_size: int) -> TensorSpec:
    """One header entry, validated by the rules the safetensors library applies (so rtnq never accepts a file
    the library, and so every loader, refuses), then the ones rtnq adds (known dtypes)."""
    where = f"{path.name}: tensor {_name(name)}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: its header entry is {_brief(info)}, not an object; the header is corrupt")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CheckpointError(f"{where}: its header entry has no {key!r}; the header is corrupt")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {_brief(dtype)} is not a string; the header is corrupt")
    if dtype not in dtypes.BY_ST:
        raise CheckpointError(f"{where} has dtype {_name(dtype)}, which rtnq cannot read "
                              f"(supported: {', '.join(dtypes.BY_ST)})")
    if not isinstance(shape, list) or not all(_u64(d) for d in shape):
        raise CheckpointError(f"{where}: shape {_brief(shape)} is not a list of integers >= 0; the header is corrupt")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {_brief(offsets)} is not a pair of integers >= 0; "
                              "the header is corrupt")
    numel = _numel(shape)
    itemsize = dtypes.BY_ST[dtype].itemsize
    if numel is None or numel * itemsize * 8 > U64_MAX:  # safetensors counts bits in 64 bits
        raise CheckpointError(f"{where}: shape {_brief(shape)} has more elements than a 64-bit count holds; "
                              "the header is corrupt")
    begin, end = offsets
    if begin > end or end - begin != numel * itemsize:
        raise CheckpointError(f"{where} has data offsets [{begin}, {end}] that do not fit its shape "
                              f"{_brief(shape)} and dtype {dtype}; the header is corrupt")
    if end > data_size:
        raise CheckpointError(f"{where} ends at byte {end} of the data but the file holds only {data_size}; "
                              "the file is truncated")
    return TensorSpec(name, dtype, tuple(shape), path.name, start + begin, end - begin)


def scan_shard(path: Path) -> list[TensorSpec]:
    """Specs of every tensor in one shard, in file order; validates dtypes, shapes and offsets."""
    return scan_shard_metadata(path)[0]


def scan_shard_metadata(path: Path) -> tuple[list[TensorSpec], dict[str, str] | None]:
    """`scan_shard`, and the header's `__metadata__` (None when it has none), from one read of the header."""
    header, start, size = _parse_header(path)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path.name}: __metadata__ is {_brief(meta)}, not a map of strings to strings "
                              "(safetensors refuses anything else); the header is corrupt")
    specs = [_spec(path, name, info, start, size - start) for name, info in header.items() if name != "__metadata__"]
    # The data must be exactly the tensors' bytes, back to back: safetensors refuses overlaps, gaps and bytes past
    # the last tensor, and a reader that accepted them could hand a loader a file it cannot open.
    specs.sort(key=lambda s: (s.offset, s.nbytes))
    pos, prev = start, None
    for s in specs:
        if s.offset < pos:
            raise CheckpointError(f"{path.name}: tensors {_name(prev.name)} and {_name(s.name)} "
                                  "overlap; the header is corrupt")
        if s.offset > pos:
            raise CheckpointError(f"{path.name}: {s.offset - pos} byte(s) before tensor {_name(s.name)} belong "
                                  "to no tensor (safetensors refuses gaps); the header is corrupt")
        pos, prev = s.offset + s.nbytes, s
    if pos != size:
        raise CheckpointError(f"{path.name}: {size - pos} byte(s) after the last tensor belong to no tensor "
                              "(safetensors refuses such files); the file is corrupt or was appended to")
    return specs, meta


def scan(src: str | Path) -> list[TensorSpec]:
    """Every tensor of the checkpoint, in file order (shard by shard), from the headers only."""
    model_dir = resolve(src)
    specs: list[TensorSpec] = []
    seen: dict[str, str] = {}
    for shard in shard_files(model_dir):
        for spec in scan_shard(model_dir / shard):
            if spec.name in seen:
                raise CheckpointError(f"tensor {_name(spec.name)} appears in both {seen[spec.name]} and {shard}")
            seen[spec.name] = shard
            specs.append(spec)
    weight_map = index_map(model_dir)
    if weight_map is not None:  # an index naming a tensor its shard lacks: refused, never dropped silently
        for name, shard in weight_map.items():
            if seen.get(name) != shard:
                where = f"it is in {seen[name]}" if name in seen else "no shard holds it"
                raise CheckpointError(f"{INDEX_NAME} places {_name(name)} in {_name(shard)}, but {where}; the index does not "
                                      "match the shards, fix it")
    return specs


@functools.cache
def _madvise():
    """libc's madvise through ctypes, which (unlike mmap.madvise) lets other threads run meanwhile."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _populate(addr: int, length: int) -> None:
    """Pre-fault a mapping's page tables (MADV_POPULATE_READ); best effort, e.g. before Linux 5.14."""
    fn = _madvise()
    if fn is not None:
        fn(addr, length, MADV_POPULATE_READ)


class Reader:
    """Reads tensors by spec with plain file I/O, one open handle per shard."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    def read_bytes(self, spec: TensorSpec):
        """The tensor's raw bytes as a fresh uint8 torch tensor."""
        import torch

        buf = torch.empty(spec.nbytes, dtype=torch.uint8)
        self.read_into(spec, buf)
        return buf

    def read_array(self, spec: TensorSpec) -> np.ndarray:
        """The tensor's raw bytes as a fresh uint8 numpy array."""
        buf = np.empty(spec.nbytes, dtype=np.uint8)
        self.read_into(spec, buf)
        return buf

    def read_into(self, spec: TensorSpec, buf, start: int = 0) -> None:
        """Fill `buf` (contiguous uint8, a numpy array or torch tensor) with the tensor's bytes
        [start, start + len(buf)).

        Plain preadv into the caller's buffer: no mapping, no fresh allocation, safe to call from
        another thread than the one that opened the file (the GIL is released while reading).
        """
        view = memoryview(buf if isinstance(buf, np.ndarray) else buf.numpy())
        nbytes = view.nbytes
        if start < 0 or start + nbytes > spec.nbytes:
            raise ValueError(f"{spec.name}: bytes [{start}, {start + nbytes}) outside its {spec.nbytes}")
        f = self._file(spec.shard)
        got = 0
        while got < nbytes:
            n = os.preadv(f.fileno(), [view[got:]], spec.offset + start + got)
            if n == 0:
                raise CheckpointError(f"{spec.shard}: file ended while reading tensor {spec.name}; it is truncated")
            got += n

    def map_array(self, spec: TensorSpec, start: int, nbytes: int) -> np.ndarray:
        """Bytes [start, start + nbytes) of a tensor as a uint8 array, mapped from the page cache (no copy).

        Only that range is mapped (from the page boundary below it), private and pre-faulted here
        (MADV_POPULATE_READ) so whoever reads it takes no page faults; it is unmapped when the
        returned array and its views are gone, so the mapped bytes count towards RSS only while
        they are in use: a few chunks, never a shard. The range is checked against the file's
        current size first (touching a mapping past the end of a file is a crash, not an error).
        """
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        f = self._file(spec.shard)
        pos = spec.offset + start
        if start < 0 or start + nbytes > spec.nbytes or pos + nbytes > os.fstat(f.fileno()).st_size:
            raise CheckpointError(f"{spec.shard}: file ended while reading tensor {spec.name}; it is truncated")
        if hasattr(os, "posix_fadvise"):  # a cold file: one large async read instead of page faults
            os.posix_fadvise(f.fileno(), pos, nbytes, os.POSIX_FADV_WILLNEED)
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        mm = mmap.mmap(f.fileno(), pos + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
        a = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=pos - base)
        _populate(a.__array_interface__["data"][0] - (pos - base), pos + nbytes - base)
        return a

    def map_range(self, spec: TensorSpec, start: int, nbytes: int):
        """`map_array` as a uint8 torch tensor (the same mapping, no copy)."""
        import torch

        return torch.from_numpy(self.map_array(spec, start, nbytes))

    def _file(self, shard: str):
        with self._lock:
            f = self._files.get(shard)
            if f is None:
                f = self._files[shard] = open(self.model_dir / shard, "rb", buffering=0)
            return f

    def close_shard(self, shard: str) -> None:
        """Close one shard's handle (a hub source deletes each staged shard once read; an open handle would
        keep its blocks allocated). A later read opens it again."""
        with self._lock:
            f = self._files.pop(shard, None)
        if f is not None:
            f.close()

    def read(self, spec: TensorSpec):
        """The tensor with its dtype and shape (a torch tensor)."""
        return self.read_bytes(spec).view(spec.torch_dtype).reshape(spec.shape)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_reader(model_dir: str | Path, rotation=None) -> Reader:
    """A Reader of MODEL_DIR, or under --rotate of its rotated form (rotation: a commands.rotate.Rotation,
    whose `reader` gives a RotatedReader): convert, the budget's scorer and verify read the source through it."""
    return Reader(model_dir) if rotation is None else rotation.reader(model_dir)
