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

from rtnq import dtypes, params
from rtnq.checkpoint import layout
from rtnq.checkpoint.source import Reader, TensorSpec
from rtnq.errors import UsageError
from rtnq.numerics import sensitivity
from rtnq.selection import budget as knapsack
from rtnq.selection.names import NameInfo
from rtnq.selection.precision import Selection, group_key

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
          dtype: str | None = None, scale: str = "absmax") -> Scored:
    """Promote units of `selection` within `budget`; dtype: --dtype ("bf16"/"fp16"), or None for the source's."""
    params.check(budget_score=score_name)
    if not math.isfinite(budget) or budget <= 0:
        raise UsageError(f"--budget takes a positive number of bits per weight, such as 4.5, got {budget}")
    t0 = time.perf_counter()
    decisions = selection.decisions
    infos = {i.name: i for i in selection.infos}
    quantized = {n: d for n, d in decisions.items() if d.kind == "quantized"}
    shapes = {s.name: s.shape for s in specs if s.name in quantized}
    base_bits = sum(_bits(shapes[n], d.bits, d.group_size) for n, d in quantized.items())
    n_params = sum(math.prod(shape) for shape in shapes.values())
    # Candidates: units whose every member is quantized at 4 bits by the default rule.
    units: dict[tuple[str, str], list[str]] = {}
    for name in quantized:
        units.setdefault(group_key(infos[name]), []).append(name)
    candidates = {k: m for k, m in units.items()
                  if all(decisions[n].bits == 4 and decisions[n].rule == "default" for n in m)}
    extra = {n: _extra_bits(shapes[n], decisions[n].group_size) for m in candidates.values() for n in m}
    with _Scorer(src_dir, specs, infos, score_name, dtype, scale) as scorer:
        scores = {n: scorer.score(n, decisions[n].group_size, extra[n]) for m in candidates.values() for n in m}
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


class _Scorer:
    """One tensor's score, the same for convert (apply) and verify (rederive): `position` is its prior
    times its extra bits (priority per bit, whatever the unit's size, and no weight read); a statistic
    reads the weight in the dtype it is quantized in, with the norm weight that scales its input."""

    def __init__(self, src_dir: Path, specs: list[TensorSpec], infos: dict[str, NameInfo], kind: str,
                 dtype: str | None, scale: str):
        self.by_spec = {s.name: s for s in specs}
        self.infos, self.kind, self.dtype, self.scale = infos, kind, dtype, scale
        self.norms = _norm_names(self.by_spec, infos)
        self.gemma = layout.model_type(src_dir).startswith("gemma")  # Gemma's RMSNorm scales by (1 + weight)
        self.reader = None if kind == "position" else Reader(src_dir)

    def score(self, name: str, group_size: int, extra_bits: int) -> float:
        if self.kind == "position":
            return knapsack.position_priority(self.infos[name]) * extra_bits
        spec = self.by_spec[name]
        w = self.reader.read(spec).to(dtypes.quantized_in(spec.dtype, self.dtype).torch)
        gamma = None
        norm = self.norms.get(name)
        if norm is not None and self.by_spec[norm].shape == (spec.shape[-1],):
            gamma = self.reader.read(self.by_spec[norm]).float() + (1.0 if self.gemma else 0.0)
        value = sensitivity.score(self.kind, w, group_size, gamma, name=name, scale=self.scale)
        # A per-tensor ratio (relative error, kurtosis, max/RMS) times the parameters, so that score per
        # extra bit ranks by the ratio itself rather than favouring the smallest units.
        return value * spec.numel if self.kind in _INTENSIVE else value

    def __enter__(self) -> "_Scorer":
        return self

    def __exit__(self, *exc) -> None:
        if self.reader is not None:
            self.reader.close()


def _bits(shape: tuple[int, ...], bits: int, group_size: int) -> int:
    """Bits of one quantized weight's codes and 16-bit scales at its logical shape."""
    *lead, n, k = shape
    groups = 1 if group_size == -1 else k // group_size
    return math.prod(lead) * (n * k * bits + n * groups * 16)


def _extra_bits(shape: tuple[int, ...], group_size: int) -> int:
    """What promoting a weight from INT4 to INT8 adds (the scales stay)."""
    return _bits(shape, 8, group_size) - _bits(shape, 4, group_size)


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

    infos = {i.name: i for i in analyse([s.name for s in specs])}
    ranked = {n: e for n, e in manifest.tensors.items() if e.rank is not None}
    option = manifest.defaults.get("dtype")  # "bf16"/"fp16" when --dtype was given
    problems = []
    with _Scorer(src_dir, specs, infos, score_name, option if option in dtypes.SIXTEEN_BIT else None,
                 scale) as scorer:
        for name, e in ranked.items():
            got = scorer.score(name, e.group_size, _extra_bits(tuple(e.shape), e.group_size))
            if e.score is None or not math.isclose(got, e.score, rel_tol=1e-6, abs_tol=1e-12):
                problems.append((name, f"budget score {e.score} recorded, {got:.6g} re-derived"))
    if problems:
        return problems
    # Re-run the greedy on the recorded scores: the promoted units must be the ones it picks.
    promoted = {n for n, e in ranked.items() if (e.rule or "").startswith("budget:")}
    quantized = manifest.quantized()
    base = sum(_bits(tuple(e.shape), 4 if n in promoted else e.bits, e.group_size) for n, e in quantized.items())
    n_params = sum(math.prod(e.shape) for e in quantized.values())
    units: dict[int, list[str]] = {}
    for n, e in ranked.items():
        units.setdefault(e.rank, []).append(n)
    ordered = [knapsack.Unit(("rank", str(r)), tuple(m), sum(ranked[n].score for n in m),
                             sum(_extra_bits(tuple(ranked[n].shape), ranked[n].group_size) for n in m))
               for r, m in sorted(units.items())]
    try:
        choice = knapsack.choose(ordered, base, n_params, float(budget))
    except UsageError as err:
        return [("defaults.budget", str(err))]
    again = {n for u in ordered if u.key in choice.promoted for n in u.members}
    return [(n, "promoted by the manifest, not by re-running the budget" if n in promoted
             else "the budget re-run promotes it, the manifest does not") for n in sorted(promoted ^ again)]
