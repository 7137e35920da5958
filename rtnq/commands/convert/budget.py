"""`rtnq convert --budget BPW`: score each default-precision unit from its weights, then promote the
best ones to INT8 within the budget (rtnq.selection.budget chooses; this module reads and scores).

Bits are counted at the logical shape, codes and scales only (the compressed-tensors layout), whatever
the output format: the same budget then makes the same choice in every format (so their KL agree), and
neither the marlin format's padding nor GPTQ's qzeros/g_idx (constants no promotion changes) moves it.
The output's own bits_per_weight in the manifest counts every stored byte, so it may be higher.

One extra read of the quantized weights before the write pass, one tensor at a time (memory: the largest
tensor and its two RTN reconstructions), so the plan stays streaming; `Scored.seconds` is its cost.
The score (rtnq.numerics.sensitivity) of a member is computed at its own group size, in the 16-bit dtype
it will be quantized in, with the RMSNorm weight that scales its input where the block has one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from rtnq import dtypes, formats, params
from rtnq.checkpoint import layout
from rtnq.checkpoint.source import Reader, TensorSpec
from rtnq.errors import UsageError
from rtnq.numerics import sensitivity
from rtnq.selection import budget as knapsack
from rtnq.selection.names import NameInfo
from rtnq.selection.precision import Decision, Selection, group_key

_FAMILY = {"q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv", "gate": "gate_up", "up": "gate_up", "gate_up": "gate_up"}
# The norm whose output a family reads, by the names models give it (the first present wins).
_INPUT_NORMS = {
    "qkv": ("input_layernorm", "attention_norm", "ln_1", "ln_attn", "self_attn_layer_norm", "norm1"),
    "gate_up": ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm", "ln_2", "ln_mlp",
                "final_layer_norm", "norm2"),
}


@dataclass
class Scored:
    selection: Selection  # with the promotions applied
    score_name: str
    budget: float
    bits_per_weight: float  # of the quantized linears after promotion
    floor: float  # before
    scores: dict[str, float] = field(default_factory=dict)  # tensor -> its own score
    ranks: dict[str, int] = field(default_factory=dict)  # tensor -> its unit's rank by score per extra bit
    promoted: dict[str, int] = field(default_factory=dict)  # tensor -> its unit's promotion order
    seconds: float = 0.0


def apply(src_dir: Path, specs: list[TensorSpec], selection: Selection, budget: float, score_name: str,
          quant_dtype, scale: str = "absmax") -> Scored:
    """Promote units of `selection` within `budget`; quant_dtype(spec) -> the DType it is quantized in."""
    params.check(budget_score=score_name)
    if not math.isfinite(budget) or budget <= 0:
        raise UsageError(f"--budget takes a positive number of bits per weight, such as 4.5, got {budget}")
    t0 = time.perf_counter()
    by_spec = {s.name: s for s in specs}
    infos = {i.name: i for i in selection.infos}
    decisions = selection.decisions
    base_bits = n_params = 0
    for d in decisions.values():
        if d.kind == "quantized":
            base_bits += _bits(by_spec[d.name], d.bits, d.group_size, quant_dtype)
            n_params += by_spec[d.name].numel
    # Candidates: units whose every member is quantized at 4 bits by the default rule.
    units: dict[tuple[str, str], list[str]] = {}
    for name, d in decisions.items():
        if d.kind == "quantized":
            units.setdefault(group_key(infos[name]), []).append(name)
    candidates = {k: m for k, m in units.items()
                  if all(decisions[n].bits == 4 and decisions[n].rule == "default" for n in m)}
    norms = _norm_names(by_spec, infos)
    gemma = layout.model_type(src_dir).startswith("gemma")  # Gemma's RMSNorm scales by (1 + weight)
    scores: dict[str, float] = {}
    if score_name == "position":  # a prior per extra bit: no weight is read
        scores = {n: knapsack.position_priority(infos[n]) * 1.0 for m in candidates.values() for n in m}
    with Reader(src_dir) as reader:
        for members in candidates.values() if score_name != "position" else ():
            for name in members:
                spec, d = by_spec[name], decisions[name]
                w = reader.read(spec).to(quant_dtype(spec).torch)
                gamma = None
                norm = norms.get(name)
                if norm is not None and by_spec[norm].shape == (spec.shape[-1],):
                    gamma = reader.read(by_spec[norm]).float() + (1.0 if gemma else 0.0)
                scores[name] = _extensive(score_name, spec, sensitivity.score(score_name, w, d.group_size, gamma,
                                                                              name=name, scale=scale))
                del w
    extra = {n: _bits(by_spec[n], 8, decisions[n].group_size, quant_dtype)
             - _bits(by_spec[n], 4, decisions[n].group_size, quant_dtype) for m in candidates.values() for n in m}
    if score_name == "position":  # priority per extra bit whatever the unit's size
        scores = {n: s * extra[n] for n, s in scores.items()}
    ordered = [knapsack.Unit(k, tuple(m), sum(scores[n] for n in m), sum(extra[n] for n in m))
               for k, m in candidates.items()]
    choice = knapsack.choose(ordered, base_bits, n_params, budget)
    new = dict(decisions)
    promoted: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for u in ordered:
        for n in u.members:
            ranks[n] = choice.ranks[u.key]
            if u.key in choice.promoted:
                promoted[n] = choice.promoted[u.key]
                new[n] = replace(decisions[n], bits=8, rule=f"budget:{score_name} #{choice.ranks[u.key]}")
    rules = selection.rules + [{"option": "budget", "selector": f"{budget:g} bpw by {score_name}",
                                "matched": len(promoted)}]
    sel = replace(selection, decisions=new, rules=rules)
    return Scored(sel, score_name, budget, choice.bits_per_weight, choice.floor, scores, ranks, promoted,
                  time.perf_counter() - t0)


_INTENSIVE = ("relative", "kurtosis", "max_over_rms")


def _extensive(kind: str, spec: TensorSpec, value: float) -> float:
    """A per-tensor statistic (relative error, kurtosis, max/RMS) times the tensor's parameters, so that
    score per extra bit ranks by the statistic itself rather than favouring the smallest units."""
    return value * spec.numel if kind in _INTENSIVE else value


def _quant_dtype(spec: TensorSpec, option: str | None) -> dtypes.DType:
    """The 16-bit dtype convert quantized `spec` in, from the manifest's defaults.dtype (plan.quant_dtype's rule)."""
    if option in dtypes.SIXTEEN_BIT:
        return dtypes.BY_SHORT[option]
    d = dtypes.BY_ST[spec.dtype]
    return d if d.short in dtypes.SIXTEEN_BIT else dtypes.BY_SHORT["bf16"]


def _bits(spec: TensorSpec, bits: int, group_size: int, quant_dtype) -> int:
    """Bits of one quantized weight's codes and scales at its logical shape."""
    entries = formats.COMPRESSED_TENSORS.entries("p", spec.shape, bits, group_size, quant_dtype(spec).st)[:2]
    return sum(8 * math.prod(shape) * dtypes.BY_ST[dt].itemsize for _, dt, shape in entries)


def _norm_names(by_spec: dict[str, TensorSpec], infos: dict[str, NameInfo]) -> dict[str, str]:
    """Linear weight -> the norm weight that scales its input (q/k/v, gate/up), where the block has one."""
    out = {}
    for name, info in infos.items():
        family = _FAMILY.get(info.role or "")
        if family is None or info.block is None:
            continue
        block = ".".join(info.comps[: info.block + 1])
        for norm in _INPUT_NORMS[family]:
            candidate = f"{block}.{norm}.weight"
            if candidate in by_spec:
                out[name] = candidate
                break
    return out


def rederive(manifest, src_dir: Path, specs: list[TensorSpec], scale: str) -> list[tuple[str, str]]:
    """`rtnq verify` of a --budget output: recompute every recorded score from SRC and re-run the choice
    on them; [(tensor, what differs)] (empty when both match). Costs one scoring pass, like convert's."""
    b = manifest.defaults.get("budget")
    if not isinstance(b, dict):
        return []
    score_name, budget = b.get("score"), b.get("bits_per_weight")
    if score_name not in params.BUDGET_SCORES or not isinstance(budget, (int, float)):
        return [("defaults.budget", f"names score {score_name!r} and budget {budget!r}, which this rtnq cannot re-derive")]
    from rtnq.selection.names import analyse

    by_spec = {s.name: s for s in specs}
    infos = {i.name: i for i in analyse([s.name for s in specs])}
    norms = _norm_names(by_spec, infos)
    gemma = layout.model_type(src_dir).startswith("gemma")
    problems = []
    ranked = {n: e for n, e in manifest.tensors.items() if e.rank is not None}

    def bits_of(e, bits):
        n, k = e.shape[-2:]
        groups = 1 if e.group_size == -1 else k // e.group_size
        lead = math.prod(e.shape[:-2])
        return lead * (n * k * bits + n * groups * 16)

    with Reader(src_dir) as reader:
        for name, e in ranked.items():
            spec = by_spec[name]
            if score_name == "position":
                got = knapsack.position_priority(infos[name]) * (bits_of(e, 8) - bits_of(e, 4))
                if e.score is None or not math.isclose(got, e.score, rel_tol=1e-9):
                    problems.append((name, f"budget score {e.score} recorded, {got:.6g} re-derived"))
                continue
            w = reader.read(spec).to(_quant_dtype(spec, manifest.defaults.get("dtype")).torch)
            gamma = None
            norm = norms.get(name)
            if norm is not None and by_spec[norm].shape == (spec.shape[-1],):
                gamma = reader.read(by_spec[norm]).float() + (1.0 if gemma else 0.0)
            got = _extensive(score_name, spec, sensitivity.score(score_name, w, e.group_size, gamma, name=name,
                                                                 scale=scale))
            if e.score is None or not math.isclose(got, e.score, rel_tol=1e-6, abs_tol=1e-12):
                problems.append((name, f"budget score {e.score} recorded, {got:.6g} re-derived"))
    if problems:
        return problems
    # Re-run the greedy on the recorded scores: the promoted units must be the ones it picks.
    promoted = {n for n, e in ranked.items() if (e.rule or "").startswith("budget:")}
    quantized = manifest.quantized()
    base = sum(bits_of(e, 4 if n in promoted else e.bits) for n, e in quantized.items())
    n_params = sum(math.prod(e.shape) for e in quantized.values())
    units: dict[int, list[str]] = {}
    for n, e in ranked.items():
        units.setdefault(e.rank, []).append(n)
    ordered = [knapsack.Unit(("rank", str(r)), tuple(m), sum(ranked[n].score for n in m),
                             sum(bits_of(ranked[n], 8) - bits_of(ranked[n], 4) for n in m))
               for r, m in sorted(units.items())]
    try:
        choice = knapsack.choose(ordered, base, n_params, float(budget))
    except UsageError as err:
        return [("defaults.budget", str(err))]
    again = {n for u in ordered if u.key in choice.promoted for n in u.members}
    return [(n, "promoted by the manifest, not by re-running the budget" if n in promoted
             else "the budget re-run promotes it, the manifest does not") for n in sorted(promoted ^ again)]
