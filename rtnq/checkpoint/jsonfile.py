"""The one JSON reader for every file rtnq reads: safetensors headers, config.json, the index, the
manifest, quantize_config.json, the dispatch file.

`json.loads` alone accepts what the readers downstream do not, or fails with something other than a
decoding error: deep nesting raises RecursionError (1,000 levels fit in 2 KB), an integer of over 4,300
digits raises ValueError, "\\ud800" decodes to a lone surrogate that cannot be written back as UTF-8 (the
safetensors library refuses such a header), a duplicated key silently keeps the last value (which of two
tensors did the writer mean?), and NaN/Infinity are not JSON at all. Here each is one typed error naming
the file; the limits are far above what any real checkpoint file needs.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from rtnq.errors import CheckpointError, RtnqError

MAX_DEPTH = 64  # real files nest 3-6 levels (config.json's text_config.rope_scaling is the deepest seen)
MAX_INT_DIGITS = 20  # every integer rtnq reads fits in 64 bits
MAX_FILE_BYTES = 100 * 1024 * 1024  # the safetensors header limit; config and manifest files are far smaller


class _Reject(ValueError):
    """Raised inside the decoder's hooks; turned into the caller's error class with the file's name."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Reject(f"the key {dup!r} appears twice")
    return obj


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"an integer of {len(text)} digits (more than any size or count can be)")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Reject(f"the number {text[:30]} overflows a double")
    return value


def _constant(name: str):
    raise _Reject(f"{name} is not a JSON value")


def _check_tree(value: Any) -> None:
    """Depth and string checks without recursion (the decoder itself stops at ~1,000 levels)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Reject(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, str):
            _check_str(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                _check_str(k)
                stack.append((x, depth + 1))
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject(f"the string {s!r} holds a lone UTF-16 surrogate, which is not valid Unicode") from None


def loads(raw: bytes | str, where: str, error: type[RtnqError] = CheckpointError) -> Any:
    """Decode `raw` (the contents of `where`) or raise `error` with one line saying why."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=_int, parse_float=_float,
                           parse_constant=_constant)
        _check_tree(value)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}); the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{where}: not usable JSON (nested more than {MAX_DEPTH} levels deep)") from None
    except ValueError as e:  # _Reject, and int() past sys.get_int_max_str_digits
        raise error(f"{where}: not usable JSON ({e})") from None
    return value


def read(path: str | Path, where: str | None = None, error: type[RtnqError] = CheckpointError) -> Any:
    """Read and decode a JSON file. Anything but a regular file is refused before it is opened (a FIFO
    would block forever); an unreadable file says why (permissions) instead of "not valid JSON"."""
    path = Path(path)
    where = where or str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{where}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise error(f"{where}: {st.st_size} bytes, more than the {MAX_FILE_BYTES} rtnq reads as JSON")
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise error(f"{where}: cannot read ({e.strerror or e})") from None
    return loads(raw, where, error)


def read_object(path: str | Path, where: str | None = None, error: type[RtnqError] = CheckpointError) -> dict:
    """`read`, and the top level must be an object."""
    value = read(path, where, error)
    if not isinstance(value, dict):
        raise error(f"{where or path}: not a JSON object")
    return value
