"""Fuzz of the safetensors header scanner (rtnq.checkpoint.source.scan_shard) with hostile files.

Two properties, on files built from valid tensor entries plus mutations (wrong types, bools, -0, huge and
negative numbers, nested junk, duplicate keys and lone surrogates written as raw JSON text, bad offsets,
gaps, trailing or missing bytes, bad length prefixes, random bytes):

    1. scan_shard returns specs or raises an RtnqError subclass; any other exception (or a hang) is a bug.
    2. Differential: whenever rtnq accepts a file, the safetensors library opens it too and lists the same
       tensors with the same dtypes and shapes, so rtnq never converts a source into an output no loader reads.

rtnq may refuse what the library accepts (duplicate keys, dtypes it cannot quantize); never the reverse.
RTNQ_FUZZ_EXAMPLES raises the example count; scripts/fuzz_headers.py runs the same fuzz for a time budget.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtnq import dtypes
from rtnq.checkpoint.source import scan_shard
from rtnq.errors import RtnqError

U64_MAX = 2**64 - 1
EXAMPLES = int(os.environ.get("RTNQ_FUZZ_EXAMPLES", "1000"))  # about 3 s


class Raw(str):
    """JSON text written verbatim: tokens Python's json never writes (-0, 1.0 for an integer, NaN, deep nests)."""


class Pairs(list):
    """A JSON object as (key, value) pairs, so that a key can repeat."""


def dump(value, ascii_only: bool = True) -> str:
    """JSON text for `value`, Raw and Pairs included. With ascii_only=False, non-ASCII characters (lone
    surrogates among them) are written raw, so the file's bytes are not even UTF-8."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        value = Pairs(value.items())
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


# -- strategies --------------------------------------------------------------------------------------------

NAMES = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["w", "model.layers.0.mlp.up_proj.weight", "", "__metadata__", "\ud800", "a\udfff", "\ud83d\ude00",
                     "a\nb", "\x00", " ", "layers-0"]),
)
DTYPE_NAMES = list(dtypes.BY_ST) + ["F4", "C64", "F8_E8M0", "f16", "", "F16 "]
NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 2**32, 2**63, U64_MAX, 2**64, -(2**63), 10**20 - 1]),
    st.integers(-(2**70), 2**70),
    st.sampled_from([Raw("-0"), Raw("1.0"), Raw("1e3"), Raw("-0.0"), Raw("NaN"), Raw("Infinity"), Raw("9" * 30)]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.floats(allow_nan=False, allow_infinity=False),
                    st.text(max_size=6), st.sampled_from(DTYPE_NAMES))
JUNK = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
ENTRIES = st.lists(
    st.tuples(NAMES, st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 4), max_size=3)),
    max_size=5, unique_by=lambda e: e[0],
)
MUTATIONS = (
    "field_junk", "dim_junk", "offset_junk", "offset_shift", "drop_field", "extra_field", "entry_junk", "metadata",
    "duplicate_key", "duplicate_field", "huge_shape", "zero_tensor", "gap_at_start", "trailing", "truncate",
    "header_pad", "header_lead", "length_prefix", "byte_flip", "deep", "top_level_junk", "random_file", "lookalike",
    "same_offsets",
)


def _itemsize(dtype: str) -> int:
    return dtypes.BY_ST[dtype].itemsize if dtype in dtypes.BY_ST else 1


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@st.composite
def hostile_files(draw) -> bytes:
    """A safetensors file: a valid layout of drawn tensors, then zero to three mutations."""
    entries = draw(ENTRIES)
    order = draw(st.permutations(range(len(entries))))  # data order differs from header order
    header: dict = {}
    pos, boundaries = 0, {0}
    for i in order:
        name, dtype, shape = entries[i]
        size = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
        boundaries.add(pos)
    header = {name: header[name] for name, _, _ in entries}  # back in header order
    data = bytes(pos)
    if draw(st.booleans()):
        header = {"__metadata__": {"format": "pt"}, **header}
    prefix_len = None
    ascii_only = draw(st.booleans())
    pad, lead = "", ""
    tensor_names = [n for n in header if n != "__metadata__"]

    ops = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    if "random_file" in ops:
        return draw(st.binary(max_size=64) | st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b))
    for op in ops:
        infos = [header[n] for n in tensor_names if isinstance(header.get(n), dict)] if isinstance(header, dict) else []
        info = draw(st.sampled_from(infos)) if infos else None
        if op == "field_junk" and info is not None:
            info[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JUNK)
        elif op == "dim_junk" and info is not None and isinstance(info.get("shape"), list):
            shape = info["shape"]
            at = draw(st.integers(0, len(shape)))
            shape[at:at + 1] = [draw(SCALARS)]
        elif op == "offset_junk" and info is not None and isinstance(info.get("data_offsets"), list):
            offsets = info["data_offsets"] = list(info["data_offsets"])
            if offsets:
                offsets[draw(st.integers(0, len(offsets) - 1))] = draw(NUMBERS | st.booleans())
        elif op == "lookalike" and info is not None:
            # the same number in a spelling safetensors refuses: where the value itself is valid, only a strict
            # reader notices (True is an int to Python, -0 is 0 to Python and a float to serde)
            field = draw(st.sampled_from(["shape", "data_offsets"]))
            values = info.get(field)
            small = [i for i, v in enumerate(values) if type(v) is int and v in (0, 1)] if isinstance(values, list) else []
            if small:
                at = draw(st.sampled_from(small))
                values[at] = draw(st.sampled_from([False, Raw("-0"), Raw("0.0"), Raw("0e0")] if values[at] == 0
                                                  else [True, Raw("1.0"), Raw("1e0"), 1.0]))
        elif op == "offset_shift" and info is not None and isinstance(info.get("data_offsets"), list):
            offsets = list(info["data_offsets"])
            k = draw(st.integers(0, len(offsets) - 1)) if offsets else None
            if k is not None and type(offsets[k]) is int:
                offsets[k] += draw(st.integers(-3, 3))
            info["data_offsets"] = offsets
        elif op == "same_offsets" and len(infos) > 1:  # two tensors on the same bytes
            a, b = draw(st.permutations(infos))[:2]
            b["data_offsets"] = a.get("data_offsets")
        elif op == "drop_field" and info is not None:
            info.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "extra_field" and info is not None:
            info[draw(st.text(max_size=4))] = draw(JUNK)
        elif op == "entry_junk" and isinstance(header, dict):
            header[draw(NAMES)] = draw(JUNK)
        elif op == "metadata" and isinstance(header, dict):
            header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | JUNK)
        elif op == "duplicate_key" and isinstance(header, dict) and header:
            pairs = Pairs(header.items())
            key = draw(st.sampled_from([k for k, _ in pairs]))
            pairs.insert(draw(st.integers(0, len(pairs))), (key, draw(st.just(header[key]) | JUNK)))
            header = pairs
        elif op == "duplicate_field" and info is not None:
            name = next(n for n in tensor_names if header.get(n) is info)
            pairs = Pairs(info.items())
            if pairs:
                pairs.append(draw(st.sampled_from(pairs)))
            header[name] = pairs
        elif op == "huge_shape" and info is not None:
            info["shape"] = draw(st.sampled_from([[2**63, 2**63, 0], [0, 2**63, 2**63], [U64_MAX, 0], [2**64, 0],
                                                  [2**62, 0], [2**32, 2**32, 0], [2**61, 1], [0, 2**64], [0, U64_MAX, U64_MAX]]))
        elif op == "zero_tensor" and isinstance(header, dict):
            # empty tensors are valid anywhere between two others; an overflowing element count is not
            at = draw(st.sampled_from(sorted(boundaries)) | st.integers(0, len(data) + 1))
            shape = draw(st.sampled_from([[0], [3, 0], [0, 2**64], [2**63, 2**63, 0], [0, U64_MAX, U64_MAX],
                                          [U64_MAX, 0], [2**62, 0], [2**64, 0]]))
            header[draw(NAMES)] = {"dtype": draw(st.sampled_from(DTYPE_NAMES)), "shape": shape, "data_offsets": [at, at]}
        elif op == "gap_at_start" and infos:
            k = draw(st.integers(1, 3))
            data = bytes(k) + data
            for i in infos:
                if isinstance(i.get("data_offsets"), list) and all(type(o) is int for o in i["data_offsets"]):
                    i["data_offsets"] = [o + k for o in i["data_offsets"]]
        elif op == "trailing":
            data += draw(st.binary(min_size=1, max_size=9))
        elif op == "truncate" and data:
            data = data[: -draw(st.integers(1, len(data)))]
        elif op == "header_pad":
            pad += draw(st.sampled_from([" ", "  \n", "\t\r\n", "\x00", "\x0c", " x", "}"]))
        elif op == "header_lead":
            lead += draw(st.sampled_from([" ", "\n", "\ufeff", "x", "\x00"]))
        elif op == "length_prefix":
            prefix_len = draw(st.sampled_from([0, 1, 2**64 - 1, 100 * 1024 * 1024 + 1, 2**40]) | st.integers(-8, 8))
        elif op == "deep" and info is not None:
            k = draw(st.sampled_from([63, 64, 65, 1000, 3000]))
            info[draw(st.sampled_from(["shape", "extra"]))] = Raw("[" * k + "]" * k)
        elif op == "top_level_junk":
            header = draw(JUNK)

    text = (lead + dump(header, ascii_only) + pad).encode("utf-8", "surrogatepass")
    if isinstance(prefix_len, int) and -8 <= prefix_len <= 8:  # a small error in an otherwise right length
        prefix_len = max(0, len(text) + prefix_len)
    raw = struct.pack("<Q", len(text) if prefix_len is None else prefix_len) + text + data
    if "byte_flip" in ops and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1:]
    return raw


# -- the property ------------------------------------------------------------------------------------------


class DifferentialFailure(AssertionError):
    """rtnq accepted a file that the safetensors library refuses, or reads it differently."""


def library_view(path: Path) -> dict:
    """{name: (dtype, shape)} as the safetensors library reads the file; raises whatever it raises."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def check(raw: bytes, path: Path) -> str:
    """Write `raw` to `path` and check both properties. Returns "accepted" or "ErrorClass: message" (rtnq's
    refusal); any exception other than an RtnqError propagates, and DifferentialFailure says how the two
    readers differ."""
    path.write_bytes(raw)
    try:
        specs = scan_shard(path)
    except RtnqError as e:
        message = str(e)
        assert message and "\n" not in message, f"not a one-line message: {message!r}"
        return f"{type(e).__name__}: {message}"
    ours = {s.name: (s.dtype, s.shape) for s in specs}
    try:
        theirs = library_view(path)
    except Exception as e:  # noqa: BLE001 (the library's error class is whatever its binding raises)
        raise DifferentialFailure(f"rtnq accepted {ours} but safetensors refuses the file: {e}") from None
    if ours != theirs:
        raise DifferentialFailure(f"rtnq reads {ours}, safetensors reads {theirs}")
    return "accepted"


SETTINGS = {"deadline": None, "database": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]}


def fuzz(path: Path, examples: int, outcomes: Counter, checker=check) -> None:
    """One hypothesis run of `examples` hostile files through `checker`, tallying "accepted" and each error
    class; raises on a failure, after shrinking it (the last file written to `path` is the smallest failing one)."""

    @settings(max_examples=examples, **SETTINGS)
    @given(raw=hostile_files())
    def one(raw: bytes) -> None:
        outcomes[checker(raw, path).partition(":")[0]] += 1

    one()


def test_scanner_refuses_with_a_typed_error_or_agrees_with_safetensors(tmp_path):
    outcomes: Counter = Counter()
    fuzz(tmp_path / "model.safetensors", EXAMPLES, outcomes)
    # a fuzz that only ever produced refusals (or only acceptances) would test half the property
    assert outcomes["accepted"] and outcomes["CheckpointError"], outcomes
