"""Torch-facing wrappers of the CUDA library: GEMM on the Marlin layout and dequantization.

Tensors stay torch tensors; the library gets their data pointers, the current CUDA stream of their
device and a workspace this module owns (one zero-filled buffer per device and stream). The weight is a
MarlinWeight (checked when it was made); the rest of each call is checked here first, so a wrong call
fails with a clear message before the library is even loaded.

Callers see logical shapes only: x (m, k), results (m, n), (n, k) or (k, n). A padded weight (see
MarlinWeight) runs the kernels at its stored dims: x is zero-padded to k_stored and the result cropped to n.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from rtnq.errors import ShapeError, UsageError
from rtnq.runtime import dispatch, library
from rtnq.runtime.weight import MarlinWeight

GEMM_PATHS = ("auto",) + dispatch.PATHS
_DTYPES = {torch.float16: library.FLOAT16, torch.bfloat16: library.BFLOAT16}  # torch dtype -> the ABI's enum
_LAYOUTS = {"kn": library.LAYOUT_KN, "nk": library.LAYOUT_NK}

_ws_lock = threading.Lock()
_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_gpu_names: dict[int, str] = {}


def _weight(weight: MarlinWeight) -> MarlinWeight:
    # The checks live in MarlinWeight; a loose tensor here would skip them, so refuse it by type.
    if not isinstance(weight, MarlinWeight):
        raise UsageError(f"weight must be a rtnq.runtime.MarlinWeight, got {type(weight).__name__}")
    return weight


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the library's contract); copies only when needed."""
    if not t.is_contiguous():
        t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _cuda(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise UsageError(
            f"{what} is on {t.device}; the CUDA kernels need CUDA tensors (QuantLinear runs a CPU reference path)"
        )


def _stream(device: torch.device) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def workspace(device: torch.device, stream: int | None = None) -> torch.Tensor:
    """The zero-filled workspace of `device` for `stream` (default: its current stream); kernels leave it zeroed.

    One per (device, stream) because two streams must not share split-K counters; 16 MiB each.
    """
    device = torch.device(device)
    if stream is None:
        stream = _stream(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(), stream)
    ws = _workspaces.get(key)
    if ws is None:
        with _ws_lock:
            ws = _workspaces.get(key)
            if ws is None:
                ws = torch.zeros(library.workspace_size(), dtype=torch.uint8, device=device)
                _workspaces[key] = ws
    return ws


def gpu_name(device: torch.device) -> str:
    """The GPU's name as the library reports it (the key of measured dispatch thresholds)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _gpu_names.get(index)
    if name is None:
        name = _gpu_names[index] = library.device_info(index)["name"]
    return name


def thresholds_for(device: torch.device, bits: int, dtype: torch.dtype) -> dispatch.Thresholds:
    return dispatch.cached_thresholds(gpu_name(device), bits, dtype)


def dequantize(weight: MarlinWeight, *, layout: str = "nk", out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense weight from the Marlin layout, bit-identical to weight.reference_dequantize() (rtn.dequantize).

    weight: on CUDA. layout "nk" returns (n, k) (the nn.Linear weight), "kn" returns (k, n) = W^T, logical
    shapes (a padded weight is dequantized at its stored dims, then cropped); dtype = the scales' dtype.
    out: optional contiguous, 16-byte aligned tensor of that shape and dtype.
    """
    w = _weight(weight)
    if layout not in _LAYOUTS:
        raise UsageError(f"layout must be 'nk' or 'kn', got {layout!r}")
    _cuda(w.qweight, "qweight")
    n, k, dtype, device = w.n, w.k, w.scales.dtype, w.device
    shape = (n, k) if layout == "nk" else (k, n)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise UsageError(f"out must be a contiguous {dtype} {shape} tensor on {device}")
    if out.data_ptr() % 16:
        raise UsageError("out must be 16-byte aligned")
    n_s, k_s = w.n_stored, w.k_stored
    # The kernel writes the whole stored matrix: a padded weight goes through a temporary, cropped into out.
    stored = (n_s, k_s) if layout == "nk" else (k_s, n_s)
    target = out if stored == shape else torch.empty(stored, dtype=dtype, device=device)
    qweight, scales = _ready(w.qweight), _ready(w.scales)
    lib = library.load()
    with torch.cuda.device(device):
        status = lib.rtnq_dequantize(
            qweight.data_ptr(), scales.data_ptr(), target.data_ptr(), n_s, k_s, w.bits, w.group_size,
            _DTYPES[dtype], _LAYOUTS[layout], _stream(device),
        )
    library.check(status, "rtnq_dequantize")
    if target is not out:
        out.copy_(target[: shape[0], : shape[1]])
    return out


def gemm(x: torch.Tensor, weight: MarlinWeight, *, path: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """out = x @ dequant(W)^T with fp32 accumulation, on the Marlin-layout weight.

    x: float16/bfloat16 (m, k), CUDA (row-major; copied if not contiguous).  weight: on x's device, scales
    in x's dtype.  path: "auto" (by m, with thresholds measured by `rtnq bench`; see rtnq.runtime.dispatch),
    "small_m", "tensor_core" or "dequant" (dequantize kernel + torch.matmul).  out: optional (m, n)
    x.dtype contiguous tensor to write into.  Returns (m, n) in x.dtype.  n, k are the weight's logical
    dims; for a padded weight the kernels see x zero-padded to k_stored and write an (m, n_stored) temporary.
    """
    w = _weight(weight)
    n, k = w.n, w.k
    if path not in GEMM_PATHS:
        raise UsageError(f"path must be one of {', '.join(GEMM_PATHS)}, got {path!r}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeError(f"x must be (m, {k}), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise UsageError(f"x must be float16 or bfloat16, got {x.dtype}")
    if w.scales.dtype != x.dtype:
        raise UsageError(f"x is {x.dtype} but the scales are {w.scales.dtype}; they must match")
    _cuda(x, "x")
    if w.device != x.device:
        raise UsageError(f"x is on {x.device} but the weights on {w.device}")
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise UsageError(f"out must be a contiguous {x.dtype} ({m}, {n}) tensor on {x.device}")
    if m == 0:
        return out
    if path == "auto":
        path = dispatch.forced_path() or dispatch.choose_path(m, thresholds_for(x.device, w.bits, x.dtype))
    if path == "dequant":
        return torch.matmul(x, dequantize(w, layout="kn"), out=out)
    n_s, k_s = w.n_stored, w.k_stored
    if n_s == n and out.data_ptr() % 16:
        raise UsageError("out must be 16-byte aligned")
    if k_s != k:
        # Zeros, not uninitialised memory: the padded codes dequantize to 0, but NaN/Inf garbage * 0 = NaN.
        x = torch.nn.functional.pad(x, (0, k_s - k))
    target = out if n_s == n else torch.empty((m, n_s), dtype=x.dtype, device=x.device)
    x, qweight, scales = _ready(x), _ready(w.qweight), _ready(w.scales)
    lib = library.load()
    fn = lib.rtnq_gemm_small_m if path == "small_m" else lib.rtnq_gemm_tensor_core
    with torch.cuda.device(x.device):
        stream = _stream(x.device)
        ws = workspace(x.device, stream)
        status = fn(
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), target.data_ptr(), m, n_s, k_s, w.bits, w.group_size,
            _DTYPES[x.dtype], ws.data_ptr(), ws.numel(), stream,
        )
    library.check(status, f"rtnq_gemm_{path}")
    if target is not out:
        out.copy_(target[:, :n])
    return out


def plan(path: str, m: int, n: int, k: int, *, bits: int, group_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(k-splits, rows of x per CTA) the kernel of `path` ("small_m"/"tensor_core") uses on the current GPU.

    n, k: the dims the kernel runs at, i.e. a MarlinWeight's n_stored, k_stored (not its logical n, k)."""
    codes = {"small_m": library.PATH_SMALL_M, "tensor_core": library.PATH_TENSOR_CORE}
    if path not in codes:
        raise UsageError(f"path must be 'small_m' or 'tensor_core', got {path!r}")
    if dtype not in _DTYPES:
        raise UsageError(f"dtype must be float16 or bfloat16, got {dtype}")
    splits, rows = ctypes.c_int32(), ctypes.c_int32()
    status = library.load().rtnq_gemm_plan(
        codes[path], m, n, k, bits, group_size, _DTYPES[dtype], ctypes.byref(splits), ctypes.byref(rows)
    )
    library.check(status, "rtnq_gemm_plan")
    return int(splits.value), int(rows.value)
