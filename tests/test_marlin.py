"""Marlin layout: the reference vectors byte for byte, and pack/unpack round trips."""

import pytest
import torch

from rtnq.numerics import marlin, rtn
from rtnq.errors import ShapeError


def test_permutation_tables_match_the_references(vectors):
    p = vectors("perms")
    assert torch.equal(marlin.weight_perm(4), p["ist_perm"])
    assert torch.equal(marlin.weight_perm(4), p["vllm_weight_perm_w4"])
    assert torch.equal(marlin.weight_perm(4), p["vllm_rtn_perm"])
    assert torch.equal(marlin.weight_perm(8), p["vllm_weight_perm_w8"])
    assert torch.equal(marlin.scale_perm(False), p["vllm_scale_perm"])
    assert torch.equal(marlin.scale_perm(False), p["ist_scale_perm"])
    assert torch.equal(marlin.scale_perm(True), p["vllm_scale_perm_single"])
    assert torch.equal(marlin.scale_perm(True), p["ist_scale_perm_single"])


@pytest.mark.parametrize("name,bits", [("marlin_w4_k512_n768_g128", 4), ("marlin_w8_k256_n256_g128", 8)])
def test_pack_matches_reference_words_and_scales(vectors, name, bits):
    d = vectors(name)
    codes_kn, scales_gn = d["codes"], d["scales"]
    qweight, scales = marlin.pack(codes_kn.t(), scales_gn.t(), bits)
    assert qweight.dtype == torch.int32
    assert torch.equal(qweight, d["marlin_vllm_qweight"])
    assert torch.equal(scales, d["marlin_vllm_scales"])
    if bits == 4:
        assert torch.equal(qweight, d["marlin_ist_B"]) and torch.equal(scales, d["marlin_ist_s"])
    k, n = codes_kn.shape
    codes_back, scales_back = marlin.unpack(qweight, scales, bits, n, k)
    assert torch.equal(codes_back, codes_kn.t()) and torch.equal(scales_back, scales_gn.t())


def test_rtn_then_pack_matches_reference_end_to_end(vectors):
    d = vectors("rtn_bf16_w4_g128")
    qweight, scales = marlin.pack(*rtn.quantize(d["w"], 4, 128), 4)
    assert torch.equal(qweight, d["marlin_qweight"])
    assert torch.equal(scales, d["marlin_scales"]) and scales.dtype == torch.bfloat16


def _random_codes(n, k, bits, groups, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=g) * 0.1 + 1e-3).to(dtype)
    return codes, scales


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,group", [(64, 128, 128), (64, 128, -1), (128, 256, 32), (192, 384, 64), (256, 1024, -1)])
def test_pack_unpack_roundtrip(bits, dtype, n, k, group):
    groups = 1 if group == -1 else k // group
    codes, scales = _random_codes(n, k, bits, groups, dtype)
    qweight, mscales = marlin.pack(codes, scales, bits)
    assert qweight.shape == (k // 16, n * 16 * bits // 32)
    assert mscales.shape == (groups, n) and mscales.dtype == dtype
    c2, s2 = marlin.unpack(qweight, mscales, bits, n, k)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)


def test_k_equal_group_uses_the_channelwise_scale_table():
    codes, scales = _random_codes(64, 128, 4, 1, torch.float16)
    _, ms = marlin.pack(codes, scales, 4)
    assert torch.equal(ms[0, :32], scales[:32, 0][marlin.scale_perm(True)])


def test_closed_form_word_layout_4bit():
    # FORMATS.md 3.3: nibble s of word (kt, col) holds B[16kt + r, 64nb + 16j + cc].
    n, k = 128, 256
    codes, scales = _random_codes(n, k, 4, 2, torch.float16, seed=3)
    b = codes.t()
    qweight, _ = marlin.pack(codes, scales, 4)
    rows = [0, 8, 0, 8, 1, 9, 1, 9]
    cols = [0, 0, 8, 8, 0, 0, 8, 8]
    for kt, col in [(0, 0), (3, 77), (15, 255), (7, 130)]:
        word = int(qweight[kt, col]) & 0xFFFFFFFF
        nb, w = divmod(col, 128)
        lane, j = divmod(w, 4)
        t, c = lane % 4, lane // 4
        for s in range(8):
            expect = int(b[16 * kt + 2 * t + rows[s], 64 * nb + 16 * j + c + cols[s]])
            assert (word >> (4 * s)) & 0xF == expect


def test_3d_experts_pack_per_expert():
    codes = torch.randint(0, 16, (2, 64, 256), dtype=torch.uint8)
    scales = torch.rand(2, 64, 2).to(torch.bfloat16)
    qw, ms = marlin.pack(codes, scales, 4)
    assert qw.shape == (2, 16, 128) and ms.shape == (2, 2, 64)
    for e in range(2):
        q1, m1 = marlin.pack(codes[e], scales[e], 4)
        assert torch.equal(qw[e], q1) and torch.equal(ms[e], m1)
    c2, s2 = marlin.unpack(qw, ms, 4, 64, 256)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)


def test_shape_errors_name_sizes_and_rule():
    with pytest.raises(ShapeError, match=r"n % 64 == 0.*n=96"):
        marlin.pack(*_random_codes(96, 128, 4, 1, torch.float16), 4)
    with pytest.raises(ShapeError, match=r"k % 128 == 0.*k=192"):
        marlin.pack(*_random_codes(64, 192, 4, 1, torch.float16), 4)
    with pytest.raises(ShapeError, match="0..15"):
        marlin.pack(*_random_codes(64, 128, 8, 1, torch.float16), 4)
    with pytest.raises(ShapeError, match="int32"):
        marlin.unpack(torch.zeros(8, 64, dtype=torch.int32), torch.zeros(1, 64), 4, 64, 128)
    assert marlin.check_shape(64, 128, 128) is None
    assert marlin.check_shape(64, 384, 128) is None  # 384 = 3 groups of 128
    assert marlin.check_shape(64, 384, -1) is None  # channelwise: any k that is a multiple of 128
    assert marlin.check_shape(64, 384, 256) == "k=384 is not a multiple of the group size 256"
    assert marlin.check_shape(96, 128, 128) == "n=96 (out_features) is not a multiple of 64"
    assert marlin.check_shape(64, 192, -1) == "k=192 (in_features) is not a multiple of 128"


@pytest.mark.parametrize("n", [32, 64, 96, 128])
@pytest.mark.parametrize("k", [64, 128, 192, 256, 384])
@pytest.mark.parametrize("group", [64, 128, 256, -1])
def test_shape_gate_admits_exactly_what_pack_can_hold(n, k, group):
    """The converter's gate (rtnq.numerics.shape_rule) says yes exactly when packing succeeds."""
    g = k if group == -1 else group
    reason = marlin.check_shape(n, k, group)
    if k % g:
        assert reason is not None
        return
    codes, scales = _random_codes(n, k, 4, k // g, torch.float16)
    try:
        marlin.pack(codes, scales, 4)
        packed = True
    except ShapeError:
        packed = False
    assert packed == (reason is None), (n, k, group, reason)
