"""Find and load librtnq_cuda.so (the C ABI in cuda/include/rtnq_cuda.h) with ctypes.

Lazy by design: importing this module loads nothing and needs neither a GPU nor the library. The first
call of `load()` (or of anything built on it) looks for the library in this order:

1. the file named by the environment variable ``RTNQ_CUDA_LIB``;
2. ``rtnq/runtime/librtnq_cuda.so`` (a copy installed next to this package);
3. ``cuda/build/librtnq_cuda.so`` in the source checkout (what ``make -C cuda`` builds).

It declares every function's signature once, checks the ABI version, and caches the handle. Failures
raise `KernelUnavailable` with one line saying what is missing and how to get it; failing kernel calls
raise typed errors through `check`.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path
from typing import Any

from rtnq.errors import KernelError, KernelUnavailable, RtnqError, ShapeError

ABI_VERSION = 2  # must equal RTNQ_ABI_VERSION in cuda/include/rtnq_cuda.h
LIB_NAME = "librtnq_cuda.so"
ENV_VAR = "RTNQ_CUDA_LIB"
BUILD_HINT = "build it with `make -C cuda` (needs nvcc)"

# rtnq_status
OK = 0
ERR_INVALID_VALUE = 1
ERR_SHAPE = 2
ERR_ALIGNMENT = 3
ERR_WORKSPACE = 4
ERR_NO_DEVICE = 5
ERR_ARCH = 6
ERR_NO_KERNEL = 7
ERR_LAUNCH = 8
ERR_CUDA = 9
STATUS_NAMES = {
    OK: "RTNQ_OK",
    ERR_INVALID_VALUE: "RTNQ_ERR_INVALID_VALUE",
    ERR_SHAPE: "RTNQ_ERR_SHAPE",
    ERR_ALIGNMENT: "RTNQ_ERR_ALIGNMENT",
    ERR_WORKSPACE: "RTNQ_ERR_WORKSPACE",
    ERR_NO_DEVICE: "RTNQ_ERR_NO_DEVICE",
    ERR_ARCH: "RTNQ_ERR_ARCH",
    ERR_NO_KERNEL: "RTNQ_ERR_NO_KERNEL",
    ERR_LAUNCH: "RTNQ_ERR_LAUNCH",
    ERR_CUDA: "RTNQ_ERR_CUDA",
}
# Statuses that mean "this machine cannot run the kernels", not "this call was wrong".
UNAVAILABLE = (ERR_NO_DEVICE, ERR_ARCH, ERR_NO_KERNEL)

# rtnq_dtype, rtnq_layout, rtnq_path
FLOAT16 = 0
BFLOAT16 = 1
LAYOUT_KN = 0
LAYOUT_NK = 1
PATH_SMALL_M = 1
PATH_TENSOR_CORE = 2
PATH_DEQUANT = 3


class DeviceInfo(ctypes.Structure):
    """Mirror of `rtnq_device_info`."""

    _fields_ = [
        ("device", ctypes.c_int32),
        ("major", ctypes.c_int32),
        ("minor", ctypes.c_int32),
        ("sm_count", ctypes.c_int32),
        ("driver_version", ctypes.c_int32),
        ("runtime_version", ctypes.c_int32),
        ("total_memory", ctypes.c_int64),
        ("l2_cache_bytes", ctypes.c_int32),
        ("max_shared_per_block_optin", ctypes.c_int32),
        ("name", ctypes.c_char * 256),
    ]


_i32, _i64, _ptr, _size = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_size_t
_I32P = ctypes.POINTER(ctypes.c_int32)
_WEIGHTS = [_ptr, _ptr, _ptr]  # qweight, scales, out (or x, qweight, scales)

# Every exported function: (restype, argtypes). The ABI test checks this table against the header.
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "rtnq_abi_version": (ctypes.c_int, []),
    "rtnq_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "rtnq_last_error": (ctypes.c_char_p, []),
    "rtnq_build_info": (ctypes.c_char_p, []),
    "rtnq_driver_version": (ctypes.c_int, [_I32P]),
    "rtnq_runtime_version": (ctypes.c_int, [_I32P]),
    "rtnq_device_count": (ctypes.c_int, [_I32P]),
    "rtnq_device_info_get": (ctypes.c_int, [_i32, ctypes.POINTER(DeviceInfo)]),
    "rtnq_workspace_size": (ctypes.c_int, [ctypes.POINTER(_size)]),
    "rtnq_choose_path": (ctypes.c_int, [_i64, _i64, _i64, _I32P]),
    "rtnq_gemm_plan": (ctypes.c_int, [_i32, _i64, _i64, _i64, _i32, _i32, _i32, _I32P, _I32P]),
    "rtnq_dequantize": (ctypes.c_int, _WEIGHTS + [_i64, _i64, _i32, _i32, _i32, _i32, _ptr]),
    "rtnq_gemm_small_m": (ctypes.c_int, _WEIGHTS + [_ptr, _i64, _i64, _i64, _i32, _i32, _i32, _ptr, _size, _ptr]),
    "rtnq_gemm_tensor_core": (ctypes.c_int, _WEIGHTS + [_ptr, _i64, _i64, _i64, _i32, _i32, _i32, _ptr, _size, _ptr]),
}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_path: Path | None = None


def candidates() -> list[Path]:
    """Where `load` looks, in order (the env var first, when set)."""
    found = []
    env = os.environ.get(ENV_VAR)
    if env:
        found.append(Path(env))
    here = Path(__file__).resolve().parent
    found.append(here / LIB_NAME)
    found.append(here.parent.parent / "cuda" / "build" / LIB_NAME)
    return found


def find_library() -> Path:
    """The library file `load` would open; KernelUnavailable if there is none."""
    env = os.environ.get(ENV_VAR)
    if env:
        if not Path(env).is_file():
            raise KernelUnavailable(f"{ENV_VAR}={env} does not exist; point it at a built {LIB_NAME} or unset it")
        return Path(env)
    for path in candidates():
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates())
    raise KernelUnavailable(f"{LIB_NAME} not found (looked in {looked}); {BUILD_HINT}")


def _open(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {path}: {e}; rebuild it with `make -C cuda`") from None
    missing = [name for name in SIGNATURES if not hasattr(lib, name)]
    if missing:
        raise KernelUnavailable(f"{path} lacks {', '.join(missing)}; it is not an rtnq library of this version ({BUILD_HINT})")
    for name, (restype, argtypes) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    version = lib.rtnq_abi_version()
    if version != ABI_VERSION:
        raise KernelUnavailable(
            f"{path} has ABI version {version} but this rtnq needs {ABI_VERSION}; rebuild it with `make -C cuda`"
        )
    return lib


def load() -> ctypes.CDLL:
    """The loaded library (cached after the first successful call)."""
    global _lib, _lib_path
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = find_library()
            _lib = _open(path)
            _lib_path = path
    return _lib


def loaded_path() -> Path | None:
    """Path of the loaded library, or None before `load` succeeded."""
    return _lib_path


def is_loaded() -> bool:
    return _lib is not None


def reset() -> None:
    """Forget the cached handle (tests, or after rebuilding); the next `load` searches again."""
    global _lib, _lib_path
    with _lock:
        _lib = None
        _lib_path = None


def abi_version() -> int:
    """RTNQ_ABI_VERSION of the loaded library (equal to ABI_VERSION, or `load` would have refused it)."""
    return int(load().rtnq_abi_version())


def status_string(status: int) -> str:
    return load().rtnq_status_string(status).decode()


def last_error() -> str:
    return load().rtnq_last_error().decode(errors="replace")


def error_for(status: int, what: str) -> RtnqError:
    """The typed error for a failed call: KernelUnavailable (no GPU / arch / kernel image), ShapeError, KernelError."""
    lib = load()
    detail = lib.rtnq_last_error().decode(errors="replace")
    text = lib.rtnq_status_string(status).decode()
    msg = f"{what}: {text}" + (f" ({detail})" if detail else "")
    if status in UNAVAILABLE:
        return KernelUnavailable(msg)
    if status == ERR_SHAPE:
        return ShapeError(msg)
    return KernelError(msg)


def check(status: int, what: str) -> None:
    """Raise the typed error for a non-zero status from the library."""
    if status != OK:
        raise error_for(status, what)


def build_info() -> str:
    return load().rtnq_build_info().decode()


def workspace_size() -> int:
    """Bytes of the zero-initialised workspace every GEMM call needs (the same on every GPU)."""
    size = ctypes.c_size_t()
    check(load().rtnq_workspace_size(ctypes.byref(size)), "rtnq_workspace_size")
    return int(size.value)


def driver_version() -> int:
    """CUDA driver version as an integer (13000 = 13.0); 0 when no driver is installed."""
    v = ctypes.c_int32()
    check(load().rtnq_driver_version(ctypes.byref(v)), "rtnq_driver_version")
    return int(v.value)


def device_count() -> int:
    """Visible GPUs; KernelUnavailable when there is no driver or no GPU."""
    n = ctypes.c_int32()
    status = load().rtnq_device_count(ctypes.byref(n))
    if status != OK:
        raise _no_gpu(status, "rtnq_device_count")
    return int(n.value)


def device_info(device: int | None = None) -> dict[str, Any]:
    """Properties of a GPU (default: the current one) as a dict.

    Keys: device, name, compute_capability ("9.0"), major, minor, sm_count, total_memory, l2_cache_bytes,
    max_shared_per_block_optin, driver_version, runtime_version (integers as CUDA reports them, 13000 =
    13.0). Raises KernelUnavailable when no GPU is usable.
    """
    info = DeviceInfo()
    status = load().rtnq_device_info_get(-1 if device is None else int(device), ctypes.byref(info))
    if status != OK:
        raise _no_gpu(status, "rtnq_device_info_get")
    return {
        "device": info.device,
        "name": info.name.decode(errors="replace"),
        "compute_capability": f"{info.major}.{info.minor}",
        "major": info.major,
        "minor": info.minor,
        "sm_count": info.sm_count,
        "total_memory": info.total_memory,
        "l2_cache_bytes": info.l2_cache_bytes,
        "max_shared_per_block_optin": info.max_shared_per_block_optin,
        "driver_version": info.driver_version,
        "runtime_version": info.runtime_version,
    }


def _no_gpu(status: int, what: str) -> RtnqError:
    if status == ERR_NO_DEVICE:
        detail = load().rtnq_last_error().decode(errors="replace")
        return KernelUnavailable(
            f"no CUDA GPU available ({detail}); rtnq's CUDA runtime needs an NVIDIA GPU with compute capability 8.0+"
        )
    return error_for(status, what)
