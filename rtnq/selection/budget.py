"""`--budget BPW`: which quantized units to promote from INT4 to INT8 so the average bits per weight of
the quantized linears (scales and the format's constants included) stays within a budget. Pure, torch-free.

A unit is what an engine loads as one layer (precision.group_key: q/k/v of one attention, gate/up of one
MLP, the routed experts of one MoE layer, any other linear alone), so it is promoted whole. Each unit
comes with a data-free score (rtnq.numerics.sensitivity, summed over its members) and the exact extra
bits its promotion costs in the chosen format. Greedy knapsack: units in decreasing score per extra bit
(ties: source order), each promoted if it still fits; a unit that does not fit is passed over for
cheaper ones after it. Explicit --keep-int8 and --skip decided before the budget and are never undone.

`--budget-groups` (`choose_options`) widens each unit's choice from {INT4, INT8} to {INT4 at its group size,
INT4 at 64, INT4 at 32, INT8}: a multiple-choice knapsack. Each option comes with the unit's modelled loss
(rtnq.commands.convert.budget: the prior times the squared weight error of that option), and a unit moves
along the lower convex hull of its (extra bits, loss) points, so every step is one that no mix of its
neighbours beats. Steps of all units are taken greedily by loss removed per extra bit. A finer group costs
16/g bits of scales per weight (0.125 for 64, 0.375 for 32, from 128) where INT8 costs 4, which is why
on SmolLM2-135M most of a 4.5 budget goes to groups of 32 (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rtnq.errors import UsageError


@dataclass(frozen=True)
class Unit:
    key: tuple[str, str]  # precision.group_key
    members: tuple[str, ...]  # source tensor names
    score: float  # higher: promoting it buys more
    extra_bits: int  # output bits added by promoting every member to INT8


@dataclass(frozen=True)
class Choice:
    promoted: dict[tuple[str, str], int]  # unit key -> rank among the promoted (1 = first)
    ranks: dict[tuple[str, str], int]  # every unit's rank by score per extra bit (1 = best)
    bits_per_weight: float  # of the quantized linears, after promotion
    floor: float  # before promotion


def choose(units: Sequence[Unit], base_bits: int, params: int, budget: float) -> Choice:
    """Promote units while the quantized linears' bits per weight stay <= budget.

    base_bits: output bits of every quantized linear before promotion; params: their parameter count.
    UsageError when the budget is below what the plan already costs.
    """
    floor = _floor(base_bits, params, budget)
    order = sorted(range(len(units)), key=lambda i: (-_density(units[i]), i))
    ranks = {units[i].key: r for r, i in enumerate(order, 1)}
    limit = int(budget * params + 1e-6)  # bits allowed in all
    total = base_bits
    promoted: dict[tuple[str, str], int] = {}
    for i in order:
        u = units[i]
        if u.extra_bits > 0 and total + u.extra_bits <= limit and u.score > 0:
            total += u.extra_bits
            promoted[u.key] = len(promoted) + 1
    return Choice(promoted, ranks, total / params, floor)


# --budget-score position: llama.cpp Q4_K_M's data-free prior, generalised. Errors in the first blocks pass
# through every later one, errors in the last go straight to the logits: units nearer either end of the
# stack come first, and within a block q/k/v and down_proj (Q4_K_M's attn_v and ffn_down) before o and
# gate/up. Measured on SmolLM2-135M it beats every weight statistic (docs/BENCHMARKS.md).
_ROLE_WEIGHT = {"q": 1.0, "k": 1.0, "v": 1.0, "qkv": 1.0, "down": 1.0, "o": 0.5}


def position_priority(info) -> float:
    """The position prior of a linear (a NameInfo inside a block): 1 / (1 + blocks to the nearer end),
    times 1 for q/k/v and down, 0.5 for o, 0.25 for anything else (gate/up, experts)."""
    index = int(info.comps[info.block])
    depth = info.sizes[info.block] or index + 1
    return _ROLE_WEIGHT.get(info.role or "", 0.25) / (1 + min(index, depth - 1 - index))


def _density(u: Unit) -> float:
    return u.score / u.extra_bits if u.extra_bits > 0 else 0.0


@dataclass(frozen=True)
class Option:
    label: str  # what the unit becomes: "g64", "g32" (INT4 at that group size) or "int8"
    extra_bits: int  # output bits added over the unit's base (INT4 at its own group size)
    loss: float  # the unit's modelled loss with this option (lower is better)


@dataclass(frozen=True)
class Choices:
    key: tuple[str, str]  # precision.group_key
    members: tuple[str, ...]
    base_loss: float  # the modelled loss at the base
    options: tuple[Option, ...]


@dataclass(frozen=True)
class OptionChoice:
    taken: dict[tuple[str, str], str]  # unit key -> the label of its option (units left at the base absent)
    ranks: dict[tuple[str, str], int]  # every unit's rank by the loss its first step removes per extra bit
    bits_per_weight: float
    floor: float


def choose_options(units: Sequence[Choices], base_bits: int, params: int, budget: float) -> OptionChoice:
    """Move units to their options while the quantized linears' bits per weight stay <= budget (module
    docstring). Deterministic: ties in loss per bit go to the earlier unit, then to its cheaper step."""
    floor = _floor(base_bits, params, budget)
    steps = []  # (loss removed per extra bit, unit index, step index, label left, option taken)
    firsts: dict[tuple[str, str], float] = {}
    for i, u in enumerate(units):
        hull = _hull(u)
        for j, ((bits_a, loss_a, label_a), (bits_b, loss_b, label_b)) in enumerate(zip(hull, hull[1:])):
            per_bit = (loss_a - loss_b) / (bits_b - bits_a)
            steps.append((per_bit, i, j, label_a, next(o for o in u.options if o.label == label_b)))
            firsts.setdefault(u.key, per_bit)
    order = sorted(range(len(units)), key=lambda i: (-firsts.get(units[i].key, 0.0), i))
    ranks = {units[i].key: r for r, i in enumerate(order, 1)}
    limit = int(budget * params + 1e-6)  # bits allowed in all
    total = base_bits
    at = {u.key: ("", 0) for u in units}  # unit -> (the label it is at, its extra bits); "" is the base
    for _, i, _, left, option in sorted(steps, key=lambda t: (-t[0], t[1], t[2])):
        key = units[i].key
        label, bits = at[key]
        if label != left:  # an earlier step of this unit did not fit, so no later one is taken
            continue
        if total - bits + option.extra_bits <= limit:
            total += option.extra_bits - bits
            at[key] = (option.label, option.extra_bits)
    taken = {k: label for k, (label, _) in at.items() if label}
    return OptionChoice(taken, ranks, total / params, floor)


def _hull(u: Choices) -> list[tuple[int, float, str]]:
    """The lower convex hull of a unit's (extra bits, loss, label) points from its base ("" label), cheapest
    first: only options that lower the loss, and none that going straight to a later one beats per bit."""
    hull = [(0, u.base_loss, "")]
    for o in sorted((o for o in u.options if o.extra_bits > 0), key=lambda o: (o.extra_bits, o.loss)):
        if o.loss >= hull[-1][1]:
            continue
        while len(hull) >= 2 and _no_better(hull[-2], hull[-1], (o.extra_bits, o.loss)):
            hull.pop()
        hull.append((o.extra_bits, o.loss, o.label))
    return hull


def _no_better(a, b, c) -> bool:
    """Whether stepping a -> b removes no more loss per bit than a -> c (b then leaves the hull)."""
    return (a[1] - b[1]) * (c[0] - a[0]) <= (a[1] - c[1]) * (b[0] - a[0])


def _floor(base_bits: int, params: int, budget: float) -> float:
    """Bits per weight before any move; UsageError when nothing is quantized or the budget is below it."""
    if params <= 0:
        raise UsageError("--budget: no tensor is quantized, so there is nothing to budget")
    floor = base_bits / params
    if budget + 1e-9 < floor:
        raise UsageError(f"--budget {budget:g} is below the {floor:.4f} bits per weight the quantized linears "
                         "cost before any promotion; give at least that")
    return floor
