"""Resolve every layer of an rtnq GPTQ / compressed-tensors export with vLLM's (or SGLang's) own matching code.

    pip download vllm --no-deps -d /tmp/vllm          # ~340 MB wheel; nothing is installed
    .venv/bin/python scripts/check_vllm_matching.py OUT [OUT ...] --wheel /tmp/vllm/vllm-*.whl
    pip download sglang --no-deps -d /tmp/sglang      # ~40 MB
    .venv/bin/python scripts/check_vllm_matching.py OUT --wheel /tmp/sglang/sglang-*.whl --engine sglang

vLLM cannot be installed here (CUDA, no GPU), but the functions that decide a layer's precision are
plain Python. This script reads them from the wheel (utils/gptq_utils.py `get_dynamic_override`;
compressed_tensors/utils.py `should_ignore_layer`, `find_matched_target` and helpers;
utils/config_utils.py `find_matching_patterns`, `is_equal_or_regex_match`), runs them on the layer
names vLLM builds for a Llama- or Mixtral-style model (fused `qkv_proj` / `gate_up_proj`, one
`...experts` layer per MoE block) and on the checkpoint's own names, and compares the result with the
bits rtnq_manifest.json records. Exit 1 on any mismatch. Not part of the test suite: it needs the wheel.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch as fnmatch_mod
import json
import re
import sys
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

SOURCES = {
    "vllm": {
        "vllm/model_executor/layers/quantization/utils/gptq_utils.py": ["get_dynamic_override"],
        "vllm/model_executor/layers/quantization/utils/config_utils.py": ["find_matching_patterns",
                                                                          "is_equal_or_regex_match"],
        "vllm/model_executor/layers/quantization/compressed_tensors/utils.py": [
            "should_ignore_layer", "find_matched_target", "_find_first_match", "_match_fused_layer"],
    },
    "sglang": {
        "sglang/srt/layers/quantization/utils.py": ["get_dynamic_override"],
        "sglang/srt/layers/quantization/compressed_tensors/utils.py": [
            "should_ignore_layer", "check_equal_or_regex_match", "find_matched_target", "_find_first_match",
            "_is_equal_or_regex_match", "_match_fused_layer"],
    },
}
# How each engine names a MoE layer's class target and which expert-0 projections it looks up
# (vLLM: the checkpoint's own names; SGLang 0.5.23: always gate_proj/up_proj/down_proj), and whether
# its GPTQ MoE layers read `dynamic` (SGLang's do not: every expert gets the base bits).
MOE = {"vllm": ("RoutedExperts", None, True), "sglang": ("FusedMoE", ("gate_proj", "up_proj", "down_proj"), False)}
# vLLM's packed_modules_mapping for Llama-style models (its fused layer -> the checkpoint's shards)
FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
CLASS_OF = {"qkv_proj": "QKVParallelLinear", "gate_up_proj": "MergedColumnParallelLinear",
            "o_proj": "RowParallelLinear", "down_proj": "RowParallelLinear"}


def load_functions(wheel: Path, engine: str) -> dict[str, Any]:
    """The named functions, compiled from the wheel's source into one namespace."""
    try:
        import regex as re_impl  # what vLLM imports as `re`
    except ImportError:
        re_impl = re
    from typing import Dict, List, Optional, Union

    ns: dict[str, Any] = {"re": re_impl, "fnmatch": fnmatch_mod.fnmatch, "Iterable": Iterable, "Mapping": Mapping,
                          "MappingProxyType": MappingProxyType, "Any": Any, "Module": object,
                          "AutoGPTQConfig": object, "QuantizationConfig": object, "Optional": Optional,
                          "List": List, "Dict": Dict, "Union": Union, "engine": engine}
    if engine == "sglang":
        import re as std_re  # SGLang imports the standard module

        ns["re"] = std_re
    with zipfile.ZipFile(wheel) as z:
        for path, names in SOURCES[engine].items():
            tree = ast.parse(z.read(path).decode())
            found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
            if len(found) != len(names):
                raise SystemExit(f"{path}: expected functions {names}, found {[f.name for f in found]}")
            exec(compile(ast.Module(body=found, type_ignores=[]), path, "exec"), ns)  # noqa: S102
    return ns


def vllm_layers(manifest: dict) -> dict[str, list[str]]:
    """vLLM layer name -> the checkpoint tensors it loads (fused linears, one FusedMoE per experts block)."""
    layers: dict[str, list[str]] = {}
    for name, entry in manifest["tensors"].items():
        if not name.endswith(".weight") or len(entry["shape"]) != 2 or ".layers." not in name:
            continue
        module = name.removesuffix(".weight")
        m = re.match(r"(.*\.experts)\.\d+\.", module)
        if m:
            layers.setdefault(m.group(1), []).append(name)
            continue
        parent, leaf = module.rsplit(".", 1)
        fused = next((f for f, shards in FUSED.items() if leaf in shards), leaf)
        layers.setdefault(f"{parent}.{fused}", []).append(name)
    return layers


def stored(manifest: dict, tensors: list[str]) -> set:
    return {e["bits"] if e["kind"] == "quantized" else None for e in (manifest["tensors"][t] for t in tensors)}


def check(out: Path, fns: dict[str, Any]) -> list[str]:
    manifest = json.loads((out / "rtnq_manifest.json").read_text())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    problems = []
    for layer, tensors in vllm_layers(manifest).items():
        want = stored(manifest, tensors)
        if len(want) != 1:
            problems.append(f"{layer}: its shards are stored with different precisions {want}")
            continue
        want_bits = want.pop()
        if layer.endswith(".experts"):  # engines resolve a MoE layer from expert 0's projections
            cls, names, _ = MOE[fns["engine"]]
            expert0 = ([f"{layer}.0.{p}" for p in names] if names
                       else [t.removesuffix(".weight") for t in tensors if t.startswith(f"{layer}.0.")])
            checks = [(layer, resolve_moe(cfg, layer, expert0, fns))]
        else:
            checks = [(n, resolve(cfg, n, fns)) for n in [layer] + [t.removesuffix(".weight") for t in tensors]]
        for name, got in checks:
            if got != want_bits:
                problems.append(f"{name}: {fns['engine']} resolves {got}, the checkpoint holds {want_bits}")
    return problems


def resolve(cfg: dict, name: str, fns: dict[str, Any]):
    if cfg["quant_method"] == "gptq":
        class Config:  # the attribute get_dynamic_override reads
            dynamic = cfg.get("dynamic", {})
        bits = fns["get_dynamic_override"](Config, name, "bits", cfg["bits"])
        return None if bits is False else bits
    if fns["should_ignore_layer"](name, cfg["ignore"], FUSED):
        return None
    targets, bits_of = _targets(cfg)
    cls = CLASS_OF.get(name.rsplit(".", 1)[-1], "ColumnParallelLinear")
    target = fns["find_matched_target"](name, type(cls, (), {})(), targets, FUSED)
    return bits_of.get(target)


def _targets(cfg: dict) -> tuple[list[str], dict[str, int]]:
    """vLLM's target_scheme_map keys in insertion order, with "Linear" also mapped onto RoutedExperts."""
    targets, bits_of = [], {}
    for group in cfg["config_groups"].values():
        for t in group["targets"]:
            targets.append(t)
            bits_of[t] = group["weights"]["num_bits"]
    return targets, bits_of


def resolve_moe(cfg: dict, layer: str, expert0: list[str], fns: dict[str, Any]):
    """A MoE layer: every projection of expert 0 must resolve to one scheme (the engines raise otherwise)."""
    cls, _, reads_dynamic = MOE[fns["engine"]]
    if cfg["quant_method"] == "gptq":
        return resolve(cfg, layer, fns) if reads_dynamic else cfg["bits"]
    results = set()
    for name in expert0:
        if fns["should_ignore_layer"](name, cfg["ignore"], FUSED):
            results.add(None)
            continue
        targets, bits_of = _targets(cfg)
        if "Linear" in bits_of:  # both engines map a "Linear" target onto their MoE class
            targets.append(cls)
            bits_of[cls] = bits_of["Linear"]
        results.add(bits_of.get(fns["find_matched_target"](name, type(cls, (), {})(), targets, FUSED)))
    return results.pop() if len(results) == 1 else results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="+", help="export directories")
    ap.add_argument("--wheel", type=Path, required=True, help="a downloaded vllm-*.whl or sglang-*.whl")
    ap.add_argument("--engine", choices=sorted(SOURCES), default="vllm")
    a = ap.parse_args()
    fns = load_functions(a.wheel, a.engine)
    bad = 0
    for out in a.out:
        problems = check(out, fns)
        layers = len(vllm_layers(json.loads((out / "rtnq_manifest.json").read_text())))
        print(f"{out}: {layers} {a.engine} layers, {len(problems)} mismatches")
        for p in problems:
            print("  ", p)
        bad += len(problems)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
