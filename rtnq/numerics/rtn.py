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
    err_r       sum over the group of (w - w_hat_r)**2                   in float64: each difference and
                square in float64, summed as a balanced tree over the group zero-padded to a power
                of two P (x[i] += x[i + h] for h = P/2, P/4, ..., 1; `_tree_sum`), so it depends
                only on the group's values, never on the tensor's shape, chunking, threads, or
                zeros appended to the group
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

from rtnq.params import SCALES as SCALE_RULES  # noqa: E402  (the one list: the CLI checks --scale without torch)
# The "mse" rule's clipping ratios: 1.00, 0.99, ..., 0.80 (21 values, r = 1 - i/100 as Python floats,
# used as their fp32 roundings). 1.0 first: it is the absmax scale and wins every tie.
MSE_RATIOS: tuple[float, ...] = tuple(1 - i / 100 for i in range(21))
MSE_BLOCK = 1 << 18  # weights per block of the "mse" search (float64 work ~2 MiB: stays in cache)


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


def check_scales(scales: torch.Tensor, name: str) -> None:
    """InvalidWeightError when a scale overflowed its 16-bit dtype: the reference's formula computes
    2 * maxabs in that dtype, so |w| >= ~32760 in fp16 (~1.7e38 in bf16) gives an infinite scale, and
    such an output would dequantize to NaN. `quantize` (and the fused kernel) keep the formula's inf, bit
    for bit with the reference; the commands that write or evaluate a conversion call this and refuse."""
    if not torch.isfinite(scales).all():
        limit = torch.finfo(scales.dtype).max / 2
        raise InvalidWeightError(
            f"{name}: |w| reaches {limit:.4g} or more, so 2 * maxabs overflows the {scales.dtype} scale; "
            + ("quantize in bf16 (--dtype bf16) or --skip it" if scales.dtype == torch.float16 else "--skip it"))


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
    """The "mse" rule's scale per group (module docstring), shaped like maxabs.

    Blocks of about MSE_BLOCK weights (whole groups) go through every ratio while they sit in the
    CPU cache, keeping only the running best scale and error per group: memory stays O(weight),
    and as every step is elementwise per group or `_tree_sum`, blocks change no value."""
    ratios = sorted({float(r) for r in ratios}, reverse=True)  # larger r first: it keeps ties
    if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"clipping ratios must lie in (0, 1], got {ratios}")
    r32 = [torch.tensor(r, dtype=torch.float32) for r in ratios]
    g = groups.shape[-1]
    flat = groups.reshape(-1, g)
    m32 = maxabs.reshape(-1, 1).float()
    out = torch.empty(flat.shape[0], 1, dtype=groups.dtype)
    half = bias(bits)
    width = 1 << (g - 1).bit_length()  # g rounded up to a power of two: _tree_sum's zero padding
    step = max(1, MSE_BLOCK // width)
    for lo in range(0, flat.shape[0], step):
        w = flat[lo : lo + step]
        w64 = w.double()
        sq = torch.zeros(w.shape[0], width, dtype=torch.float64)  # columns >= g stay 0: never written
        best_s = best_e = None
        for r in r32:
            clip = (m32[lo : lo + step] * r).to(groups.dtype)
            s = _scale(clip, bits)
            # (code - bias) in the 16-bit dtype is q clamped to [-bias, bias - 1] (q + bias is exact
            # inside the range), and times s rounded once is exactly dequantize's product.
            w_hat = _round(w, s).clamp_(-half, half - 1).mul_(s)
            torch.sub(w64, w_hat, out=sq[:, :g]).square_()  # float64: w_hat converts exactly
            e = _tree_sum(sq)
            if best_e is None:
                best_s, best_e = s, e.clone()
            else:
                better = e < best_e  # strict: a tie keeps the larger r, tried before
                best_s = torch.where(better, s, best_s)
                best_e = torch.where(better, e, best_e)
        out[lo : lo + step] = best_s
    return out.reshape(maxabs.shape)


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim, whose length is a power of two, as a balanced tree: each level adds
    the second half onto the first, elementwise (x[i] += x[i + h]); in place, returns x[..., :1].
    The order depends only on the length, so a group's sum is the same whatever tensor, chunk of rows
    or thread count it is computed in. A group of g values is summed zero-padded at its end to the
    next power of two; more zeros appended (fused pads k with zeros, channelwise) change nothing:
    the first levels then add only +0."""
    n = x.shape[-1]
    while n > 1:
        n //= 2
        x[..., :n] += x[..., n : 2 * n]
    return x[..., :1]


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
