"""The conversion fast path (rtnq.fastquant, csrc/rtnq_cpu.c, the overlapped pipeline) against the references.

Every backend must give the bytes of marlin.pack(*rtn.quantize(...)) and the error of
rtn.relative_error(w, rtn.dequantize(...)); the C library's AVX2 and portable-C paths and the
per-chunk torch path are each compared with that reference, and with the stored reference vectors.
"""

from __future__ import annotations

import math

import pytest
import torch

from rtnq import convert, fastquant, marlin, rtn, testing
from rtnq.errors import CheckpointError, InvalidWeightError
from rtnq.source import Reader, scan
from rtnq.writer import Entry, ShardWriter

HAVE_C = fastquant.library() is not None
BACKENDS = ["torch"] + (["c", "c-scalar"] if HAVE_C else [])


def reference(w, bits, group):
    codes, scales = rtn.quantize(w, bits, group)
    q, s = marlin.pack(codes, scales, bits)
    return q, s, rtn.relative_error(w, rtn.dequantize(codes, scales, bits, group))


def test_the_c_library_is_built_where_a_compiler_exists():
    import shutil

    if shutil.which("cc") or shutil.which("gcc"):
        assert HAVE_C, "pip install built no rtnq/_cpu*.so although a C compiler is on PATH"
        assert fastquant.implementation() in ("c-avx2", "c-portable")


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_vector_bit_exact(vectors, backend):
    d = vectors("rtn_bf16_w4_g128")
    q, s, err = fastquant.quantize_pack(d["w"], 4, 128, backend=backend)
    assert torch.equal(q, d["marlin_qweight"])
    assert torch.equal(s, d["marlin_scales"])
    assert err == pytest.approx(rtn.relative_error(d["w"], d["rtn_dequant"]), rel=1e-7)


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
def test_matches_rtn_quantize_and_marlin_pack(backend, dtype, bits, group):
    w = _weights(dtype)
    q_ref, s_ref, e_ref = reference(w, bits, group)
    q, s, e = fastquant.quantize_pack(w, bits, group, backend=backend)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert e == pytest.approx(e_ref, rel=1e-6, nan_ok=True)  # fp16 row 9: infinite scales -> NaN in both


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
def test_every_16bit_scale_and_its_rounding_cases(dtype, bits):
    """Exhaustive over the scale: every finite 16-bit max |w|, subnormal to the largest (fp16: the
    ones whose 2 * maxabs overflows give an infinite scale), with values around each half-step."""
    w = _every_maxabs(dtype)
    q_ref, s_ref, _ = reference(w, bits, 32)
    for backend in ("c", "c-scalar"):
        q, s, _ = fastquant.quantize_pack(w, bits, 32, backend=backend)
        assert torch.equal(s, s_ref), backend
        assert torch.equal(q, q_ref), backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_name_the_tensor(backend, bad):
    w = _weights(torch.bfloat16)
    w[130, 200] = bad
    with pytest.raises(InvalidWeightError, match="layers.7.mlp.up_proj.weight: weight contains NaN or Inf"):
        fastquant.quantize_pack(w, 4, 128, name="layers.7.mlp.up_proj.weight", backend=backend)


def test_chunked_quantize_item_equals_whole_tensor_for_experts():
    """A 3-D (experts, n, k) weight fed in 64-row chunks, fp32 source cast to bf16 per chunk."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 128, 256, generator=g) * 0.02
    plan_item = _item(w.shape, "F32", bits=4, group=64)
    chunks = [w[e, r : r + 64] for e in range(3) for r in range(0, 128, 64)]
    q, s, err = convert.quantize_item(plan_item, iter(chunks))
    q_whole, s_whole, err_whole = convert.quantize_item(plan_item, w)
    w16 = w.to(torch.bfloat16)
    codes, scales = rtn.quantize(w16, 4, 64)
    q_ref, s_ref = marlin.pack(codes, scales, 4)
    assert torch.equal(q, q_ref) and torch.equal(q_whole, q_ref)
    assert torch.equal(s, s_ref) and torch.equal(s_whole, s_ref)
    e_ref = rtn.relative_error(w16, rtn.dequantize(codes, scales, 4, 64))
    assert err == pytest.approx(e_ref) and err_whole == pytest.approx(e_ref)


def _item(shape, st_dtype, bits, group):
    from rtnq import precision
    from rtnq.source import TensorSpec

    spec = TensorSpec("model.layers.0.mlp.experts", st_dtype, tuple(shape), "x.safetensors", 0, 0)
    d = precision.Decision(spec.name, "marlin", bits=bits, group_size=group, rule="test")
    qdt = torch.bfloat16
    return convert.Item(spec, d, convert.output_entries(spec, d, qdt), "x.safetensors", qdt)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    src = tmp_path_factory.mktemp("fp") / "m"
    return testing.write_checkpoint(src, testing.SampleSpec(layers=3, shards=2, odd_linear=True, hidden=256,
                                                            intermediate=640, vocab=4096))


def test_conversion_bytes_identical_with_and_without_the_c_library(small_model, tmp_path, monkeypatch):
    def convert_to(out):
        plan = convert.make_plan(small_model, out, convert.Options(bits=4, keep_int8=["mlp"]))
        return convert.run(plan).manifest

    fast = convert_to(tmp_path / "fast")
    monkeypatch.setattr(fastquant, "library", lambda: None)
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


def test_small_chunks_and_few_buffers_give_the_same_files(small_model, tmp_path, monkeypatch):
    """Chunking and back-pressure are invisible in the output (tiny chunks force many of each)."""
    plan = convert.make_plan(small_model, tmp_path / "a", convert.Options(bits=8))
    convert.run(plan)
    monkeypatch.setattr(convert, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(convert, "IN_FLIGHT", 1)
    monkeypatch.setattr(convert, "OUT_BUFFERS", 1)
    plan = convert.make_plan(small_model, tmp_path / "b", convert.Options(bits=8))
    convert.run(plan)
    for p in sorted((tmp_path / "a").glob("*.safetensors")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_a_shard_truncated_after_planning_fails_cleanly(small_model, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(small_model, src)
    plan = convert.make_plan(src, tmp_path / "out", convert.Options())
    shard = sorted(src.glob("*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    with pytest.raises(CheckpointError, match="truncated"):
        convert.run(plan)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_reader_map_range_matches_read_bytes(small_model):
    specs = scan(small_model)
    with Reader(small_model) as r:
        for spec in specs[:6]:
            whole = r.read_bytes(spec)
            for start, n in ((0, spec.nbytes), (3, min(100, spec.nbytes - 3)), (spec.nbytes // 2, spec.nbytes // 2)):
                assert torch.equal(r.map_range(spec, start, n), whole[start : start + n])
            buf = torch.empty(spec.nbytes // 3, dtype=torch.uint8)
            r.read_into(spec, buf, 1)
            assert torch.equal(buf, whole[1 : 1 + buf.numel()])


def test_shard_writer_takes_tensors_in_any_order_and_in_parts(tmp_path):
    entries = [Entry("a", "U8", (5,)), Entry("b", "I32", (3,)), Entry("c", "U8", (0,)), Entry("d", "U8", (9,))]
    data = {e.name: torch.arange(e.nbytes, dtype=torch.uint8) + 7 * i for i, e in enumerate(entries)}
    w = ShardWriter(tmp_path / "in_order.safetensors", entries)
    for e in entries:
        w.write_part(e.name, data[e.name], whole=True)
    w.close()
    calls = []
    w = ShardWriter(tmp_path / "shuffled.safetensors", entries, writeback=lambda *a: calls.append(a))
    w.write_part("d", data["d"][:4])
    w.write_part("b", data["b"])
    w.write_part("d", data["d"][4:])
    w.write_part("c", data["c"])
    with pytest.raises(ValueError, match="closed before a was written"):
        ShardWriter(tmp_path / "x.safetensors", entries).close()
    w.write_part("a", data["a"])
    with pytest.raises(ValueError, match="needs 5 bytes"):
        w.write_part("a", data["a"][:1])
    w.close()
    assert (tmp_path / "in_order.safetensors").read_bytes() == (tmp_path / "shuffled.safetensors").read_bytes()


def test_relative_error_from_sums():
    assert fastquant.relative_error([0.0, 0.0]) == 0.0
    assert fastquant.relative_error([4.0, 1.0]) == 0.5
    assert math.isnan(fastquant.relative_error([4.0, float("nan")]))
