"""The precision map of a manifest: one row per block (layer), one column per module, for `rtnq inspect`.

Pure: takes a Manifest, returns plain data that the CLI renders as a table or a picture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rtnq import dtypes
from rtnq.checkpoint.manifest import Manifest, TensorEntry
from rtnq.selection import names


@dataclass
class PrecisionMap:
    layers: list[int]
    modules: list[str]  # column names, e.g. "self_attn.q_proj"
    cells: dict[tuple[int, str], str]  # (layer, module) -> "int4" / "int8" / "bf16" ...
    other: dict[str, str]  # tensors outside blocks -> label
    # Added for the error panel of `inspect --plot`; defaults keep hand-built maps (and old callers) valid.
    errors: dict[tuple[int, str], float | None] = field(default_factory=dict)  # RTN error; None if 16-bit/unrecorded
    whys: dict[tuple[int, str], str] = field(default_factory=dict)  # 16-bit cells only: short why ("shape", "skip")
    reasons: dict[tuple[int, str], str] = field(default_factory=dict)  # 16-bit cells only: the manifest's full reason


# Column order: attention projections, then the MLP, then anything else (alphabetical).
_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"]


def short_names(modules: list[str]) -> list[str]:
    """Column headers: the last component without `_proj` (q, gate, ...) when unambiguous, else full paths."""
    last = [m.rsplit(".", 1)[-1].removesuffix("_proj") for m in modules]
    return last if len(set(last)) == len(last) else modules


def _column_key(module: str) -> tuple[int, str]:
    leaf = module.rsplit(".", 1)[-1].removesuffix("_proj")
    return (_ORDER.index(leaf) if leaf in _ORDER else len(_ORDER), module)


def label(entry: TensorEntry) -> str:
    if entry.kind == "quantized":
        return f"int{entry.bits}"
    d = dtypes.BY_NAME.get(entry.dtype)
    return d.label if d else entry.dtype


# Reasons whose first word alone says nothing ("not a ...", "GPT-2 ...", "skipped by ...") get a fixed short form;
# the rest are either one word already ("norm", "lm_head") or "<kind>: <detail>" (the shape gate's "shape: k=...").
_SHORT_PREFIXES = [
    ("skipped by --skip", "skip"),
    ("GPT-2 Conv1D", "Conv1D"),
    ("not a linear weight", "not linear"),
    ("not a weight", "not weight"),
    ("dtype", "dtype"),
]


def short_why(reason: str | None) -> str:
    """A cell-sized word for why a tensor stayed 16-bit: "shape", "skip", "Conv1D", "norm", ..."""
    if not reason:
        return "16-bit"  # manifests from before reasons were recorded
    for prefix, short in _SHORT_PREFIXES:
        if reason.startswith(prefix):
            return short
    head = reason.split(":", 1)[0].strip()
    # "3-D tensor is not a linear weight" and other free text: keep the first word so it still fits a cell.
    return head if len(head) <= 12 else head.split()[0]


def build(m: Manifest, include_1d: bool = False) -> PrecisionMap:
    """Group every matrix (or, with include_1d, every tensor) by block index and module name."""
    cells: dict[tuple[int, str], str] = {}
    errors: dict[tuple[int, str], float | None] = {}
    whys: dict[tuple[int, str], str] = {}
    reasons: dict[tuple[int, str], str] = {}
    other: dict[str, str] = {}
    modules: dict[str, None] = {}
    kept = [(name, e) for name, e in m.tensors.items() if include_1d or len(e.shape) >= 2]
    # The blocks as selection sees them (rtnq.selection.names), so inspect and --keep-int8 agree.
    for (name, entry), info in zip(kept, names.analyse([name for name, _ in kept])):
        if info.block is None:
            other[name] = label(entry)
            continue
        rest = info.comps[info.block + 1 :]
        module = ".".join(rest[:-1] if rest[-1] == "weight" and len(rest) > 1 else rest)
        modules.setdefault(module, None)
        key = (int(info.comps[info.block]), module)
        cells[key] = label(entry)
        # Only a quantized weight has an RTN error; a 16-bit one is exact, so it gets its why instead.
        errors[key] = entry.error if entry.kind == "quantized" else None
        if entry.kind != "quantized":
            whys[key] = short_why(entry.reason)
            reasons[key] = entry.reason or ""
    layers = sorted({layer for layer, _ in cells})
    return PrecisionMap(layers, sorted(modules, key=_column_key), cells, other, errors, whys, reasons)


@dataclass(frozen=True)
class BudgetRow:
    rank: int  # by score per extra bit, 1 = first to promote
    modules: list[str]  # the unit's members (module names)
    score: float  # the unit's score (sum of its members')
    promoted: bool
    became: str = ""  # what --budget made it: "int8", or "int4 g32"/"int4 g64" under --budget-groups; "" if nothing


def budget_ranking(m: Manifest) -> list[BudgetRow]:
    """The --budget candidates of a manifest, one row per unit, best first (empty without --budget)."""
    units: dict[int, list[tuple[str, TensorEntry]]] = {}
    for name, e in m.tensors.items():
        if e.rank is not None:
            units.setdefault(e.rank, []).append((name, e))
    return [BudgetRow(rank, [names.module_name(n) for n, _ in members], sum(e.score or 0.0 for _, e in members),
                      any((e.rule or "").startswith("budget:") for _, e in members), _became(members))
            for rank, members in sorted(units.items())]


def _became(members: list[tuple[str, TensorEntry]]) -> str:
    moved = [e for _, e in members if (e.rule or "").startswith("budget:")]
    if not moved:
        return ""
    e = moved[0]
    return "int8" if e.bits == 8 else f"int{e.bits} g{e.group_size}"
