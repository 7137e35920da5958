"""Which tensors rtnq quantizes, and to how many bits: one Decision per source tensor.

Pure and torch-free: it reads only the names, dtypes and shapes of the source tensors (headers), and returns a
Selection that the converter executes and the manifest records (DESIGN.md sections 5 and 6). The selector language
and the alias table live in `rtnq.selection.selectors`.

Default: quantize float (F16/BF16/F32) `.weight` tensors of linear layers inside the blocks, i.e. under a
numbered container of names.BLOCK_CONTAINERS (`layers.N`, `layer.N`, `h.N`, `blocks.N`, `block.N`,
`resblocks.N`; the first one in the name is the block, so T5's `block.0.layer.1` is block 0): 2-D `(n, k)`, or
3-D `(E, n, k)` under `experts`. Everything else passes through unchanged with a reason: biases, tensors not
named `.weight`, lm_head, embeddings (T5's in-block relative_attention_bias too), norms, MoE routers, other
ranks, tensors outside the blocks, other dtypes. Tied embeddings stay correct because neither the embedding
nor lm_head is ever quantized, whatever the rules say.
GPT-2's Conv1D weights are stored (in, out), transposed against nn.Linear. A checkpoint is taken to be in that
layout when a c_attn or c_fc weight has more columns than rows (a Linear stores (out, in), and both modules
widen); its c_attn/c_fc/c_proj weights then pass through, because rtnq does not transpose. GPT-BigCode and
Qwen-1 use the same names with nn.Linear layouts and are quantized as usual.

Precedence, per tensor:
  1. a default passthrough reason wins over every rule (rules never force a tensor into Marlin);
  2. --skip: 16-bit, whatever --keep-int8 says and in whichever order the options come;
  3. the shape gate: a tensor Marlin cannot hold passes through (--strict: ShapeError);
  4. --keep-int8: 8-bit (a no-op with --bits 8, but the selector must still match);
  5. otherwise --bits, rule "default".
Among the selectors of one option, the first in the list that matches is recorded as the rule; `matched` counts
the tensors each selector decided (fused partners included), so the keep-int8 counts add up to the 8-bit tensors.

Fused groups: inference engines load q/k/v (same attention module), gate/up (same MLP), DeepSeek's q_a/kv_a
and all routed experts of one MoE layer as one layer, which needs one precision and one kind (vLLM raises
otherwise). A rule that hits one member is extended to the whole group, recorded in the rule
("fused-with:<member> (keep-int8:<selector>)") and warned about. If one member fails the shape gate the whole
group passes through, because a Marlin half and a 16-bit half cannot be loaded as one layer.

Shapes (rtnq.numerics.shape_rule): every group is g consecutive weights of one row, so a tensor whose k
the requested group size does not divide takes the largest smaller group size that does (k = 576 at
--group-size 128: 64), in every format alike, with a warning; Decision.group_size is the tensor's own.
The marlin format stores shapes its kernels cannot tile (n % 64, k % 128) padded with zero codes; GPTQ
and compressed-tensors store the logical shape. What no format can hold passes through (the storage
rule: k a multiple of 8 and of some group size <= the requested one; GPTQ also n % 8 for its qzeros);
if one member of a fused group fails, the whole group passes through, because a quantized half and a
16-bit half cannot be loaded as one layer. --strict makes such a passthrough an error.
--tp checks each quantized tensor's per-rank shape against Marlin's kernel rule (n % 64, k % 128), the way
engines split it (rtnq.selection.tp): column-parallel layers (q/k/v, gate/up) split n and are checked as
the fused per-rank layer, row-parallel ones (o, down) split k, MoE experts by Marlin MoE's rule. Those
failures are warnings, never errors (Selection.tp_failures lists them all): an engine serves such a
layer with a slower fallback kernel or refuses it. Checkpoints whose q/k/v are already one tensor
(Phi-3's qkv_proj) are split as one n, an approximation: the engine splits each of q, k and v inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rtnq import dtypes, params
from rtnq.errors import ShapeError, UsageError
from rtnq.numerics.shape_rule import check_shape, group_for, padded, problem
from rtnq.selection import tp as tensor_parallel
from rtnq.selection.names import FUSED, NameInfo, analyse
from rtnq.selection.selectors import Selector, parse_selectors, unmatched_message


class TensorSpec(Protocol):
    """What the planner reads of a tensor: its header entry (rtnq.checkpoint.source.TensorSpec has it)."""

    name: str
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]


__all__ = ["Decision", "Selection", "Selector", "check_shape", "parse_selectors", "select"]

_LM_HEAD = frozenset({"lm_head", "embed_out", "output_layer"})
_EMBED = frozenset({"wte", "wpe", "shared", "relative_attention_bias"})
_ROUTER = frozenset({"gate", "router", "shared_expert_gate"})
_CONV1D = frozenset({"c_attn", "c_fc", "c_proj"})


@dataclass(frozen=True)
class Decision:
    name: str  # source tensor name
    kind: str  # "quantized" (in the format's layout) or "passthrough"
    bits: int | None = None  # 4 or 8 for marlin
    group_size: int | None = None  # as given (-1 = channelwise) for marlin
    rule: str | None = None  # what chose the precision: "default", "keep-int8:SEL", "skip:SEL", "fused-with:..."
    reason: str | None = None  # why it passes through


@dataclass
class Selection:
    decisions: dict[str, Decision]  # every input spec, in input order
    rules: list[dict]  # [{"option": "keep-int8", "selector": "layers.0", "matched": 7}, ...]
    warnings: list[str]
    tp_failures: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # tp -> [(name, why)]
    infos: list[NameInfo] = field(default_factory=list)  # what each name is, in input order (names.analyse)


def _conv1d_layout(specs: Sequence[TensorSpec], infos: list[NameInfo]) -> bool:
    """GPT-2 Conv1D stores (in, out); c_attn (3d) and c_fc (4d) widen, so in that layout they are wide."""
    return any(
        i.leaf in ("c_attn", "c_fc") and len(s.shape) == 2 and s.shape[1] > s.shape[0] for s, i in zip(specs, infos)
    )


# Passthrough reasons of tensors that sit where a linear weight belongs (by name and rank) but cannot be
# quantized as stored: convert refuses those sources (rtnq.checkpoint.refusals) rather than pass them through.
DTYPE_REASON = "dtype "
CONV1D_REASON = "GPT-2 Conv1D"


def _default_reason(spec: TensorSpec, info: NameInfo, conv1d: bool) -> str | None:
    """Why this tensor is never quantized, whatever the rules say; None for a quantizable linear weight."""
    if spec.name.endswith(".bias"):
        return "bias"
    if not spec.name.endswith(".weight"):
        return "not a weight (the name does not end in .weight)"
    mod = [c.lower() for c in info.comps[:-1]]
    if any(c in _LM_HEAD for c in mod) or mod == ["output"]:  # Meta-format Llama calls it output.weight
        return "lm_head"
    if any("embed" in c or c in _EMBED for c in mod):
        return "embedding"
    if any("norm" in c or c == "ln" or c.startswith("ln_") or (c[:2] == "ln" and c[2:].isdecimal()) for c in mod):
        return "norm"  # input_layernorm, LayerNorm, q_norm, ln_1, ln_f, ln_attn, ln1
    if info.leaf in _ROUTER or "router" in mod:
        return "router gate"
    if info.block is None:
        return "not a linear weight inside a block"
    nd = len(spec.shape)
    if nd != 2 and not (nd == 3 and info.experts):
        return f"{nd}-D tensor is not a linear weight"
    if conv1d and info.leaf in _CONV1D:
        return CONV1D_REASON + " weight stored (in, out); not supported"
    if spec.dtype not in dtypes.FLOATS:
        if spec.dtype.startswith("F"):
            return f"{DTYPE_REASON}{spec.dtype} is not quantized (only F16, BF16 and F32 are)"
        return f"{DTYPE_REASON}{spec.dtype} is not a float"
    return None


def select(
    specs: Sequence[TensorSpec],
    *,
    bits: int = 4,
    group_size: int = 128,
    keep_int8: str | Sequence[str | Selector] | None = (),
    skip: str | Sequence[str | Selector] | None = (),
    strict: bool = False,
    tp: Sequence[int] = (),
    kv_heads: int | None = None,
    layout: str = "marlin",
) -> Selection:
    """One Decision per spec (input order), the rules with what each decided, and warnings.

    keep_int8 / skip: selector strings (comma lists) or parsed Selectors. tp: tensor-parallel degrees to check.
    kv_heads: the model's key-value heads (config.json), for how engines split k/v at high TP degrees.
    layout: the output format's layout ("marlin", "rows", "cols"; rtnq.formats.Format.layout), whose
    storage rule decides which shapes can be quantized.
    Raises UsageError for bad arguments or a selector that matches no tensor at all, and (strict=True)
    ShapeError for a tensor that would be quantized but whose shape the format cannot hold.
    """
    params.check(bits, group_size)
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tp):
        raise UsageError(f"--tp takes positive integers such as 2,4,8, got {list(tp)}")
    options = [("keep-int8", s) for s in parse_selectors(keep_int8)] + [("skip", s) for s in parse_selectors(skip)]
    infos = analyse([s.name for s in specs])
    matched: list[list[NameInfo]] = []
    for option, sel in options:  # a typo must never silently ship an all-INT4 model
        matched.append([i for i in infos if sel.matches(i)])
        if not matched[-1]:
            raise UsageError(unmatched_message(option, sel, infos))

    conv1d = _conv1d_layout(specs, infos)
    reason = {s.name: _default_reason(s, i, conv1d) for s, i in zip(specs, infos)}
    nk = {s.name: (s.shape[-2], s.shape[-1]) for s in specs if len(s.shape) >= 2}
    groups: dict[tuple[str, str], list[NameInfo]] = {}
    for i in infos:
        if reason[i.name] is None:
            groups.setdefault(group_key(i), []).append(i)

    hits = [{i.name for i in m} for m in matched]
    skipped = _claim(groups, [j for j, (o, _) in enumerate(options) if o == "skip"], hits)
    gated, failing = _gate(groups, skipped, nk, group_size, layout)
    if strict and failing:
        name, why = failing[0]
        more = f" ({len(failing) - 1} more tensors fail too)" if len(failing) > 1 else ""
        raise ShapeError(
            f"{name}: {why}{more}. Drop --strict to keep it in 16-bit, or --skip {name.removesuffix('.weight')}"
        )
    live = {key: [m for m in ms if m.name not in skipped and m.name not in gated] for key, ms in groups.items()}
    int8 = _claim(live, [j for j, (o, _) in enumerate(options) if o == "keep-int8"], hits)

    decisions: dict[str, Decision] = {}
    credit = [0] * len(options)  # tensors each selector decided, fused partners included
    for s in specs:
        name = s.name
        if name in skipped:
            j, anchor = skipped[name]
            text = options[j][1].text
            rule, why = f"skip:{text}", f"skipped by --skip {text}"
            if anchor is not None:
                rule, why = f"fused-with:{anchor} ({rule})", f"{why} (fused with {anchor})"
            decisions[name] = Decision(name, "passthrough", rule=rule, reason=why)
            credit[j] += 1
        elif reason[name] or name in gated:
            decisions[name] = Decision(name, "passthrough", reason=reason[name] or gated[name])
        elif name in int8:
            j, anchor = int8[name]
            rule = f"keep-int8:{options[j][1].text}"
            if anchor is not None:
                rule = f"fused-with:{anchor} ({rule})"
            decisions[name] = Decision(name, "quantized", 8, group_for(nk[name][1], group_size), rule)
            credit[j] += 1
        else:
            decisions[name] = Decision(name, "quantized", bits, group_for(nk[name][1], group_size), "default")

    warnings = _warnings(options, matched, credit, skipped, int8, reason, gated, bits)
    warnings += _shape_notes(decisions, nk, group_size, layout)
    if decisions and not any(d.kind == "quantized" for d in decisions.values()):
        warnings.append("no tensor is quantized: no float linear weight inside a block passed the rules and the gate")
    by_name = {i.name: i for i in infos}
    # The common degrees are always checked, for the one-line summary of every run; only the degrees
    # asked for with --tp become warnings.
    degrees = sorted(set(tp) | set(tensor_parallel.SUMMARY_DEGREES))
    tp_failures = {t: tensor_parallel.check(t, decisions, by_name, nk, kv_heads) for t in degrees}
    warnings += tensor_parallel.warnings({t: tp_failures[t] for t in dict.fromkeys(tp)}, decisions, by_name)
    rules = [{"option": o, "selector": s.text, "matched": c} for (o, s), c in zip(options, credit)]
    return Selection(decisions, rules, warnings, tp_failures, infos)


def group_key(i: NameInfo) -> tuple[str, str]:
    """Tensors an inference engine loads as one layer share a key; everything else is its own group."""
    if i.experts is not None:
        return (i.experts, "experts")  # vLLM FusedMoE: all experts of a layer take one precision
    kind = FUSED.get(i.role or "")
    return (i.module.rpartition(".")[0], kind) if kind else (i.name, "")


def _claim(groups: dict, idx: list[int], hits: list[set[str]]) -> dict[str, tuple[int, str | None]]:
    """name -> (the first selector in idx that matches it, None), or (that of its fused partner, partner)."""
    out: dict[str, tuple[int, str | None]] = {}
    for members in groups.values():
        direct = {m.name: next((j for j in idx if m.name in hits[j]), None) for m in members}
        anchor = next((n for n, j in direct.items() if j is not None), None)
        if anchor is None:
            continue
        for n, j in direct.items():
            out[n] = (j, None) if j is not None else (direct[anchor], anchor)
    return out


def _gate(groups: dict, skipped: dict, nk: dict, group_size: int,
          layout: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """The storage rule per group: one failing member sends the whole (non-skipped) group to passthrough.
    Returns (name -> passthrough reason, [(failing name, why)])."""
    gated: dict[str, str] = {}
    failing: list[tuple[str, str]] = []
    for members in groups.values():
        live = [m.name for m in members if m.name not in skipped]
        fails = {n: why for n in live if (why := problem(*nk[n], group_size, layout))}
        if not fails:
            continue
        failing.extend(fails.items())
        first = next(iter(fails))
        for n in live:
            gated[n] = f"shape: {fails[n]}" if n in fails else f"shape: fused with {first}, {_PARTNER_FAILS}"
    return gated, failing


_PARTNER_FAILS = "whose shape the format cannot hold"


def _shape_notes(decisions: dict[str, Decision], nk: dict, group_size: int, layout: str) -> list[str]:
    """What the shapes changed about quantized tensors: a smaller group size, padding (marlin)."""
    quantized = [d for d in decisions.values() if d.kind == "quantized"]
    out = []
    smaller = [d for d in quantized if d.group_size != group_size]
    if smaller:
        d = smaller[0]
        sizes = sorted({x.group_size for x in smaller}, reverse=True)
        out.append(f"{len(smaller)} tensors use group size {'/'.join(map(str, sizes))} instead of {group_size}: their "
                   f"k is not a multiple of {group_size}, e.g. {d.name} (k={nk[d.name][1]})")
    if layout == "marlin":
        pads = [d for d in quantized if padded(*nk[d.name]) != nk[d.name]]
        if pads:
            n, k = nk[pads[0].name]
            out.append(f"{len(pads)} tensors are stored padded to the Marlin kernels' tiles (n to a multiple of 64, "
                       f"k of 128) with zero codes, e.g. {pads[0].name}: {n}x{k} -> "
                       f"{'x'.join(map(str, padded(n, k)))}")
    return out


def _warnings(options, matched, credit, skipped, int8, reason, gated, bits) -> list[str]:
    out = []
    for j, (option, sel) in enumerate(options):
        claimed = skipped if option == "skip" else int8
        ext = [(n, a) for n, (k, a) in claimed.items() if k == j and a is not None]
        if ext:
            out.append(
                f"--{option} {sel.text}: extended to {len(ext)} fused partners (q/k/v, gate/up and the experts "
                f"of one MoE layer load as one layer and need one precision), e.g. {ext[0][0]} (fused with {ext[0][1]})"
            )
        if credit[j] == 0:
            first = matched[j][0].name
            if all(reason[i.name] or i.name in gated for i in matched[j]):
                why = reason[first] or gated[first]
                out.append(f"--{option} {sel.text}: matches only tensors that pass through anyway, e.g. {first} "
                           f"({why}); it changes nothing")
            else:
                out.append(f"--{option} {sel.text}: every tensor it matches was already decided by an earlier or "
                           "stronger rule (--skip beats --keep-int8); it changes nothing")
    if bits == 8 and any(o == "keep-int8" for o, _ in options):
        out.append("--keep-int8 changes nothing with --bits 8: every quantized tensor is 8-bit already")
    own = [n for n, why in gated.items() if not why.endswith(_PARTNER_FAILS)]
    if own:
        out.append(f"{len(own)} tensors have shapes the format cannot hold and pass through in 16-bit, "
                   f"e.g. {own[0]} ({gated[own[0]].removeprefix('shape: ')})")
    partners = [n for n, why in gated.items() if why.endswith(_PARTNER_FAILS)]
    if partners:
        out.append(f"{len(partners)} tensors pass through in 16-bit because a fused partner's shape cannot be held, "
                   f"e.g. {partners[0]}")
    conv = [n for n, r in reason.items() if r and r.startswith(CONV1D_REASON)]
    if conv:
        out.append(f"{len(conv)} GPT-2 Conv1D weights are stored (in, out) and pass through in 16-bit; "
                   "rtnq quantizes nn.Linear (out, in) weights only")
    return out
