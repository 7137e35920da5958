r"""The `quantization_config` that vLLM, SGLang and transformers read from a GPTQ or compressed-tensors export.

Pure and torch-free: built from the converter's decisions and the names' analysis (rtnq.selection.names).
Also the engine policy: what an engine does differently from what an export says (`warnings`).
Facts: shared FORMATS.md 6.1 (GPTQ) and 6.3 (compressed-tensors).

The hard part is naming modules so that every loader resolves the same precision:
* engines match their own module names, in which q/k/v are one `qkv_proj`, gate/up one `gate_up_proj`
  (DeepSeek's q_a/kv_a one `fused_qkv_a_proj`) and all routed experts of a layer one `...experts`;
  transformers and the compressed-tensors library match the checkpoint's names.
  Each pattern therefore names a whole fused group: its parent, then an alternation of the members
  found in the checkpoint plus the engine's fused name; an experts pattern matches the experts
  container and everything under it. rtnq.selection.precision already gives every fused group one precision.
* patterns end in `$` and start at the block container with an optional prefix,
  `(?:.*\.)?layers\.3\.mlp\.down_proj$`, so they still match when an engine names the text model
  differently (vLLM's multimodal models use `language_model.model.layers...`, and GPTQ `dynamic` keys
  are not renamed for it). Where that would also reach another module of the checkpoint (a vision
  tower's `layers.3`), the pattern keeps the full name, then is anchored at the start. Patterns never
  overlap, so "the first match wins" (vLLM) and "exact > regex > class" (compressed-tensors) agree;
* the layer index is folded into an alternation, `layers\.(?:0|31)\.mlp\.down_proj$`, so a rule
  applied to every layer stays one pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from rtnq.numerics.shape_rule import check_shape
from rtnq.selection.names import FUSED, NameInfo

# The fused layer name an engine builds from members of a FUSED kind (vLLM's packed_modules_mapping).
ENGINE_FUSED_NAME = {"qkv": "qkv_proj", "gate_up": "gate_up_proj", "qkv_a": "fused_qkv_a_proj"}
_IDX = "\x00"  # placeholder for the block index while patterns are grouped
_ANY_PREFIX = r"(?:.*\.)?"


def _unit(info: NameInfo, leaves_by_parent: dict[tuple[str, str], set[str]]) -> tuple[tuple[str, ...], str]:
    """(module components, regex tail) of the load unit `info` belongs to."""
    comps = info.comps[:-1] if info.comps[-1] in ("weight", "bias") else info.comps
    if info.experts is not None:
        n = info.experts.count(".") + 1
        return comps[:n], r"(?:\..*)?$"
    kind = FUSED.get(info.role or "")
    if kind:
        leaves = leaves_by_parent[(".".join(comps[:-1]), kind)] | {ENGINE_FUSED_NAME[kind]}
        return comps[:-1], r"\.(?:" + "|".join(re.escape(x) for x in sorted(leaves)) + r")$"
    return comps, "$"


def module_patterns(infos: Iterable[NameInfo], all_infos: Sequence[NameInfo]) -> list[str]:
    """Regexes (without a `re:` or `+:` prefix) matching exactly the modules of `infos`, their fused
    partners and the engines' fused names, with the block index folded into alternations.

    all_infos: every tensor of the checkpoint, to find the members of each fused group and the
    modules a pattern must not reach.
    """
    infos = list(infos)
    leaves_by_parent: dict[tuple[str, str], set[str]] = {}
    for i in all_infos:
        kind = FUSED.get(i.role or "")
        if kind:
            comps = i.comps[:-1] if i.comps[-1] in ("weight", "bias") else i.comps
            leaves_by_parent.setdefault((".".join(comps[:-1]), kind), set()).add(comps[-1])
    # (full pattern, pattern from the block container on) with the block index as _IDX -> indices
    grouped: dict[tuple[str, str | None], set[str]] = {}
    for info in infos:
        comps, tail = _unit(info, leaves_by_parent)
        parts = [re.escape(c) for c in comps]
        index = short = None
        if info.block is not None and info.block < len(comps):
            index, parts[info.block] = comps[info.block], _IDX
            short = r"\.".join(parts[info.block - 1 :]) + tail  # `layers\.#\....`: no model-specific root
        key = (r"\.".join(parts) + tail, short)
        grouped.setdefault(key, set())
        if index is not None:
            grouped[key].add(index)
    mine = {i.module for i in infos}
    others = {i.module for i in all_infos} - mine
    out = set()
    for (full, short), indices in grouped.items():
        if indices:
            alt = "|".join(sorted(indices, key=int))
            alt = alt if len(indices) == 1 else f"(?:{alt})"
            full, short = full.replace(_IDX, alt), short.replace(_IDX, alt)
        # The most general candidate that reaches no other module of the checkpoint.
        candidates = ([_ANY_PREFIX + short] if short else []) + [_ANY_PREFIX + full, full]
        out.add(next(c for c in candidates if c == full or not any(re.match(c, m) for m in others)))
    return sorted(out)


def unquantized_linear(decision) -> bool:
    """A linear weight an engine would build as a quantized layer, which rtnq left in 16-bit:
    skipped by --skip, failed the shape gate, or a GPT-2 Conv1D weight. Loaders must be told."""
    why = decision.reason or ""
    return decision.kind != "quantized" and (why.startswith(("skipped by", "shape:")) or "Conv1D" in why)


def plain_linears(decisions: Sequence, infos: Sequence[NameInfo], ndim: dict[str, int]) -> list[NameInfo]:
    """16-bit 2-D weights that may be linear layers in a model definition: skipped or gated linears,
    routers, projectors outside the blocks, a lm_head not named `lm_head`. Loaders must be told to
    leave them alone (SGLang, unlike vLLM, does not infer it from the tensors' dtypes)."""
    by_name = {i.name: i for i in infos}
    return [
        by_name[d.name]
        for d in decisions
        if d.kind != "quantized" and d.name.endswith(".weight") and ndim[d.name] == 2 and d.name != "lm_head.weight"
        and (unquantized_linear(d) or (d.reason or "") in _PLAIN_REASONS)
    ]


def default_group(decisions: Sequence, bits: int, group_size: int) -> int:
    """The group size a config states at top level: the one most tensors at the default bits use (a
    model whose hidden size 128 does not divide quantizes most linears with 64), ties to --group-size."""
    counts: dict[int, int] = {}
    for d in decisions:
        if d.kind == "quantized" and d.bits == bits:
            counts[d.group_size] = counts.get(d.group_size, 0) + 1
    return max(counts, key=lambda g: (counts[g], g == group_size), default=group_size)


def _schemes(decisions: Sequence, by_name: dict[str, NameInfo], top: tuple[int, int]) -> dict:
    """(bits, group size) -> the quantized modules that use it, for every pair but the top-level one."""
    out: dict[tuple[int, int], list[NameInfo]] = {}
    for d in decisions:
        if d.kind == "quantized" and (d.bits, d.group_size) != top:
            out.setdefault((d.bits, d.group_size), []).append(by_name[d.name])
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0] == top[0], kv[0][0], -kv[0][1])))


def gptq(
    decisions: Sequence, infos: Sequence[NameInfo], ndim: dict[str, int], *, bits: int, group_size: int
) -> dict:
    """GPTQ `quantization_config` (FORMATS.md 6.1): the run's default bits and most common group size
    at top level, every other (bits, group size) a `+:` override in `dynamic` (vLLM reads both keys per
    module, matched against its fused names), and every 16-bit linear a `-:` entry. The patterns never
    overlap, so their order (config.json is written with sorted keys) does not matter."""
    by_name = {i.name: i for i in infos}
    top = (bits, default_group(decisions, bits, group_size))
    dynamic: dict[str, dict] = {}
    for p in module_patterns(plain_linears(decisions, infos, ndim), infos):
        dynamic[f"-:{p}"] = {}
    for (b, g), mods in _schemes(decisions, by_name, top).items():
        override = ({"bits": b} if b != bits else {}) | ({"group_size": g} if g != top[1] else {})
        for p in module_patterns(mods, infos):
            dynamic[f"+:{p}"] = override
    cfg = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": top[1],
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "checkpoint_format": "gptq",
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def _ct_weights(bits: int, group_size: int) -> dict:
    grouped = group_size != -1
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": True,
        "strategy": "group" if grouped else "channel",
        "group_size": group_size if grouped else None,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def compressed_tensors(
    decisions: Sequence, infos: Sequence[NameInfo], ndim: dict[str, int], *, bits: int, group_size: int
) -> dict:
    """compressed-tensors `pack-quantized` config (FORMATS.md 6.3).

    Each (bits, group size) other than the default one is a group with regex targets (the other
    precision first); the default bits with their most common group size come last, with the class
    target "Linear". Engines and the library's model matching prefer a name match over a class match
    whatever the order, but the library's checkpoint dequantizer treats "Linear" as "every remaining
    module" and visits the groups in order. A fused layer's members share k, hence one group size:
    vLLM takes a fused layer's scheme from its first member without comparing the others.
    `ignore`: lm_head and every other 16-bit module with a 2-D weight (routers, projectors, skipped or
    gated linears), which "Linear" would claim.
    """
    by_name = {i.name: i for i in infos}
    groups: dict[str, dict] = {}
    top = (bits, default_group(decisions, bits, group_size))
    for (b, g), mods in _schemes(decisions, by_name, top).items():
        groups[f"group_{len(groups)}"] = _scheme([f"re:{p}" for p in module_patterns(mods, infos)], b, g)
    groups[f"group_{len(groups)}"] = _scheme(["Linear"], *top)
    ignore = ["lm_head"] + [f"re:{p}" for p in module_patterns(plain_linears(decisions, infos, ndim), infos)]
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(dict.fromkeys(ignore)),
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }


_PLAIN_REASONS = ("lm_head", "router gate", "not a linear weight inside a block")


def _scheme(targets: list[str], bits: int, group_size: int) -> dict:
    return {
        "targets": targets,
        "weights": _ct_weights(bits, group_size),
        "input_activations": None,
        "output_activations": None,
        # no per-group "format": the top-level one covers both groups, and compressed-tensors before
        # its PR #415 (2025-08) rejects the key (its scheme model forbids unknown keys)
    }


def for_format(fmt, decisions: Sequence, infos: Sequence[NameInfo], ndim: dict[str, int], *, bits: int,
               group_size: int, scale: str = "absmax") -> dict:
    """The engines' quantization_config of an export format (gptq or compressed-tensors). Engines read the
    stored scales whatever rule chose them; compressed-tensors names the rule as its observer."""
    if fmt.quant_method == "gptq":
        return gptq(decisions, infos, ndim, bits=bits, group_size=group_size)
    cfg = compressed_tensors(decisions, infos, ndim, bits=bits, group_size=group_size)
    if scale == "mse":  # the library's "mse" observer is the same kind of clipping search
        for g in cfg["config_groups"].values():
            g["weights"]["observer"] = "mse"
    return cfg


def warnings(fmt, decisions: Sequence, bits: int, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """What the engines will do differently from what the export says, for the user and the manifest.

    SGLang's GPTQ MoE layers never read `dynamic` (checked with scripts/check_vllm_matching.py
    --engine sglang): every expert loads at the default bits. Layers off Marlin's tiles (k % 128, n % 64)
    take another kernel or padding, depending on the engine's version (docs/SERVING.md, "Shapes").
    """
    if fmt.quant_method not in ("gptq", "compressed-tensors"):
        return []
    out = []
    off = [d for d in decisions if d.kind == "quantized" and shapes and check_shape(*shapes[d.name][-2:], -1)]
    if off:
        n, k = shapes[off[0].name][-2:]
        out.append(f"{len(off)} quantized layers are off the Marlin kernels' tiles (k % 128 or n % 64), e.g. "
                   f"{off[0].name} ({n}x{k}): vLLM 0.34 pads them for Marlin (or uses Machete/Humming on Hopper), "
                   "vLLM 0.11 serves them only with its fp16-only Exllama kernel; see docs/SERVING.md, Shapes")
    if fmt.quant_method != "gptq":
        return out
    odd = [d for d in decisions if "experts" in d.name.lower().split(".")
           and ((d.kind == "quantized" and d.bits != bits) or unquantized_linear(d))]
    if not odd:
        return out
    what = f"{odd[0].bits}-bit" if odd[0].kind == "quantized" else "16-bit"
    return out + [f"{len(odd)} MoE expert weights (e.g. {odd[0].name}) are {what} while the default is {bits}-bit: "
                  "vLLM reads that from the GPTQ `dynamic` overrides, but SGLang loads every expert at the default "
                  "bits; for SGLang use --format compressed-tensors"]
