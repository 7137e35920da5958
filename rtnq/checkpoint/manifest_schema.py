"""The manifest's schema check (rtnq.checkpoint.manifest.from_json calls it before building a Manifest).

Tables say what each field must be; `_check` walks one object against its table. Every reader (inspect,
verify, dequantize, eval, the runtime, bench) comes through from_json, so none of them has to guard
against a hand-edited or corrupt file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rtnq import formats, params

KINDS = ("quantized", "passthrough")
PASSTHROUGH_ROLES = ("tensor",)  # a passthrough entry's one output: the tensor, unchanged


# The schema check. Tables say what each field must be; `_check` walks one object against its table.
# A null value counts as absent (to_json drops None fields, and a reader sees None either way).
# Unknown keys are refused only in tensor entries: an entry's keys become TensorEntry's fields and
# change what its words mean, while defaults, totals and the top level are open to additions (the
# totals gained linear_bits_per_weight without a version bump; an older rtnq must still read them).


class Invalid(Exception):
    """One schema violation, said as "<where in the manifest> must be <what>, got <value>"."""


@dataclass(frozen=True)
class _Rule:
    expected: str  # in words, for the error: "an integer >= 0"
    ok: Callable[[Any], bool]
    fields: dict[str, tuple[_Rule, bool]] | None = None  # an object's own table: key -> (rule, required)
    items: _Rule | None = None  # a list's: the rule of each item (whose fields are then checked too)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not 1


def _is_finite(v: Any) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))  # (math.isfinite overflows on a huge int)


def _one_of(values: tuple) -> _Rule:
    words = ", ".join(map(str, values[:-1])) + f" or {values[-1]}"
    return _Rule(words, lambda v: any(type(v) is type(x) and v == x for x in values))  # 4.0 is not 4


def _list_of(rule: _Rule, what: str) -> _Rule:
    return _Rule(f"a list of {what}", lambda v: isinstance(v, list) and all(rule.ok(x) for x in v), items=rule)


def _map_of(key_ok: Callable[[str], bool], rule: _Rule, what: str) -> _Rule:
    return _Rule(f"an object of {what}",
                 lambda v: isinstance(v, dict) and all(key_ok(k) and rule.ok(x) for k, x in v.items()))


def _object(fields: dict[str, tuple[_Rule, bool]]) -> _Rule:
    return _Rule("an object", lambda v: isinstance(v, dict), fields)


_STR = _Rule("a string", lambda v: isinstance(v, str))
_COUNT = _Rule("an integer >= 0", lambda v: is_int(v) and v >= 0)
_POSITIVE = _Rule("an integer >= 1", lambda v: is_int(v) and v >= 1)
_NUMBER = _Rule("a finite number", _is_finite)
_RATIO = _Rule("a finite number >= 0", lambda v: _is_finite(v) and v >= 0)
_DIMS = _list_of(_COUNT, "integers >= 0")
# A shard is opened as OUT/<shard> (the runtime's loader, bench): a path would reach outside OUT.
_FILE_NAME = _Rule("a plain file name (no directory part, not hidden)",
                   lambda v: isinstance(v, str) and v != "" and v[0] != "." and not set(v) & set("/\\\0"))
_OUTPUTS = _Rule("a non-empty object of role -> tensor name",
                 lambda v: isinstance(v, dict) and len(v) > 0 and all(isinstance(x, str) and x for x in v.values()))
_DEGREE = re.compile(r"[1-9][0-9]{0,5}")  # a tensor-parallel degree, as a JSON key

_ENTRY_COMMON = {
    "kind": (_one_of(KINDS), True),
    "shape": (_DIMS, True),
    "dtype": (_STR, True),
    "outputs": (_OUTPUTS, True),
    "shard": (_FILE_NAME, True),
    "rule": (_STR, False),
    "reason": (_STR, False),
    "error": (_RATIO, False),  # a relative Frobenius error
}
# Per kind: a passthrough entry carrying bits or a rank contradicts itself (and verify's budget
# re-run would compute with its missing group size), so those fields are the quantized kind's only.
_ENTRY = {
    "quantized": {
        **_ENTRY_COMMON,
        "bits": (_one_of(params.BITS), True),
        "group_size": (_one_of(params.GROUP_SIZES), True),  # the tensor's own: a fallback is still one of these
        "padded_shape": (_DIMS, False),
        "score": (_NUMBER, False),
        "rank": (_POSITIVE, False),
    },
    "passthrough": _ENTRY_COMMON,
}

_TOP = {
    "defaults": (_object({
        "bits": (_one_of(params.BITS), False),
        "group_size": (_one_of(params.GROUP_SIZES), False),
        "scale_rule": (_STR, False),  # which rules this rtnq knows is scale_of's question, with its own error
        "dtype": (_STR, False),
        "budget": (_object({  # convert --budget; verify re-runs the choice from these
            "bits_per_weight": (_Rule("a number > 0", lambda v: _is_finite(v) and v > 0), True),
            "score": (_STR, True),
            "groups": (_Rule("true or false", lambda v: isinstance(v, bool)), False),  # --budget-groups
            "before": (_NUMBER, False),
            "after": (_NUMBER, False),
            "seconds": (_NUMBER, False),
        }), False),
    }), True),
    "tensors": (_Rule("an object of tensor name -> entry", lambda v: isinstance(v, dict)), True),  # _check_entry
    "rules": (_list_of(_object({"option": (_STR, False), "selector": (_STR, False), "matched": (_COUNT, False)}),
                       "objects"), False),
    "totals": (_object({}), False),  # its table depends on whether it is empty: _TOTALS
    "warnings": (_list_of(_STR, "strings"), False),
    "rtnq_version": (_STR, False),
    "source": (_object({"hub": (_STR, True), "revision": (_STR, True), "commit": (_STR, True)}), False),
}
# What `rtnq inspect` prints. A hand-made manifest may leave the totals empty (the runtime's tests do);
# one that has totals has the counts every rtnq version wrote. The rest came later and may be absent.
_TOTALS = {
    "tensors": (_object({name: (_COUNT, True) for name in ("int4", "int8", "passthrough")}), True),
    "parameters": (_COUNT, True),
    "quantized_parameters": (_COUNT, True),
    "bytes_in": (_COUNT, True),
    "bytes_out": (_COUNT, True),
    "bits_per_weight": (_RATIO, False),
    "model_bits_per_weight": (_RATIO, False),
    "linear_bits_per_weight": (_RATIO, False),
    "linear_parameters": (_COUNT, False),
    "passthrough_reasons": (_map_of(lambda k: True, _COUNT, "reason -> count"), False),
    "tp_failures": (_map_of(lambda k: bool(_DEGREE.fullmatch(k)), _COUNT, "degree -> count"), False),
}


def show(value: Any, limit: int = 60) -> str:
    """A value as the JSON it was, on one line and short (a hostile value may be long or multi-line)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _label(name: str) -> str:
    """A tensor name or key as is where it is printable, else quoted: one error line stays one line."""
    return name if name.isprintable() and 0 < len(name) <= 200 else show(name, 200)


def _check(obj: dict, table: dict[str, tuple[_Rule, bool]], path: str = "") -> None:
    for key, (rule, required) in table.items():
        value = obj.get(key)
        if value is None:
            if required:
                raise Invalid(f"{path}{key} is missing (must be {rule.expected})")
            continue
        if not rule.ok(value):
            raise Invalid(f"{path}{key} must be {rule.expected}, got {show(value)}")
        if rule.fields:
            _check(value, rule.fields, f"{path}{key}.")
        if rule.items is not None and rule.items.fields:
            for i, item in enumerate(value):
                _check(item, rule.items.fields, f"{path}{key}[{i}].")


def check_manifest(data: dict, fmt: formats.Format) -> None:
    _check(data, _TOP)
    tensors = data["tensors"]
    for name, entry in tensors.items():
        try:
            if not isinstance(entry, dict):
                raise Invalid(f"the entry must be an object, got {show(entry)}")
            _check_entry(entry, fmt)
        except Invalid as e:
            raise Invalid(f"tensor {_label(name)}: {e}") from None
    totals = data.get("totals") or {}
    if totals:
        _check(totals, _TOTALS, "totals.")
        # inspect divides by linear_parameters, and builds a list as long as each tp_failures count.
        if totals.get("linear_bits_per_weight") is not None and not totals.get("linear_parameters"):
            raise Invalid(f"totals.linear_parameters must be an integer >= 1 where linear_bits_per_weight is "
                           f"given, got {show(totals.get('linear_parameters'))}")
        worst = max((totals.get("tp_failures") or {}).values(), default=0)
        if worst > len(tensors):
            raise Invalid(f"totals.tp_failures must count at most the {len(tensors)} tensors, got {worst}")


def _check_entry(entry: dict, fmt: formats.Format) -> None:
    kind = entry.get("kind")
    _check(entry, {"kind": _ENTRY_COMMON["kind"]})
    table = _ENTRY[kind]
    for key, value in entry.items():
        if key not in table and value is not None:
            raise Invalid(f"{_label(key)} is not a field of a {kind} entry")
    _check(entry, table)
    roles = fmt.roles if kind == "quantized" else PASSTHROUGH_ROLES
    if set(entry["outputs"]) != set(roles):
        raise Invalid(f"outputs must name the roles {', '.join(roles)} of a {kind} entry ({fmt.manifest_name} "
                       f"format), got {show(sorted(entry['outputs']))}")
    if kind != "quantized":
        return
    # What the readers compute with: unpacking and verify's re-quantization need a real (n, k) split
    # into whole groups, and a padded weight can only be larger than the logical one.
    shape, group, padded = entry["shape"], entry["group_size"], entry.get("padded_shape")
    if len(shape) not in (2, 3) or 0 in shape:
        raise Invalid(f"shape must be [n, k] or [E, n, k] with sizes >= 1 for a quantized tensor, got {show(shape)}")
    if len(shape) == 3 and not fmt.stacked_experts:
        raise Invalid(f"shape must be [n, k] in the {fmt.manifest_name} format (it stores no stacked experts), "
                       f"got {show(shape)}")
    if group != -1 and shape[-1] % group:
        raise Invalid(f"group_size must divide k={shape[-1]} (or be -1, channelwise), got {group}")
    if padded is not None and (len(padded) != len(shape) or any(p < s for p, s in zip(padded, shape))):
        raise Invalid(f"padded_shape must have the rank of shape {show(shape)} and no smaller sizes, "
                       f"got {show(padded)}")
