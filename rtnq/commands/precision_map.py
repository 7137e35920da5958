"""The precision map of a manifest: one row per block (layer), one column per module, for `rtnq inspect`.

Pure: takes a Manifest, returns plain data that the CLI renders as a table or a picture.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtnq import dtypes
from rtnq.checkpoint.manifest import Manifest, TensorEntry
from rtnq.selection import names


@dataclass
class PrecisionMap:
    layers: list[int]
    modules: list[str]  # column names, e.g. "self_attn.q_proj"
    cells: dict[tuple[int, str], str]  # (layer, module) -> "int4" / "int8" / "bf16" ...
    other: dict[str, str]  # tensors outside blocks -> label


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


def build(m: Manifest, include_1d: bool = False) -> PrecisionMap:
    """Group every matrix (or, with include_1d, every tensor) by block index and module name."""
    cells: dict[tuple[int, str], str] = {}
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
        cells[(int(info.comps[info.block]), module)] = label(entry)
    layers = sorted({layer for layer, _ in cells})
    return PrecisionMap(layers, sorted(modules, key=_column_key), cells, other)
