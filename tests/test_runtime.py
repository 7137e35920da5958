"""rtnq.runtime on the CPU: lazy import, the dispatcher's threshold file, QuantLinear's reference path,
argument checks of ops, and the checkpoint loader. No GPU and no built library needed."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rtnq import formats
from rtnq.checkpoint import manifest
from rtnq.numerics import marlin, rtn, shape_rule
from rtnq.errors import CheckpointError, KernelUnavailable, RtnqError, ShapeError, UsageError
from rtnq.runtime import MarlinWeight, QuantLinear, dispatch, library, load_checkpoint, ops

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


# ---- Import hygiene ---------------------------------------------------------------------------------------------


def test_import_loads_no_library_and_no_cli_deps():
    code = (
        "import sys, rtnq.runtime as rt\n"
        "assert not rt.library.is_loaded()\n"
        "bad = [m for m in ('typer', 'rich', 'safetensors', 'ctypes.util') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    env = dict(os.environ, RTNQ_CUDA_LIB="/nonexistent/librtnq_cuda.so")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_missing_library_is_one_actionable_line(monkeypatch, tmp_path):
    monkeypatch.delenv(library.ENV_VAR, raising=False)
    monkeypatch.setattr(library, "candidates", lambda: [tmp_path / "nope" / library.LIB_NAME])
    library.reset()
    try:
        with pytest.raises(KernelUnavailable) as e:
            library.load()
        msg = str(e.value)
        assert "\n" not in msg
        assert "librtnq_cuda.so not found" in msg and "make -C cuda" in msg and "nvcc" in msg
        assert e.value.exit_code == 3
    finally:
        library.reset()


def test_env_var_to_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv(library.ENV_VAR, str(tmp_path / "x.so"))
    library.reset()
    try:
        with pytest.raises(KernelUnavailable, match=r"RTNQ_CUDA_LIB=.*x\.so does not exist"):
            library.load()
    finally:
        library.reset()


def test_library_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv(library.ENV_VAR, str(tmp_path / "env.so"))
    found = library.candidates()
    assert found[0] == tmp_path / "env.so"
    assert found[1] == ROOT / "rtnq" / "runtime" / library.LIB_NAME
    assert found[2] == ROOT / "cuda" / "build" / library.LIB_NAME


# ---- Dispatcher -------------------------------------------------------------------------------------------------


@pytest.fixture()
def dispatch_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "dispatch.json"
    monkeypatch.setenv(dispatch.ENV_FILE, str(path))
    dispatch.clear_cache()
    yield path
    dispatch.clear_cache()


def test_defaults_are_unmeasured(dispatch_file):
    th = dispatch.load_thresholds("NVIDIA H100 80GB HBM3", 4, torch.bfloat16)
    assert th == dispatch.Thresholds(4, 1024, measured=False)
    assert th.small_m_max == dispatch.DEFAULT_SMALL_M_MAX and th.tensor_core_max == dispatch.DEFAULT_TENSOR_CORE_MAX
    assert not dispatch_file.exists()  # reading never creates the file


def test_default_file_location(monkeypatch, tmp_path):
    monkeypatch.delenv(dispatch.ENV_FILE, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dispatch.dispatch_file() == tmp_path / ".cache" / "rtnq" / "dispatch.json"


def test_save_and_load_roundtrip_keyed_by_gpu_bits_dtype(dispatch_file):
    written = dispatch.save_thresholds("NVIDIA H100 80GB HBM3", 4, torch.bfloat16, 6, 640, source="rtnq bench run 1")
    assert written == dispatch_file
    dispatch.save_thresholds("NVIDIA H100 80GB HBM3", 8, "fp16", 12, 300)
    dispatch.save_thresholds("NVIDIA H200", 4, "bf16", 4, 512)

    th = dispatch.load_thresholds("NVIDIA H100 80GB HBM3", 4, "bfloat16")
    assert (th.small_m_max, th.tensor_core_max, th.measured, th.source) == (6, 640, True, "rtnq bench run 1")
    assert dispatch.load_thresholds("NVIDIA H100 80GB HBM3", 8, torch.float16).tensor_core_max == 300
    assert dispatch.load_thresholds("NVIDIA H200", 4, torch.bfloat16).small_m_max == 4
    # Not measured for this combination: defaults.
    assert not dispatch.load_thresholds("NVIDIA H100 80GB HBM3", 4, torch.float16).measured
    assert not dispatch.load_thresholds("NVIDIA A100", 4, torch.bfloat16).measured

    data = json.loads(dispatch_file.read_text())
    assert data["version"] == 1 and len(data["entries"]) == 3
    entry = data["entries"]["NVIDIA H100 80GB HBM3|w4|bfloat16"]
    assert entry["gpu"] == "NVIDIA H100 80GB HBM3" and entry["bits"] == 4 and entry["dtype"] == "bfloat16"
    assert entry["saved_at"].endswith("Z")
    assert [p.name for p in dispatch_file.parent.iterdir()] == ["dispatch.json"]  # no temp files left


def test_save_overwrites_the_same_key(dispatch_file):
    dispatch.save_thresholds("G", 4, "bf16", 1, 2)
    dispatch.save_thresholds("G", 4, "bf16", 3, 4)
    th = dispatch.load_thresholds("G", 4, "bf16")
    assert (th.small_m_max, th.tensor_core_max) == (3, 4)


def test_cached_thresholds_see_new_saves(dispatch_file):
    assert not dispatch.cached_thresholds("G", 4, torch.bfloat16).measured
    dispatch.save_thresholds("G", 4, torch.bfloat16, 2, 64)
    assert dispatch.cached_thresholds("G", 4, torch.bfloat16).tensor_core_max == 64


@pytest.mark.parametrize("bad", [-1, 2.5, "8", True, None])
def test_save_rejects_bad_values(dispatch_file, bad):
    with pytest.raises(RtnqError, match="must be an integer >= 0"):
        dispatch.save_thresholds("G", 4, "bf16", bad, 10)
    assert not dispatch_file.exists()


def test_save_rejects_bad_keys(dispatch_file):
    with pytest.raises(UsageError, match="--bits: must be 4 or 8, got 3"):
        dispatch.save_thresholds("G", 3, "bf16", 1, 2)
    with pytest.raises(UsageError, match="dtype must be bfloat16 or float16"):
        dispatch.save_thresholds("G", 4, torch.float32, 1, 2)
    with pytest.raises(UsageError, match="gpu_name"):
        dispatch.save_thresholds("", 4, "bf16", 1, 2)


def test_corrupt_or_foreign_files_are_clear_errors(dispatch_file):
    dispatch_file.parent.mkdir(parents=True)
    dispatch_file.write_text("{not json")
    with pytest.raises(RtnqError, match="not a readable dispatch file.*re-run `rtnq bench`"):
        dispatch.load_thresholds("G", 4, "bf16")
    dispatch_file.write_text(json.dumps({"version": 2, "entries": {}}))
    with pytest.raises(RtnqError, match="version 2 is not supported"):
        dispatch.load_thresholds("G", 4, "bf16")
    dispatch_file.write_text(json.dumps([1, 2]))
    with pytest.raises(RtnqError, match="not a dispatch file"):
        dispatch.load_thresholds("G", 4, "bf16")
    dispatch_file.write_text(json.dumps({"version": 1, "entries": {"G|w4|bfloat16": {"small_m_max": -3, "tensor_core_max": 9}}}))
    with pytest.raises(RtnqError, match="small_m_max must be an integer >= 0"):
        dispatch.load_thresholds("G", 4, "bf16")


def test_choose_path_boundaries():
    th = dispatch.Thresholds(8, 1024, measured=True)
    assert [dispatch.choose_path(m, th) for m in (0, 1, 8, 9, 1024, 1025, 10**6)] == [
        "small_m", "small_m", "small_m", "tensor_core", "tensor_core", "dequant", "dequant"]
    no_tc = dispatch.Thresholds(16, 16, measured=True)  # tensor-core path disabled
    assert [dispatch.choose_path(m, no_tc) for m in (16, 17)] == ["small_m", "dequant"]
    all_dequant = dispatch.Thresholds(0, 0, measured=True)
    assert dispatch.choose_path(1, all_dequant) == "dequant"
    with pytest.raises(UsageError):
        dispatch.choose_path(-1, th)


def test_forced_path(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_FORCE, raising=False)
    assert dispatch.forced_path() is None
    monkeypatch.setenv(dispatch.ENV_FORCE, "dequant")
    assert dispatch.forced_path() == "dequant"
    monkeypatch.setenv(dispatch.ENV_FORCE, "fast")
    with pytest.raises(UsageError, match="RTNQ_FORCE_PATH=fast is not one of"):
        dispatch.forced_path()


def test_dtype_names():
    assert dispatch.dtype_name(torch.bfloat16) == dispatch.dtype_name("bf16") == "bfloat16"
    assert dispatch.dtype_name(torch.float16) == dispatch.dtype_name("half") == "float16"


# ---- QuantLinear: the CPU reference path ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [128, 64, 32, -1])
def test_quantlinear_cpu_matches_rtn_dequantize(bits, dtype, group):
    gen = torch.Generator().manual_seed(bits * 100 + abs(group))
    n, k = 192, 384
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    layer = QuantLinear.from_weight(w, bits, group)
    codes, scales = rtn.quantize(w, bits, group)
    w_deq = rtn.dequantize(codes, scales, bits, group)
    assert torch.equal(layer.dequantized_weight().view(torch.int16), w_deq.view(torch.int16))  # bit-exact

    x = torch.randn(2, 3, k, generator=gen).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    assert torch.equal(y, F.linear(x, w_deq))  # the same computation
    ref = x.double() @ w_deq.double().t()
    assert float((y.double() - ref).norm() / ref.norm()) < (1e-3 if dtype == torch.float16 else 8e-3)
    # Quantization error of the layer itself stays at RTN level.
    assert rtn.relative_error(w, layer.dequantized_weight()) < (0.15 if bits == 4 else 0.01)


def test_quantlinear_bias_and_float32_input():
    w = torch.randn(128, 256).to(torch.bfloat16)
    bias = torch.randn(128).to(torch.bfloat16)
    layer = QuantLinear.from_weight(w, 8, 128, bias=bias)
    x = torch.randn(5, 256)
    y = layer(x)
    assert y.dtype == torch.float32
    ref = F.linear(x, layer.dequantized_weight().float(), bias.float())
    assert torch.equal(y, ref)


def test_quantlinear_from_packed_vllm_tensors():
    # A layer built straight from tensors vLLM's packer produced (tests/data) computes (code - 8) * scale.
    t = load_file(str(DATA / "marlin_w4_k512_n768_g128.safetensors"))
    k, n = t["codes"].shape
    layer = QuantLinear(MarlinWeight(t["marlin_vllm_qweight"], t["marlin_vllm_scales"], bits=4, n=n, k=k, group_size=128))
    ref = ((t["codes"].to(torch.int16) - 8).to(torch.float16) * t["scales"].repeat_interleave(128, 0)).t()
    assert torch.equal(layer.dequantized_weight(), ref)


def test_quantlinear_state_dict_roundtrip():
    layer = QuantLinear.from_weight(torch.randn(64, 128).to(torch.float16), 4, -1)
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "scales"}
    assert sd["qweight"].dtype == torch.int32 and tuple(sd["qweight"].shape) == (8, 128)
    assert tuple(sd["scales"].shape) == (1, 64)
    assert "bits=4, channelwise" in repr(layer)


def test_quantlinear_shape_errors():
    # Shapes off the kernels' tiles are padded; what cannot be stored at all, or needs a smaller group, fails.
    with pytest.raises(ShapeError, match=r"k=100 \(in_features\) is not a multiple of any group size <= 128"):
        QuantLinear.from_weight(torch.randn(64, 100), 4, 128)
    with pytest.raises(ShapeError, match=r"k=192 \(in_features\) is not a multiple of 128; choose group size 64 "
                                         r"\(--group-size 64\) or -1"):
        QuantLinear.from_weight(torch.randn(64, 192), 4, 128)
    with pytest.raises(ShapeError, match=r"k=100 \(in_features\) is not a multiple of 8"):
        QuantLinear.from_weight(torch.randn(64, 100), 4, -1)
    layer = QuantLinear.from_weight(torch.randn(64, 128), 4, 128)
    with pytest.raises(ShapeError, match="input has 64 features, the layer expects 128"):
        layer(torch.randn(3, 64))
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(8, 128\)"):
        MarlinWeight(layer.qweight[:, :64], layer.scales, bits=4, n=64, k=128, group_size=128)
    with pytest.raises(ShapeError, match=r"scales must be float16/bfloat16 \(1, 64\)"):
        MarlinWeight(layer.qweight, layer.scales.float(), bits=4, n=64, k=128, group_size=128)
    with pytest.raises(ShapeError, match=r"bias must have shape \(64,\)"):
        QuantLinear(layer.packed, bias=torch.zeros(3))
    with pytest.raises(UsageError, match="--bits: must be 4 or 8, got 3"):
        MarlinWeight(layer.qweight, layer.scales, bits=3, n=64, k=128, group_size=128)
    with pytest.raises(UsageError, match="QuantLinear takes a rtnq.runtime.MarlinWeight, got Tensor"):
        QuantLinear(layer.qweight)


# ---- ops: argument checks happen before the library is needed ---------------------------------------------------------


def _packed(bits=4, group=128, n=128, k=256, dtype=torch.bfloat16):
    codes, scales = rtn.quantize(torch.randn(n, k).to(dtype), bits, group)
    return marlin.pack(codes, scales, bits)


def test_ops_refuse_cpu_tensors_without_loading_the_library(monkeypatch):
    monkeypatch.setattr(library, "load", lambda: pytest.fail("library loaded"))
    w = MarlinWeight(*_packed(), bits=4, n=128, k=256, group_size=128)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with pytest.raises(UsageError, match="x is on cpu; the CUDA kernels need CUDA tensors"):
        ops.gemm(x, w)
    with pytest.raises(UsageError, match="qweight is on cpu"):
        ops.dequantize(w)


def test_ops_argument_errors(monkeypatch):
    monkeypatch.setattr(library, "load", lambda: pytest.fail("library loaded"))
    qw, s = _packed()
    w = MarlinWeight(qw, s, bits=4, n=128, k=256, group_size=128)
    x = torch.randn(3, 256).to(torch.bfloat16)
    with pytest.raises(UsageError, match="path must be one of auto, small_m, tensor_core, dequant"):
        ops.gemm(x, w, path="fast")
    with pytest.raises(ShapeError, match=r"x must be \(m, 256\)"):
        ops.gemm(x[:, :128], w)
    with pytest.raises(UsageError, match="x is torch.float16 but the scales are torch.bfloat16"):
        ops.gemm(x.half(), w)
    # The weight's own checks run when the MarlinWeight is made, before any ops call can see it.
    with pytest.raises(ShapeError, match="qweight must be int32"):
        MarlinWeight(qw, s, bits=8, n=128, k=256, group_size=128)
    with pytest.raises(ShapeError, match=r"scales must be float16/bfloat16 \(1, 128\)"):
        MarlinWeight(qw, s, bits=4, n=128, k=256, group_size=-1)
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(16, 384\) for n=130, k=256 \(stored padded to n=192"):
        MarlinWeight(qw, s, bits=4, n=130, k=256, group_size=128)
    with pytest.raises(UsageError, match="layout must be 'nk' or 'kn'"):
        ops.dequantize(w, layout="xy")
    # Loose tensors are refused by type, so no unchecked weight reaches the library.
    for call in (lambda: ops.gemm(x, qw), lambda: ops.dequantize(qw)):
        with pytest.raises(UsageError, match="weight must be a rtnq.runtime.MarlinWeight, got Tensor"):
            call()


# ---- MarlinWeight ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits, group", [(4, 128), (8, -1), (4, 32)])
def test_marlin_weight_pack_unpack_and_reference(bits, group):
    w_nk = (torch.randn(128, 256) * 0.02).to(torch.float16)
    codes, scales = rtn.quantize(w_nk, bits, group)
    w = MarlinWeight.pack(codes, scales, bits, group)
    assert (w.bits, w.n, w.k, w.group_size) == (bits, 128, 256, group)
    assert w.qweight.dtype == torch.int32 and tuple(w.qweight.shape) == (256 // 16, 128 * bits // 2)
    assert tuple(w.scales.shape) == ((1 if group == -1 else 256 // group), 128) and w.scales.dtype == torch.float16
    got_codes, got_scales = w.unpack()
    assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
    assert torch.equal(w.reference_dequantize(), rtn.dequantize(codes, scales, bits, group))


def test_marlin_weight_is_a_checked_frozen_value():
    import dataclasses

    w = MarlinWeight(*_packed(), bits=4, n=128, k=256, group_size=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.bits = 8  # type: ignore[misc]
    c = w.clone()
    assert c.qweight.data_ptr() != w.qweight.data_ptr() and torch.equal(c.qweight, w.qweight)
    h = w.to(scale_dtype=torch.float16)
    assert h.scales.dtype == torch.float16 and h.qweight is w.qweight and (h.n, h.k, h.bits) == (128, 256, 4)
    assert w.to("cpu").device == torch.device("cpu")
    assert repr(w) == "MarlinWeight(n=128, k=256, 4-bit, g128, torch.bfloat16, cpu)"
    with pytest.raises(UsageError, match="--group-size: must be 32, 64, 128 or -1"):
        MarlinWeight(w.qweight, w.scales, bits=4, n=128, k=256, group_size=100)
    with pytest.raises(ShapeError, match=r"k=200 \(in_features\) is not a multiple of the group size 128"):
        MarlinWeight(w.qweight, w.scales, bits=4, n=128, k=200, group_size=128)
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(8, 256\) for n=128, k=100 \(stored padded"):
        MarlinWeight(w.qweight, w.scales, bits=4, n=128, k=100, group_size=-1)
    with pytest.raises(ShapeError, match="n >= 1 and k >= 1"):
        MarlinWeight(w.qweight, w.scales, bits=4, n=0, k=256, group_size=128)


def test_quantlinear_packed_follows_its_buffers():
    layer = QuantLinear.from_weight(torch.randn(64, 128).to(torch.bfloat16), 8, 128)
    w = layer.packed
    assert isinstance(w, MarlinWeight) and (w.bits, w.n, w.k, w.group_size) == (8, 64, 128, 128)
    assert w.qweight is layer.qweight and w.scales is layer.scales
    layer.to(torch.float16)  # buffers cast like any module's (qweight stays int32)
    assert layer.packed.scales.dtype == torch.float16 and layer.packed.qweight.dtype == torch.int32
    again = QuantLinear(layer.packed)
    assert torch.equal(again.dequantized_weight(), layer.dequantized_weight())


# ---- Padded shapes: logical (n, k) off the kernels' tiles, stored at shape_rule.padded(n, k) --------------------------

# (n, k, group): padded n and k, padded n only, padded k only with a channelwise-sized tail, an aligned control.
PADDED_SHAPES = [(576, 576, 64), (192, 576, 64), (100, 256, 128), (100, 96, 32), (72, 200, -1), (960, 1536, 128)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, group", PADDED_SHAPES)
def test_quantlinear_cpu_padded_shapes_match_rtn(bits, dtype, n, k, group):
    gen = torch.Generator().manual_seed(n * 7 + k + bits)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(dtype)
    layer = QuantLinear.from_weight(w, bits, group)
    n_s, k_s = shape_rule.padded(n, k)
    assert (layer.out_features, layer.in_features) == (n, k)
    packed = layer.packed
    assert (packed.n, packed.k, packed.n_stored, packed.k_stored) == (n, k, n_s, k_s)
    assert packed.is_padded == ((n_s, k_s) != (n, k))
    assert tuple(layer.qweight.shape) == (k_s // 16, n_s * bits // 2)
    assert tuple(layer.scales.shape) == (1 if group == -1 else k_s // group, n_s)
    w_deq = rtn.dequantize(*rtn.quantize(w, bits, group), bits, group)
    assert torch.equal(layer.dequantized_weight().view(torch.int16), w_deq.view(torch.int16))  # bit-exact, (n, k)
    x = torch.randn(2, 3, k, generator=gen).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, n) and torch.equal(y, F.linear(x, w_deq))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k, group", PADDED_SHAPES)
def test_marlin_weight_padded_roundtrip_and_padding_is_zero(bits, n, k, group):
    w_nk = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.02).to(torch.bfloat16)
    codes, scales = rtn.quantize(w_nk, bits, group)
    w = MarlinWeight.pack(codes, scales, bits, group)
    n_s, k_s = w.n_stored, w.k_stored
    got_codes, got_scales = w.unpack()  # logical
    assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)
    assert torch.equal(w.reference_dequantize(), rtn.dequantize(codes, scales, bits, group))
    # The bytes the marlin format stores for this logical weight (formats.MARLIN.reference pads then packs).
    ref_q, ref_s = formats.MARLIN.reference(codes, scales, bits, group)
    assert torch.equal(w.qweight, ref_q) and torch.equal(w.scales, ref_s)
    # The stored tensors' padding: bias codes (the code of 0.0) and zero scale groups, i.e. exact zeros.
    codes_p, scales_p = marlin.unpack(w.qweight, w.scales, bits, n_s, k_s)
    assert torch.equal(codes_p[:n, :k], codes)
    assert bool((codes_p[n:] == rtn.bias(bits)).all()) and bool((codes_p[:, k:] == rtn.bias(bits)).all())
    groups = 1 if group == -1 else k // group
    assert bool((scales_p[n:] == 0).all()) and bool((scales_p[:, groups:] == 0).all())
    dense_p = rtn.dequantize(codes_p, scales_p, bits, group)
    assert not bool(dense_p[n:].any()) and not bool(dense_p[:, k:].any())
    stored = f", stored {n_s}x{k_s}" if (n_s, k_s) != (n, k) else ""
    assert repr(w).startswith(f"MarlinWeight(n={n}, k={k}{stored}, {bits}-bit, ")


def test_marlin_weight_padded_shape_errors():
    codes, scales = rtn.quantize(torch.randn(100, 192).to(torch.float16), 4, 64)
    w = MarlinWeight.pack(codes, scales, 4, 64)  # stored (128, 256): qweight (16, 256), scales (4, 128)
    assert tuple(w.qweight.shape) == (16, 256) and tuple(w.scales.shape) == (4, 128)
    # Any logical (n, k) with the same stored shape is accepted (the manifest says which); others are not.
    assert MarlinWeight(w.qweight, w.scales, 4, 65, 256, 64).n_stored == 128
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(16, 384\) for n=130, k=192 \(stored padded to "
                                         r"n=192, k=256\), 4-bit; got torch.int32 \(16, 256\)"):
        MarlinWeight(w.qweight, w.scales, 4, 130, 192, 64)
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(24, 256\) for n=100, k=320"):
        MarlinWeight(w.qweight, w.scales, 4, 100, 320, 64)
    with pytest.raises(ShapeError, match=r"scales must be float16/bfloat16 \(2, 128\) for group_size 128"):
        MarlinWeight(w.qweight, w.scales, 4, 100, 256, 128)
    with pytest.raises(ShapeError, match=r"k=192 \(in_features\) is not a multiple of the group size 128"):
        MarlinWeight(w.qweight, w.scales, 4, 100, 192, 128)
    with pytest.raises(ShapeError, match=r"qweight must be int32 \(16, 512\) for n=100, k=192 .* 8-bit"):
        MarlinWeight(w.qweight, w.scales, 8, 100, 192, 64)
    with pytest.raises(ShapeError, match=r"scales must be float16/bfloat16 \(4, 128\)"):
        MarlinWeight(w.qweight, w.scales[:, :100], 4, 100, 192, 64)  # logical-width scales: not stored ones
    with pytest.raises(ShapeError, match="MarlinWeight.pack: expected 2-D codes"):
        MarlinWeight.pack(codes[None], scales[None], 4, 64)


class FakeLibrary:
    """Stands in for librtnq_cuda.so on CPU tensors: reads and writes through the raw pointers ops passes, like
    the kernels, and computes with the reference. Records what each kernel saw (the stored dims, padded x)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def view(ptr, shape, dtype):
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).view(shape)

    def _weight(self, q_ptr, s_ptr, n, k, bits, group, dt):
        # The real library refuses stored dims off the tiles (ERR_SHAPE); ops must never pass logical ones.
        assert n % 64 == 0 and k % 128 == 0, (n, k)
        dtype = {library.FLOAT16: torch.float16, library.BFLOAT16: torch.bfloat16}[dt]
        qweight = self.view(q_ptr, (k // 16, n * bits // 2), torch.int32).clone()
        scales = self.view(s_ptr, (1 if group == -1 else k // group, n), dtype).clone()
        return MarlinWeight(qweight, scales, bits, n, k, group).reference_dequantize(), dtype

    def _gemm(self, x_ptr, q_ptr, s_ptr, out_ptr, m, n, k, bits, group, dt, ws, ws_size, stream):
        w, dtype = self._weight(q_ptr, s_ptr, n, k, bits, group, dt)
        x = self.view(x_ptr, (m, k), dtype).clone()
        self.calls.append(("gemm", m, n, k, x))
        self.view(out_ptr, (m, n), dtype).copy_((x.double() @ w.double().t()).to(dtype))
        return library.OK

    rtnq_gemm_small_m = rtnq_gemm_tensor_core = _gemm

    def rtnq_dequantize(self, q_ptr, s_ptr, out_ptr, n, k, bits, group, dt, layout, stream):
        w, dtype = self._weight(q_ptr, s_ptr, n, k, bits, group, dt)
        self.calls.append(("dequantize", n, k, layout))
        if layout == library.LAYOUT_NK:
            self.view(out_ptr, (n, k), dtype).copy_(w)
        else:
            self.view(out_ptr, (k, n), dtype).copy_(w.t())
        return library.OK


@pytest.fixture()
def fake_library(monkeypatch):
    """ops on CPU tensors with FakeLibrary behind it: checks ops' padding and cropping without a GPU."""
    import contextlib

    fake = FakeLibrary()
    monkeypatch.setattr(library, "load", lambda: fake)
    monkeypatch.setattr(ops, "_cuda", lambda t, what: None)
    monkeypatch.setattr(ops, "_stream", lambda device: 0)
    monkeypatch.setattr(ops, "workspace", lambda device, stream=None: torch.zeros(64, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return fake


@pytest.mark.parametrize("n, k, group", [(100, 192, 64), (576, 576, 64), (192, 576, -1), (128, 256, 128)])
def test_ops_run_padded_weights_at_stored_dims(fake_library, n, k, group):
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(n + k)
    w = MarlinWeight.pack(*rtn.quantize((torch.randn(n, k, generator=gen) * 0.05).to(dtype), 4, group), 4, group)
    n_s, k_s = w.n_stored, w.k_stored
    w_ref = w.reference_dequantize()
    for layout, want in (("nk", w_ref), ("kn", w_ref.t())):
        out = torch.full(want.shape, float("nan"), dtype=dtype)
        assert ops.dequantize(w, layout=layout, out=out) is out
        assert torch.equal(out.view(torch.int16), want.view(torch.int16)), layout  # bit-exact, logical shape
        assert torch.equal(ops.dequantize(w, layout=layout), want)
    assert fake_library.calls[-1][:3] == ("dequantize", n_s, k_s)

    x = torch.randn(5, k, generator=gen).to(dtype)
    ref = (x.double() @ w_ref.double().t()).to(dtype)
    for path in ("small_m", "tensor_core"):
        fake_library.calls.clear()
        y = ops.gemm(x, w, path=path)
        assert y.shape == (5, n) and y.is_contiguous() and torch.equal(y, ref), path
        (_, m, got_n, got_k, got_x), = fake_library.calls
        assert (m, got_n, got_k) == (5, n_s, k_s)
        assert torch.equal(got_x[:, :k], x) and not bool(got_x[:, k:].any())  # zero-padded, never garbage
        out = torch.full((5, n), float("nan"), dtype=dtype)
        assert ops.gemm(x, w, path=path, out=out) is out and torch.equal(out, ref), path
    y = ops.gemm(x, w, path="dequant")
    assert y.shape == (5, n) and float((y.double() - ref.double()).norm() / ref.double().norm()) < 8e-3
    with pytest.raises(ShapeError, match=rf"x must be \(m, {k}\)"):
        ops.gemm(torch.randn(5, k_s + 8).to(dtype), w)
    with pytest.raises(UsageError, match=rf"out must be a contiguous torch.bfloat16 \(5, {n}\) tensor"):
        ops.gemm(x, w, path="small_m", out=torch.empty(5, n_s + 64, dtype=dtype))
    with pytest.raises(UsageError, match=rf"out must be a contiguous torch.bfloat16 \({n}, {k}\) tensor"):
        ops.dequantize(w, out=torch.empty(n_s, k_s + 128, dtype=dtype))
    assert ops.gemm(x[:0], w).shape == (0, n)


# ---- Loader ----------------------------------------------------------------------------------------------------------


def write_checkpoint(root: Path, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A converted directory as `rtnq convert` writes it: two shards, a manifest, 4- and 8-bit layers, a
    channelwise layer, a layer stored padded (100 x 192 -> 128 x 256), biases, a norm and an embedding
    passed through. Returns the source weights."""
    gen = torch.Generator().manual_seed(7)
    src = {
        "model.layers.0.self_attn.q_proj.weight": ((torch.randn(128, 256, generator=gen) * 0.02).to(dtype), 4, 128),
        "model.layers.0.mlp.down_proj.weight": ((torch.randn(256, 128, generator=gen) * 0.02).to(dtype), 8, 128),
        "model.layers.1.mlp.up_proj.weight": ((torch.randn(64, 256, generator=gen) * 0.02).to(dtype), 4, -1),
        "model.layers.1.self_attn.o_proj.weight": ((torch.randn(100, 192, generator=gen) * 0.02).to(dtype), 4, 64),
    }
    passthrough = {
        "model.layers.0.self_attn.q_proj.bias": torch.randn(128, generator=gen).to(dtype),
        "model.norm.weight": torch.ones(256, dtype=dtype),
        "model.embed_tokens.weight": torch.randn(32, 256, generator=gen).to(dtype),
        "model.layers.1.self_attn.o_proj.bias": torch.randn(100, generator=gen).to(dtype),
    }
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    entries = {}
    for i, (name, (w, bits, group)) in enumerate(src.items()):
        codes, scales = rtn.quantize(w, bits, group)
        qw, s = formats.MARLIN.reference(codes, scales, bits, group)  # padded where the shape needs it
        stored = formats.MARLIN.stored_shape(tuple(w.shape))
        prefix = name[: -len(".weight")]
        shard = list(shards)[i % 2]
        shards[shard][f"{prefix}.qweight"] = qw
        shards[shard][f"{prefix}.scales"] = s
        entries[name] = manifest.TensorEntry(
            kind="quantized", shape=list(w.shape), dtype=str(dtype).removeprefix("torch."), bits=bits, group_size=group,
            outputs={"qweight": f"{prefix}.qweight", "scales": f"{prefix}.scales"}, shard=shard, rule="default",
            padded_shape=list(stored) if stored != tuple(w.shape) else None,
        )
    for name, t in passthrough.items():
        shard = list(shards)[1]
        shards[shard][name] = t
        entries[name] = manifest.TensorEntry(
            kind="passthrough", shape=list(t.shape), dtype=str(dtype).removeprefix("torch."),
            outputs={"tensor": name}, shard=shard, reason="not a linear weight inside a block",
        )
    root.mkdir(parents=True, exist_ok=True)
    for shard, tensors in shards.items():
        save_file(tensors, str(root / shard), metadata={"format": "rtnq"})
    m = manifest.Manifest(defaults={"bits": 4, "group_size": 128, "dtype": str(dtype).removeprefix("torch.")},
                          tensors=entries)
    (root / manifest.FILENAME).write_text(m.dumps())
    return {**{k: v[0] for k, v in src.items()}, **passthrough}


def test_loader_builds_quantlinears_and_passthrough_tensors(tmp_path):
    src = write_checkpoint(tmp_path / "ckpt")
    ckpt = load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert set(ckpt.linears) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                 "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"}
    assert set(ckpt.tensors) == {"model.layers.0.self_attn.q_proj.bias", "model.norm.weight",
                                 "model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.bias"}
    assert ckpt.skipped == []
    q = ckpt.linears["model.layers.0.self_attn.q_proj"]
    assert (q.bits, q.out_features, q.in_features, q.group_size) == (4, 128, 256, 128)
    assert torch.equal(q.bias, src["model.layers.0.self_attn.q_proj.bias"])
    assert ckpt.linears["model.layers.0.mlp.down_proj"].bits == 8
    assert ckpt.linears["model.layers.1.mlp.up_proj"].group_size == -1
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(ckpt.tensors[name], src[name])
    for module, layer in ckpt.linears.items():
        w = src[f"{module}.weight"]
        codes, scales = rtn.quantize(w, layer.bits, layer.group_size)
        assert torch.equal(layer.dequantized_weight(), rtn.dequantize(codes, scales, layer.bits, layer.group_size))
    x = torch.randn(4, 256).to(torch.bfloat16)
    y = q(x)
    assert torch.equal(y, F.linear(x, q.dequantized_weight(), q.bias))
    # The padded layer: logical features from the manifest, stored tensors at the padded shape.
    o = ckpt.linears["model.layers.1.self_attn.o_proj"]
    assert (o.out_features, o.in_features, o.group_size) == (100, 192, 64)
    assert (o.packed.n_stored, o.packed.k_stored) == (128, 256) and tuple(o.qweight.shape) == (16, 256)
    x = torch.randn(4, 192).to(torch.bfloat16)
    assert torch.equal(o(x), F.linear(x, o.dequantized_weight(), src["model.layers.1.self_attn.o_proj.bias"]))


def test_loader_errors(tmp_path):
    root = tmp_path / "ckpt"
    write_checkpoint(root)
    (root / "model-00002-of-00002.safetensors").rename(root / "moved.safetensors")
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors named in the manifest is missing"):
        load_checkpoint(root, device="cpu")
    (root / "moved.safetensors").rename(root / "model-00002-of-00002.safetensors")

    data = json.loads((root / manifest.FILENAME).read_text())
    data["tensors"]["model.layers.0.self_attn.q_proj.weight"]["outputs"]["qweight"] = "nope.qweight"
    (root / manifest.FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="tensor nope.qweight named in the manifest is missing"):
        load_checkpoint(root, device="cpu")

    data["tensors"]["model.layers.0.self_attn.q_proj.weight"]["outputs"]["qweight"] = "model.layers.0.self_attn.q_proj.qweight"
    data["tensors"]["model.layers.0.self_attn.q_proj.weight"]["shape"] = [128, 512]
    (root / manifest.FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="q_proj.weight does not match its manifest entry: qweight must be int32"):
        load_checkpoint(root, device="cpu")

    data["version"] = 9
    (root / manifest.FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="manifest version 9 is not supported"):
        load_checkpoint(root, device="cpu")

    (root / "model-00001-of-00002.safetensors").write_bytes(b"\x00" * 7)
    data["version"] = 1
    data["tensors"]["model.layers.0.self_attn.q_proj.weight"]["shape"] = [128, 256]
    (root / manifest.FILENAME).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="cannot read the shard"):
        load_checkpoint(root, device="cpu")

    with pytest.raises(CheckpointError, match="no rtnq_manifest.json"):
        load_checkpoint(tmp_path, device="cpu")


def _write_single(root: Path, name: str, shape, bits: int, group: int, qweight, scales, padded_shape=None) -> None:
    """A marlin-format directory holding one quantized entry with the given stored tensors."""
    prefix = name[: -len(".weight")]
    root.mkdir(parents=True, exist_ok=True)
    shard = "model.safetensors"
    save_file({f"{prefix}.qweight": qweight.contiguous(), f"{prefix}.scales": scales.contiguous()}, str(root / shard),
              metadata={"format": "rtnq"})
    entry = manifest.TensorEntry(
        kind="quantized", shape=list(shape), dtype="bfloat16", bits=bits, group_size=group, shard=shard,
        outputs={"qweight": f"{prefix}.qweight", "scales": f"{prefix}.scales"}, rule="default",
        padded_shape=None if padded_shape is None else list(padded_shape),
    )
    m = manifest.Manifest(defaults={"bits": bits, "group_size": group, "dtype": "bfloat16"}, tensors={name: entry})
    (root / manifest.FILENAME).write_text(m.dumps())


def test_loader_padded_experts_and_stored_shape_checks(tmp_path):
    # A 3-D expert weight off the tiles: kept raw at its stored (padded) shape, and checked against it.
    name = "model.layers.0.mlp.experts.down_proj.weight"
    w = (torch.randn(2, 100, 192) * 0.02).to(torch.bfloat16)
    codes, scales = rtn.quantize(w, 4, 64)
    qw, s = formats.MARLIN.reference(codes, scales, 4, 64)
    assert tuple(qw.shape) == (2, 16, 256) and tuple(s.shape) == (2, 4, 128)
    _write_single(tmp_path / "ok", name, w.shape, 4, 64, qw, s, padded_shape=(2, 128, 256))
    ckpt = load_checkpoint(tmp_path / "ok", device="cpu")
    assert ckpt.linears == {} and len(ckpt.skipped) == 1 and "3-D (expert)" in ckpt.skipped[0]
    assert torch.equal(ckpt.tensors["model.layers.0.mlp.experts.down_proj.qweight"], qw)
    got_codes, got_scales = formats.MARLIN.unpack(qw, s, 4, 100, 192)
    assert torch.equal(got_codes, codes) and torch.equal(got_scales, scales)

    # Unpadded (logical-shape) tensors are not what the marlin format stores: refused, for 3-D too.
    _write_single(tmp_path / "bad3d", name, w.shape, 4, 64, qw[:, :12], s)
    with pytest.raises(CheckpointError, match=r"experts.down_proj.weight does not match its manifest entry: qweight "
                                              r"must be int32 \(2, 16, 256\) for shape \(2, 100, 192\)"):
        load_checkpoint(tmp_path / "bad3d", device="cpu")
    _write_single(tmp_path / "bad_scales", name, w.shape, 4, 64, qw, s[:, :3, :100].contiguous())
    with pytest.raises(CheckpointError, match=r"scales must be \(2, 4, 128\)"):
        load_checkpoint(tmp_path / "bad_scales", device="cpu")
    _write_single(tmp_path / "bad_padded", name, w.shape, 4, 64, qw, s, padded_shape=(2, 100, 256))
    with pytest.raises(CheckpointError, match=r"padded_shape \[2, 100, 256\] is not the stored shape \(2, 128, 256\)"):
        load_checkpoint(tmp_path / "bad_padded", device="cpu")

    # 2-D: the same checks, then a QuantLinear with the logical features.
    name2 = "model.layers.0.self_attn.o_proj.weight"
    _write_single(tmp_path / "two_d", name2, (100, 192), 4, 64, qw[0].contiguous(), s[0].contiguous())
    layer = load_checkpoint(tmp_path / "two_d", device="cpu").linears["model.layers.0.self_attn.o_proj"]
    assert (layer.out_features, layer.in_features) == (100, 192)
    assert torch.equal(layer.dequantized_weight(), rtn.dequantize(codes[0], scales[0], 4, 64))
    _write_single(tmp_path / "two_d_bad", name2, (100, 192), 4, 64, qw[0, :12].contiguous(), s[0].contiguous())
    with pytest.raises(CheckpointError, match=r"o_proj.weight does not match its manifest entry: qweight must be int32 "
                                              r"\(16, 256\)"):
        load_checkpoint(tmp_path / "two_d_bad", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_loader_cuda_without_cuda(tmp_path):
    write_checkpoint(tmp_path / "ckpt")
    with pytest.raises(KernelUnavailable, match="needs a CUDA build of torch and a GPU.*device='cpu'"):
        load_checkpoint(tmp_path / "ckpt", device="cuda")
