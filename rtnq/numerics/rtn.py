"""Symmetric round-to-nearest (RTN) quantization, bit-exact with the paper's reference.

The reference is vLLM's `rtn.py` (the code behind arXiv 2505.15909). Its arithmetic happens in the
weight's own 16-bit dtype, and that matters: computing the same formula in float32 changes 0.1-0.4 %
of 4-bit codes and 6-9 % of 8-bit codes (docs/FORMAT.md, shared FORMATS.md section 2.1). The rule:

    groups      g consecutive weights of one row along k (the input dimension); g = -1: whole row
    maxabs      max |w| over the group                                   (exact)
    scale       (maxabs * 2) / (2**bits - 1)                             rounded to the 16-bit dtype
    t           w / scale                                                rounded to the 16-bit dtype
    q           round(t), half to even
    code        clamp(q + 2**(bits-1), 0, 2**bits - 1)                   stored unsigned (uint4b8/uint8b128)
    dequant     (code - bias) in the 16-bit dtype, times scale           (one rounding)

Because |t| <= 7.5 (127.5) mathematically, +maxabs may round to q = +8 and is clamped to +7, while
q = -8 appears only for a group's most negative value. All-zero groups are undefined in the reference
(0/0); rtnq gives them scale 0 and code = bias so they dequantize to exact zeros.

Scale rules (SCALE_RULES). "absmax" is the rule above, the paper's. "mse" (data-free, per group) tries
the clipping ratios r of MSE_RATIOS and keeps the scale whose dequantized group is closest to w:

    clip_r      fp32(maxabs) * fp32(r), rounded to nearest-even fp32, then to the 16-bit dtype
    scale_r     (clip_r * 2) / (2**bits - 1)                             as absmax, clip_r for maxabs
    codes_r     t, q, code exactly as above with scale_r (|t| may now exceed the range: the clamp
                saturates clipped values to codes 0 / 2**bits - 1)
    w_hat_r     (code - bias) * scale_r                                  in the 16-bit dtype
    err_r       sum over the group of (w - w_hat_r)**2                   in float64: every difference and
                square in float64, summed by a fixed pairwise tree of neighbours (`_tree_sum`), so it
                depends only on the group's values, never on the tensor's shape, chunking, threads,
                or zeros appended to the group
    chosen      the r with the smallest err_r; ties go to the larger r

r = 1.0 gives clip = maxabs, i.e. exactly the absmax scale, and wins ties: a group absmax already
quantizes without error, and every all-zero group (scale 0, code bias), keeps the absmax result.
The codes are then those of the chosen scale, so `dequantize` and every packer are unchanged.
"""

from __future__ import annotations

import torch

from rtnq.errors import InvalidWeightError, ShapeError, UsageError
from rtnq.params import check as check_params
from rtnq.params import effective_group

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)

SCALE_RULES = ("absmax", "mse")
# The "mse" rule's clipping ratios: 1.00, 0.99, ..., 0.80 (21 values, r = 1 - i/100 as Python floats,
# used as their fp32 roundings). 1.0 first: it is the absmax scale and wins every tie.
MSE_RATIOS: tuple[float, ...] = tuple(1 - i / 100 for i in range(21))


def bias(bits: int) -> int:
    """The offset added to signed codes before storage: 8 for 4-bit, 128 for 8-bit."""
    return 1 << (bits - 1)


def quantize(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    *,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
    scale: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a linear weight with the reference RTN rule.

    w: (n, k) or (E, n, k), bf16/fp16 (quantized in its own dtype) or fp32 (cast to `dtype` first).
    scale: "absmax" (the paper's rule) or "mse" (the per-group clipping search; module docstring).
    Returns codes uint8 with w's shape (biased: q + 2**(bits-1)) and scales (..., n, k/g) in the
    16-bit dtype the arithmetic used. Raises InvalidWeightError naming `name` on NaN/Inf.
    """
    check_params(bits, group_size)
    if scale not in SCALE_RULES:
        raise UsageError(f"scale rule must be one of {', '.join(SCALE_RULES)}, got {scale!r}")
    if w.dim() not in (2, 3):
        raise ShapeError(f"{name}: expected a 2-D (n, k) or 3-D (E, n, k) weight, got shape {tuple(w.shape)}")
    if w.dtype not in _SIXTEEN_BIT:
        if not w.dtype.is_floating_point:
            raise ShapeError(f"{name}: cannot quantize a {w.dtype} tensor; expected bf16, fp16 or fp32")
        w = w.to(dtype)
    k = w.shape[-1]
    g = effective_group(k, group_size)
    if k % g:
        raise ShapeError(f"{name}: k={k} is not a multiple of the group size {g}")

    groups = w.reshape(*w.shape[:-1], k // g, g)
    # amax propagates NaN and Inf, so checking the per-group maxima finds every bad element
    # without another full pass over the weight.
    maxabs = groups.abs().amax(dim=-1, keepdim=True)
    if not torch.isfinite(maxabs).all():
        raise InvalidWeightError(f"{name}: weight contains NaN or Inf values; fix the checkpoint before quantizing")
    s = _scale(maxabs, bits) if scale == "absmax" else _mse_scale(groups, maxabs, bits, MSE_RATIOS)
    codes = (_round(groups, s) + bias(bits)).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.reshape(w.shape), s.squeeze(-1)


def _scale(maxabs: torch.Tensor, bits: int) -> torch.Tensor:
    # Both operations round to the 16-bit dtype exactly as the reference does (torch evaluates a
    # 16-bit elementwise op in fp32 and rounds the result once).
    return (maxabs * 2) / (2**bits - 1)


def _round(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = round(w / scale) in the 16-bit dtype (t rounded to it, then half to even, as the reference).
    All-zero groups give 0/0 = NaN here; it becomes 0, so their code is the bias, and NaN never reaches
    the integer cast."""
    return torch.round(groups / scale).nan_to_num_(0.0)


def _mse_scale(groups: torch.Tensor, maxabs: torch.Tensor, bits: int, ratios) -> torch.Tensor:
    """The "mse" rule's scale per group (module docstring): one pass over the weight per ratio,
    keeping only the running best scale and error per group."""
    half = bias(bits)
    w64 = groups.double()
    best_scale = best_err = None
    for r in sorted(set(float(x) for x in ratios), reverse=True):  # larger r first: it keeps ties
        if not 0.0 < r <= 1.0:
            raise ValueError(f"clipping ratio {r} is not in (0, 1]")
        clip = (maxabs.float() * torch.tensor(r, dtype=torch.float32)).to(groups.dtype)
        s = _scale(clip, bits)
        # (code - bias) of the clamped code, in the 16-bit dtype: clamping q to [-bias, bias - 1]
        # is the same (q + bias is exact inside the range) and dequantize's product is this one.
        w_hat = _round(groups, s).clamp_(-half, half - 1).mul_(s)
        d = w64 - w_hat.double()
        err = _tree_sum(d.mul_(d))
        if best_err is None:
            best_scale, best_err = s, err
        else:
            better = err < best_err  # strict: a tie keeps the larger r found before
            best_scale = torch.where(better, s, best_scale)
            best_err = torch.where(better, err, best_err)
    return best_scale


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (keepdim) in a fixed pairwise order: each level adds neighbours
    (x0 + x1, x2 + x3, ...) and carries an odd last element up unchanged, i.e. the balanced tree of
    the group zero-padded at its end to a power of two. The order depends only on the values, so a
    group's sum is the same whatever tensor, chunk of rows or thread count it is computed in, and
    zeros appended to the group (fused's padding of k, channelwise) leave it unchanged (x + 0 = x)."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        y = x[..., 0 : 2 * h : 2] + x[..., 1 : 2 * h : 2]
        x = torch.cat((y, x[..., 2 * h :]), dim=-1) if x.shape[-1] % 2 else y
    return x


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of `quantize`: (code - bias) * scale in the scales' 16-bit dtype.

    codes: uint8 (..., n, k); scales: (..., n, k/g). Returns (..., n, k) in scales.dtype.
    """
    check_params(bits, group_size)
    k = codes.shape[-1]
    g = effective_group(k, group_size)
    if k % g or scales.shape[-1] != k // g or scales.shape[:-1] != codes.shape[:-1]:
        raise ShapeError(
            f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not fit group size {group_size}"
        )
    signed = (codes.to(torch.int16) - bias(bits)).to(scales.dtype)
    grouped = signed.reshape(*codes.shape[:-1], k // g, g) * scales.unsqueeze(-1)
    return grouped.reshape(codes.shape)


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||w - w_hat|| / ||w||, in float64 (0.0 for an all-zero w)."""
    w64 = w.double()
    denom = torch.linalg.vector_norm(w64)
    if denom == 0:
        return 0.0
    return float(torch.linalg.vector_norm(w64 - w_hat.double()) / denom)
