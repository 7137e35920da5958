"""RTN numerics: the reference vectors bit for bit, plus the rules the reference leaves implicit."""

import pytest
import torch

from rtnq.numerics import rtn
from rtnq.errors import InvalidWeightError, ShapeError, UsageError


def test_reference_codes_scales_and_dequant_bit_exact(vectors):
    d = vectors("rtn_bf16_w4_g128")
    codes, scales = rtn.quantize(d["w"], 4, 128)
    assert torch.equal(codes, d["codes_nk"])
    assert torch.equal(scales, d["rtn_scale"])
    assert scales.dtype == torch.bfloat16
    assert torch.equal(rtn.dequantize(codes, scales, 4, 128), d["rtn_dequant"])


def test_fp32_math_would_differ_so_dtype_arithmetic_matters(vectors):
    # Guards against a "simplification" to fp32 math: on this file it changes 271 codes.
    d = vectors("rtn_bf16_w4_g128")
    g = d["w"].float().reshape(128, 4, 128)
    s = g.abs().amax(-1, keepdim=True) * 2 / 15
    fp32_codes = (torch.round(g / s) + 8).clamp(0, 15).to(torch.uint8).reshape(128, 512)
    codes, _ = rtn.quantize(d["w"], 4, 128)
    assert int((fp32_codes != codes).sum()) == 271


def _weights(dtype, shape=(64, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_roundtrip_error_bound_and_code_range(dtype, bits, group):
    w = _weights(dtype)
    codes, scales = rtn.quantize(w, bits, group)
    k = w.shape[1]
    g = k if group == -1 else group
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert scales.shape == (w.shape[0], k // g) and scales.dtype == dtype
    assert int(codes.max()) <= 2**bits - 1
    w_hat = rtn.dequantize(codes, scales, bits, group)
    assert w_hat.dtype == dtype
    # |w - dequant| <= scale/2, plus the two 16-bit roundings (of t = w/scale and of the product),
    # each at most one unit roundoff of |w|; the clamped positive extreme (q = +8 -> +7) may be off
    # by up to one full step.
    step = scales.float().repeat_interleave(g, dim=1)
    u = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (w.float() - w_hat.float()).abs()
    bound = 0.5 * step + 2 * u * w.float().abs() + 1e-12
    clipped = codes == 2**bits - 1
    assert bool((err[~clipped] <= bound[~clipped]).all())
    assert bool((err[clipped] <= step[clipped] + bound[clipped]).all())
    assert rtn.relative_error(w, w_hat) < (0.2 if bits == 4 else 0.02)


@pytest.mark.parametrize("bits", [4, 8])
def test_extremes_positive_clipped_to_max_and_negative_min_reaches_zero_code(bits):
    # maxabs = (2^bits - 1) / 2 makes the scale exactly 1, so t = +-7.5 (+-127.5): exact ties.
    w = torch.zeros(1, 128, dtype=torch.bfloat16)
    w[0, 0], w[0, 1] = (2**bits - 1) / 2, -(2**bits - 1) / 2
    codes, scales = rtn.quantize(w, bits, 128)
    top = 2**bits - 1
    assert float(scales[0, 0]) == 1.0
    assert int(codes[0, 0]) == top  # t = 7.5 rounds (to even) to 8, past the range: clamped to +7
    assert int(codes[0, 1]) == 0  # t = -7.5 rounds to -8: code 0, the only place q = -8 occurs
    assert int(codes[0, 2]) == rtn.bias(bits)  # exact zero


def test_half_way_cases_round_to_even():
    # maxabs 7.5 -> scale exactly 1.0 in bf16, so t = w: x.5 values are exact ties.
    w = torch.tensor([[7.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 120], dtype=torch.bfloat16)
    codes, scales = rtn.quantize(w, 4, 128)
    assert float(scales[0, 0]) == 1.0
    q = codes[0, :8].to(torch.int16) - 8
    assert q.tolist() == [7, 0, 2, 2, 0, -2, -2, 4]


def test_zero_group_gives_scale_zero_and_exact_zeros():
    w = _weights(torch.bfloat16, (4, 256))
    w[1, 128:] = 0
    codes, scales = rtn.quantize(w, 4, 128)
    assert float(scales[1, 1]) == 0.0
    assert bool((codes[1, 128:] == 8).all())
    w_hat = rtn.dequantize(codes, scales, 4, 128)
    assert bool((w_hat[1, 128:] == 0).all()) and not bool(torch.isnan(w_hat).any())


def test_3d_moe_weights_quantize_per_expert():
    w = _weights(torch.float16, (3, 64, 256))
    codes, scales = rtn.quantize(w, 4, 128)
    assert codes.shape == (3, 64, 256) and scales.shape == (3, 64, 2)
    for e in range(3):
        c, s = rtn.quantize(w[e], 4, 128)
        assert torch.equal(codes[e], c) and torch.equal(scales[e], s)


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float16])
def test_fp32_input_is_cast_to_the_chosen_dtype_first(target):
    w32 = _weights(torch.float32)
    codes, scales = rtn.quantize(w32, 4, 128, dtype=target)
    ref_codes, ref_scales = rtn.quantize(w32.to(target), 4, 128)
    assert scales.dtype == target
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_is_an_error_naming_the_tensor(bad):
    w = _weights(torch.bfloat16)
    w[3, 17] = bad
    with pytest.raises(InvalidWeightError, match="layers.3.mlp.up_proj.weight"):
        rtn.quantize(w, 4, 128, name="layers.3.mlp.up_proj.weight")


def test_bad_parameters_and_shapes():
    w = _weights(torch.bfloat16)
    with pytest.raises(UsageError, match="--bits: must be 4 or 8, got 3"):
        rtn.quantize(w, 3, 128)
    with pytest.raises(UsageError, match=r"--group-size: must be 32, 64, 128 or -1 \(channelwise\), got 100"):
        rtn.quantize(w, 4, 100)
    with pytest.raises(ShapeError, match="k=200"):
        rtn.quantize(_weights(torch.bfloat16, (64, 200)), 4, 128)
    with pytest.raises(ShapeError, match="2-D"):
        rtn.quantize(torch.zeros(128, dtype=torch.bfloat16), 4, 128)
    with pytest.raises(ShapeError, match="int32"):
        rtn.quantize(torch.zeros(64, 128, dtype=torch.int32), 4, 128)
