"""Issue 14 item 3: FP8 sources (DeepSeek-style block-scaled `fp8`, compressed-tensors float-quantized) convert.

Every expectation is built here from the documented layouts with a plain dequantization written in this
file (float32 FP8 value times its scale, one cast to bf16), never with rtnq.checkpoint.fp8, then
quantized with the reference RTN and packed with the format's reference packers.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cliutil import leftovers, load_tensors, run
from rtnq import formats
from rtnq.checkpoint import fp8
from rtnq.commands.convert import execute
from rtnq.numerics import rtn

H = 320  # hidden: k of most linears, not a multiple of the 128 block (edge column blocks)
N = 200  # gate/up rows: not a multiple of 128 (an edge row block)
BLOCK = [128, 128]


def _fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 2).clamp(-448, 448).to(torch.float8_e4m3fn)


def _linears(experts: bool):
    """name -> (n, k) of the FP8 linears: layer 0 dense, layer 1 MoE with per-expert 2-D weights."""
    out = {}
    for i, moe in enumerate([False, True] if experts else [False]):
        p = f"model.layers.{i}"
        for name, shape in {"q_proj": (H, H), "k_proj": (128, H), "v_proj": (128, H), "o_proj": (H, H)}.items():
            out[f"{p}.self_attn.{name}.weight"] = shape
        mlps = [f"{p}.mlp.experts.{e}" for e in range(2)] + [f"{p}.mlp.shared_experts"] if moe else [f"{p}.mlp"]
        for m in mlps:
            out[f"{m}.gate_proj.weight"] = (N, H)
            out[f"{m}.up_proj.weight"] = (N, H)
            # k = 200: no group size divides it, so down_proj fails the storage rule and passes through
            out[f"{m}.down_proj.weight"] = (H, N) if not moe else (H, 192)
    return out


def _dense_tensors(experts: bool):
    t = {"model.embed_tokens.weight": torch.randn(64, H).to(torch.bfloat16),
         "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
         "lm_head.weight": torch.randn(64, H).to(torch.bfloat16)}
    for i in range(2 if experts else 1):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.rand(H).to(torch.bfloat16)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.rand(H).to(torch.bfloat16)
    if experts:  # the MoE router stays bf16 in these checkpoints
        t["model.layers.1.mlp.gate.weight"] = torch.randn(2, H).to(torch.bfloat16)
    return t


def deepseek(path, experts=True, drop_scale=None):
    """Block-scaled FP8: P.weight F8_E4M3 and P.weight_scale_inv float32 (ceil(n/128), ceil(k/128))."""
    t = _dense_tensors(experts)
    for j, (name, (n, k)) in enumerate(_linears(experts).items()):
        t[name] = _fp8((n, k), j)
        g = torch.Generator().manual_seed(1000 + j)
        t[name + "_scale_inv"] = torch.rand((-(-n // 128), -(-k // 128)), generator=g) * 1e-2 + 1e-3
    if drop_scale:
        del t[drop_scale]
    path.mkdir()
    save_file(t, path / "model.safetensors")
    cfg = {"model_type": "llama", "hidden_size": H, "torch_dtype": "bfloat16",
           "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                   "weight_block_size": BLOCK}}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def ct_fp8(path, strategy):
    """compressed-tensors float-quantized FP8: P.weight F8_E4M3, P.weight_scale bf16 ([1] per tensor, (n, 1) per
    channel), P.input_scale (static activation scale, dropped)."""
    t = _dense_tensors(False)
    for j, (name, (n, k)) in enumerate(_linears(False).items()):
        p = name.removesuffix(".weight")
        t[name] = _fp8((n, k), j)
        g = torch.Generator().manual_seed(2000 + j)
        shape = (1,) if strategy == "tensor" else (n, 1)
        t[f"{p}.weight_scale"] = (torch.rand(shape, generator=g) * 1e-2 + 1e-3).to(torch.bfloat16)
        t[f"{p}.input_scale"] = torch.tensor([0.02], dtype=torch.bfloat16)
    path.mkdir()
    save_file(t, path / "model.safetensors")
    args = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
            "group_size": None, "block_structure": None, "observer": "minmax"}
    qcfg = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args,
                                          "input_activations": {**args, "strategy": "tensor"}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": qcfg}))
    return path


def reference_dense(src, name, dtype=torch.bfloat16):
    """The documented dequantization, written out: each scale repeated over its block (cut at the edges)."""
    t = load_tensors(src)
    w = t[name].to(torch.float32)
    n, k = w.shape
    p = name.removesuffix(".weight")
    if f"{name}_scale_inv" in t:
        s = t[f"{name}_scale_inv"].to(torch.float32)
        full = s.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:n, :k]
    else:
        s = t[f"{p}.weight_scale"].to(torch.float32)
        full = s.reshape(-1, 1).expand(n, k) if s.numel() == n else s.reshape(1, 1).expand(n, k)
    return (w * full).to(dtype)


def check_output(src, out, fmt_name="marlin", dtype=torch.bfloat16):
    """Every FP8 linear: quantized outputs equal reference RTN of the reference dense weight, or (passthrough)
    the reference dense weight itself; no scale tensor in OUT; bf16 tensors unchanged."""
    fmt = formats.BY_NAME[fmt_name]
    m = json.loads((out / "rtnq_manifest.json").read_text())
    got = load_tensors(out)
    src_t = load_tensors(src)
    fp8_names = [n for n, v in src_t.items() if v.dtype == torch.float8_e4m3fn]
    assert fp8_names
    for name in fp8_names:
        e = m["tensors"][name]
        assert e["dtype"] == "float8_e4m3fn"
        ref = reference_dense(src, name, dtype)
        if e["kind"] == "passthrough":
            assert got[name].dtype == dtype and torch.equal(got[name], ref), name
            continue
        codes, scales = rtn.quantize(ref, e["bits"], e["group_size"])
        for role, want in zip(fmt.roles, fmt.reference(codes, scales, e["bits"], e["group_size"]), strict=True):
            assert torch.equal(got[e["outputs"][role]], want), (name, role)
    # OUT holds exactly the manifest's outputs (the compressed-tensors format names its own scales
    # weight_scale, which are then rtnq's, not the source's)
    assert set(got) == {o for e in m["tensors"].values() for o in e["outputs"].values()}
    for name, v in src_t.items():
        if name.endswith(("_scale_inv", ".weight_scale", ".input_scale")):
            assert name not in m["tensors"], name
            assert name not in got or got[name].dtype == dtype and got[name].shape != v.shape, name
        elif v.dtype != torch.float8_e4m3fn:
            assert torch.equal(got[name], v), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt.quant_method
    assert "weight_block_size" not in json.dumps(cfg) and "float-quantized" not in json.dumps(cfg)
    return m


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return deepseek(tmp_path_factory.mktemp("fp8") / "ds")


@pytest.mark.parametrize("fmt", ["marlin", "gptq", "compressed-tensors"])
def test_block_scaled_fp8_converts_to_rtn_of_the_dequantized_weight(ds, tmp_path, fmt):
    out = tmp_path / "out"
    r = run("convert", ds, out, "--format", fmt, "--skip", "layers.0.self_attn.o_proj")
    assert r.code == 0, r.err
    assert "FP8 block-scaled (128x128)" in r.err and "dequantized to bf16" in r.err
    m = check_output(ds, out, fmt)
    t = m["tensors"]
    assert t["model.layers.0.self_attn.o_proj.weight"]["kind"] == "passthrough"  # --skip: dense bf16
    assert t["model.layers.0.mlp.down_proj.weight"]["reason"].startswith("shape")  # gated: dense bf16
    assert t["model.layers.1.mlp.experts.1.up_proj.weight"]["kind"] == "quantized"
    assert t["model.layers.1.mlp.experts.0.down_proj.weight"]["kind"] == "quantized"
    assert t["model.layers.1.mlp.gate.weight"]["kind"] == "passthrough"
    assert m["totals"]["tensors"]["int4"] == sum(e["kind"] == "quantized" for e in t.values()) > 10
    v = run("verify", out, "--against", ds)  # re-derives through the same dequantization
    assert v.code == 0, v.out + v.err


def test_an_fp8_source_converts_without_torch(ds, tmp_path):
    """Issue 15: the FP8 dequantization convert runs is numpy (fp8.dense_rows), so an FP8 source needs no
    torch either when the C fast path is built; the bytes are those the torch reference verifies."""
    import subprocess
    import sys

    from rtnq.numerics import cpu

    if cpu.library() is None:
        pytest.skip("the C fast path is not built")
    out = tmp_path / "out"
    code = ("import sys; from rtnq import cli; sys.argv = ['rtnq'] + sys.argv[1:]\n"
            "try:\n    cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, "convert", str(ds), str(out), "--skip", "layers.0.self_attn.o_proj"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    check_output(ds, out)


def test_chunks_that_start_inside_a_scale_block(ds, tmp_path, monkeypatch):
    """64-row chunks: the second starts at row 64 of the first 128-row block, the third on the second block."""
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64 * H * 2)
    out = tmp_path / "out"
    r = run("convert", ds, out, "--bits", "8", "--group-size", "64")
    assert r.code == 0, r.err
    check_output(ds, out)


def test_dtype_fp16_dequantizes_to_fp16(ds, tmp_path):
    out = tmp_path / "out"
    r = run("convert", ds, out, "--dtype", "fp16", "--format", "gptq")
    assert r.code == 0, r.err
    check_output(ds, out, "gptq", torch.float16)
    assert run("verify", out, "--against", ds).code == 0


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_compressed_tensors_fp8(tmp_path, strategy):
    src = ct_fp8(tmp_path / "ct", strategy)
    out = tmp_path / "out"
    r = run("convert", src, out, "--format", "compressed-tensors")
    assert r.code == 0, r.err
    assert f"FP8 per-{strategy}" in r.err
    check_output(src, out, "compressed-tensors")
    assert run("verify", out, "--against", src).code == 0


def test_dry_run_says_the_source_is_fp8(ds, tmp_path):
    r = run("convert", ds, tmp_path / "out", "--dry-run")
    assert r.code == 0, r.err
    assert "source: FP8 block-scaled (128x128)" in r.err
    assert "_scale_inv" not in r.out  # consumed tensors are not rows of the plan
    assert not (tmp_path / "out").exists()


def test_fp8_weight_without_its_scale_is_refused(tmp_path):
    src = deepseek(tmp_path / "ds", experts=False, drop_scale="model.layers.0.mlp.up_proj.weight_scale_inv")
    out = tmp_path / "out"
    r = run("convert", src, out)
    assert r.code == 4, r.err
    lines = [x for x in r.err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "model.layers.0.mlp.up_proj.weight_scale_inv is missing" in lines[0], r.err
    assert not out.exists() and leftovers(tmp_path) == []


def test_other_compressed_tensors_formats_stay_refused(tmp_path):
    src = ct_fp8(tmp_path / "ct", "tensor")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "int"
    (src / "config.json").write_text(json.dumps(cfg))
    r = run("convert", src, tmp_path / "out")
    assert r.code == 4 and "already quantized" in r.err and "'compressed-tensors'" in r.err, r.err


def test_dequantize_rows_matches_the_documented_rule_for_any_row_range():
    n, k, bn, bk = 200, 320, 128, 128
    w8 = _fp8((n, k), 7)
    s = torch.rand(-(-n // bn), -(-k // bk)) + 0.5
    full = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    ref = (w8.to(torch.float32) * full).to(torch.bfloat16)
    for a, b in [(0, n), (0, 64), (64, 192), (100, 200), (127, 129)]:
        got = fp8.dequantize_rows(w8[a:b], s, a, (bn, bk), torch.bfloat16)
        assert torch.equal(got, ref[a:b]), (a, b)


def test_the_numpy_lookup_table_is_torchs_conversion():
    import numpy as np

    want = fp8._lut().numpy()
    got = fp8.lut()
    assert np.isnan(want).sum() == 2 and np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("block", [(128, 128), (1, 320), (200, 320), (1, 64), (64, 128)])
def test_numpy_dense_rows_give_the_torch_references_bytes(dtype, block):
    """What convert runs (numpy, torch-free) against the torch reference verify and eval use: NaN codes,
    edge blocks, any row range, both 16-bit dtypes."""
    import numpy as np

    tdt = {"BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    n, k = 200, 320
    w8 = _fp8((n, k), 11)
    w8.view(torch.uint8)[3, :4] = torch.tensor([0x7F, 0xFF, 0x00, 0x80], dtype=torch.uint8)  # NaN, -NaN, +-0
    bn, bk = block
    s = (torch.rand(-(-n // bn), -(-k // bk), generator=torch.Generator().manual_seed(2)) + 0.5) * 1e-2
    for a, b in [(0, n), (0, 64), (64, 192), (100, 200), (127, 129)]:
        want = fp8.dequantize_rows(w8[a:b], s, a, block, tdt).view(torch.int16).numpy()
        got = fp8.dense_rows(w8[a:b].view(torch.uint8).numpy(), s.numpy(), a, block, dtype).view(np.int16)
        assert np.array_equal(got, want), (a, b)


def test_compressed_tensors_library_reads_the_same_dense_weights():
    """The layouts of these tests are the library's: its own dequantize gives the same values."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    w8 = _fp8((N, H), 3)
    for strategy, scale in (("tensor", torch.tensor([0.0123], dtype=torch.bfloat16)),
                            ("channel", (torch.rand(N, 1) * 1e-2).to(torch.bfloat16))):
        args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
        lib = dequantize(w8, scale, args=args, dtype=torch.bfloat16)
        block = (N, H) if strategy == "tensor" else (1, H)
        grid = scale.to(torch.float32).reshape(1, 1) if strategy == "tensor" else scale.to(torch.float32)
        assert torch.equal(fp8.dequantize_rows(w8, grid, 0, block, torch.bfloat16), lib), strategy



def _deep_fp8(path, layers, hidden=512, inter=1536):
    """A Llama-shaped block-scaled FP8 checkpoint with `layers` layers (for the memory bound)."""
    t = {"model.embed_tokens.weight": torch.zeros(1024, hidden, dtype=torch.bfloat16),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    for i in range(layers):
        for name, (n, k) in {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
                             "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
                             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                             "mlp.down_proj": (hidden, inter)}.items():
            p = f"model.layers.{i}.{name}"
            t[f"{p}.weight"] = _fp8((n, k), i)
            t[f"{p}.weight_scale_inv"] = torch.full((-(-n // 128), -(-k // 128)), 0.01)
    path.mkdir()
    save_file(t, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "fp8", "weight_block_size": BLOCK}}))
    return path


@pytest.mark.slow
def test_peak_rss_of_an_fp8_source_is_flat_in_the_number_of_layers(tmp_path):
    from test_memory import peak_rss

    small, big = _deep_fp8(tmp_path / "l4", 4), _deep_fp8(tmp_path / "l16", 16)
    per_layer_dense = (big / "model.safetensors").stat().st_size * 2 / 16  # the layer dequantized to bf16
    rss_small = peak_rss("convert", small, tmp_path / "o4", "--skip", "mlp")  # skipped: dense passthrough too
    rss_big = peak_rss("convert", big, tmp_path / "o16", "--skip", "mlp")
    assert rss_big - rss_small < 4 * per_layer_dense, (rss_small, rss_big, per_layer_dense)
    assert rss_big < 512 * 2**20, rss_big


def test_scales_in_another_shard(tmp_path):
    """Sharded FP8 source whose scales all sit in a shard of their own: read across shards, and that shard,
    holding only consumed tensors, has no counterpart in OUT."""
    one = deepseek(tmp_path / "one", experts=False)
    t = load_tensors(one)
    src = tmp_path / "sharded"
    src.mkdir()
    scales = {k: v for k, v in t.items() if k.endswith("_scale_inv")}
    rest = {k: v for k, v in t.items() if k not in scales}
    files = {"model-00001-of-00002.safetensors": rest, "model-00002-of-00002.safetensors": scales}
    for fname, part in files.items():
        save_file(part, src / fname)
    weight_map = {k: f for f, part in files.items() for k in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_bytes((one / "config.json").read_bytes())
    out = tmp_path / "out"
    r = run("convert", src, out, "--format", "gptq")
    assert r.code == 0, r.err
    check_output(src, out, "gptq")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_budget_by_position_works_and_statistic_scores_are_refused(ds, tmp_path):
    r = run("convert", ds, tmp_path / "out", "--budget", "5")
    assert r.code == 0, r.err
    check_output(ds, tmp_path / "out")
    r = run("convert", ds, tmp_path / "out2", "--budget", "5", "--budget-score", "error")
    assert r.code == 2 and "FP8 source" in r.err, r.err
    r = run("convert", ds, tmp_path / "out3", "--budget", "5", "--budget-groups")  # reads weights too
    assert r.code == 2 and "--budget-groups reads the weights" in r.err and "FP8 source" in r.err, r.err
    r = run("convert", ds, tmp_path / "out4", "--rotate")
    assert r.code == 2 and "--rotate cannot rotate an FP8 source" in r.err, r.err


def test_stacked_fp8_experts_and_fp16_overflow(tmp_path, monkeypatch):
    """A 3-D (E, n, k) FP8 expert tensor with (E, ceil(n/128), ceil(k/128)) scales: each expert dequantized with
    its own grid, chunks of 64 rows never crossing experts. Then fp16 overflow of value * scale is named."""
    src = tmp_path / "stacked"
    src.mkdir()
    w8 = _fp8((3, 200, 320), 11)
    s = torch.rand(3, 2, 3) * 1e-2 + 1e-3
    name = "model.layers.0.mlp.experts.down_proj.weight"
    save_file({name: w8, name + "_scale_inv": s, "model.norm.weight": torch.ones(320, dtype=torch.bfloat16)},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": BLOCK}}))
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64 * 320 * 2)
    out = tmp_path / "out"
    r = run("convert", src, out, "--bits", "8", "--group-size", "64")
    assert r.code == 0, r.err
    full = s.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :200, :320]
    ref = (w8.to(torch.float32) * full).to(torch.bfloat16)
    codes, scales = rtn.quantize(ref, 8, 64)
    got = load_tensors(out)
    for role, want in zip(("qweight", "scales"), formats.MARLIN.reference(codes, scales, 8, 64), strict=True):
        assert torch.equal(got[f"model.layers.0.mlp.experts.down_proj.{role}"], want), role

    save_file({name: w8, name + "_scale_inv": s * 1e6, "model.norm.weight": torch.ones(320, dtype=torch.bfloat16)},
              src / "model.safetensors")
    r = run("convert", src, tmp_path / "out16", "--dtype", "fp16")
    assert r.code == 5 and "overflows float16" in r.err and name in r.err, r.err
