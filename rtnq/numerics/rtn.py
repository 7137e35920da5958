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
"""

from __future__ import annotations

import torch

from rtnq.errors import InvalidWeightError, ShapeError
from rtnq.params import check as check_params
from rtnq.params import effective_group

_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a linear weight with the reference RTN rule.

    w: (n, k) or (E, n, k), bf16/fp16 (quantized in its own dtype) or fp32 (cast to `dtype` first).
    Returns codes uint8 with w's shape (biased: q + 2**(bits-1)) and scales (..., n, k/g) in the
    16-bit dtype the arithmetic used. Raises InvalidWeightError naming `name` on NaN/Inf.
    """
    check_params(bits, group_size)
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
    # Both operations below round to w.dtype exactly as the reference does (torch evaluates a
    # 16-bit elementwise op in fp32 and rounds the result once).
    scale = (maxabs * 2) / (2**bits - 1)
    t = groups / scale
    # torch.round is half-to-even, as the reference. All-zero groups give 0/0 = NaN here; they are
    # replaced by the bias below, and NaN never reaches the integer cast.
    q = torch.round(t).nan_to_num_(0.0)
    codes = (q + bias(bits)).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.reshape(w.shape), scale.squeeze(-1)


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
