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

import torch

from rtnq import dtypes, params
from rtnq.checkpoint import layout
from rtnq.checkpoint.source import TensorSpec, open_reader
from rtnq.errors import UsageError
from rtnq.numerics import sensitivity, shape_rule
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
    groups: bool = False  # --budget-groups: units may also have taken groups of 64 or 32


def apply(src_dir: Path, specs: list[TensorSpec], selection: Selection, budget: float, score_name: str,
          dtype: str | None = None, scale: str = "absmax", groups: bool = False, layout_: str = "marlin",
          rotation=None) -> Scored:
    """Promote units of `selection` within `budget`; dtype: --dtype ("bf16"/"fp16"), or None for the source's.
    groups (--budget-groups): units may also take groups of 64 or 32 (`_apply_groups`); layout_: the format's
    (shape_rule.problem), which decides whether a finer group can be stored; rotation (--rotate): the
    commands.rotate.Rotation whose rotated weights are scored, as they are the ones quantized."""
    params.check(budget_score=score_name)
    if not math.isfinite(budget) or budget <= 0:
        raise UsageError(f"--budget takes a positive number of bits per weight, such as 4.5, got {budget}")
    if groups:
        return _apply_groups(src_dir, specs, selection, budget, score_name, dtype, scale, layout_, rotation)
    t0 = time.perf_counter()
    decisions, infos = selection.decisions, {i.name: i for i in selection.infos}
    shapes, base_bits, n_params, candidates = _candidates(specs, selection, infos)
    extra = {n: _extra_bits(shapes[n], decisions[n].group_size) for m in candidates.values() for n in m}
    with _Scorer(src_dir, specs, infos, score_name, dtype, scale, rotation) as scorer:
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


def _candidates(specs: list[TensorSpec], selection: Selection, infos: dict[str, NameInfo]):
    """(shapes of the quantized tensors, their output bits and parameters before any move, the candidate
    units): a candidate is a unit (group_key) whose every member is INT4 by the default rule."""
    decisions = selection.decisions
    quantized = {n: d for n, d in decisions.items() if d.kind == "quantized"}
    shapes = {s.name: s.shape for s in specs if s.name in quantized}
    base_bits = sum(_bits(shapes[n], d.bits, d.group_size) for n, d in quantized.items())
    n_params = sum(math.prod(shape) for shape in shapes.values())
    units: dict[tuple[str, str], list[str]] = {}
    for name in quantized:
        units.setdefault(group_key(infos[name]), []).append(name)
    candidates = {k: m for k, m in units.items()
                  if all(decisions[n].bits == 4 and decisions[n].rule == "default" for n in m)}
    return shapes, base_bits, n_params, candidates


GROUP_SCORES = ("position", "error", "norm_error", "relative")  # the scores that model a loss per option
# (--budget-groups)
FINER_GROUPS = (64, 32)  # the group sizes --budget-groups may give an INT4 unit, besides its own


def _apply_groups(src_dir: Path, specs: list[TensorSpec], selection: Selection, budget: float, score_name: str,
                  dtype: str | None, scale: str, layout_: str, rotation=None) -> Scored:
    """--budget-groups: each candidate unit may stay as it is, take groups of 64 or 32 (still INT4), or go to
    INT8 (rtnq.selection.budget.choose_options). Its modelled loss under each option is the squared weight
    error of its members there, times the position prior for `position`, with the input norm's gamma^2 per
    channel for `norm_error`, divided by the weight's own squared norm and times its parameters for
    `relative` (every unit's error on one scale, whatever its weights' size). Every candidate's weights are
    read once (all options computed from one read)."""
    if score_name not in GROUP_SCORES:
        raise UsageError(f"--budget-groups weighs each option by the weight error it leaves, which --budget-score "
                         f"{score_name} does not measure; use one of {', '.join(GROUP_SCORES)}")
    t0 = time.perf_counter()
    decisions, infos = selection.decisions, {i.name: i for i in selection.infos}
    shapes, base_bits, n_params, candidates = _candidates(specs, selection, infos)
    settings = {k: _unit_settings(m, decisions, shapes, layout_) for k, m in candidates.items()}
    losses: dict[str, dict[str, float]] = {}  # tensor -> option label ("" = base) -> its modelled loss
    with _Scorer(src_dir, specs, infos, "error" if score_name == "position" else score_name, dtype, scale,
                 rotation) as scorer:
        for k, m in candidates.items():
            for n in m:
                labels = list(settings[k])
                errors = scorer.errors(n, [settings[k][label][n] for label in labels])
                prior = knapsack.position_priority(infos[n]) if score_name == "position" else 1.0
                losses[n] = {label: prior * e for label, e in zip(labels, errors)}

    def unit_bits(k, label):
        return sum(_bits(shapes[n], *settings[k][label][n]) for n in candidates[k])

    ordered = [knapsack.Choices(k, tuple(m), sum(losses[n][""] for n in m), tuple(
        knapsack.Option(label, unit_bits(k, label) - unit_bits(k, ""), sum(losses[n][label] for n in m))
        for label in settings[k] if label)) for k, m in candidates.items()]
    choice = knapsack.choose_options(ordered, base_bits, n_params, budget)
    new = dict(decisions)
    moved: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for u in ordered:
        label = choice.taken.get(u.key)
        for n in u.members:
            ranks[n] = choice.ranks[u.key]
            if label:
                bits, group = settings[u.key][label][n]
                moved[n] = choice.ranks[u.key]
                new[n] = replace(decisions[n], bits=bits, group_size=group,
                                 rule=f"budget:{score_name} {label} #{choice.ranks[u.key]}")
    rules = selection.rules + [{"option": "budget", "selector": f"{budget:g} bpw by {score_name}, groups",
                                "matched": len(moved)}]
    sel = replace(selection, decisions=new, rules=rules)
    scores = {n: per[""] for n, per in losses.items()}  # each candidate's modelled loss as it was planned
    return Scored(sel, score_name, budget, choice.bits_per_weight, choice.floor, scores, ranks, moved,
                  time.perf_counter() - t0, groups=True)


def _unit_settings(members: list[str], decisions, shapes, layout_: str) -> dict[str, dict[str, tuple[int, int]]]:
    """A unit's options: label ("" = as planned) -> member -> (bits, group_size). A finer group is offered
    when every member's k holds it and the format can store it, and it changes some member's group; a
    member already at or below it keeps its own (engines load a fused unit with one scheme, and q/k/v or
    gate/up share k, so in practice they all move together)."""
    out = {"": {n: (4, decisions[n].group_size) for n in members}}
    for g in FINER_GROUPS:
        option = {}
        for n in members:
            *_, rows, k = shapes[n]
            own = decisions[n].group_size
            if g >= (k if own == -1 else own):
                option[n] = (4, own)
                continue
            if k % g or shape_rule.problem(rows, k, g, layout_):
                break
            option[n] = (4, g)
        else:
            if any(option[n] != out[""][n] for n in members):
                out[f"g{g}"] = option
    out["int8"] = {n: (8, decisions[n].group_size) for n in members}
    return out


class _Scorer:
    """One tensor's score, the same for convert (apply) and verify (rederive): `position` is its prior
    times its extra bits (priority per bit, whatever the unit's size, and no weight read); a statistic
    reads the weight in the dtype it is quantized in, with the norm weight that scales its input."""

    def __init__(self, src_dir: Path, specs: list[TensorSpec], infos: dict[str, NameInfo], kind: str,
                 dtype: str | None, scale: str, rotation=None):
        self.by_spec = {s.name: s for s in specs}
        self.infos, self.kind, self.dtype, self.scale = infos, kind, dtype, scale
        self.norms = _norm_names(self.by_spec, infos)
        self.gemma = layout.model_type(src_dir).startswith("gemma")  # Gemma's RMSNorm scales by (1 + weight)
        # rotated weights under --rotate (its folded norms are ones, so norm_error weighs the rotated model too)
        self.reader = None if kind == "position" else open_reader(src_dir, rotation)

    def errors(self, name: str, settings: list[tuple[int, int]]) -> list[float]:
        """sensitivity.option_errors of one tensor under each (bits, group_size), gamma^2-weighted for
        norm_error; for relative, over the weight's squared norm and times its parameters."""
        spec = self.by_spec[name]
        w = self.reader.read(spec).to(dtypes.quantized_in(spec.dtype, self.dtype).torch)
        gamma = self._gamma(name, spec) if self.kind == "norm_error" else None
        errors = sensitivity.option_errors(w, settings, gamma, name=name, scale=self.scale)
        if self.kind != "relative":
            return errors
        flat = w.reshape(-1).float()
        norm2 = float(torch.dot(flat, flat))
        return [e / norm2 * spec.numel if norm2 > 0 else 0.0 for e in errors]

    def _gamma(self, name: str, spec: TensorSpec):
        norm = self.norms.get(name)
        if norm is None or self.by_spec[norm].shape != (spec.shape[-1],):
            return None
        return self.reader.read(self.by_spec[norm]).float() + (1.0 if self.gemma else 0.0)

    def score(self, name: str, group_size: int, extra_bits: int) -> float:
        if self.kind == "position":
            return knapsack.position_priority(self.infos[name]) * extra_bits
        spec = self.by_spec[name]
        w = self.reader.read(spec).to(dtypes.quantized_in(spec.dtype, self.dtype).torch)
        gamma = self._gamma(name, spec)
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


def rederive(manifest, src_dir: Path, specs: list[TensorSpec], scale: str, rotation=None) -> list[tuple[str, str]]:
    """`rtnq verify` of a --budget output: recompute every recorded score from SRC and re-run the choice
    on them; [(tensor, what differs)] (empty when both match). Costs one scoring pass, like convert's."""
    b = manifest.defaults.get("budget")
    if not isinstance(b, dict):
        return []
    score_name, budget = b.get("score"), b.get("bits_per_weight")
    if score_name not in params.BUDGET_SCORES or not isinstance(budget, (int, float)):
        return [("defaults.budget", f"names score {score_name!r} and budget {budget!r}, which this rtnq cannot re-derive")]
    if b.get("groups") is True:
        return _rederive_groups(manifest, src_dir, specs, scale, score_name, float(budget), rotation)
    from rtnq.selection.names import analyse

    infos = {i.name: i for i in analyse([s.name for s in specs])}
    ranked = {n: e for n, e in manifest.tensors.items() if e.rank is not None}
    option = manifest.defaults.get("dtype")  # "bf16"/"fp16" when --dtype was given
    problems = []
    with _Scorer(src_dir, specs, infos, score_name, option if option in dtypes.SIXTEEN_BIT else None,
                 scale, rotation) as scorer:
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


def _rederive_groups(manifest, src_dir: Path, specs: list[TensorSpec], scale: str, score_name: str,
                     budget: float, rotation=None) -> list[tuple[str, str]]:
    """verify of a --budget-groups output: undo every budget move the manifest records (back to INT4 at the
    default rule's group), plan the budget again from SRC, and compare each tensor's bits, group size, rule
    and modelled loss with the manifest's."""
    from rtnq import formats
    from rtnq.selection.names import analyse
    from rtnq.selection.precision import Decision

    default_group = manifest.defaults.get("group_size", 128)
    option = manifest.defaults.get("dtype")
    decisions = {}
    for name, e in manifest.tensors.items():
        if e.kind != "quantized":
            decisions[name] = Decision(name, "passthrough", reason=e.reason)
        elif (e.rule or "").startswith("budget:"):
            decisions[name] = Decision(name, "quantized", 4, shape_rule.group_for(e.shape[-1], default_group),
                                       "default")
        else:
            decisions[name] = Decision(name, "quantized", e.bits, e.group_size, e.rule)
    order = [s.name for s in specs]
    selection = Selection({n: decisions[n] for n in order if n in decisions}, [], [],
                          infos=[i for i in analyse(order) if i.name in decisions])
    try:
        again = _apply_groups(src_dir, specs, selection, budget, score_name,
                              option if option in dtypes.SIXTEEN_BIT else None, scale,
                              formats.BY_MANIFEST_NAME[manifest.format].layout, rotation)
    except UsageError as err:
        return [("defaults.budget", str(err))]
    problems = []
    for name, e in manifest.tensors.items():
        d = again.selection.decisions.get(name)
        if e.kind != "quantized" or d is None:
            continue
        if (e.bits, e.group_size, e.rule) != (d.bits, d.group_size, d.rule):
            problems.append((name, f"the manifest has {e.bits} bits, group {e.group_size} ({e.rule}); the budget "
                                   f"re-run gives {d.bits} bits, group {d.group_size} ({d.rule})"))
        got = again.scores.get(name)
        if (got is None) != (e.score is None) or (got is not None and not math.isclose(
                got, e.score, rel_tol=1e-6, abs_tol=1e-12)):
            problems.append((name, f"budget score {e.score} recorded, {got} re-derived"))
    return problems
