"""The "mse" scale rule (rtn.SCALE_RULES): a data-free per-group clipping search next to absmax.

The rule is pinned by an independent, unblocked re-implementation of the spec in rtn's docstring
(`_spec_mse`); the properties checked: never worse than absmax per group, r = 1 alone is absmax,
deterministic across runs, blocks, row chunks, layouts and zero padding, and absmax is untouched.
"""

from __future__ import annotations

import pytest
import torch

from rtnq.errors import InvalidWeightError, UsageError
from rtnq.numerics import cpu, fused, kpack, marlin, rtn, shape_rule
from rtnq.synthetic import make_tensor

HAVE_C = fused.library() is not None
# None: the C library when built (its "mse" search is checked bit for bit against the torch reference), and
# its portable loop; "torch": the reference itself
BACKENDS = [None, "torch"] + (["c-scalar"] if HAVE_C else [])
# the error statistic (not a byte of output): the C kernel's AVX2 loop sums squares in fp32 per lane
_ERR_REL = {None: 1e-6 if HAVE_C else 1e-12, "torch": 1e-12, "c-scalar": 1e-12}


def _weights(shape, dtype, seed=0):
    """N(0, 0.02) with ~0.5 % outliers x40, an all-zero group and an all-zero row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[torch.rand(shape, generator=g) < 0.005] *= 40
    w[..., 1, :] = 0
    w[..., 2, :32] = 0
    return w.to(dtype)


def _absmax_original(w, bits, g):
    """rtn.quantize's absmax rule as it was before scale rules existed, verbatim."""
    k = w.shape[-1]
    groups = w.reshape(*w.shape[:-1], k // g, g)
    maxabs = groups.abs().amax(dim=-1, keepdim=True)
    scale = (maxabs * 2) / (2**bits - 1)
    q = torch.round(groups / scale).nan_to_num_(0.0)
    codes = (q + rtn.bias(bits)).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.reshape(w.shape), scale.squeeze(-1)


def _spec_sum(x):
    """The spec's group sum: zero-pad to a power of two P, then x[i] += x[i + h], h = P/2, ..., 1."""
    n = x.shape[-1]
    p = 1 << (n - 1).bit_length()
    x = torch.cat((x, x.new_zeros(*x.shape[:-1], p - n)), dim=-1)
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x


def _spec_mse(w, bits, g, ratios=rtn.MSE_RATIOS):
    """The "mse" rule straight from rtn's docstring: whole tensor per ratio, codes kept per ratio."""
    k = w.shape[-1]
    groups = w.reshape(*w.shape[:-1], k // g, g)
    maxabs = groups.abs().amax(dim=-1, keepdim=True)
    best = None
    for r in sorted(ratios, reverse=True):
        clip = (maxabs.float() * torch.tensor(r, dtype=torch.float32)).to(w.dtype)
        scale = (clip * 2) / (2**bits - 1)
        q = torch.round(groups / scale).nan_to_num_(0.0)
        codes = (q + rtn.bias(bits)).clamp_(0, 2**bits - 1).to(torch.uint8)
        w_hat = (codes.to(torch.int16) - rtn.bias(bits)).to(w.dtype) * scale
        err = _spec_sum((groups.double() - w_hat.double()) ** 2)
        if best is None:
            best = [codes, scale, err]
        else:
            better = err < best[2]
            best = [torch.where(better, codes, best[0]), torch.where(better, scale, best[1]),
                    torch.where(better, err, best[2])]
    return best[0].reshape(w.shape), best[1].squeeze(-1)


def _group_errors(w, codes, scales, bits, group):
    """Squared error per group, float64."""
    k = w.shape[-1]
    g = k if group == -1 else group
    d = w.double() - rtn.dequantize(codes, scales, bits, group).double()
    return (d * d).reshape(*w.shape[:-1], k // g, g).sum(-1)


def _packed(codes, scales, bits, group, layout):
    if layout == "rows":
        return kpack.pack_rows(codes, bits), scales
    if layout == "cols":
        return kpack.pack_cols(codes, bits), scales.t().contiguous()
    return marlin.pack(*marlin.pad(codes, scales, bits, group), bits)


# --- absmax stays what it was ------------------------------------------------------------------


def test_rules_and_grid():
    assert rtn.SCALE_RULES == ("absmax", "mse")
    assert len(rtn.MSE_RATIOS) == 21 and rtn.MSE_RATIOS[0] == 1.0
    assert rtn.MSE_RATIOS == tuple(sorted(rtn.MSE_RATIOS, reverse=True))
    assert [round(r, 10) for r in rtn.MSE_RATIOS] == [round(1 - i / 100, 10) for i in range(21)]


def test_absmax_default_and_explicit_match_the_reference_vectors(vectors):
    d = vectors("rtn_bf16_w4_g128")
    for kw in ({}, {"scale": "absmax"}):
        codes, scales = rtn.quantize(d["w"], 4, 128, **kw)
        assert torch.equal(codes, d["codes_nk"]) and torch.equal(scales, d["rtn_scale"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
def test_absmax_is_the_original_rule_byte_for_byte(dtype, bits, group):
    w = _weights((64, 256), dtype, seed=bits)
    g = 256 if group == -1 else group
    ref = _absmax_original(w, bits, g)
    for kw in ({}, {"scale": "absmax"}):
        codes, scales = rtn.quantize(w, bits, group, **kw)
        assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1])


def test_unknown_rule_is_a_usage_error():
    w = _weights((64, 256), torch.bfloat16)
    with pytest.raises(UsageError, match="absmax, mse.*'minmax'"):
        rtn.quantize(w, 4, 128, scale="minmax")
    q, s = (torch.empty(t, dtype=d) for t, d in zip(fused.out_shapes(64, 256, 4, 128), (torch.int32, w.dtype)))
    with pytest.raises(UsageError, match="absmax, mse"):
        fused.quantize_rows(w, 0, q, s, 4, 128, [0.0, 0.0], scale="minmax")
    if HAVE_C:  # the C library takes both rules, and refuses others itself too
        with pytest.raises(UsageError, match="absmax or mse, got 'minmax'"):
            cpu.quantize_rows(w.view(torch.int16).numpy().view("uint16"), 0, q.numpy(), s.view(torch.int16).numpy()
                              .view("uint16"), 4, 128, [0.0, 0.0], scale="minmax")


# --- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_mse_follows_the_spec_and_never_loses_to_absmax_in_any_group(dtype, bits, group):
    w = _weights((96, 384), dtype, seed=bits + (group % 97))
    codes, scales = rtn.quantize(w, bits, group, scale="mse")
    g = 384 if group == -1 else group
    ref_codes, ref_scales = _spec_mse(w, bits, g)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    assert codes.dtype == torch.uint8 and scales.dtype == dtype and scales.shape == (96, 384 // g)

    a_codes, a_scales = rtn.quantize(w, bits, group)
    e_mse = _group_errors(w, codes, scales, bits, group)
    e_abs = _group_errors(w, a_codes, a_scales, bits, group)
    assert bool((e_mse <= e_abs * (1 + 1e-12)).all())
    assert float(e_mse.sum()) < float(e_abs.sum())  # and the search does find something
    # a scale is never above absmax's (r <= 1), and where it is equal the codes are absmax's too
    assert bool((scales <= a_scales).all())
    same = (scales == a_scales).repeat_interleave(g, dim=-1)
    assert torch.equal(codes[same], a_codes[same])
    # the all-zero row and group: scale 0, code bias, as absmax
    assert bool((scales[1] == 0).all()) and bool((codes[1] == rtn.bias(bits)).all())
    if group == 32:
        assert float(scales[2, 0]) == 0.0 and bool((codes[2, :32] == rtn.bias(bits)).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_a_grid_of_r_1_alone_is_absmax_exactly(monkeypatch, dtype, bits):
    w = _weights((64, 512), dtype, seed=3)
    monkeypatch.setattr(rtn, "MSE_RATIOS", (1.0,))
    for group in (32, 128, -1):
        codes, scales = rtn.quantize(w, bits, group, scale="mse")
        a_codes, a_scales = rtn.quantize(w, bits, group)
        assert torch.equal(codes, a_codes) and torch.equal(scales, a_scales)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_group_absmax_serves_best_keeps_absmax(dtype):
    # Positive extremes only: absmax's +m sits at t = 7.5 -> q = 8, clamped to 7 (error m/15); any r < 1
    # puts it further out (t = 7.5/r, still clamped to 7): its error grows by 14(1 - r) m/15, more than
    # a smaller step can win back on m/2 (t = 3.75 -> 4).
    w = torch.zeros(3, 128, dtype=dtype)
    w[0, 3] = 1.0
    w[1, 0], w[1, 100] = 0.25, 0.125
    codes, scales = rtn.quantize(w, 4, 128, scale="mse")
    a_codes, a_scales = rtn.quantize(w, 4, 128)
    assert torch.equal(scales, a_scales) and torch.equal(codes, a_codes)
    assert float(scales[2, 0]) == 0.0  # all-zero: every r ties at error 0; absmax's scale 0 stays


def test_an_outlier_heavy_group_clips():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 128, generator=gen)
    w[0, 5], w[0, 77] = 4.0, -4.0  # two 4-sigma values set the absmax scale for 126 N(0, 1) values
    w = w.to(torch.bfloat16)
    codes, scales = rtn.quantize(w, 4, 128, scale="mse")
    a_codes, a_scales = rtn.quantize(w, 4, 128)
    assert float(scales[0, 0]) < float(a_scales[0, 0])
    grid = {float(((w.abs().amax().float() * torch.tensor(r)).to(w.dtype) * 2) / 15) for r in rtn.MSE_RATIOS}
    assert float(scales[0, 0]) in grid
    assert float(_group_errors(w, codes, scales, 4, 128)) < float(_group_errors(w, a_codes, a_scales, 4, 128))
    # the clipped extremes saturate: codes 0 and 15
    assert int(codes[0, 5]) == 15 and int(codes[0, 77]) == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_is_an_error_with_mse(bad):
    w = _weights((64, 256), torch.bfloat16)
    w[3, 17] = bad
    with pytest.raises(InvalidWeightError, match="layers.3.q_proj.weight"):
        rtn.quantize(w, 4, 128, name="layers.3.q_proj.weight", scale="mse")


def test_3d_fp32_input_with_mse():
    w = _weights((3, 64, 256), torch.float32)
    codes, scales = rtn.quantize(w, 4, 64, dtype=torch.float16, scale="mse")
    assert scales.dtype == torch.float16 and scales.shape == (3, 64, 4)
    for e in range(3):
        c, s = rtn.quantize(w[e].to(torch.float16), 4, 64, scale="mse")
        assert torch.equal(codes[e], c) and torch.equal(scales[e], s)


# --- determinism -------------------------------------------------------------------------------


def test_deterministic_across_runs_and_blocks(monkeypatch):
    w = make_tensor("model.layers.0.mlp.down_proj.weight", (64, 1024), torch.bfloat16)
    for group in (128, -1):
        first = rtn.quantize(w, 4, group, scale="mse")
        again = rtn.quantize(w, 4, group, scale="mse")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for block in (256, 1000, 4096):  # blocks of 2 groups (or one row), of 7 groups, of whole rows
            monkeypatch.setattr(rtn, "MSE_BLOCK", block)
            c, s = rtn.quantize(w, 4, group, scale="mse")
            assert torch.equal(c, first[0]) and torch.equal(s, first[1]), block
        monkeypatch.undo()
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            c, s = rtn.quantize(w, 4, group, scale="mse")
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(c, first[0]) and torch.equal(s, first[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", fused.LAYOUTS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(256, 512, 128), (192, 256, -1), (128, 256, 32)])
def test_chunked_rows_equal_the_whole_tensor(backend, layout, bits, shape):
    n, k, group = shape
    w = _weights((n, k), torch.bfloat16, seed=n + bits)
    codes, scales = rtn.quantize(w, bits, group, scale="mse")
    q_ref, s_ref = _packed(codes, scales, bits, group, layout)
    e_ref = rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group))
    qshape, sshape = fused.out_shapes(n, k, bits, group, layout)
    q = torch.full(qshape, -0x5A5A5A5B, dtype=torch.int32)
    s = torch.full(sshape, 1234.0, dtype=w.dtype)
    sums = [0.0, 0.0]
    for row0 in reversed(range(0, n, 64)):  # 64-row chunks, last first
        fused.quantize_rows(w[row0 : row0 + 64], row0, q, s, bits, group, sums, backend=backend, layout=layout,
                            scale="mse")
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert fused.relative_error(sums) == pytest.approx(e_ref, rel=_ERR_REL[backend])
    q_w, s_w, e_w = fused.quantize_pack(w, bits, group, backend=backend, layout=layout, scale="mse")
    assert torch.equal(q_w, q_ref) and torch.equal(s_w, s_ref)
    assert e_w == pytest.approx(e_ref, rel=_ERR_REL[backend])
    # and absmax through the same calls is still absmax
    q_a, s_a, _ = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
    q_abs, s_abs = _packed(*rtn.quantize(w, bits, group), bits, group, layout)
    assert torch.equal(q_a, q_abs) and torch.equal(s_a, s_abs)
    assert not torch.equal(s_a, s_ref)


# --- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", fused.LAYOUTS)
@pytest.mark.parametrize("shape", [(100, 576, 64), (100, 72, -1), (104, 256, 32), (192, 576, 32)])
def test_padded_shapes_with_mse(layout, shape):
    n, k, group = shape
    if shape_rule.problem(n, k, group, layout) is not None:
        pytest.skip("the storage rule refuses this shape in this layout")
    w = _weights((n, k), torch.bfloat16, seed=k)
    w[n - 1] *= 3
    w[:, k - 1] = 0.05  # next to the padding columns
    for bits in (4, 8):
        codes, scales = rtn.quantize(w, bits, group, scale="mse")
        q_ref, s_ref = _packed(codes, scales, bits, group, layout)
        e_ref = rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group))
        for backend in BACKENDS:
            q, s, e = fused.quantize_pack(w, bits, group, backend=backend, layout=layout, scale="mse")
            assert torch.equal(q, q_ref) and torch.equal(s, s_ref), (bits, backend)
            assert e == pytest.approx(e_ref, rel=_ERR_REL[backend])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(100, 576, 64), (100, 72, -1), (104, 200, -1), (64, 64, 32)])
def test_zero_padding_changes_no_choice_and_dequantizes_to_zero(bits, shape):
    """What fused's padding relies on: zeros appended to rows and to k (inside the channelwise group)
    leave the logical part's codes and scales as they were; padding rows get scale 0, and every
    padding code is the bias, i.e. dequantizes to exactly 0."""
    n, k, group = shape
    w = _weights((n, k), torch.bfloat16, seed=bits)
    n_p, k_p = shape_rule.padded(n, k)
    w_p = torch.zeros(n_p, k_p, dtype=w.dtype)
    w_p[:n, :k] = w
    codes, scales = rtn.quantize(w, bits, group, scale="mse")
    c_p, s_p = rtn.quantize(w_p, bits, group, scale="mse")
    groups = scales.shape[1]
    assert torch.equal(c_p[:n, :k], codes) and torch.equal(s_p[:n, :groups], scales)
    assert bool((c_p[n:] == rtn.bias(bits)).all()) and bool((c_p[:, k:] == rtn.bias(bits)).all())
    assert bool((s_p[n:] == 0).all())
    d_p = rtn.dequantize(c_p, s_p, bits, group)
    assert bool((d_p[n:] == 0).all()) and bool((d_p[:, k:] == 0).all())


# --- what it buys ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_error_reduction_on_synthetic_weights(dtype):
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)]
    ws = [make_tensor(name, (256, 1024), dtype) for name in names]
    for bits, group, gain in ((4, 128, 0.03), (4, 32, 0.03), (4, -1, 0.03), (8, 128, 0.001)):
        err = {}
        for rule in rtn.SCALE_RULES:
            e = []
            for w in ws:
                codes, scales = rtn.quantize(w, bits, group, scale=rule)
                e.append(rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group)))
            err[rule] = sum(e) / len(e)
        assert err["mse"] < err["absmax"] * (1 - gain), (bits, group, err)
