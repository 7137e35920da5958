"""The conversion fast path (rtnq.numerics.fused) on shapes off the Marlin kernels' tiles.

Any shape shape_rule.problem allows must give, from every backend and in every layout, the bytes of
the reference: rtn.quantize of the logical weight, then marlin.pack(*marlin.pad(...)) ("marlin",
stored at shape_rule.padded(n, k)) or kpack.pack_rows / pack_cols with plain scales ("rows",
"cols", stored at the logical shape); the error is rtn.relative_error's of the logical weight.
"""

from __future__ import annotations

import re

import pytest
import torch

from rtnq.errors import ShapeError
from rtnq.numerics import fused, kpack, marlin, rtn, shape_rule

HAVE_C = fused.library() is not None
BACKENDS = ["torch"] + (["c", "c-scalar"] if HAVE_C else [])
LAYOUTS = fused.LAYOUTS
SENTINEL_Q, SENTINEL_S = -0x5A5A5A5B, 1234.0


def _rel(backend):
    """How close the error sums come to float64's: the AVX2 kernel ("c") adds each tile's squares in
    fp32 before the double sum (csrc/rtnq_cpu.c; ~3e-9 relative on aligned shapes too), the scalar C
    and the torch reference sum in double."""
    return 1e-7 if backend == "c" and fused.implementation() == "c-avx2" else 1e-12

# (n, k, group): off the tiles in n, in k or both; k=72 fits no group of 32 or more, so channelwise only
SHAPES = [
    (576, 576, 64),
    (192, 576, 64),
    (192, 576, 32),
    (192, 576, -1),
    (100, 72, -1),
    (104, 72, -1),
    (960, 1536, 128),
    (64, 64, 64),
    (64, 64, -1),
    (100, 256, 128),
    (100, 256, -1),
    (104, 256, 32),
]


def _ids(shape):
    n, k, g = shape
    return f"n{n}-k{k}-g{g}"


def _weights(n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.002] *= 40  # outliers
    w[3, :] = 0  # all-zero row
    w[5, 32:64] = 0  # one zero group of 32
    w[7, : min(k, 128)] = 1e-3 * torch.arange(min(k, 128)) / 128  # all positive
    w[n - 1, :] = w[n - 1, :] * 3  # the last logical row: next to the padding rows
    w[:, k - 1] = 0.05  # the last logical column: next to the padding columns
    return w.to(dtype)


def _reference(w, bits, group, layout):
    """rtn.quantize of the logical weight, packed for `layout`, and rtn.relative_error."""
    codes, scales = rtn.quantize(w, bits, group)
    err = rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group))
    if layout == "rows":
        return kpack.pack_rows(codes, bits), scales, err
    if layout == "cols":
        return kpack.pack_cols(codes, bits), scales.t().contiguous(), err
    return *marlin.pack(*marlin.pad(codes, scales, bits, group), bits), err


def _allowed(n, k, group, layout):
    return shape_rule.problem(n, k, group, layout) is None


def test_out_shapes_are_padded_for_marlin_only():
    # marlin: (100, 72) is stored at (128, 128); channelwise keeps one scale group
    assert fused.out_shapes(100, 72, 4, -1) == ((8, 256), (1, 128))
    assert fused.out_shapes(100, 72, 8, -1) == ((8, 512), (1, 128))
    assert fused.out_shapes(576, 576, 4, 64) == ((40, 1152), (10, 576))  # k' = 640
    assert fused.out_shapes(100, 256, 4, 128) == ((16, 256), (2, 128))  # n' = 128
    assert fused.out_shapes(64, 64, 8, 32) == ((8, 256), (4, 64))  # k' = 128
    # rows / cols: the logical shape
    assert fused.out_shapes(100, 72, 4, -1, "rows") == ((100, 9), (100, 1))
    assert fused.out_shapes(576, 576, 8, 64, "cols") == ((144, 576), (9, 576))
    assert fused.out_shapes(104, 256, 4, 32, "cols") == ((32, 104), (8, 104))
    for n, k, g in SHAPES:
        n_p, k_p = shape_rule.padded(n, k)
        g_p = 1 if g == -1 else k_p // g
        assert fused.out_shapes(n, k, 4, g) == ((k_p // 16, 2 * n_p), (g_p, n_p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_padded_shapes_match_the_reference(backend, bits, layout, shape):
    n, k, group = shape
    if not _allowed(n, k, group, layout):
        pytest.skip("the storage rule refuses this shape in this layout (see the refusal test)")
    w = _weights(n, k, seed=n + k)
    q_ref, s_ref, e_ref = _reference(w, bits, group, layout)
    q, s, e = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
    assert (tuple(q.shape), tuple(s.shape)) == fused.out_shapes(n, k, bits, group, layout)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert e == pytest.approx(e_ref, rel=_rel(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(100, 72, -1), (192, 576, 64), (104, 256, 32)], ids=_ids)
def test_padded_shapes_in_fp16(backend, layout, shape):
    n, k, group = shape
    if not _allowed(n, k, group, layout):
        pytest.skip("the storage rule refuses this shape in this layout")
    w = _weights(n, k, torch.float16, seed=7)
    for bits in (4, 8):
        q_ref, s_ref, e_ref = _reference(w, bits, group, layout)
        q, s, e = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), bits
        assert e == pytest.approx(e_ref, rel=_rel(backend))


def _chunks(n):
    """128 rows, then the remainder (a short last chunk when n % 64 != 0), fed remainder first."""
    if n <= 128:
        first = min(n, 64)
    else:
        first = 128
    parts = [(0, first)] + ([(first, n - first)] if n > first else [])
    return parts[::-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(576, 576, 64), (100, 256, 128), (104, 72, -1), (192, 576, 32),
                                   (960, 1536, 128), (100, 72, -1)], ids=_ids)
def test_chunked_equals_whole_on_padded_shapes(backend, bits, layout, shape):
    """Row chunks into sentinel-filled buffers: every byte (the padding included) is written, and the
    result and the error equal the whole-tensor call and the reference."""
    n, k, group = shape
    if not _allowed(n, k, group, layout):
        pytest.skip("the storage rule refuses this shape in this layout")
    w = _weights(n, k, seed=11)
    q_ref, s_ref, e_ref = _reference(w, bits, group, layout)
    qshape, sshape = fused.out_shapes(n, k, bits, group, layout)
    q = torch.full(qshape, SENTINEL_Q, dtype=torch.int32)
    s = torch.full(sshape, SENTINEL_S, dtype=w.dtype)
    sums = [0.0, 0.0]
    for row0, rows in _chunks(n):
        fused.quantize_rows(w[row0 : row0 + rows], row0, q, s, bits, group, sums, backend=backend, layout=layout)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert fused.relative_error(sums) == pytest.approx(e_ref, rel=_rel(backend))
    q_whole, s_whole, e_whole = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
    assert torch.equal(q, q_whole) and torch.equal(s, s_whole)
    assert fused.relative_error(sums) == pytest.approx(e_whole, rel=_rel(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(100, 72, -1), (104, 72, -1), (192, 576, 64), (100, 256, 128)], ids=_ids)
def test_padding_adds_nothing_to_the_error_sums(backend, layout, shape):
    """The padded chunk's sums are those of the logical rows (zeros add 0 to both), and exactly those of
    the same weight zero-padded by hand and quantized on the tiles."""
    n, k, group = shape
    if not _allowed(n, k, group, layout):
        pytest.skip("the storage rule refuses this shape in this layout")
    w = _weights(n, k, seed=13)
    qshape, sshape = fused.out_shapes(n, k, 4, group, layout)
    sums = [0.0, 0.0]
    fused.quantize_rows(w, 0, torch.empty(qshape, dtype=torch.int32), torch.empty(sshape, dtype=w.dtype),
                        4, group, sums, backend=backend, layout=layout)
    codes, scales = rtn.quantize(w, 4, group)
    w64 = w.double()
    d64 = w64 - rtn.dequantize(codes, scales, 4, group).double()
    assert sums[0] == pytest.approx(float((w64 * w64).sum()), rel=_rel(backend))
    assert sums[1] == pytest.approx(float((d64 * d64).sum()), rel=_rel(backend))

    n_p, k_p = shape_rule.padded(n, k)
    w_p = torch.zeros(n_p, k_p, dtype=w.dtype)
    w_p[:n, :k] = w
    qshape, sshape = fused.out_shapes(n_p, k_p, 4, group, layout)
    sums_p = [0.0, 0.0]
    fused.quantize_rows(w_p, 0, torch.empty(qshape, dtype=torch.int32), torch.empty(sshape, dtype=w.dtype),
                        4, group, sums_p, backend=backend, layout=layout)
    assert sums_p == sums


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(100, 72, -1), (576, 576, 64), (192, 576, 32), (100, 256, 128),
                                   (64, 64, 64)], ids=_ids)
def test_marlin_padding_dequantizes_to_exact_zeros(backend, bits, shape):
    """Outside the logical (n, k) block the padded Marlin codes are the bias and the all-padding scale
    groups 0; cropping gives back rtn.quantize's codes and scales."""
    n, k, group = shape
    w = _weights(n, k, seed=17)
    q, s, _ = fused.quantize_pack(w, bits, group, backend=backend)
    n_p, k_p = shape_rule.padded(n, k)
    codes_p, scales_p = marlin.unpack(q, s, bits, n_p, k_p)
    assert codes_p.shape == (n_p, k_p)
    b = rtn.bias(bits)
    assert bool((codes_p[n:, :] == b).all()) and bool((codes_p[:, k:] == b).all())
    assert bool((scales_p[n:, :] == 0).all())
    if group != -1:
        assert scales_p.shape == (n_p, k_p // group)
        assert bool((scales_p[:, k // group :] == 0).all())  # groups wholly in the padding columns
    else:
        assert scales_p.shape == (n_p, 1)
    w_hat = rtn.dequantize(codes_p, scales_p, bits, group)
    assert bool((w_hat[n:, :] == 0).all()) and bool((w_hat[:, k:] == 0).all())
    codes, scales = rtn.quantize(w, bits, group)
    c, sc = marlin.crop(codes_p, scales_p, n, k)
    assert torch.equal(c, codes) and torch.equal(sc, scales)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_the_storage_rule_refuses(backend):
    cases = [
        ((100, 256), 128, "cols", "n=100 (out_features) is not a multiple of 8"),
        ((64, 100), -1, "rows", "k=100 (in_features) is not a multiple of 8"),
        ((64, 72), 32, "marlin", "k=72 (in_features) is not a multiple of any group size <= 32"),
        ((64, 576), 128, "marlin", "k=576 is not a multiple of the group size 128"),
        ((64, 576), 128, "rows", "k=576 is not a multiple of the group size 128"),
    ]
    for (n, k), group, layout, text in cases:
        w = _weights(n, k) if k >= 64 else torch.zeros(n, k, dtype=torch.bfloat16)
        with pytest.raises(ShapeError, match="^" + re.escape(f"weight: {text}")):
            fused.quantize_pack(w, 4, group, backend=backend, layout=layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_wrong_chunks_and_buffers_are_refused_on_padded_shapes(backend, layout):
    n, k = 100, 256
    w = _weights(n, k)
    qshape, sshape = fused.out_shapes(n, k, 4, 64, layout)
    q, s = torch.empty(qshape, dtype=torch.int32), torch.empty(sshape, dtype=w.dtype)

    def call(rows, row0, group=64, q=q, s=s):
        fused.quantize_rows(rows, row0, q, s, 4, group, [0.0, 0.0], backend=backend, layout=layout)

    with pytest.raises(ShapeError, match="is not a run of 64-row blocks"):
        call(w[:64], 32)  # row0 off a block
    with pytest.raises(ShapeError, match="is not a run of 64-row blocks"):
        call(w[:36], 0)  # a short chunk that is not the tensor's last
    with pytest.raises(ShapeError, match="is not a run of 64-row blocks"):
        call(w[:64], 128 if layout == "marlin" else 64)  # past n (the padded n for Marlin)
    with pytest.raises(ShapeError, match="k=256 is not a multiple of the group size 96"):
        call(w[:64], 0, group=96)
    if layout == "marlin":
        # buffers at the logical shape: Marlin's are padded
        q_log = torch.empty(k // 16, n * 2, dtype=torch.int32)
        s_log = torch.empty(k // 64, n, dtype=w.dtype)
        with pytest.raises(ShapeError, match=re.escape("(16, 200), (4, 100) do not fit n=100, k=256 in the marlin")):
            call(w[64:], 64, q=q_log, s=s_log)
    else:
        # buffers at the padded shape fit a 128-row weight, of which [64, 100) is not the last chunk
        qp, sp = fused.out_shapes(128, 256, 4, 64, layout)
        with pytest.raises(ShapeError, match=re.escape("row chunk [64, 100) is not a run of 64-row blocks of n=128")):
            call(w[64:], 64, q=torch.empty(qp, dtype=torch.int32), s=torch.empty(sp, dtype=w.dtype))
    with pytest.raises(ShapeError, match=f"do not fit n={n if layout != 'marlin' else 128}, k=128"):
        call(w[:, :128], 0)  # rows of another k (k=192 would fit Marlin's padded 256)
    call(w[64:], 64)  # the real last chunk is fine
