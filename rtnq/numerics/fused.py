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

* the C library built from csrc/rtnq_cpu.c by `pip install` (rtnq/numerics/_cpu*.so, loaded with ctypes
  by rtnq.numerics.cpu, which runs it on numpy arrays so that conversion needs no torch;
  AVX2 + F16C + FMA when the CPU has them, portable C otherwise), called without the GIL so the
  rows of one chunk are split across the CPU's cores;
* the readable reference, per chunk: `rtn.quantize` -> `rtn.dequantize` -> `marlin.pack` or
  `kpack.pack_rows` / `pack_cols`, used when the library is missing (no compiler at install time,
  another CPU architecture) or when RTNQ_FASTPATH=0.

The scale rule (rtn.SCALE_RULES) is chosen with `scale`. The C kernel implements both rules ("mse" as
csrc/rtnq_cpu.c `mse_scale`, the same float64 tree sums as rtn._mse_scale, so bit for bit; about 11x
faster than the torch reference here); the torch reference runs without the library. The padding below is
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

import torch

from rtnq.errors import ShapeError, UsageError
from rtnq.numerics import cpu, kpack, marlin, rtn, shape_rule
from rtnq.numerics.cpu import (  # noqa: F401  (the library's facts, for callers that hold torch tensors)
    ABI, LAYOUTS, ROW_ALIGN, implementation, library, out_shapes, problem, relative_error, workers,
)

_DTYPE_CODE = {torch.bfloat16: 0, torch.float16: 1}


def as_numpy(t: torch.Tensor):
    """A numpy view of a tensor's storage (no copy): bf16 as its uint16 bit patterns (numpy has no bf16)."""
    import numpy as np

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def torch_tile(scale: str = "absmax"):
    """The reference for one chunk on the kernel's tiles, as rtnq.numerics.cpu.quantize_rows calls its
    `tile`: numpy arrays in and out (bf16 as uint16), torch (`_torch_rows`) in between, no copies."""

    def tile(w, row0, n, qweight, scales, bits, group_size, sums, name, code):
        dt = torch.bfloat16 if w.dtype.kind == "u" else torch.float16
        w_t = torch.from_numpy(w).view(dt)
        q_t = torch.from_numpy(qweight)
        s_t = torch.from_numpy(scales).view(dt)
        _torch_rows(w_t, row0, q_t, s_t, bits, group_size, sums, name, LAYOUTS[code], scale)

    return tile


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
    scale: the scale rule, "absmax" or "mse" (rtn.SCALE_RULES); the C library implements both.
    Raises InvalidWeightError naming `name` on NaN/Inf, like rtn.quantize.
    The work is rtnq.numerics.cpu.quantize_rows on numpy views of the same memory.
    """
    cpu.layout_code(layout)
    if scale not in rtn.SCALE_RULES:
        raise UsageError(f"scale rule must be one of {', '.join(rtn.SCALE_RULES)}, got {scale!r}")
    if w_rows.dtype not in _DTYPE_CODE or scales.dtype != w_rows.dtype or qweight.dtype != torch.int32:
        raise ShapeError(f"{name}: fast path needs 16-bit rows and scales and int32 qweight")
    lib = library() if backend in (None, "c", "c-scalar") else None
    if backend in ("c", "c-scalar") and lib is None:
        raise RuntimeError("the rtnq C fast path is not built (pip install the package with a C compiler)")
    if lib is not None and not (qweight.is_contiguous() and scales.is_contiguous()):
        raise ShapeError(f"{name}: the C fast path writes contiguous qweight and scales only")
    cpu.quantize_rows(as_numpy(w_rows), row0, as_numpy(qweight), as_numpy(scales), bits, group_size, sums,
                      name=name, layout=layout, tile=None if lib is not None else torch_tile(scale),
                      scalar=backend == "c-scalar", scale=scale)


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
