"""Casts between the float dtypes rtnq quantizes (fp32, bf16, fp16) on numpy arrays, as torch's `.to()` does them.

The torch-free conversion path casts a source chunk to the 16-bit dtype its RTN arithmetic runs in
(an fp32 checkpoint quantized in bf16, --dtype fp16 over a bf16 one), so the bytes must be torch's: every
cast goes through float32 (exact from a 16-bit type) and rounds once to nearest-even. numpy has no bf16:
it is held as uint16 bit patterns (`dtypes.DType.numpy`), rounded here by integer arithmetic; fp16 is
numpy's own float16, whose cast from float32 rounds to nearest-even like torch's (tests/test_halfcast.py
checks both against torch over every 16-bit pattern and random fp32 ones).
"""

from __future__ import annotations

import numpy as np

from rtnq.errors import InvalidWeightError

_TORCH_NAME = {"F32": "torch.float32", "BF16": "torch.bfloat16", "F16": "torch.float16"}  # for messages
_MAX = {"BF16": 3.3895313892515355e38, "F16": 65504.0}  # largest finite value


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exactly (bf16 is the top half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest-even as torch does. NaN stays NaN: the
    rounding sum would carry a NaN's payload into the sign, so NaNs get 0xFFFF, the pattern torch's CPU
    cast writes for every NaN (its vectorized conversion; tests/test_halfcast.py checks it)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    out = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0xFFFF
    return out


def to_float32(a: np.ndarray, st: str) -> np.ndarray:
    """A float array held as `st` storage ("F32", "BF16" as uint16, "F16") as float32, exactly."""
    if st == "BF16":
        return bf16_to_f32(a)
    return a.astype(np.float32, copy=False)


def cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """`a` (the storage of safetensors dtype `src`) as `dst` ("BF16" or "F16"): `a` itself when they are the
    same, else a new array, one round to nearest-even from the exact float32 value."""
    if src == dst:
        return a
    x = to_float32(a, src)
    if dst == "BF16":
        return f32_to_bf16(x)
    with np.errstate(over="ignore"):  # overflow to inf is the cast's defined result, as in torch
        return x.astype(np.float16)


def raise_if_cast_overflow(a: np.ndarray, src: str, dst: str, name: str) -> None:
    """A finite source value beyond the 16-bit type's range becomes inf in the cast: say that, not "NaN or
    Inf in the source" (which would send the user looking for a corruption that is not there). Same
    line as the torch path's (rtnq.commands.convert.execute)."""
    if src == dst:
        return
    x = to_float32(a, src)
    if not np.isfinite(x).all():
        return
    big = float(np.abs(x).max())
    raise InvalidWeightError(f"{name}: a {_TORCH_NAME[src]} value of magnitude {big:.4g} overflows {_TORCH_NAME[dst]} "
                             f"(largest {_MAX[dst]:.4g}), the dtype it is quantized in; "
                             + ("use --dtype bf16 or " if dst == "F16" else "") + "--skip it")
