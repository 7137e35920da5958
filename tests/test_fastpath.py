"""The conversion fast path (rtnq.numerics.fused, csrc/rtnq_cpu.c) against the references.

Every backend must give, in each layout, the bytes of marlin.pack(*rtn.quantize(...)) ("marlin") or
of kpack.pack_rows / pack_cols of rtn.quantize's codes with plain scales ("rows", "cols"), and the
error of rtn.relative_error(w, rtn.dequantize(...)); the C library's AVX2 and portable-C paths and
the per-chunk torch path are each compared with that reference, and with the stored reference vectors.
"""

from __future__ import annotations

import importlib.machinery
import math

import pytest
import torch

from rtnq import synthetic
from rtnq.commands import convert
from rtnq.errors import InvalidWeightError, ShapeError, UsageError
from rtnq.numerics import cpu, fused, kpack, marlin, rtn

HAVE_C = fused.library() is not None
BACKENDS = ["torch"] + (["c", "c-scalar"] if HAVE_C else [])
LAYOUTS = fused.LAYOUTS


def packed(codes, scales, bits, layout):
    """The reference packers: rtn.quantize's (codes, scales) -> (qweight, scales) of `layout`."""
    if layout == "rows":
        return kpack.pack_rows(codes, bits), scales
    if layout == "cols":
        return kpack.pack_cols(codes, bits), scales.t().contiguous()
    return marlin.pack(codes, scales, bits)


def reference(w, bits, group, layout="marlin"):
    codes, scales = rtn.quantize(w, bits, group)
    q, s = packed(codes, scales, bits, layout)
    return q, s, rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group))


def test_layout_names_and_shapes():
    assert LAYOUTS == ("marlin", "rows", "cols")
    assert fused.out_shapes(192, 384, 4, 128) == ((24, 384), (3, 192))
    assert fused.out_shapes(192, 384, 4, 128, "rows") == ((192, 48), (192, 3))
    assert fused.out_shapes(192, 384, 8, 64, "cols") == ((96, 192), (6, 192))
    assert fused.out_shapes(192, 384, 8, -1, "rows") == ((192, 96), (192, 1))
    # off the tiles: Marlin stores the padded (128, 128), rows / cols the logical shape
    # (tests/test_fastpath_padded.py covers these shapes end to end)
    assert fused.out_shapes(100, 72, 4, -1) == ((8, 256), (1, 128))
    assert fused.out_shapes(100, 72, 4, -1, "rows") == ((100, 9), (100, 1))
    assert fused.out_shapes(104, 72, 8, -1, "cols") == ((18, 104), (1, 104))
    with pytest.raises(UsageError, match="layout must be one of marlin, rows, cols"):
        fused.out_shapes(192, 384, 4, 128, "gptq")


def test_the_c_library_is_built_where_a_compiler_exists():
    import shutil

    if shutil.which("cc") or shutil.which("gcc"):
        assert HAVE_C, "pip install built no rtnq/numerics/_cpu*.so although a C compiler is on PATH"
        assert fused.implementation() in ("c-avx2", "c-portable")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_vector_bit_exact(vectors, backend, layout):
    d = vectors("rtn_bf16_w4_g128")
    q, s, err = fused.quantize_pack(d["w"], 4, 128, backend=backend, layout=layout)
    expected = {
        "marlin": (d["marlin_qweight"], d["marlin_scales"]),
        "rows": (kpack.pack_rows(d["codes_nk"], 4), d["rtn_scale"]),
        "cols": (kpack.pack_cols(d["codes_nk"], 4), d["rtn_scale"].t()),
    }[layout]
    assert torch.equal(q, expected[0])
    assert torch.equal(s, expected[1])
    assert err == pytest.approx(rtn.relative_error(d["w"], d["rtn_dequant"]), rel=1e-7)


@pytest.mark.parametrize("name", ["marlin_w4_k512_n768_g128", "marlin_w8_k256_n256_g128"])
def test_kpack_reference_matches_the_stored_gptq_and_compressed_tensors_vectors(vectors, name):
    """The reference the "rows"/"cols" layouts are checked against is itself the external one."""
    d = vectors(name)
    bits = 4 if "_w4_" in name else 8
    codes_nk = d["codes"].t().contiguous()
    assert torch.equal(kpack.pack_rows(codes_nk, bits), d["ct_weight_packed"])
    assert torch.equal(kpack.pack_cols(codes_nk, bits), d["gptq_qweight"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_k_packed_words_hold_the_codes_lsb_first(backend, bits):
    """The word formula itself, independent of kpack: word w of row r, field s = code [r, w*pf + s]."""
    w = _weights(torch.bfloat16)
    codes, scales = rtn.quantize(w, bits, 64)
    pf = 32 // bits
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    for layout in ("rows", "cols"):
        q, s, _ = fused.quantize_pack(w, bits, 64, backend=backend, layout=layout)
        words = (q if layout == "rows" else q.t()).to(torch.int64) & 0xFFFFFFFF
        fields = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        assert torch.equal(fields.reshape(codes.shape).to(torch.uint8), codes), layout
        assert torch.equal(s if layout == "rows" else s.t(), scales), layout


def _weights(dtype, n=192, k=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[torch.rand(n, k, generator=g) < 0.002] *= 40  # outliers
    w[3, :] = 0  # all-zero row: every group zero
    w[5, 32:64] = 0  # one zero group of 32
    w[7, :128] = 1e-3 * torch.arange(128) / 128  # all positive
    w[9, 64:] = w[9, 64:] * 1e6  # large values (fp16: overflows to inf; skipped below)
    w[11, :] = w[11, :] * 1e-30  # tiny: bf16 subnormal scales, fp16 all zero
    w = w.to(dtype)
    return torch.where(torch.isfinite(w), w, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_rtn_quantize_and_marlin_pack(backend, dtype, bits, group, layout):
    w = _weights(dtype)
    q_ref, s_ref, e_ref = reference(w, bits, group, layout)
    q, s, e = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert e == pytest.approx(e_ref, rel=1e-6, nan_ok=True)  # fp16 row 9: infinite scales -> NaN in both


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_row_chunk_writes_only_its_part(backend, dtype, bits, group, layout):
    """Rows [64, 192) of a 256-row weight: that part of each output is the reference's, the rest of
    the (sentinel-filled) buffers is untouched, and the sums are the chunk's alone."""
    w = _weights(dtype, n=256, k=256, seed=3)
    row0, rows = 64, 128
    q_ref, s_ref, _ = reference(w, bits, group, layout)
    qshape, sshape = fused.out_shapes(256, 256, bits, group, layout)
    q = torch.full(qshape, -0x5A5A5A5B, dtype=torch.int32)
    s = torch.full(sshape, 1234.0, dtype=dtype)
    sums = [0.0, 0.0]
    fused.quantize_rows(w[row0 : row0 + rows], row0, q, s, bits, group, sums, backend=backend, layout=layout)
    if layout == "rows":
        q_part, s_part = (slice(row0, row0 + rows), slice(None)), (slice(row0, row0 + rows), slice(None))
    elif layout == "cols":
        q_part, s_part = (slice(None), slice(row0, row0 + rows)), (slice(None), slice(row0, row0 + rows))
    else:
        words = marlin.TILE * bits // 32
        q_part, s_part = (slice(None), slice(row0 * words, (row0 + rows) * words)), (slice(None), slice(row0, row0 + rows))
    q_mask = torch.zeros(qshape, dtype=torch.bool)
    q_mask[q_part] = True
    s_mask = torch.zeros(sshape, dtype=torch.bool)
    s_mask[s_part] = True
    assert torch.equal(q[q_mask], q_ref[q_mask])
    assert torch.equal(s[s_mask], s_ref[s_mask])
    assert bool((q[~q_mask] == -0x5A5A5A5B).all()) and bool((s[~s_mask] == 1234.0).all())
    w64 = w[row0 : row0 + rows].double()
    codes, scales = rtn.quantize(w[row0 : row0 + rows], bits, group)
    d64 = w64 - rtn.dequantize(codes, scales, bits, group).double()
    assert sums[0] == pytest.approx(float((w64 * w64).sum()), rel=1e-6)
    assert sums[1] == pytest.approx(float((d64 * d64).sum()), rel=1e-6, nan_ok=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunks_in_any_order_equal_the_whole_tensor(backend, bits, layout):
    w = _weights(torch.bfloat16, n=320, k=256, seed=4)
    q_ref, s_ref, e_ref = fused.quantize_pack(w, bits, 64, backend=backend, layout=layout)
    qshape, sshape = fused.out_shapes(320, 256, bits, 64, layout)
    q, s = torch.zeros(qshape, dtype=torch.int32), torch.zeros(sshape, dtype=w.dtype)
    sums = [0.0, 0.0]
    for row0, rows in ((192, 128), (0, 64), (64, 128)):
        fused.quantize_rows(w[row0 : row0 + rows], row0, q, s, bits, 64, sums, backend=backend, layout=layout)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert fused.relative_error(sums) == pytest.approx(e_ref, rel=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [128, -1])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_group_per_row_when_k_equals_the_group(backend, dtype, bits, group, layout):
    """k == g: a single scale row (Marlin then uses its channelwise scale permutation)."""
    w = _weights(dtype, n=192, k=128, seed=5)
    q_ref, s_ref, e_ref = reference(w, bits, group, layout)
    q, s, e = fused.quantize_pack(w, bits, group, backend=backend, layout=layout)
    assert s.shape == ((192, 1) if layout == "rows" else (1, 192))
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert e == pytest.approx(e_ref, rel=1e-6, nan_ok=True)  # fp16 row 9, as above


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
def test_error_sums_are_the_same_in_every_layout(backend, dtype, bits):
    """Only the stores differ between layouts: the same backend gives the very same sums."""
    w = _weights(dtype, n=512, k=512, seed=6)
    w[9] = w[10]  # no infinite fp16 scales: NaN sums would compare unequal
    found = {}
    for layout in LAYOUTS:
        qshape, sshape = fused.out_shapes(512, 512, bits, 128, layout)
        q, s = torch.empty(qshape, dtype=torch.int32), torch.empty(sshape, dtype=dtype)
        sums = [0.0, 0.0]
        fused.quantize_rows(w, 0, q, s, bits, 128, sums, backend=backend, layout=layout)
        found[layout] = sums
    assert found["rows"] == found["marlin"] and found["cols"] == found["marlin"], found


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_buffers_for_the_layout_are_refused(backend):
    w = _weights(torch.bfloat16)
    q, s = torch.empty(24, 384, dtype=torch.int32), torch.empty(3, 192, dtype=torch.bfloat16)  # Marlin's
    with pytest.raises(ShapeError):
        fused.quantize_rows(w, 0, q, s, 4, 128, [0.0, 0.0], backend=backend, layout="rows")
    with pytest.raises(ShapeError, match="do not fit n=192, k=384 in the cols layout"):
        fused.quantize_rows(w, 0, q, s, 4, 128, [0.0, 0.0], backend=backend, layout="cols")
    with pytest.raises(ShapeError, match="do not fit n=192, k=384 in the rows layout"):
        fused.quantize_rows(w, 0, q, s.t().contiguous(), 4, 128, [0.0, 0.0], backend=backend, layout="rows")
    with pytest.raises(UsageError, match="layout must be one of"):
        fused.quantize_pack(w, 4, 128, backend=backend, layout="gptq")


def _every_maxabs(dtype):
    """Groups of 32 whose max |w| runs through every finite positive 16-bit value (and 0)."""
    top = 0x7F7F if dtype == torch.bfloat16 else 0x7BFF
    m = torch.arange(0, top + 1, dtype=torch.int32).to(torch.int16).view(dtype).float()
    # the group: +-m and 30 fractions of it, including values that land near half-steps
    frac = torch.cat([torch.tensor([1.0, -1.0]), torch.linspace(-0.999, 0.999, 30)])
    groups = (m[:, None] * frac[None, :]).to(dtype)
    groups = torch.where(torch.isfinite(groups), groups, torch.zeros_like(groups))
    flat = groups.reshape(-1)
    k = 512
    n = -(-flat.numel() // k)
    n += -n % 64
    w = torch.zeros(n * k, dtype=dtype)
    w[: flat.numel()] = flat
    return w.view(n, k)


@pytest.mark.skipif(not HAVE_C, reason="the C fast path is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_16bit_scale_and_its_rounding_cases(dtype, bits, layout):
    """Exhaustive over the scale: every finite 16-bit max |w|, subnormal to the largest (fp16: the
    ones whose 2 * maxabs overflows give an infinite scale), with values around each half-step."""
    w = _every_maxabs(dtype)
    q_ref, s_ref, _ = reference(w, bits, 32, layout)
    for backend in ("c", "c-scalar"):
        q, s, _ = fused.quantize_pack(w, bits, 32, backend=backend, layout=layout)
        assert torch.equal(s, s_ref), backend
        assert torch.equal(q, q_ref), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("group", [128, -1])
def test_nan_and_inf_name_the_tensor(backend, bad, layout, group):
    w = _weights(torch.bfloat16)
    w[130, 200] = bad
    with pytest.raises(InvalidWeightError, match="layers.7.mlp.up_proj.weight: weight contains NaN or Inf"):
        fused.quantize_pack(w, 4, group, name="layers.7.mlp.up_proj.weight", backend=backend, layout=layout)


def test_chunked_quantize_item_equals_whole_tensor_for_experts():
    """A 3-D (experts, n, k) weight fed in 64-row chunks, fp32 source cast to bf16 per chunk (numpy, as
    the converter's reader hands them over)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 128, 256, generator=g) * 0.02
    plan_item = _item(w.shape, "F32", bits=4, group=64)
    chunks = [w[e, r : r + 64].numpy() for e in range(3) for r in range(0, 128, 64)]
    q, s, err = convert.quantize_item(plan_item, iter(chunks))
    q_whole, s_whole, err_whole = convert.quantize_item(plan_item, w.numpy())
    w16 = w.to(torch.bfloat16)
    codes, scales = rtn.quantize(w16, 4, 64)
    q_ref, s_ref = marlin.pack(codes, scales, 4)
    for qq, ss in ((q, s), (q_whole, s_whole)):
        assert torch.equal(torch.from_numpy(qq), q_ref)
        assert torch.equal(torch.from_numpy(ss).view(torch.bfloat16), s_ref)
    e_ref = rtn.relative_error(w16, rtn.dequantize(codes, scales, 4, 64))
    assert err == pytest.approx(e_ref) and err_whole == pytest.approx(e_ref)


def test_the_torch_free_module_agrees_with_marlin_on_its_constants():
    assert (cpu.TILE, cpu.ROW_ALIGN) == (marlin.TILE, marlin.BLOCK_N)


def _item(shape, st_dtype, bits, group):
    from rtnq import dtypes
    from rtnq.checkpoint.source import TensorSpec
    from rtnq.selection import precision

    spec = TensorSpec("model.layers.0.mlp.experts", st_dtype, tuple(shape), "x.safetensors", 0, 0)
    d = precision.Decision(spec.name, "quantized", bits=bits, group_size=group, rule="test")
    qdt = dtypes.BY_SHORT["bf16"]
    return convert.Item(spec, d, convert.output_entries(spec, d, qdt), "x.safetensors", qdt)


def test_conversion_bytes_identical_with_and_without_the_c_library(small_model, tmp_path, monkeypatch):
    def convert_to(out):
        plan = convert.make_plan(small_model, out, convert.ConvertOptions(bits=4, keep_int8=["mlp"]))
        return convert.run(plan).manifest

    fast = convert_to(tmp_path / "fast")
    monkeypatch.setattr(cpu, "library", lambda: None)
    slow = convert_to(tmp_path / "slow")
    files = sorted(p.name for p in (tmp_path / "fast").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "slow").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name
    for name, e in fast.tensors.items():
        if e.error is None:
            assert slow.tensors[name].error is None
        else:
            assert e.error == pytest.approx(slow.tensors[name].error, rel=1e-6)


def test_relative_error_from_sums():
    assert fused.relative_error([0.0, 0.0]) == 0.0
    assert fused.relative_error([4.0, 1.0]) == 0.5
    assert math.isnan(fused.relative_error([4.0, float("nan")]))


def test_a_stale_library_is_reported_not_used(tmp_path, monkeypatch):
    """A _cpu library built from another rtnq's source (an older ABI) is never called; convert warns that
    it falls back to the slow reference path instead of slowing down silently."""
    import shutil
    import subprocess

    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    src = tmp_path / "old.c"
    src.write_text("int rtnq_cpu_abi(void) { return 1; }\n")
    so = tmp_path / "pkg" / f"_cpu{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    so.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    (so.parent / "cpu.py").write_text("")
    monkeypatch.setattr(cpu, "__file__", str(so.parent / "cpu.py"))
    monkeypatch.setattr(cpu, "_PROBLEM", [])
    fused.library.cache_clear()  # the same function as cpu.library
    try:
        assert fused.library() is None and fused.implementation() == "torch-reference"
        assert f"built for another rtnq version (ABI 1, this one needs {cpu.ABI})" in fused.problem()
    finally:
        fused.library.cache_clear()


def test_convert_warns_when_the_fast_path_is_unusable(tmp_path, monkeypatch):
    from cliutil import run

    synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(layers=1))
    monkeypatch.setattr(cpu, "problem", lambda: "the C fast path _cpu.so was built for another rtnq")
    r = run("convert", tmp_path / "src", tmp_path / "out")
    assert r.code == 0 and "warning: the C fast path _cpu.so was built for another rtnq" in r.err
