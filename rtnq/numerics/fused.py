"""Fused quantize + pack for conversion: rtn.quantize, rtn.relative_error and a packer in one pass.

`quantize_rows` writes a run of a weight's rows straight into the qweight and scales of the whole
tensor, in one of three layouts (LAYOUTS), and returns the two sums behind the relative error:

* "marlin": qweight int32 (k/16, n*16*bits/32) and scales (k/g, n) Marlin-permuted (marlin.pack);
* "rows" (compressed-tensors): qweight int32 (n, k*bits/32) = kpack.pack_rows(codes), scales (n, k/g);
* "cols" (GPTQ): qweight int32 (k*bits/32, n) = kpack.pack_cols(codes), scales (k/g, n).

The codes, the scale values and the error sums are the same in every layout; "rows" and "cols"
store the scales plain (not permuted). The implementations give the same bytes
(tests/test_fastpath.py and, off the tiles, test_fastpath_padded.py check each against
rtn.quantize + marlin.pack / kpack):

* the C library built from csrc/rtnq_cpu.c by `pip install` (rtnq/numerics/_cpu*.so, loaded with ctypes;
  AVX2 + F16C + FMA when the CPU has them, portable C otherwise), called without the GIL so the
  rows of one chunk are split across the CPU's cores;
* the readable reference, per chunk: `rtn.quantize` -> `rtn.dequantize` -> `marlin.pack` or
  `kpack.pack_rows` / `pack_cols`, used when the library is missing (no compiler at install time,
  another CPU architecture) or when RTNQ_FASTPATH=0.

The scale rule (rtn.SCALE_RULES) is chosen with `scale`. The C kernel implements "absmax" only, so
scale="mse" always runs the torch reference (`_torch_rows` -> rtn.quantize(scale="mse")), whatever
library is built; asking for backend "c" or "c-scalar" with it is a UsageError. The padding below is
the same for both rules: padded zeros leave a group's maxabs (hence every clip and scale) unchanged,
quantize to q = 0 whatever the scale, and dequantize to exact zeros; all-zero groups stay scale 0.

A row chunk is independent of every other chunk because groups run along k inside one row. A chunk
of 64-row multiples owns whole Marlin blocks: columns [row0 * bits / 2, ...) of every qweight row
and columns [row0, ...) of the permuted scales (64- and 32-entry permutations never cross it). In
the "rows" layout it owns rows [row0, ...) of both outputs, in the "cols" layout columns [row0, ...).

Shapes off the kernel's tiles (n % 64, k % 128; any shape shape_rule.problem allows) take one
padding flow in front of either backend, because the kernel (and marlin.pack) only tile whole
64 x 128 blocks: the chunk is zero-padded to (64-row multiple, shape_rule.padded k). Zeros add 0 to
both error sums and quantize to the bias code with scale 0 in all-zero groups, which is exactly what
marlin.pad stores, so "marlin" (whose outputs are the padded shape) is written directly; "rows" and
"cols" store the logical (n, k), so the padded chunk goes to scratch outputs and its logical part
(whole words, as k % 8 == 0) is copied out. Aligned chunks skip all of this.
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

import torch

from rtnq.errors import InvalidWeightError, ShapeError, UsageError
from rtnq.numerics import kpack, marlin, rtn, shape_rule
from rtnq.params import effective_group

ABI = 2
ROW_ALIGN = marlin.BLOCK_N  # chunks start and end on Marlin blocks (the C kernel's 64-row tiles)
LAYOUTS = ("marlin", "rows", "cols")  # the C kernel's layout codes 0, 1, 2
_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}
_FLAG_SCALAR = 1
PIECES_PER_THREAD = 4  # work units per thread and chunk (dynamic balance under CPU contention)


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
    """What `quantize_rows` will run: 'c-avx2', 'c-portable' or 'torch-reference'."""
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


def _layout_code(layout: str) -> int:
    try:
        return LAYOUTS.index(layout)
    except ValueError:
        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}") from None


def out_shapes(
    n: int, k: int, bits: int, group_size: int, layout: str = "marlin"
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the qweight (int32) and scales of a logical (n, k) weight in `layout`: "marlin" stores
    it padded to shape_rule.padded(n, k) (channelwise keeps one scale group), "rows"/"cols" as is."""
    code = _layout_code(layout)
    if code == 0:
        n, k = shape_rule.padded(n, k)
    groups = k // effective_group(k, group_size)
    if code == 0:
        return (k // marlin.TILE, n * marlin.TILE * bits // 32), (groups, n)
    words = k * bits // 32  # int32 words per W row, packed along k
    return ((n, words), (n, groups)) if code == 1 else ((words, n), (groups, n))


def quantize_rows(
    w_rows: torch.Tensor,
    row0: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    sums: list[float],
    *,
    name: str = "weight",
    backend: str | None = None,
    layout: str = "marlin",
    scale: str = "absmax",
) -> None:
    """Quantize rows [row0, row0 + R) of an (n, k) weight into its whole-tensor outputs in `layout`.

    w_rows: (R, k) bf16 or fp16 (the dtype the arithmetic runs in), logical rows; row0 a multiple of
    64, R too except for the tensor's last chunk (n % 64 != 0). group_size divides k (or -1).
    qweight (int32) and scales (w_rows.dtype): the whole tensor's, shaped as `out_shapes` says (for
    "marlin" the padded shape), contiguous; only this chunk's part of each is written, in place.
    sums: [sum w^2, sum (w - w_hat)^2], added to (see `relative_error`).
    backend: None (the C library if built, else torch), "c", "c-scalar" or "torch".
    scale: the scale rule, "absmax" or "mse" (rtn.SCALE_RULES); "mse" runs the torch reference only.
    Raises InvalidWeightError naming `name` on NaN/Inf, like rtn.quantize.
    """
    code = _layout_code(layout)
    if scale not in rtn.SCALE_RULES:
        raise UsageError(f"scale rule must be one of {', '.join(rtn.SCALE_RULES)}, got {scale!r}")
    if scale != "absmax" and backend in ("c", "c-scalar"):
        raise UsageError(f"the C fast path implements the absmax scale rule only, not {scale!r}")
    rows, k = w_rows.shape
    n = scales.shape[0] if code == 1 else scales.shape[1]  # "marlin": the padded n
    if w_rows.dtype not in _DTYPE_CODE or scales.dtype != w_rows.dtype or qweight.dtype != torch.int32:
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
    lib = library() if backend in (None, "c", "c-scalar") and scale == "absmax" else None
    if backend in ("c", "c-scalar") and lib is None:
        raise RuntimeError("the rtnq C fast path is not built (pip install the package with a C compiler)")
    if lib is not None and not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ShapeError(f"{name}: the C fast path writes contiguous qweight and scales only")
    k_p = shape_rule.padded(1, k)[1]
    if rows == 0:
        return
    if rows_p == rows and k_p == k and n % ROW_ALIGN == 0:  # on the kernel's tiles: straight in
        _run(lib, backend, w_rows, row0, n, qweight, scales, bits, group_size, sums, name, code, scale)
        return
    w_p = w_rows.new_zeros(rows_p, k_p)
    w_p[:rows, :k] = w_rows
    if code == 0:  # the outputs are already padded: their padding rows/columns come out bias / 0
        _run(lib, backend, w_p, row0, n, qweight, scales, bits, group_size, sums, name, code, scale)
        return
    qshape, sshape = out_shapes(rows_p, k_p, bits, group_size, layout)
    q_p = torch.empty(qshape, dtype=torch.int32)
    s_p = torch.empty(sshape, dtype=scales.dtype)
    _run(lib, backend, w_p, 0, rows_p, q_p, s_p, bits, group_size, sums, name, code, scale)
    words = k * bits // 32  # whole words: the padding columns sit at the end of each row
    groups = 1 if group_size == -1 else k // group_size
    if code == 1:
        qweight[row0 : row0 + rows] = q_p[:rows, :words]
        scales[row0 : row0 + rows] = s_p[:rows, :groups]
    else:
        qweight[:, row0 : row0 + rows] = q_p[:words, :rows]
        scales[:, row0 : row0 + rows] = s_p[:groups, :rows]


def _run(lib, backend, w_rows, row0, n, qweight, scales, bits, group_size, sums, name, code,
         scale="absmax") -> None:
    """One chunk on the kernel's tiles (rows, row0, n multiples of 64, k of 128) into outputs of
    `out_shapes(n, k, ...)`: the C library when `lib` (absmax only), else the torch reference."""
    if lib is None:
        _torch_rows(w_rows, row0, qweight, scales, bits, group_size, sums, name, LAYOUTS[code], scale)
        return
    rows, k = w_rows.shape
    w_rows = w_rows.contiguous()
    g = effective_group(k, group_size)
    flags = _FLAG_SCALAR if backend == "c-scalar" else 0
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
            rc = lib.rtnq_quant_pack(
                w_rows.data_ptr() + lo * k * 2, hi - lo, k, n, row0 + lo, _DTYPE_CODE[w_rows.dtype], bits, g,
                code, qweight.data_ptr(), scales.data_ptr(), acc, ctypes.byref(bad), flags,
            )
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


def _torch_rows(w_rows, row0, qweight, scales, bits, group_size, sums, name, layout, scale="absmax") -> None:
    """The reference path for one chunk: rtn.quantize, rtn.dequantize and marlin.pack or kpack."""
    rows = w_rows.shape[0]
    codes, s = rtn.quantize(w_rows, bits, group_size, name=name, scale=scale)
    w_hat = rtn.dequantize(codes, s, bits, group_size)
    w64 = w_rows.double()
    d64 = w64 - w_hat.double()
    sums[0] += float((w64 * w64).sum())
    sums[1] += float((d64 * d64).sum())
    if layout == "rows":
        qweight[row0 : row0 + rows] = kpack.pack_rows(codes, bits)
        scales[row0 : row0 + rows] = s
        return
    if layout == "cols":
        qweight[:, row0 : row0 + rows] = kpack.pack_cols(codes, bits)
        scales[:, row0 : row0 + rows] = s.t()
        return
    q, ms = marlin.pack(codes, s, bits)
    words = marlin.TILE * bits // 32  # qweight words per W row
    qweight[:, row0 * words : (row0 + rows) * words] = q
    scales[:, row0 : row0 + rows] = ms


def relative_error(sums: list[float]) -> float:
    """||w - w_hat|| / ||w|| from the sums of `quantize_rows` (0.0 for an all-zero weight)."""
    if sums[0] == 0:
        return 0.0
    return math.sqrt(sums[1]) / math.sqrt(sums[0])


def quantize_pack(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    *,
    name: str = "weight",
    backend: str | None = None,
    layout: str = "marlin",
    scale: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Whole (n, k) 16-bit weight -> (qweight, scales, relative error) in `layout`, in one call; any
    shape shape_rule.problem allows, with group_size dividing k ("marlin": stored padded).

    Same bytes as, with codes, s = rtn.quantize(w, bits, group_size, scale=scale):
    marlin.pack(*marlin.pad(codes, s, bits, group_size), bits) ("marlin"),
    (kpack.pack_rows(codes, bits), s) ("rows") or (kpack.pack_cols(codes, bits), s.t()) ("cols");
    the error equals rtn.relative_error(w, rtn.dequantize(...)) up to summation order.
    """
    n, k = w.shape
    reason = shape_rule.problem(n, k, group_size, layout)
    if reason is None and group_size != -1 and k % group_size:
        reason = f"k={k} is not a multiple of the group size {group_size}"
    if reason:
        raise ShapeError(f"{name}: {reason}")
    qshape, sshape = out_shapes(n, k, bits, group_size, layout)
    qweight = torch.empty(qshape, dtype=torch.int32)
    scales = torch.empty(sshape, dtype=w.dtype)
    sums = [0.0, 0.0]
    quantize_rows(w, 0, qweight, scales, bits, group_size, sums, name=name, backend=backend, layout=layout,
                  scale=scale)
    return qweight, scales, relative_error(sums)
