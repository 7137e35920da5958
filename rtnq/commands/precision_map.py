"""The precision map of a manifest: one row per block (layer), one column per module, for `rtnq inspect`.

Pure: takes a Manifest, returns plain data that the CLI renders as a table or a picture.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rtnq import dtypes
from rtnq.checkpoint.manifest import Manifest, TensorEntry

# A numbered block container, e.g. "model.layers.12." or "transformer.h.3."
_BLOCK = re.compile(r"^(?P<prefix>.*?\b(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")


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


def _module(rest: str) -> str:
    return rest[: -len(".weight")] if rest.endswith(".weight") else rest


def build(m: Manifest, include_1d: bool = False) -> PrecisionMap:
    """Group every matrix (or, with include_1d, every tensor) by block index and module name."""
    cells: dict[tuple[int, str], str] = {}
    other: dict[str, str] = {}
    modules: dict[str, None] = {}
    for name, entry in m.tensors.items():
        if not include_1d and len(entry.shape) < 2:
            continue
        hit = _BLOCK.match(name)
        if hit is None:
            other[name] = label(entry)
            continue
        module = _module(hit["rest"])
        modules.setdefault(module, None)
        cells[(int(hit["idx"]), module)] = label(entry)
    layers = sorted({layer for layer, _ in cells})
    return PrecisionMap(layers, sorted(modules, key=_column_key), cells, other)
