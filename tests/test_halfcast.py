"""rtnq.numerics.halfcast (the torch-free path's casts) against torch's own `.to()`, bit for bit, and the
torch-free buffers (rtnq.numerics.buffers, cpu.check_scales) against the torch path's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtnq.errors import InvalidWeightError
from rtnq.numerics import buffers, cpu, halfcast, rtn

TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def _all_16bit(st: str) -> torch.Tensor:
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(TORCH[st])


def _fp32_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    rand = bits.view(torch.float32)
    near_edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 5.96e-8, 2.98e-8, 6.1e-5, 65504.0, 65519.0, 65520.0,
                               3.3895e38, 3.39e38, 3.4028235e38, float("inf"), -float("inf"), float("nan"),
                               -float("nan")])
    # every rounding boundary of bf16 near 1: ties to even both ways
    ties = (torch.arange(0, 1 << 17, dtype=torch.int32) + 0x3F800000).view(torch.float32)
    return torch.cat([rand, near_edges, ties])


@pytest.mark.parametrize("src,dst", [("BF16", "F16"), ("F16", "BF16")])
def test_every_16bit_pattern_casts_like_torch(src, dst):
    t = _all_16bit(src)
    want = _as_numpy(t.to(TORCH[dst]))
    got = halfcast.cast(_as_numpy(t), src, dst)
    nan = np.isnan(halfcast.to_float32(want, dst))
    assert np.array_equal(np.isnan(halfcast.to_float32(got, dst)), nan)
    assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


@pytest.mark.parametrize("dst", ["BF16", "F16"])
def test_fp32_casts_like_torch_including_ties_overflow_and_subnormals(dst):
    t = _fp32_cases()
    want = _as_numpy(t.to(TORCH[dst])).view(np.uint16)
    got = halfcast.cast(t.numpy(), "F32", dst).view(np.uint16)
    if dst == "BF16":  # NaN patterns too (they only ever reach a file as FP8 passthrough weights)
        assert np.array_equal(got, want)
    else:
        nan = np.isnan(t.numpy())
        assert np.array_equal(got[~nan], want[~nan]) and np.isnan(got.view(np.float16)[nan]).all()


def test_same_dtype_is_no_copy():
    a = np.arange(8, dtype=np.uint16)
    assert halfcast.cast(a, "BF16", "BF16") is a


def test_cast_overflow_names_the_value_and_the_fix():
    a = np.array([1.0, -3.4e38], dtype=np.float32)
    with pytest.raises(InvalidWeightError) as e:
        halfcast.raise_if_cast_overflow(a, "F32", "BF16", "w")
    assert str(e.value) == ("w: a torch.float32 value of magnitude 3.4e+38 overflows torch.bfloat16 (largest 3.39e+38), "
                            "the dtype it is quantized in; --skip it")
    with pytest.raises(InvalidWeightError, match=r"overflows torch.float16 \(largest 6.55e\+04\).*use --dtype bf16 or"):
        halfcast.raise_if_cast_overflow(np.array([7e4], dtype=np.float32), "F32", "F16", "w")
    halfcast.raise_if_cast_overflow(np.array([np.nan], dtype=np.float32), "F32", "F16", "w")  # the source's NaN
    halfcast.raise_if_cast_overflow(np.array([7e4], dtype=np.float32), "F16", "F16", "w")  # no cast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_check_scales_says_what_rtn_check_scales_says(dtype):
    s = torch.tensor([[1.0, float("inf")]], dtype=dtype)
    with pytest.raises(InvalidWeightError) as want:
        rtn.check_scales(s, "w")
    with pytest.raises(InvalidWeightError) as got:
        cpu.check_scales(_as_numpy(s), "w")
    assert str(got.value) == str(want.value)
    cpu.check_scales(_as_numpy(torch.tensor([[1.0, -2.0]], dtype=dtype)), "w")


def test_buffers_take_arrays_and_tensors_alike():
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    a = t.numpy()
    assert buffers.raw_bytes(t).tobytes() == buffers.raw_bytes(a).tobytes() == a.tobytes()
    assert buffers.raw_bytes(t.t()).tobytes() == np.ascontiguousarray(a.T).tobytes()
    assert buffers.holds(a, "I32") and buffers.holds(t, "I32") and not buffers.holds(a, "F32")
    bf = torch.ones(2, dtype=torch.bfloat16)
    assert buffers.holds(bf, "BF16") and buffers.holds(_as_numpy(bf), "BF16")
    assert buffers.dtype_of(bf) == "BF16" and buffers.dtype_of(a) == "int32"
