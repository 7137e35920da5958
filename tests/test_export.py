"""GPTQ and compressed-tensors exports end to end: bytes, configs, real clients, round trips, TP preflight.

One source checkpoint is converted to all three formats with the same selective rules; the GPTQ export is
unpacked by an independent reading of the format facts written here, the compressed-tensors export by the
compressed-tensors library's own dequantizer, and every format must come back to identical dense weights.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cliutil import fail_writes_with_enospc, leftovers, load_tensors, run
from rtnq.numerics import rtn
from rtnq import synthetic

RULES = ("--keep-int8", "layers.0+mlp,layers.1.self_attn.q_proj", "--skip", "layers.1.mlp.down_proj")
FORMATS = ("marlin", "gptq", "compressed-tensors")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The source (2 shards, an odd linear the gate refuses) and its three exports, same rules."""
    root = tmp_path_factory.mktemp("export")
    src = root / "src"
    synthetic.write_checkpoint(src, synthetic.SampleSpec(hidden=512, intermediate=1536, layers=2, shards=2,
                                                     odd_linear=True))
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = root / fmt
        r = run("convert", src, outs[fmt], "--format", fmt, *RULES)
        assert r.code == 0, r.err
    return src, outs


def _manifest(out):
    return json.loads((out / "rtnq_manifest.json").read_text())


def _qcfg(out):
    return json.loads((out / "config.json").read_text())["quantization_config"]


# ------------------------------------------------------------------------------------------------ GPTQ bytes

def _unpack_gptq_independently(qweight: np.ndarray, bits: int) -> np.ndarray:
    """(k/pf, n) int32 -> codes (n, k): word (r, c) holds k = r*pf + i in bits [bits*i, bits*i + bits)."""
    pf = 32 // bits
    words = qweight.astype(np.uint32)
    k = words.shape[0] * pf
    codes = np.zeros((words.shape[1], k), dtype=np.uint8)
    for i in range(pf):
        codes[:, i::pf] = ((words >> (bits * i)) & ((1 << bits) - 1)).T
    return codes


def test_gptq_tensors_hold_the_rtn_codes(exports):
    src, outs = exports
    source, out = load_tensors(src), load_tensors(outs["gptq"])
    m = _manifest(outs["gptq"])
    assert m["format"] == "gptq" and m["version"] == 4
    quantized = {n: e for n, e in m["tensors"].items() if e["kind"] == "quantized"}
    assert {e["bits"] for e in quantized.values()} == {4, 8}
    for name, e in quantized.items():
        p = name.removesuffix(".weight")
        assert set(e["outputs"]) == {"qweight", "scales", "qzeros", "g_idx"}
        assert name not in out  # replaced, not kept beside
        codes, scales = rtn.quantize(source[name], e["bits"], 128)
        n, k = source[name].shape
        pf = 32 // e["bits"]
        assert out[f"{p}.qweight"].shape == (k // pf, n) and out[f"{p}.qweight"].dtype == torch.int32
        got = _unpack_gptq_independently(out[f"{p}.qweight"].numpy(), e["bits"])
        assert np.array_equal(got, codes.numpy()), name
        assert torch.equal(out[f"{p}.scales"], scales.t())  # plain (k/g, n), not Marlin-permuted
        assert out[f"{p}.scales"].dtype == torch.bfloat16
        zero = {4: 0x77777777, 8: 0x7F7F7F7F}[e["bits"]]
        assert out[f"{p}.qzeros"].shape == (k // 128, n // pf) and (out[f"{p}.qzeros"] == zero).all()
        assert out[f"{p}.g_idx"].tolist() == [i // 128 for i in range(k)]
    for name, e in m["tensors"].items():
        if e["kind"] != "quantized":
            assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
    # an AutoGPTQ-era loader reads quantize_config.json
    assert json.loads((outs["gptq"] / "quantize_config.json").read_text()) == _qcfg(outs["gptq"])


def test_gptq_config(exports):
    _, outs = exports
    q = _qcfg(outs["gptq"])
    assert {k: q[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "lm_head", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "lm_head": False,
        "checkpoint_format": "gptq"}
    any_prefix = "(?:.*\\.)?"  # an engine may put the text model under another prefix
    assert q["dynamic"] == {
        f"-:{any_prefix}layers\\.0\\.mlp\\.odd_proj$": {},
        f"-:{any_prefix}layers\\.1\\.mlp\\.down_proj$": {},
        f"+:{any_prefix}layers\\.0\\.mlp\\.down_proj$": {"bits": 8},
        f"+:{any_prefix}layers\\.0\\.mlp\\.(?:gate_proj|gate_up_proj|up_proj)$": {"bits": 8},
        f"+:{any_prefix}layers\\.1\\.self_attn\\.(?:k_proj|q_proj|qkv_proj|v_proj)$": {"bits": 8},
    }
    assert _gptq_bits_vllm(q, "language_model.model.layers.0.mlp.gate_up_proj") == 8  # a VLM's prefix
    assert _gptq_bits_vllm(q, "model.language_model.layers.0.mlp.gate_up_proj") == 8


# ------------------------------------------------------------------------------------- compressed-tensors bytes

def test_compressed_tensors_tensors_are_the_gptq_tensors_transposed(exports):
    """Every tensor of the compressed-tensors export: each quantized weight is weight_packed / weight_scale (the
    GPTQ qweight / scales transposed) and weight_shape; everything else is the source tensor unchanged."""
    src, outs = exports
    source, out = load_tensors(src), load_tensors(outs["compressed-tensors"])
    gptq = load_tensors(outs["gptq"])
    m = _manifest(outs["compressed-tensors"])
    assert m["format"] == "compressed-tensors"
    expected = set()
    checked = {4: 0, 8: 0}
    for name, e in m["tensors"].items():
        if e["kind"] != "quantized":
            assert torch.equal(out[name], source[name]), name
            expected.add(name)
            continue
        p = name.removesuffix(".weight")
        n, k = e["shape"]
        assert out[f"{p}.weight_shape"].tolist() == [n, k] and out[f"{p}.weight_shape"].dtype == torch.int64
        assert torch.equal(out[f"{p}.weight_packed"], gptq[f"{p}.qweight"].t())  # FORMATS.md 6.3
        assert torch.equal(out[f"{p}.weight_scale"], gptq[f"{p}.scales"].t())
        assert set(e["outputs"]) == {"weight_packed", "weight_scale", "weight_shape"}
        expected |= {f"{p}.weight_packed", f"{p}.weight_scale", f"{p}.weight_shape"}
        checked[e["bits"]] += 1
    assert checked == {4: 7, 8: 6}
    assert set(out) == expected
    assert "lm_head.weight" in out and torch.equal(out["lm_head.weight"], source["lm_head.weight"])


def test_compressed_tensors_config_validates_in_the_library(exports):
    from compressed_tensors.quantization import QuantizationConfig

    _, outs = exports
    q = _qcfg(outs["compressed-tensors"])
    cfg = QuantizationConfig.model_validate(q)
    bits = {g.weights.num_bits: g.targets for g in cfg.config_groups.values()}
    assert bits[4] == ["Linear"]
    assert list(cfg.config_groups)[-1] == "group_1"  # the class-target group comes last
    assert "lm_head" in cfg.ignore and any("odd_proj" in i for i in cfg.ignore)
    assert any("layers\\.1\\.mlp\\.down_proj" in i for i in cfg.ignore)


def test_compressed_tensors_library_dequantizes_to_rtnq_weights(exports, tmp_path):
    """The compressed-tensors library's own checkpoint dequantizer on rtnq's export."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    src, outs = exports
    dense_ct = tmp_path / "ct-dense"
    convert_checkpoint(str(outs["compressed-tensors"]), str(dense_ct),
                       CompressedTensorsDequantizer(str(outs["compressed-tensors"]), dtype=torch.bfloat16),
                       max_workers=1, device="cpu")
    theirs = load_tensors(dense_ct)
    r = run("dequantize", outs["compressed-tensors"], tmp_path / "rtnq-dense")
    assert r.code == 0, r.err
    ours = load_tensors(tmp_path / "rtnq-dense")
    source = load_tensors(src)
    assert set(theirs) == set(ours) == set(source)
    m = _manifest(outs["compressed-tensors"])
    for name, t in ours.items():
        assert torch.equal(theirs[name], t), name
        e = m["tensors"][name]
        if e["kind"] == "quantized":
            codes, scales = rtn.quantize(source[name], e["bits"], 128)
            assert torch.equal(t, rtn.dequantize(codes, scales, e["bits"], 128)), name
        else:
            assert torch.equal(t, source[name]), name


def test_compressed_tensors_library_matches_each_module_to_its_bits(exports):
    """Model-based matching (what transformers runs): a module tree with the checkpoint's names."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    src, outs = exports
    m = _manifest(outs["compressed-tensors"])
    model = torch.nn.Module()
    for name, e in m["tensors"].items():
        if not name.endswith(".weight") or len(e["shape"]) != 2 or "embed" in name:
            continue
        parent = model
        *path, leaf, _ = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        n, k = e["shape"]
        parent.add_module(leaf, torch.nn.Linear(k, n, bias=False))
    apply_quantization_config(model, QuantizationConfig.model_validate(_qcfg(outs["compressed-tensors"])))
    for name, e in m["tensors"].items():
        if not name.endswith(".weight") or len(e["shape"]) != 2 or "embed" in name:
            continue
        module = model.get_submodule(name.removesuffix(".weight"))
        scheme = getattr(module, "quantization_scheme", None)
        if e["kind"] == "quantized":
            assert scheme is not None and scheme.weights.num_bits == e["bits"], name
        else:
            assert scheme is None, name


# --------------------------------------------------------------------------------- how engines resolve names

def _vllm_fused_layers(manifest):
    """The layer names vLLM builds for a Llama, with their checkpoint shards (FORMATS.md 6.1, 6.3)."""
    layers = {}
    for name in manifest["tensors"]:
        if not re.search(r"\.layers\.\d+\.", name) or not name.endswith("_proj.weight"):
            continue
        mod = name.removesuffix(".weight")
        parent, leaf = mod.rsplit(".", 1)
        fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                 "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(leaf, leaf)
        layers.setdefault(f"{parent}.{fused}", []).append(name)
    return layers


def _gptq_bits_vllm(cfg, layer):
    """vLLM's get_dynamic_override: the first pattern that re.match-es the layer prefix decides."""
    for pattern, override in cfg.get("dynamic", {}).items():
        body = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
        if re.match(body, layer):
            return None if pattern.startswith("-:") else override.get("bits", cfg["bits"])
    return cfg["bits"]


def _ct_bits_vllm(cfg, layer, shards):
    """vLLM's compressed-tensors resolution: ignore (every shard listed), then name/regex targets in group
    order, then the class target "Linear"."""
    def hit(name, target):
        return re.match(target[3:], name) is not None if target.startswith("re:") else target == name

    if all(any(hit(s, i) for i in cfg["ignore"]) for s in shards):
        return None
    for g in cfg["config_groups"].values():
        if any(hit(layer, t) for t in g["targets"] if t != "Linear"):
            return g["weights"]["num_bits"]
    for g in cfg["config_groups"].values():
        if "Linear" in g["targets"]:
            return g["weights"]["num_bits"]
    raise AssertionError(f"no target for {layer}")


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_engines_resolve_fused_and_hf_names_to_the_stored_bits(exports, fmt):
    _, outs = exports
    m = _manifest(outs[fmt])
    cfg = _qcfg(outs[fmt])
    layers = _vllm_fused_layers(m)
    assert "model.layers.1.self_attn.qkv_proj" in layers and "model.layers.0.mlp.gate_up_proj" in layers
    for layer, shards in layers.items():
        stored = {m["tensors"][s]["bits"] if m["tensors"][s]["kind"] == "quantized" else None for s in shards}
        assert len(stored) == 1, f"{layer}: shards stored with different precisions {stored}"
        for name in [layer, *(s.removesuffix(".weight") for s in shards)]:  # engine name, then HF names
            got = _gptq_bits_vllm(cfg, name) if fmt == "gptq" else _ct_bits_vllm(
                cfg, name, [s.removesuffix(".weight") for s in shards] if name == layer else [name])
            assert got == next(iter(stored)), f"{fmt}: {name} resolves to {got}, checkpoint holds {stored}"


def test_moe_experts_get_one_pattern_per_layer(tmp_path):
    """Mixtral-style per-expert weights: one override covers the experts container (vLLM's FusedMoE
    prefix) and every expert under it."""
    src = tmp_path / "moe"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 128, generator=g).bfloat16()}
    for layer in range(2):
        p = f"model.layers.{layer}.block_sparse_moe"
        tensors[f"{p}.gate.weight"] = torch.randn(4, 128, generator=g).bfloat16()
        for e in range(4):
            for w, shape in (("w1", (256, 128)), ("w3", (256, 128)), ("w2", (128, 256))):
                tensors[f"{p}.experts.{e}.{w}.weight"] = (0.02 * torch.randn(*shape, generator=g)).bfloat16()
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")
    for fmt in ("gptq", "compressed-tensors"):
        r = run("convert", src, tmp_path / fmt, "--format", fmt, "--keep-int8", "layers.1.block_sparse_moe.experts.0.w2")
        assert r.code == 0, r.err
        assert "fused partners" in r.err  # one precision per MoE layer
        assert ("SGLang loads every expert at the default bits" in r.err) == (fmt == "gptq")
        cfg = _qcfg(tmp_path / fmt)
        skipped = run("convert", src, tmp_path / f"{fmt}-skip", "--format", fmt, "--skip", "layers.0+experts")
        assert skipped.code == 0 and ("are 16-bit while the default is 4-bit" in skipped.err) == (fmt == "gptq")
        pattern = "(?:.*\\.)?layers\\.1\\.block_sparse_moe\\.experts(?:\\..*)?$"
        if fmt == "gptq":
            router = "(?:.*\\.)?layers\\.(?:0|1)\\.block_sparse_moe\\.gate$"
            assert cfg["dynamic"] == {f"-:{router}": {}, f"+:{pattern}": {"bits": 8}}  # SGLang needs the -:
            assert _gptq_bits_vllm(cfg, "model.layers.1.block_sparse_moe.experts") == 8
            assert _gptq_bits_vllm(cfg, "model.layers.0.block_sparse_moe.experts") == 4
            assert _gptq_bits_vllm(cfg, "model.layers.1.block_sparse_moe.experts.3.w1") == 8
        else:
            assert cfg["config_groups"]["group_0"]["targets"] == [f"re:{pattern}"]
            assert "re:(?:.*\\.)?layers\\.(?:0|1)\\.block_sparse_moe\\.gate$" in cfg["ignore"]  # routers


# ------------------------------------------------------------------------------------------------ round trips

def test_all_formats_dequantize_to_identical_weights(exports, tmp_path):
    src, outs = exports
    dense = {}
    for fmt, out in outs.items():
        r = run("dequantize", out, tmp_path / fmt, "--json")
        assert r.code == 0, r.err
        summary = json.loads(r.out)
        assert summary["modules_by_bits"] == {"4": 7, "8": 6}  # 14 linears: 1 skipped, 6 kept INT8
        dense[fmt] = load_tensors(tmp_path / fmt)
        cfg = json.loads((tmp_path / fmt / "config.json").read_text())
        assert "quantization_config" not in cfg and cfg["hidden_size"] == 512
        assert not (tmp_path / fmt / "rtnq_manifest.json").exists()
        assert (tmp_path / fmt / "model.safetensors.index.json").exists()  # the shards are kept
    source = load_tensors(src)
    for name in source:
        a = dense["marlin"][name]
        assert a.shape == source[name].shape
        for fmt in ("gptq", "compressed-tensors"):
            assert a.dtype == dense[fmt][name].dtype and torch.equal(a.view(torch.uint8), dense[fmt][name].view(torch.uint8)), (fmt, name)


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_and_inspect_every_format(exports, fmt):
    src, outs = exports
    r = run("verify", outs[fmt], "--against", src, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["ok"]
    r = run("inspect", outs[fmt], "--json")
    assert r.code == 0 and json.loads(r.out)["format"] == ("rtnq-marlin" if fmt == "marlin" else fmt)
    r = run("inspect", outs[fmt])
    assert r.code == 0 and "format:" in r.out
    assert "tensor parallel (Marlin shape rules per rank): TP2 ok" in r.out


@pytest.mark.parametrize("fmt,role", [("gptq", "qzeros"), ("gptq", "g_idx"), ("compressed-tensors", "weight_shape")])
def test_verify_catches_a_changed_constant(exports, tmp_path, fmt, role):
    import shutil

    _, outs = exports
    src = exports[0]
    bad = tmp_path / "bad"
    shutil.copytree(outs[fmt], bad)
    name = f"model.layers.0.self_attn.o_proj.{role}"
    shard = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = {}
    with safe_open(str(bad / shard), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(bad / shard), metadata=meta)
    r = run("verify", bad, "--against", src)
    assert r.code == 7 and f"{role} bytes differ" in r.err


# ------------------------------------------------------------------------------------------------ errors

def test_stacked_experts_need_the_marlin_format(tmp_path):
    src = tmp_path / "stacked"
    src.mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj.weight": torch.zeros(4, 128, 128, dtype=torch.bfloat16)},
              str(src / "model.safetensors"))
    r = run("convert", src, tmp_path / "out", "--format", "gptq")
    assert r.code == 2 and "stacked (E, n, k) expert tensor" in r.err and "--format marlin" in r.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bad_format_value(exports, tmp_path):
    src, _ = exports
    r = run("convert", src, tmp_path / "out", "--format", "awq")
    assert r.code == 2 and "marlin, gptq or compressed-tensors" in r.err


def test_dequantize_refuses_what_it_cannot_read(exports, tmp_path):
    src, outs = exports
    r = run("dequantize", src, tmp_path / "d1")  # not quantized
    assert r.code == 4 and "no quantization_config" in r.err
    import shutil

    asym = tmp_path / "asym"
    shutil.copytree(outs["gptq"], asym)
    cfg = json.loads((asym / "config.json").read_text())
    cfg["quantization_config"]["sym"] = False
    (asym / "config.json").write_text(json.dumps(cfg))
    r = run("dequantize", asym, tmp_path / "d2")
    assert r.code == 4 and "sym: false" in r.err
    r = run("dequantize", outs["gptq"], outs["marlin"])  # exists
    assert r.code == 2 and "already exists" in r.err
    assert leftovers(tmp_path) == []


def test_runtime_loads_every_format_into_the_same_marlin_bytes(exports):
    """rtnq's runtime repacks a GPTQ or compressed-tensors export into Marlin on load (vLLM does the same on
    the GPU): the bytes equal what the marlin format stores, and the layers compute the same outputs."""
    from rtnq.runtime.loader import load_checkpoint

    _, outs = exports
    loaded = {fmt: load_checkpoint(outs[fmt], device="cpu") for fmt in FORMATS}
    ref = loaded["marlin"].linears
    assert len(ref) == 13
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    for fmt in ("gptq", "compressed-tensors"):
        assert set(loaded[fmt].linears) == set(ref)
        for name, layer in loaded[fmt].linears.items():
            assert layer.bits == ref[name].bits
            assert torch.equal(layer.qweight, ref[name].qweight) and torch.equal(layer.scales, ref[name].scales), name
        layer = loaded[fmt].linears["model.layers.0.self_attn.q_proj"]
        assert torch.equal(layer(x), ref["model.layers.0.self_attn.q_proj"](x))


# ------------------------------------------------------------------------------------------ TP preflight

def test_tp_preflight_passes_at_2_and_fails_at_8(exports, tmp_path):
    """hidden 512, intermediate 1536: every split at TP 2 keeps n % 64 and k % 128; at TP 8 the o_proj and
    down_proj inputs per rank (512/8 = 64, 1536/8 = 192) break them. q/k/v pass: 2 key-value heads
    (config.json) are replicated at TP 8, so the fused per-rank n is 64 + 128 + 128."""
    src, _ = exports
    r = run("convert", src, tmp_path / "o", "--format", "gptq", *RULES, "--dry-run", "--tp", "2,8", "--json")
    assert r.code == 0, r.err
    tp = json.loads(r.out)["tp"]
    assert tp["2"] == []
    fails = {f["name"]: f["why"] for f in tp["8"]}
    assert "row-parallel, k/8: k=192" in fails["model.layers.0.mlp.down_proj.weight"]
    assert "row-parallel, k/8: k=64" in fails["model.layers.0.self_attn.o_proj.weight"]
    assert "model.layers.0.self_attn.k_proj.weight" not in fails
    assert "model.layers.1.mlp.down_proj.weight" not in fails  # skipped: stays 16-bit, nothing to split
    assert "model.layers.0.mlp.gate_proj.weight" not in fails  # 1536/8 = 192 = 3 * 64
    assert "TP2 ok" in r.err and f"TP8: {len(fails)} quantized tensors fail" in r.err
    assert not (tmp_path / "o").exists()


def test_every_run_prints_the_tp_summary(exports, tmp_path):
    src, _ = exports
    r = run("convert", src, tmp_path / "o", "--format", "compressed-tensors")
    assert r.code == 0
    line = [x for x in r.out.splitlines() if x.startswith("tensor parallel")]
    assert line and "TP2 ok" in line[0] and "TP4" in line[0] and "TP8:" in line[0] and "--dry-run --tp 8" in line[0]
    totals = _manifest(tmp_path / "o")["totals"]
    assert totals["tp_failures"]["2"] == 0 and totals["tp_failures"]["8"] > 0


def test_dequantize_marlin_stacked_experts(tmp_path):
    """The marlin format holds stacked (E, n, k) experts; dequantize restores them per expert."""
    src = tmp_path / "stacked"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    w = (0.02 * torch.randn(3, 128, 256, generator=g)).bfloat16()
    save_file({"model.layers.0.mlp.experts.down_proj.weight": w,
               "model.norm.weight": torch.ones(256, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"hidden_size": 256}')
    assert run("convert", src, tmp_path / "q", "--keep-int8", "experts").code == 0
    r = run("dequantize", tmp_path / "q", tmp_path / "d", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["modules_by_bits"] == {"8": 1}
    dense = load_tensors(tmp_path / "d")
    codes, scales = rtn.quantize(w, 8, 128)
    assert torch.equal(dense["model.layers.0.mlp.experts.down_proj.weight"], rtn.dequantize(codes, scales, 8, 128))
    assert torch.equal(dense["model.norm.weight"], torch.ones(256, dtype=torch.bfloat16))


@pytest.mark.parametrize("group", ["-1", "64"])
def test_other_group_sizes_round_trip_through_the_library(tmp_path, group):
    """Channelwise (strategy "channel", one scale per row) and group 64, both formats."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    src = tmp_path / "src"
    synthetic.write_checkpoint(src, synthetic.SampleSpec(hidden=256, intermediate=512, layers=2, dtype="fp16"))
    dense = {}
    for fmt in ("gptq", "compressed-tensors"):
        r = run("convert", src, tmp_path / fmt, "--format", fmt, "--group-size", group, "--keep-int8", "layers.1")
        assert r.code == 0, r.err
        assert run("verify", tmp_path / fmt, "--against", src).code == 0
        assert run("dequantize", tmp_path / fmt, tmp_path / f"{fmt}-dense").code == 0
        dense[fmt] = load_tensors(tmp_path / f"{fmt}-dense")
    q = _qcfg(tmp_path / "compressed-tensors")
    weights = q["config_groups"]["group_1"]["weights"]
    assert (weights["strategy"], weights["group_size"]) == (("channel", None) if group == "-1" else ("group", 64))
    convert_checkpoint(str(tmp_path / "compressed-tensors"), str(tmp_path / "lib-dense"),
                       CompressedTensorsDequantizer(str(tmp_path / "compressed-tensors"), dtype=torch.float16),
                       max_workers=1, device="cpu")
    theirs = load_tensors(tmp_path / "lib-dense")
    source = load_tensors(src)
    g = int(group)
    for name, t in dense["gptq"].items():
        assert torch.equal(t, dense["compressed-tensors"][name]) and torch.equal(t, theirs[name]), name
        if name.endswith("proj.weight"):
            bits = 8 if ".layers.1." in name else 4
            codes, scales = rtn.quantize(source[name], bits, g)
            assert torch.equal(t, rtn.dequantize(codes, scales, bits, g)), name


def test_transformers_loads_the_compressed_tensors_export(exports, tmp_path):
    """transformers' own loading of the export (LlamaForCausalLM, the compressed-tensors integration): the
    weights it decompresses for its forward pass are rtnq's dequantized weights, INT4 and INT8 alike."""
    transformers = pytest.importorskip("transformers")
    _, outs = exports
    model = transformers.AutoModelForCausalLM.from_pretrained(str(outs["compressed-tensors"]), dtype=torch.bfloat16)
    logits = model(torch.tensor([[1, 2, 3]])).logits  # the first forward decompresses every module
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
    assert run("dequantize", outs["compressed-tensors"], tmp_path / "dense").code == 0
    dense = load_tensors(tmp_path / "dense")
    theirs = model.state_dict()
    m = _manifest(outs["compressed-tensors"])
    checked = {4: 0, 8: 0}
    for name, e in m["tensors"].items():
        if e["kind"] == "quantized":
            assert torch.equal(theirs[name], dense[name]), name
            checked[e["bits"]] += 1
    assert checked == {4: 7, 8: 6}


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(dynamic={"+:(unclosed": {"bits": 8}}), "not a valid regex"),
    (lambda q: q.update(dynamic=["x"]), "must be an object"),
    (lambda q: q.update(bits="four"), "bits is 'four'"),
])
def test_dequantize_reports_a_broken_gptq_config(exports, tmp_path, edit, message):
    import shutil

    _, outs = exports
    bad = tmp_path / "bad"
    shutil.copytree(outs["gptq"], bad)
    for path in bad.glob("*.safetensors"):  # without g_idx the bits must come from the config
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".g_idx")}
        save_file(tensors, str(path), metadata=meta)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith(".g_idx")}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((bad / "config.json").read_text())
    edit(cfg["quantization_config"])
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run("dequantize", bad, tmp_path / "d")
    assert r.code == 4 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "d").exists() and leftovers(tmp_path) == []


def test_dequantize_without_g_idx_reads_bits_from_dynamic(exports, tmp_path):
    """A GPTQ checkpoint without g_idx (some writers omit it): bits from the config's `dynamic`."""
    import shutil

    src, outs = exports
    bare = tmp_path / "bare"
    shutil.copytree(outs["gptq"], bare)
    for path in bare.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if not k.endswith(".g_idx")}
        save_file(tensors, str(path), metadata=meta)
    (bare / "model.safetensors.index.json").unlink()
    r = run("dequantize", bare, tmp_path / "d", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["modules_by_bits"] == {"4": 7, "8": 6}


def test_dequantize_reports_a_broken_compressed_tensors_config(exports, tmp_path):
    import shutil

    _, outs = exports
    bad = tmp_path / "bad"
    shutil.copytree(outs["compressed-tensors"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run("dequantize", bad, tmp_path / "d")
    assert r.code == 4 and "only symmetric int weights" in r.err
    cfg["quantization_config"]["config_groups"] = ["nope"]
    (bad / "config.json").write_text(json.dumps(cfg))
    r = run("dequantize", bad, tmp_path / "d")
    assert r.code == 4 and "config_groups" in r.err


def test_dequantize_disk_full_and_interrupt_leave_nothing(exports, tmp_path, monkeypatch):
    from rtnq.commands import dequantize

    _, outs = exports
    fail_writes_with_enospc(monkeypatch)
    r = run("dequantize", outs["gptq"], tmp_path / "full")
    assert r.code == 8 and "disk full" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "full").exists() and leftovers(tmp_path) == []
    monkeypatch.undo()

    real = dequantize.dense_weight
    seen = {"n": 0}

    def interrupt(*a, **k):
        seen["n"] += 1
        if seen["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dequantize, "dense_weight", interrupt)
    r = run("dequantize", outs["compressed-tensors"], tmp_path / "int")
    assert r.code == 130 and "nothing was written" in r.err
    assert not (tmp_path / "int").exists() and leftovers(tmp_path) == []
