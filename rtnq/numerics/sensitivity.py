"""Data-free sensitivity of one linear weight to 4-bit RTN: what `--budget` ranks tensors by.

Every score is computed from the weight alone (and, where one precedes it, the RMSNorm weight that
scales its input channels); nothing needs activations. The quantization is rtn.quantize's, so the
errors are exactly those of the output at 4 and at 8 bits.

  error       sum((W - W4)^2) - sum((W - W8)^2): squared Frobenius error that promoting to INT8 removes
  norm_error  the same per input channel j weighted by gamma_j^2, gamma the preceding norm's weight: for
              an input x = gamma * x_hat with x_hat of unit scale, E|dW x|^2 = sum_j gamma_j^2 |dW_:,j|^2,
              so this is the expected output error an RMS-normalised input would see (= error without gamma)
  relative    ||W - W4|| / ||W|| (the per-tensor figure the manifest already records)
  kurtosis    E[(w - mean)^4] / var^2 over the whole weight (3 for a Gaussian; outliers raise it)
  max_over_rms  max |w| / rms(w)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rtnq.numerics import cpu, rtn
from rtnq.params import BUDGET_SCORES

SCORES = BUDGET_SCORES[1:]  # the weight statistics; "position" (rtnq.selection.budget) reads no weight


def scores(w: torch.Tensor, group_size: int, gamma: torch.Tensor | None = None, *, scale: str = "absmax",
           name: str = "weight") -> dict[str, float]:
    """Every one of SCORES of a 16-bit (n, k) or (E, n, k) weight quantized with `group_size`, in float64
    (the reference `score` is checked against); gamma: (k,) or None."""
    w64 = w.double()
    col = {}
    for bits in (4, 8):
        codes, s = rtn.quantize(w, bits, group_size, name=name, scale=scale)
        d = w64 - rtn.dequantize(codes, s, bits, group_size).double()
        col[bits] = (d * d).reshape(-1, w.shape[-1]).sum(0)  # (k,): squared error per input channel
    gain = col[4] - col[8]
    total = float((w64 * w64).sum())
    g2 = None if gamma is None else gamma.double().reshape(-1) ** 2
    return {
        "error": float(gain.sum()),
        "norm_error": float(gain.sum()) if g2 is None else float((gain * g2).sum()),
        "relative": math.sqrt(float(col[4].sum()) / total) if total else 0.0,
        **scores_stats(w),
    }


def score(kind: str, w: torch.Tensor, group_size: int, gamma: torch.Tensor | None = None, *,
          name: str = "weight", scale: str = "absmax") -> float:
    """One of SCORES, computing only what it needs (what `--budget` calls once per tensor): the
    statistics need no quantization, the errors are summed in float32 (a ranking, not a report)."""
    if kind in ("kurtosis", "max_over_rms"):
        return scores_stats(w)[kind]
    w32 = w.float()
    col = {}
    for bits in (4, 8) if kind != "relative" else (4,):
        codes, s = rtn.quantize(w, bits, group_size, name=name, scale=scale)
        d = w32 - rtn.dequantize(codes, s, bits, group_size).float()
        col[bits] = (d * d).reshape(-1, w.shape[-1]).sum(0)
        del codes, s, d
    if kind == "relative":
        total = float((w32 * w32).sum())
        return math.sqrt(float(col[4].sum()) / total) if total else 0.0
    gain = col[4] - col[8]
    if kind == "norm_error" and gamma is not None:
        return float((gain.double() * gamma.double().reshape(-1) ** 2).sum())
    return float(gain.double().sum())


def scores_stats(w: torch.Tensor) -> dict[str, float]:
    """kurtosis and max_over_rms of a weight (float64)."""
    w64 = w.double()
    mean = float(w64.mean())
    var = float(((w64 - mean) ** 2).mean())
    ms = float((w64 * w64).mean())
    return {"kurtosis": float(((w64 - mean) ** 4).mean()) / var**2 if var else 0.0,
            "max_over_rms": float(w64.abs().max()) / math.sqrt(ms) if ms else 0.0}


def option_errors(w: torch.Tensor, settings, gamma: torch.Tensor | None = None, *, name: str = "weight",
                  scale: str = "absmax") -> list[float]:
    """The squared error sum((W - W_q)^2) of a 16-bit (n, k) or (E, n, k) weight quantized with each
    (bits, group_size) of `settings`, what `--budget-groups` weighs its options by; with gamma (k,), each
    input channel's error is weighted by gamma_j^2 (norm_error's model). Summed in float64 per channel; without
    gamma, by the C library when it is built (the same codes; its sums are fp32 per AVX2 lane, then float64,
    so they agree with torch's to about 1e-8, which a ranking does not notice): ~7x faster (absmax), ~12x (mse)."""
    if gamma is None and cpu.library() is not None:
        return [_c_error(w, bits, group_size, scale, name) for bits, group_size in settings]
    w32 = w.float()
    g2 = None if gamma is None else gamma.double().reshape(-1) ** 2
    out = []
    for bits, group_size in settings:
        codes, s = rtn.quantize(w, bits, group_size, name=name, scale=scale)
        d = w32 - rtn.dequantize(codes, s, bits, group_size).float()
        col = (d * d).reshape(-1, w.shape[-1]).double().sum(0)
        out.append(float(col.sum()) if g2 is None else float((col * g2).sum()))
        del codes, s, d
    return out


def _c_error(w: torch.Tensor, bits: int, group_size: int, scale: str, name: str) -> float:
    """sum((W - W_q)^2) of a 16-bit (n, k) or (E, n, k) weight by the C kernel (its error statistic)."""
    from rtnq.numerics.fused import as_numpy

    n, k = w.shape[-2:]
    sums = [0.0, 0.0]
    qshape, sshape = cpu.out_shapes(n, k, bits, group_size, "rows")
    for e in w.reshape(-1, n, k):
        rows = as_numpy(e.contiguous())
        q = np.empty(qshape, dtype=np.int32)
        s = np.empty(sshape, dtype=rows.dtype)
        cpu.quantize_rows(rows, 0, q, s, bits, group_size, sums, name=name, layout="rows", scale=scale)
    return sums[1]
