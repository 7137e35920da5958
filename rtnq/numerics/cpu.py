"""The C fast path on numpy arrays: loading `csrc/rtnq_cpu.c`'s library, and quantize + pack of row chunks.

Torch-free, so `rtnq convert` never imports torch when the library is built: the kernel takes raw
pointers, and numpy (without a bfloat16 type) holds bf16 as its uint16 bit patterns, fp16 as float16
(`dtypes.DType.numpy`). rtnq.numerics.fused is the torch face of the same function (tests, verify,
`quantize_pack`) and the torch reference that stands in for the library when it is absent, stale or
turned off (RTNQ_FASTPATH=0), or for the "mse" scale rule, which the kernel does not implement: it is
passed here as `tile`, so the chunk checks and the padding flow below are one code for both.

Layouts, the chunk rule and the padding flow are described in rtnq.numerics.fused.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from rtnq.errors import InvalidWeightError, ShapeError, UsageError
from rtnq.numerics import shape_rule
from rtnq.params import effective_group

ABI = 3
TILE = 16  # rtnq.numerics.marlin.TILE (that module imports torch): k rows per Marlin slab
ROW_ALIGN = 64  # rtnq.numerics.marlin.BLOCK_N: chunks start and end on Marlin blocks (the kernel's 64-row tiles)
LAYOUTS = ("marlin", "rows", "cols")  # the C kernel's layout codes 0, 1, 2
_DTYPE_CODE = {np.dtype(np.uint16): 0, np.dtype(np.float16): 1}  # bf16 (as bit patterns), fp16
_DTYPE_NAME = {0: "torch.bfloat16", 1: "torch.float16"}  # as the torch path's messages spell them
_HALF_MAX = {0: 3.3895313892515355e38, 1: 65504.0}  # largest finite bf16 / fp16
_FLAG_SCALAR = 1
_FLAG_MSE = 2  # the "mse" scale rule (rtn.py), in C bit for bit
PIECES_PER_THREAD = 4  # work units per thread and chunk (dynamic balance under CPU contention)

Tile = Callable[..., None]  # tile(w, row0, n, qweight, scales, bits, group_size, sums, name, layout_code)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled fast path, or None when it is not built or RTNQ_FASTPATH=0."""
    if os.environ.get("RTNQ_FASTPATH", "1") == "0":
        return None
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_cpu{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            _PROBLEM.append(f"{path.name} cannot be loaded ({e})")
            return None
        if lib.rtnq_cpu_abi() != ABI:  # built from another rtnq's source: rebuild, never call it
            _PROBLEM.append(f"{path.name} was built for another rtnq version (ABI {lib.rtnq_cpu_abi()}, "
                            f"this one needs {ABI})")
            return None
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        cint = ctypes.c_int
        lib.rtnq_quant_pack.argtypes = [ptr, i64, i64, i64, i64, cint, cint, i64, cint,
                                        ptr, ptr, ptr, ptr, cint]
        lib.rtnq_quant_pack.restype = cint
        return lib
    return None


_PROBLEM: list[str] = []  # why a library that exists was not used (set by `library`)


def problem() -> str | None:
    """A one-line warning when the C fast path exists but cannot be used, so conversion would silently
    run the ~20x slower torch reference; None when it is used, absent or turned off on purpose."""
    library()
    if not _PROBLEM:
        return None
    return (f"the C fast path {_PROBLEM[0]}; converting with the much slower torch reference. "
            "Reinstall rtnq (pip install -e . in its checkout) to rebuild it")


def implementation() -> str:
    """What quantizing will run: 'c-avx2', 'c-portable' or 'torch-reference'."""
    lib = library()
    if lib is None:
        return "torch-reference"
    return "c-avx2" if lib.rtnq_cpu_isa() == 2 else "c-portable"


@functools.cache
def workers() -> int:
    """Threads that share one chunk's rows (the CPUs this process may use, at most 8)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, workers() - 1), thread_name_prefix="rtnq-quant")


def layout_code(layout: str) -> int:
    try:
        return LAYOUTS.index(layout)
    except ValueError:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}") from None


def out_shapes(
    n: int, k: int, bits: int, group_size: int, layout: str = "marlin"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the qweight (int32) and scales of a logical (n, k) weight in `layout`: "marlin" stores
    it padded to shape_rule.padded(n, k) (channelwise keeps one scale group), "rows"/"cols" as is."""
    code = layout_code(layout)
    if code == 0:
        n, k = shape_rule.padded(n, k)
    groups = k // effective_group(k, group_size)
    if code == 0:
        return (k // TILE, n * TILE * bits // 32), (groups, n)
    words = k * bits // 32  # int32 words per W row, packed along k
    return ((n, words), (n, groups)) if code == 1 else ((words, n), (groups, n))


def relative_error(sums: list[float]) -> float:
    """||w - w_hat|| / ||w|| from the sums of `quantize_rows` (0.0 for an all-zero weight)."""
    if sums[0] == 0:
        return 0.0
    return math.sqrt(sums[1]) / math.sqrt(sums[0])


def check_scales(scales: np.ndarray, name: str) -> None:
    """rtnq.numerics.rtn.check_scales on bf16 bit patterns or fp16: the kernel keeps the reference's
    infinite scale when 2 * maxabs overflows the 16-bit dtype; the converter refuses such a weight."""
    code = _DTYPE_CODE[scales.dtype]
    bits = scales.view(np.uint16)
    exponent = 0x7F80 if code == 0 else 0x7C00  # all-ones exponent: inf or NaN
    if bits.size and ((bits & exponent) == exponent).any():
        raise InvalidWeightError(
            f"{name}: |w| reaches {_HALF_MAX[code] / 2:.4g} or more, so 2 * maxabs overflows the "
            f"{_DTYPE_NAME[code]} scale; "
            + ("quantize in bf16 (--dtype bf16) or --skip it" if code == 1 else "--skip it"))


def quantize_rows(
    w_rows: np.ndarray,
    row0: int,
    qweight: np.ndarray,
    scales: np.ndarray,
    bits: int,
    group_size: int,
    sums: list[float],
    *,
    name: str = "weight",
    layout: str = "marlin",
    tile: Tile | None = None,
    scalar: bool = False,
    scale: str = "absmax",
) -> None:
    """Quantize rows [row0, row0 + R) of an (n, k) weight into its whole-tensor outputs in `layout`.

    w_rows: (R, k) bf16 (uint16 bit patterns) or fp16, the dtype the arithmetic runs in; row0 a multiple
    of 64, R too except for the tensor's last chunk. qweight int32 and scales (w_rows' dtype): the whole
    tensor's, shaped as `out_shapes` says, C-contiguous; only this chunk's part is written.
    sums: [sum w^2, sum (w - w_hat)^2], added to. tile: the kernel for one chunk on the 64 x 128 tiles
    (rtnq.numerics.fused's torch reference); None runs the C library, which must then be built.
    scalar: the library's portable loop instead of AVX2 (tests). scale: the C library's scale rule, "absmax" or
    "mse" (rtn.quantize's; a `tile` brings its own).
    Raises InvalidWeightError naming `name` on NaN/Inf.
    """
    code = layout_code(layout)
    rows, k = w_rows.shape
    n = scales.shape[0] if code == 1 else scales.shape[1]  # "marlin": the padded n
    if w_rows.dtype not in _DTYPE_CODE or scales.dtype != w_rows.dtype or qweight.dtype != np.int32:
        raise ShapeError(f"{name}: fast path needs 16-bit rows and scales and int32 qweight")
    if group_size != -1 and k % group_size:
        raise ShapeError(f"{name}: k={k} is not a multiple of the group size {group_size}")
    if code != 0 and k % shape_rule.PACK:
        raise ShapeError(f"{name}: k={k} is not a multiple of {shape_rule.PACK} (codes are packed along k)")
    if (tuple(qweight.shape), tuple(scales.shape)) != out_shapes(n, k, bits, group_size, layout):
        raise ShapeError(
            f"{name}: output buffers {tuple(qweight.shape)}, {tuple(scales.shape)} do not fit n={n}, k={k}"
            f" in the {layout} layout"
        )
    rows_p = -(-rows // ROW_ALIGN) * ROW_ALIGN
    # a short chunk must be the tensor's last: it ends at n (at the padded n in the Marlin layout)
    end = row0 + (rows_p if code == 0 else rows)
    if row0 % ROW_ALIGN or end > n or (rows != rows_p and end != n):
        raise ShapeError(f"{name}: row chunk [{row0}, {row0 + rows}) is not a run of 64-row blocks of n={n}")
    lib = None
    if tile is None:
        lib = library()
        if lib is None:
            raise RuntimeError("the rtnq C fast path is not built (pip install the package with a C compiler)")
        if not (qweight.flags.c_contiguous and scales.flags.c_contiguous):
            raise ShapeError(f"{name}: the C fast path writes contiguous qweight and scales only")

        if scale not in ("absmax", "mse"):
            raise UsageError(f"scale rule must be absmax or mse, got {scale!r}")

        def tile(w, r0, n_, q, s, bits_, g_, sums_, name_, code_):
            _c_tile(lib, w, r0, n_, q, s, bits_, g_, sums_, name_, code_, scalar, scale == "mse")

    k_p = shape_rule.padded(1, k)[1]
    if rows == 0:
        return
    if rows_p == rows and k_p == k and n % ROW_ALIGN == 0:  # on the kernel's tiles: straight in
        tile(w_rows, row0, n, qweight, scales, bits, group_size, sums, name, code)
        return
    # Off the tiles: zero-pad to whole 64 x 128 tiles (zeros add nothing to the sums, and quantize to the
    # bias code with scale 0 in all-zero groups, which is what marlin.pad stores).
    w_p = np.zeros((rows_p, k_p), dtype=w_rows.dtype)
    w_p[:rows, :k] = w_rows
    if code == 0:  # the outputs are already padded: their padding rows/columns come out bias / 0
        tile(w_p, row0, n, qweight, scales, bits, group_size, sums, name, code)
        return
    qshape, sshape = out_shapes(rows_p, k_p, bits, group_size, layout)
    q_p = np.empty(qshape, dtype=np.int32)
    s_p = np.empty(sshape, dtype=scales.dtype)
    tile(w_p, 0, rows_p, q_p, s_p, bits, group_size, sums, name, code)
    words = k * bits // 32  # whole words: the padding columns sit at the end of each row
    groups = 1 if group_size == -1 else k // group_size
    if code == 1:
        qweight[row0 : row0 + rows] = q_p[:rows, :words]
        scales[row0 : row0 + rows] = s_p[:rows, :groups]
    else:
        qweight[:, row0 : row0 + rows] = q_p[:words, :rows]
        scales[:, row0 : row0 + rows] = s_p[:groups, :rows]


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _c_tile(lib, w_rows, row0, n, qweight, scales, bits, group_size, sums, name, code, scalar=False,
            mse=False) -> None:
    """One chunk on the kernel's tiles (rows, row0, n multiples of 64, k of 128) into outputs of
    `out_shapes(n, k, ...)`, by the C library, its rows split across the CPUs."""
    rows, k = w_rows.shape
    w_rows = np.ascontiguousarray(w_rows)
    g = effective_group(k, group_size)
    flags = (_FLAG_SCALAR if scalar else 0) | (_FLAG_MSE if mse else 0)
    dtype_code = _DTYPE_CODE[w_rows.dtype]
    w_ptr, q_ptr, s_ptr = _address(w_rows), _address(qweight), _address(scales)
    # Pieces of a few 64-row blocks, pulled by every thread (this one included) until none are
    # left: a thread that loses its core to another process holds up at most one small piece.
    blocks = rows // ROW_ALIGN
    threads = min(workers(), blocks)
    pieces = min(blocks, PIECES_PER_THREAD * threads)
    bounds = [ROW_ALIGN * (blocks * i // pieces) for i in range(pieces + 1)]
    todo = iter(range(pieces))
    lock = threading.Lock()

    def run() -> list[tuple[int, int, float, float]]:
        done = []
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return done
            lo, hi = bounds[i], bounds[i + 1]
            acc = (ctypes.c_double * 2)(0.0, 0.0)
            bad = ctypes.c_int64(-1)
            rc = lib.rtnq_quant_pack(w_ptr + lo * k * 2, hi - lo, k, n, row0 + lo, dtype_code, bits, g, code,
                                     q_ptr, s_ptr, acc, ctypes.byref(bad), flags)
            done.append((i, rc, acc[0], acc[1]))

    futures = [_pool().submit(run) for _ in range(threads - 1)]
    # in piece order, whichever thread ran a piece: the sums are then the same in every run and layout
    results = sorted(run() + [r for f in futures for r in f.result()])
    for _, rc, _, _ in results:
        if rc == 1:
            raise InvalidWeightError(f"{name}: weight contains NaN or Inf values; fix the checkpoint before quantizing")
        if rc != 0:
            raise ShapeError(f"{name}: the C fast path refused shape ({rows}, {k}) with group {g}")
    for _, _, a, b in results:
        sums[0] += a
        sums[1] += b
