"""The precision manifest (`rtnq_manifest.json`): what happened to every source tensor.

Schema version 4 (a contract: docs/FORMAT.md). Written with sorted keys. Readers refuse any version
they do not know with a clear error instead of guessing, and read older ones as follows:
  1  rtnq 0.1 before the exports: format "rtnq-marlin";
  2  added the formats "gptq" and "compressed-tensors", whose quantized entries name that format's
     outputs (an older rtnq must refuse them rather than read GPTQ words as Marlin words);
  3  a quantized tensor's kind is "quantized" (it was "marlin", whatever the format) and the totals
     count "int4"/"int8" (were "marlin4"/"marlin8"). Versions 1-2 are read with those renames.
  4  every linear is quantized whatever its shape: group_size is the tensor's own (a smaller one where
     k needs it), and a marlin tensor the kernels cannot tile is stored padded, its entry saying
     "padded_shape" (an older rtnq would read those words at the logical shape, so it must refuse).

A readable version is then checked field by field (`from_json`, the tables after it): a tampered or
corrupt manifest is one CheckpointError (exit 4) naming the file, the tensor and the field, before any
command reads it. Fields added without a version bump (the totals' passthrough_reasons,
model_bits_per_weight, linear_bits_per_weight, linear_parameters, tp_failures) may be absent, and the
totals may be empty altogether (manifests built by hand, as the runtime's tests do).

    {
      "version": 4,
      "format": "rtnq-marlin" | "gptq" | "compressed-tensors",
      "rtnq_version": "0.1.0",
      "defaults": {"bits": 4, "group_size": 128, "scale_rule": "rtn-absmax", "dtype": "bfloat16"},
      "rules": [{"option": "keep-int8", "selector": "layers.0", "matched": 7}, ...],
      "totals": {"parameters": ..., "quantized_parameters": ..., "bytes_in": ..., "bytes_out": ...,
                 "bits_per_weight": ..., "tensors": {"int4": ..., "int8": ..., "passthrough": ...}},
      "warnings": ["..."],
      "tensors": {
        "model.layers.0.mlp.up_proj.weight": {
          "kind": "quantized", "bits": 8, "group_size": 128, "shape": [n, k], "dtype": "bfloat16",
          ("padded_shape": [n', k'] where the marlin outputs hold a padded weight),
          ("score": 0.12, "rank": 3 for every candidate of --budget; a promoted one's rule is "budget:<score> #3",
           under --budget-groups (defaults.budget.groups: true) "budget:<score> int8|g64|g32 #3", the score
           the candidate's modelled loss as planned),
          "outputs": {"qweight": "model.layers.0.mlp.up_proj.qweight",
                      "scales": "model.layers.0.mlp.up_proj.scales"},
          "shard": "model-00001-of-00002.safetensors", "rule": "keep-int8:layers.0", "error": 0.0071
        },
        "model.norm.weight": {"kind": "passthrough", "shape": [2048], "dtype": "bfloat16",
                              "outputs": {"tensor": "model.norm.weight"}, "shard": "...",
                              "reason": "not a linear weight inside a block"}
      }
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rtnq import formats
from rtnq.checkpoint import jsonfile
from rtnq.checkpoint import manifest_schema as schema
from rtnq.checkpoint.layout import MANIFEST_NAME
from rtnq.errors import CheckpointError

VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
FILENAME = MANIFEST_NAME
FORMAT = formats.MARLIN.manifest_name  # the default format, and the only one of version 1
FORMATS = tuple(f.manifest_name for f in formats.ALL)
SCALE_RULE = "rtn-absmax"  # the paper's rule: scale = 2 * maxabs / (2^bits - 1), 16-bit arithmetic
SCALE_RULES = {"rtn-absmax": "absmax", "rtn-mse": "mse"}  # defaults.scale_rule -> rtn.quantize's scale
KINDS = schema.KINDS


def scale_rule(scale: str) -> str:
    """The manifest's (and config's) name of an rtn.quantize scale rule."""
    return f"rtn-{scale}"


def scale_of(m: "Manifest") -> str:
    """The rtn.quantize scale rule a manifest's outputs were made with (absent: the paper's)."""
    rule = m.defaults.get("scale_rule", SCALE_RULE)
    if rule not in SCALE_RULES:
        raise CheckpointError(f"{FILENAME}: scale_rule {rule!r} is not one this rtnq knows "
                              f"({', '.join(SCALE_RULES)})")
    return SCALE_RULES[rule]


@dataclass
class TensorEntry:
    kind: str  # "quantized" (in the format's layout) or "passthrough"
    shape: list[int]  # source shape: [n, k] (or [E, n, k]) for linear weights
    dtype: str  # source dtype, torch spelling ("bfloat16", "float16", "float32", ...)
    outputs: dict[str, str]  # role -> tensor name: {"qweight", "scales", ...} (the format's), {"tensor"} for passthrough
    shard: str  # output shard file holding the outputs
    bits: int | None = None
    group_size: int | None = None
    rule: str | None = None  # which option/selector chose the precision (marlin)
    reason: str | None = None  # why it was passed through (passthrough)
    error: float | None = None  # relative Frobenius error of the dequantized weight (marlin)
    padded_shape: list[int] | None = None  # marlin: the stored (..., n', k') where it differs from shape
    score: float | None = None  # --budget: this tensor's data-free score (defaults.budget names which)
    rank: int | None = None  # --budget: its unit's rank by score per extra bit (1 = first to promote)

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies every list and dict, which made writing the manifest of a
        # checkpoint with 200k tensors take most of a minute. json.dumps only reads them.
        return {f.name: v for f in _ENTRY_FIELDS if (v := getattr(self, f.name)) is not None}


_ENTRY_FIELDS = fields(TensorEntry)


@dataclass
class Manifest:
    defaults: dict[str, Any]
    tensors: dict[str, TensorEntry]
    rules: list[dict[str, Any]] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    rtnq_version: str = "0.1.0"
    version: int = VERSION
    format: str = FORMAT
    source: dict[str, str] | None = None  # a hub source: {"hub": ORG/NAME, "revision": as asked, "commit": sha}

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "format": self.format,
            "rtnq_version": self.rtnq_version,
            "defaults": self.defaults,
            "rules": self.rules,
            "totals": self.totals,
            "warnings": self.warnings,
            "tensors": {name: e.to_json() for name, e in self.tensors.items()},
            # only for a hub source: a local conversion's manifest stays byte-identical to earlier ones
            **({} if self.source is None else {"source": self.source}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    def quantized(self) -> dict[str, TensorEntry]:
        return {name: e for name, e in self.tensors.items() if e.kind == "quantized"}


def from_json(data: Any, where: str = FILENAME) -> Manifest:
    """A Manifest from the decoded JSON, or CheckpointError (exit 4) with one line naming the file, the
    tensor and the field that is wrong. Every reader (inspect, verify, dequantize, eval, the runtime,
    bench) comes through here, so none of them has to guard against a hand-edited or corrupt file."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    version = data.get("version")
    # is_int: `true` and `1.0` equal 1 in Python, and would pass for version 1.
    if not schema.is_int(version) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{where}: manifest version {schema.show(version)} is not supported by this rtnq (reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade rtnq or re-convert the checkpoint"
        )
    fmt = data.get("format", FORMAT) if version >= 2 else FORMAT
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise CheckpointError(f"{where}: unknown format {schema.show(fmt)} (this rtnq knows {', '.join(FORMATS)})")
    if version < 3:
        data = _upgrade_kinds(data)
    try:
        schema.check_manifest(data, formats.BY_MANIFEST_NAME[fmt])
    except schema.Invalid as e:
        raise CheckpointError(f"{where}: {e}") from None
    return Manifest(
        defaults=data["defaults"],
        tensors={name: TensorEntry(**{k: v for k, v in entry.items() if v is not None})
                 for name, entry in data["tensors"].items()},
        rules=data.get("rules") or [],
        totals=data.get("totals") or {},
        warnings=data.get("warnings") or [],
        rtnq_version=data.get("rtnq_version") or "?",
        version=version,
        format=fmt,
        source=data.get("source"),
    )


def _upgrade_kinds(data: dict) -> dict:
    """Versions 1-2 called a quantized tensor's kind "marlin" in every format, and counted
    "marlin4"/"marlin8" in the totals; version 3 says "quantized" and "int4"/"int8"."""
    renames = {"marlin4": "int4", "marlin8": "int8"}
    data = dict(data)
    tensors = data.get("tensors")
    if isinstance(tensors, dict):
        data["tensors"] = {
            name: {**e, "kind": "quantized"} if isinstance(e, dict) and e.get("kind") == "marlin" else e
            for name, e in tensors.items()
        }
    totals = data.get("totals")
    if isinstance(totals, dict) and isinstance(totals.get("tensors"), dict):
        data["totals"] = {**totals, "tensors": {renames.get(k, k): v for k, v in totals["tensors"].items()}}
    return data


def read(out_dir: str | Path) -> Manifest:
    """Read and validate `OUT/rtnq_manifest.json`; CheckpointError if missing, corrupt, unknown or malformed."""
    path = Path(out_dir) / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{out_dir}: no {FILENAME}; is this a directory written by `rtnq convert`?")
    return from_json(jsonfile.read(path), str(path))
