"""`--budget BPW`: which quantized units to promote from INT4 to INT8 so the average bits per weight of
the quantized linears (scales and the format's constants included) stays within a budget. Pure, torch-free.

A unit is what an engine loads as one layer (precision.group_key: q/k/v of one attention, gate/up of one
MLP, the routed experts of one MoE layer, any other linear alone), so it is promoted whole. Each unit
comes with a data-free score (rtnq.numerics.sensitivity, summed over its members) and the exact extra
bits its promotion costs in the chosen format. Greedy knapsack: units in decreasing score per extra bit
(ties: source order), each promoted if it still fits; a unit that does not fit is passed over for
cheaper ones after it. Explicit --keep-int8 and --skip decided before the budget and are never undone.
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
    if params <= 0:
        raise UsageError("--budget: no tensor is quantized, so there is nothing to budget")
    floor = base_bits / params
    if budget + 1e-9 < floor:
        raise UsageError(f"--budget {budget:g} is below the {floor:.4f} bits per weight the quantized linears "
                         "cost before any promotion; give at least that")
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
