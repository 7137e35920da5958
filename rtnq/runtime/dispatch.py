"""Which GEMM path serves a batch of m rows, from thresholds that `rtnq bench` measures per GPU.

Three paths (rtnq.runtime.ops.gemm):
  small_m      m <= small_m_max: the CUDA-core decode kernel (weights read once per 8 rows of x)
  tensor_core  small_m_max < m <= tensor_core_max: the mma.sync kernel on the Marlin layout
  dequant      m > tensor_core_max: dequantize to a dense (k, n) weight, then torch.matmul (cuBLAS)

The crossovers depend on the GPU, the bit width and the activation dtype, so they are measured, not
hard-coded: `save_thresholds` records them (keyed by GPU name, bits, dtype) in a JSON file at
``$RTNQ_DISPATCH_FILE`` or ``~/.cache/rtnq/dispatch.json``. Without a measurement `load_thresholds`
returns documented defaults with ``measured=False``: small_m_max = 4 (an estimate: the CUDA-core kernel's
fp32 FMAs stay under the 4-bit weight stream's memory time up to about 4 rows on an H100, by arithmetic
alone) and tensor_core_max = 1024 (the paper's Marlin-vs-dequant crossover, which GPU.md section 3.4 derives
for an H100-class GPU with a fused kernel at ~75% of peak). Neither default has been measured; `rtnq bench`
replaces them. Nothing in this module needs a GPU; it is plain Python.

File format (version 1, sorted keys)::

    {"version": 1, "entries": {"NVIDIA H100 80GB HBM3|w4|bfloat16":
        {"gpu": "...", "bits": 4, "dtype": "bfloat16", "small_m_max": 8, "tensor_core_max": 512,
         "source": "rtnq bench ...", "saved_at": "2026-01-01T00:00:00Z"}}}
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtnq import dtypes, params
from rtnq.checkpoint import jsonfile
from rtnq.errors import RtnqError, UsageError

VERSION = 1
ENV_FILE = "RTNQ_DISPATCH_FILE"
ENV_FORCE = "RTNQ_FORCE_PATH"  # debugging: route every "auto" GEMM through one path
DEFAULT_SMALL_M_MAX = 4
DEFAULT_TENSOR_CORE_MAX = 1024
PATHS = ("small_m", "tensor_core", "dequant")

# torch's alias for float16 ("half"); every other spelling comes from the dtype table (rtnq.dtypes).
_TORCH_ALIASES = {"half": "float16"}


@dataclass(frozen=True)
class Thresholds:
    """Inclusive upper bounds of m for the small-M and tensor-core paths.

    measured: False when these are the built-in defaults (no `rtnq bench` result for this GPU/bits/dtype).
    """

    small_m_max: int
    tensor_core_max: int
    measured: bool
    source: str = "default (unmeasured)"


DEFAULT = Thresholds(DEFAULT_SMALL_M_MAX, DEFAULT_TENSOR_CORE_MAX, measured=False)


def dtype_name(dtype: Any) -> str:
    """'bfloat16' or 'float16' for a torch dtype or a spelling of one (bf16, fp16, torch.float16, ...)."""
    text = str(dtype).removeprefix("torch.")
    row = dtypes.BY_SHORT.get(text) or dtypes.BY_NAME.get(_TORCH_ALIASES.get(text, text))
    if row is None or row.short not in dtypes.SIXTEEN_BIT:
        raise UsageError(f"dtype must be bfloat16 or float16, got {dtype}")
    return row.name


def dispatch_file() -> Path:
    """The JSON file thresholds are read from and saved to."""
    env = os.environ.get(ENV_FILE)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "rtnq" / "dispatch.json"


def entry_key(gpu_name: str, bits: int, dtype: Any) -> str:
    return f"{gpu_name}|w{int(bits)}|{dtype_name(dtype)}"


def _check_values(small_m_max: Any, tensor_core_max: Any, where: str) -> None:
    for name, value in (("small_m_max", small_m_max), ("tensor_core_max", tensor_core_max)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RtnqError(f"{where}: {name} must be an integer >= 0, got {value!r}")


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"version": VERSION, "entries": {}}
    try:  # jsonfile: deep nesting, huge integers, a FIFO in its place are one line too, never a traceback or a hang
        data = jsonfile.read(path, f"{path}: not a readable dispatch file", error=RtnqError)
    except RtnqError as e:
        raise RtnqError(f"{e}; delete it or re-run `rtnq bench`") from None
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        raise RtnqError(f"{path}: not a dispatch file (no 'entries' object); delete it or re-run `rtnq bench`")
    if data.get("version") != VERSION:
        raise RtnqError(
            f"{path}: dispatch file version {data.get('version')!r} is not supported (this rtnq reads {VERSION}); "
            "delete it or re-run `rtnq bench`"
        )
    return data


def load_thresholds(gpu_name: str, bits: int, dtype: Any, *, path: str | Path | None = None) -> Thresholds:
    """Measured thresholds for (GPU, bits, dtype), or the unmeasured defaults when none were saved."""
    file = Path(path) if path is not None else dispatch_file()
    entry = _read(file)["entries"].get(entry_key(gpu_name, bits, dtype))
    if entry is None:
        return DEFAULT
    if not isinstance(entry, dict):
        raise RtnqError(f"{file}: entry for {entry_key(gpu_name, bits, dtype)} is not an object")
    small, tc = entry.get("small_m_max"), entry.get("tensor_core_max")
    _check_values(small, tc, f"{file}: {entry_key(gpu_name, bits, dtype)}")
    return Thresholds(small, tc, measured=True, source=str(entry.get("source", file)))


def save_thresholds(
    gpu_name: str,
    bits: int,
    dtype: Any,
    small_m_max: int,
    tensor_core_max: int,
    *,
    source: str = "rtnq bench",
    path: str | Path | None = None,
) -> Path:
    """Record measured thresholds (merging with other GPUs' entries); returns the file written.

    small_m_max, tensor_core_max: inclusive upper bounds of m. tensor_core_max <= small_m_max means the
    tensor-core path is never chosen. The file is replaced atomically.
    """
    params.check(bits=bits)
    if not gpu_name:
        raise UsageError("gpu_name must not be empty")
    _check_values(small_m_max, tensor_core_max, "save_thresholds")
    file = Path(path) if path is not None else dispatch_file()
    data = _read(file)
    data["entries"][entry_key(gpu_name, bits, dtype)] = {
        "gpu": gpu_name,
        "bits": int(bits),
        "dtype": dtype_name(dtype),
        "small_m_max": small_m_max,
        "tensor_core_max": tensor_core_max,
        "source": source,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data["version"] = VERSION
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _cache.clear()
    return file


def choose_path(m: int, thresholds: Thresholds) -> str:
    """'small_m' if m <= small_m_max, 'tensor_core' if m <= tensor_core_max, else 'dequant'."""
    if m < 0:
        raise UsageError(f"m must be >= 0, got {m}")
    if m <= thresholds.small_m_max:
        return "small_m"
    if m <= thresholds.tensor_core_max:
        return "tensor_core"
    return "dequant"


def forced_path() -> str | None:
    """The path named by $RTNQ_FORCE_PATH (for debugging and A/B checks), or None."""
    value = os.environ.get(ENV_FORCE)
    if not value:
        return None
    if value not in PATHS:
        raise UsageError(f"{ENV_FORCE}={value} is not one of {', '.join(PATHS)}")
    return value


_cache: dict[tuple[str, int, str], Thresholds] = {}


def cached_thresholds(gpu_name: str, bits: int, dtype: Any) -> Thresholds:
    """`load_thresholds`, read once per process (GEMM calls use this). `save_thresholds` clears the cache;
    call `clear_cache` after editing the file or changing $RTNQ_DISPATCH_FILE in a running process."""
    key = (gpu_name, int(bits), dtype_name(dtype))
    hit = _cache.get(key)
    if hit is None:
        hit = _cache[key] = load_thresholds(gpu_name, bits, dtype)
    return hit


def clear_cache() -> None:
    _cache.clear()
