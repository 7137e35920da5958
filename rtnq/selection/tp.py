"""Tensor-parallel preflight: which quantized tensors still meet Marlin's shape rules per rank.

Pure and torch-free. `precision.select` checks every plan at the common degrees (SUMMARY_DEGREES) for
the one-line summary of every run, and the degrees asked for with --tp become warnings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rtnq.numerics.shape_rule import check_shape
from rtnq.selection.names import COLUMN, FUSED, REPLICATED, ROW, NameInfo

if TYPE_CHECKING:
    from rtnq.selection.precision import Decision

SUMMARY_DEGREES = (2, 4, 8)  # tensor-parallel degrees every plan is checked for


def check(t: int, decisions: dict[str, Decision], infos: dict[str, NameInfo], nk: dict, kv_heads: int | None = None):
    """[(name, why)] for each quantized tensor whose per-rank shape under tensor parallelism t breaks Marlin.

    What an engine (vLLM, SGLang) holds per rank, and checks:
    * a fused column-parallel layer (q/k/v, gate/up) is one tensor per rank whose n is the sum of its
      members' parts; each member must split evenly, k/v heads are replicated rather than split when
      t exceeds the model's key-value heads (kv_heads, from config.json), and the Marlin rule applies
      to the fused n;
    * other column-parallel layers split n, row-parallel ones (o, down) split k, which must still hold
      whole groups and 128-wide k tiles;
    * routed MoE experts (Marlin MoE): the intermediate size per rank (gate/up n, down k) must be a
      multiple of max(64, group size), and the hidden size a multiple of 128.
    Tensors already off Marlin's tiles unsplit (k = 576) are not listed: what splitting breaks is the point
    here, and those take padding or another kernel at every degree (the exports warn about them).
    """
    fails = []
    fused: dict[tuple[str, str], list[str]] = {}
    for name, d in decisions.items():
        if d.kind != "quantized":
            continue
        g = d.group_size  # the tensor's own (rtnq.numerics.shape_rule.group_for)
        if check_shape(*nk[name], g):
            continue  # off Marlin's tiles before any split: padded or served by another kernel at every degree
        info = infos[name]
        n, k = nk[name]
        role = info.role
        if info.experts is not None and role in COLUMN | ROW:
            inter, hidden = (n, k) if role in COLUMN else (k, n)
            unit = max(64, g)
            if inter % t:
                why = f"intermediate size {inter} is not divisible by {t}"
            elif (inter // t) % unit:
                why = f"intermediate size per rank {inter // t} is not a multiple of {unit}"
            elif hidden % 128:
                why = f"hidden size {hidden} is not a multiple of 128"
            else:
                continue
            fails.append((name, f"MoE experts, split {inter}/{t}: {why}"))
        elif FUSED.get(role or "") in ("qkv", "gate_up"):
            fused.setdefault((info.module.rpartition(".")[0], FUSED[role]), []).append(name)
        elif role in COLUMN:  # each rank holds n/t output rows
            why = f"n={n} is not divisible by {t}" if n % t else check_shape(n // t, k, g)
            if why:
                fails.append((name, f"column-parallel, n/{t}: {why}"))
        elif role in ROW:  # each rank holds k/t input columns, so its groups and k tiles must still fit
            why = f"k={k} is not divisible by {t}" if k % t else check_shape(n, k // t, g)
            if why:
                fails.append((name, f"row-parallel, k/{t}: {why}"))
    for (_, kind), members in fused.items():
        parts = []
        why = None
        for name in members:
            n = nk[name][0]
            if infos[name].role in ("k", "v") and kv_heads and t > kv_heads and t % kv_heads == 0:
                parts.append(n // kv_heads)  # vLLM replicates the key-value heads: one head per rank
            elif n % t:
                why = why or f"n={n} of {name.rsplit('.', 2)[-2]} is not divisible by {t}"
            else:
                parts.append(n // t)
        label = "q/k/v" if kind == "qkv" else "gate/up"
        if why is None:
            total = sum(parts)
            why = check_shape(total, nk[members[0]][1], decisions[members[0]].group_size)
            if why:
                why = f"fused {label} per rank ({' + '.join(map(str, parts))}): {why}"
        if why:
            fails += [(name, f"column-parallel, n/{t}: {why}") for name in members]
    return fails


def warnings(tp_failures: dict, decisions: dict[str, Decision], infos: dict[str, NameInfo]) -> list[str]:
    out = []
    for t, fails in tp_failures.items():
        if fails:
            shown = "; ".join(f"{n} ({why})" for n, why in fails[:3])
            more = f"; and {len(fails) - 3} more" if len(fails) > 3 else ""
            out.append(f"--tp {t}: {len(fails)} quantized tensors would miss the Marlin kernels' shape rule per rank: "
                       f"{shown}{more}")
    known = COLUMN | ROW | REPLICATED
    unknown = [n for n, d in decisions.items() if d.kind == "quantized" and infos[n].role not in known]
    if tp_failures and unknown:
        out.append(f"--tp: {len(unknown)} quantized tensors have no known tensor-parallel split and were not "
                   f"checked, e.g. {unknown[0]}")
    return out
