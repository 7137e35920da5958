"""The engine-facing patterns (rtnq.formats.engine_config): general where that is safe, never reaching another module."""

from __future__ import annotations

import re

import pytest

from rtnq.formats import engine_config
from rtnq.selection import names, precision
from rtnq.checkpoint.source import TensorSpec


def S(name, shape):
    return TensorSpec(name, "BF16", shape, "model.safetensors", 0, 0)


def vlm(layers=2):
    """A text stack and a vision tower whose blocks share names below the block container."""
    out = []
    for root, h in (("model.language_model", 256), ("model.vision_tower.encoder", 128)):
        for n in range(layers):
            p = f"{root}.layers.{n}"
            out += [S(f"{p}.self_attn.{m}_proj.weight", (h, h)) for m in ("q", "k", "v", "o")]
            out += [S(f"{p}.mlp.up_proj.weight", (512, h)), S(f"{p}.mlp.gate_proj.weight", (512, h)),
                    S(f"{p}.mlp.down_proj.weight", (h, 512))]
    return out


def patterns(specs, wanted):
    infos = names.analyse([s.name for s in specs])
    return engine_config.module_patterns([i for i in infos if i.name in wanted], infos)


def test_pattern_starts_at_the_block_container_when_that_is_unambiguous():
    specs = vlm()
    text = {s.name for s in specs if "language_model.layers.0.mlp.down" in s.name}
    both = text | {s.name for s in specs if "vision_tower.encoder.layers.0.mlp.down" in s.name}
    # only the text model's module: `layers.0.mlp.down_proj` would reach the vision tower, so the full name
    assert patterns(specs, text) == [r"(?:.*\.)?model\.language_model\.layers\.0\.mlp\.down_proj$"]
    # both modules: the general pattern is exactly right
    assert patterns(specs, both) == [r"(?:.*\.)?layers\.0\.mlp\.down_proj$"]


def test_fused_groups_and_layer_indices_fold_into_one_pattern():
    specs = vlm(layers=4)
    names = {s.name for s in specs if re.search(r"language_model\.layers\.[13]\.self_attn\.[qkv]_proj", s.name)}
    assert patterns(specs, names) == [
        r"(?:.*\.)?model\.language_model\.layers\.(?:1|3)\.self_attn\.(?:k_proj|q_proj|qkv_proj|v_proj)$"]


@pytest.mark.parametrize("keep", [["layers.0"], ["down"], ["qkv", "layers.-1"], ["language_model+mlp"],
                                  ["vision_tower"], ["layers.1+o"]])
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
def test_patterns_never_reach_a_module_of_another_precision(keep, fmt):
    specs = vlm(layers=3)
    p = precision.select(specs, keep_int8=keep, skip=["vision_tower.encoder.layers.2"])
    infos = names.analyse([s.name for s in specs])
    decisions = list(p.decisions.values())
    ndim = {s.name: len(s.shape) for s in specs}
    if fmt == "gptq":
        cfg = engine_config.gptq(decisions, infos, ndim, bits=4, group_size=128)
        rules = [(k[2:], None if k.startswith("-:") else v["bits"]) for k, v in cfg.get("dynamic", {}).items()]
    else:
        cfg = engine_config.compressed_tensors(decisions, infos, ndim, bits=4, group_size=128)
        rules = [(t[3:], g["weights"]["num_bits"]) for g in cfg["config_groups"].values() for t in g["targets"]
                 if t.startswith("re:")] + [(t[3:], None) for t in cfg["ignore"] if t.startswith("re:")]
    for s in specs:
        d = p.decisions[s.name]
        want = d.bits if d.kind == "quantized" else None
        module = s.name.removesuffix(".weight")
        hits = {bits for pattern, bits in rules if re.match(pattern, module)}
        assert hits <= {want}, (module, hits, want)  # a pattern never reaches the other precision
        if want != 4:  # everything not at the default precision is named explicitly
            assert hits == {want}, (module, want)


def smol(layers=3):
    """SmolLM2-135M's shapes: hidden 576 (not a multiple of 128), intermediate 1536, k/v 192."""
    out = []
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [S(f"{p}.self_attn.q_proj.weight", (576, 576)), S(f"{p}.self_attn.k_proj.weight", (192, 576)),
                S(f"{p}.self_attn.v_proj.weight", (192, 576)), S(f"{p}.self_attn.o_proj.weight", (576, 576)),
                S(f"{p}.mlp.gate_proj.weight", (1536, 576)), S(f"{p}.mlp.up_proj.weight", (1536, 576)),
                S(f"{p}.mlp.down_proj.weight", (576, 1536))]
    return out


def resolve(cfg: dict, module: str):
    """(bits, group size) an engine reads for `module`, or None for 16-bit: GPTQ's first matching
    `dynamic` rule over the top level (vLLM), compressed-tensors' regex targets before the class target."""
    if cfg["quant_method"] == "gptq":
        for key, override in cfg.get("dynamic", {}).items():
            if re.match(key[2:], module):
                return None if key.startswith("-:") else (override.get("bits", cfg["bits"]),
                                                          override.get("group_size", cfg["group_size"]))
        return cfg["bits"], cfg["group_size"]
    if any(re.match(t[3:], module) for t in cfg["ignore"] if t.startswith("re:")):
        return None
    for g in cfg["config_groups"].values():
        w = g["weights"]
        if any(re.match(t[3:], module) for t in g["targets"] if t.startswith("re:")):
            return w["num_bits"], w["group_size"] or -1
    w = next(g["weights"] for g in cfg["config_groups"].values() if "Linear" in g["targets"])
    return w["num_bits"], w["group_size"] or -1


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("keep", [[], ["layers.0"], ["down"]])
def test_per_tensor_group_sizes_reach_the_engines_module_by_module(fmt, keep):
    """k = 576 takes groups of 64, down_proj (k = 1536) keeps 128: the config must say so for every
    module, by the checkpoint's names and by vLLM's fused ones (qkv_proj, gate_up_proj)."""
    specs = smol()
    layout = "cols" if fmt == "gptq" else "rows"
    p = precision.select(specs, keep_int8=keep, layout=layout)
    infos = names.analyse([s.name for s in specs])
    decisions = list(p.decisions.values())
    build = engine_config.gptq if fmt == "gptq" else engine_config.compressed_tensors
    cfg = build(decisions, infos, {s.name: 2 for s in specs}, bits=4, group_size=128)
    top = (cfg["bits"], cfg["group_size"]) if fmt == "gptq" else None
    if fmt == "gptq":
        assert top == (4, 64)  # most 4-bit tensors read the 576-wide hidden state
    for d in decisions:
        assert d.kind == "quantized"
        module = d.name.removesuffix(".weight")
        assert resolve(cfg, module) == (d.bits, d.group_size), module
        fused = module.replace("q_proj", "qkv_proj").replace("gate_proj", "gate_up_proj")
        assert resolve(cfg, fused) == (d.bits, d.group_size), fused


def test_default_group_prefers_the_requested_size_on_a_tie():
    d = [precision.Decision("a", "quantized", 4, 64), precision.Decision("b", "quantized", 4, 128)]
    assert engine_config.default_group(d, 4, 128) == 128
    assert engine_config.default_group(d + [precision.Decision("c", "quantized", 4, 64)], 4, 128) == 64
    assert engine_config.default_group([], 4, 32) == 32
