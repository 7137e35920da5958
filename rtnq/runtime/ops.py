"""Torch-facing wrappers of the CUDA library: GEMM on the Marlin layout and dequantization.

Tensors stay torch tensors; the library gets their data pointers, the current CUDA stream of their
device and a workspace this module owns (one zero-filled buffer per device and stream). Arguments are
checked here first, so a wrong call fails with a clear message before the library is even loaded.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from rtnq.numerics import marlin
from rtnq.errors import ShapeError, UsageError
from rtnq.numerics.rtn import check_params
from rtnq.runtime import dispatch, library

GEMM_PATHS = ("auto",) + dispatch.PATHS
_DTYPES = {torch.float16: library.FLOAT16, torch.bfloat16: library.BFLOAT16}
_LAYOUTS = {"kn": library.LAYOUT_KN, "nk": library.LAYOUT_NK}

_ws_lock = threading.Lock()
_workspaces: dict[tuple[int, int], torch.Tensor] = {}
_gpu_names: dict[int, str] = {}


def scale_groups(k: int, group_size: int) -> int:
    """Rows of the scale tensor: k / group_size, or 1 for channelwise (-1)."""
    return 1 if group_size == -1 else k // group_size


def check_weights(qweight: torch.Tensor, scales: torch.Tensor, bits: int, n: int, k: int, group_size: int) -> None:
    """Validate Marlin tensors: qweight int32 (k/16, n*bits/2), scales fp16/bf16 (groups, n), same device."""
    check_params(bits, group_size)
    reason = marlin.check_shape(n, k, group_size)
    if reason:
        raise ShapeError(f"cannot run this layer on the Marlin kernels: {reason}")
    want = (k // 16, n * bits // 2)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
        raise ShapeError(
            f"qweight must be int32 {want} for n={n}, k={k}, {bits}-bit; got {qweight.dtype} {tuple(qweight.shape)}"
        )
    groups = scale_groups(k, group_size)
    if scales.dtype not in _DTYPES or tuple(scales.shape) != (groups, n):
        raise ShapeError(
            f"scales must be float16/bfloat16 ({groups}, {n}) for group_size {group_size}; "
            f"got {scales.dtype} {tuple(scales.shape)}"
        )
    if scales.device != qweight.device:
        raise UsageError(f"qweight is on {qweight.device} but scales on {scales.device}")


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


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    n: int,
    k: int,
    group_size: int,
    layout: str = "nk",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense weight from the Marlin layout, bit-identical to rtn.dequantize(marlin.unpack(...)).

    qweight: int32 (k/16, 2n) for 4-bit or (k/16, 4n) for 8-bit, CUDA.  scales: float16/bfloat16
    (k/group_size, n) or (1, n) for channelwise, Marlin-permuted, same device.
    layout "nk" returns (n, k) (the nn.Linear weight), "kn" returns (k, n) = W^T; dtype = scales.dtype.
    """
    check_weights(qweight, scales, bits, n, k, group_size)
    if layout not in _LAYOUTS:
        raise UsageError(f"layout must be 'nk' or 'kn', got {layout!r}")
    _cuda(qweight, "qweight")
    shape = (n, k) if layout == "nk" else (k, n)
    if out is None:
        out = torch.empty(shape, dtype=scales.dtype, device=qweight.device)
    elif tuple(out.shape) != shape or out.dtype != scales.dtype or out.device != qweight.device or not out.is_contiguous():
        raise UsageError(f"out must be a contiguous {scales.dtype} {shape} tensor on {qweight.device}")
    if out.data_ptr() % 16:
        raise UsageError("out must be 16-byte aligned")
    qweight, scales = _ready(qweight), _ready(scales)
    lib = library.load()
    with torch.cuda.device(qweight.device):
        status = lib.rtnq_dequantize(
            qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k, bits, group_size,
            _DTYPES[scales.dtype], _LAYOUTS[layout], _stream(qweight.device),
        )
    library.check(status, "rtnq_dequantize")
    return out


def gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    n: int,
    k: int,
    group_size: int,
    path: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out = x @ dequant(W)^T with fp32 accumulation, on the Marlin-layout weight.

    x: float16/bfloat16 (m, k), CUDA (row-major; copied if not contiguous).  qweight: int32 (k/16, 2n)
    (4-bit) or (k/16, 4n) (8-bit).  scales: x.dtype (k/group_size, n) or (1, n), Marlin-permuted.
    path: "auto" (by m, with thresholds measured by `rtnq bench`; see rtnq.runtime.dispatch),
    "small_m", "tensor_core" or "dequant" (dequantize kernel + torch.matmul).  out: optional (m, n)
    x.dtype contiguous tensor to write into.  Returns (m, n) in x.dtype.
    """
    check_weights(qweight, scales, bits, n, k, group_size)
    if path not in GEMM_PATHS:
        raise UsageError(f"path must be one of {', '.join(GEMM_PATHS)}, got {path!r}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeError(f"x must be (m, {k}), got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise UsageError(f"x must be float16 or bfloat16, got {x.dtype}")
    if scales.dtype != x.dtype:
        raise UsageError(f"x is {x.dtype} but the scales are {scales.dtype}; they must match")
    _cuda(x, "x")
    if qweight.device != x.device:
        raise UsageError(f"x is on {x.device} but the weights on {qweight.device}")
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise UsageError(f"out must be a contiguous {x.dtype} ({m}, {n}) tensor on {x.device}")
    if m == 0:
        return out
    if path == "auto":
        path = dispatch.forced_path() or dispatch.choose_path(m, thresholds_for(x.device, bits, x.dtype))
    if path == "dequant":
        w_kn = dequantize(qweight, scales, bits=bits, n=n, k=k, group_size=group_size, layout="kn")
        return torch.matmul(x, w_kn, out=out)
    if out.data_ptr() % 16:
        raise UsageError("out must be 16-byte aligned")
    x, qweight, scales = _ready(x), _ready(qweight), _ready(scales)
    lib = library.load()
    fn = lib.rtnq_gemm_small_m if path == "small_m" else lib.rtnq_gemm_tensor_core
    with torch.cuda.device(x.device):
        stream = _stream(x.device)
        ws = workspace(x.device, stream)
        status = fn(
            x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), out.data_ptr(), m, n, k, bits, group_size,
            _DTYPES[x.dtype], ws.data_ptr(), ws.numel(), stream,
        )
    library.check(status, f"rtnq_gemm_{path}")
    return out


def plan(path: str, m: int, n: int, k: int, *, bits: int, group_size: int, dtype: torch.dtype) -> tuple[int, int]:
    """(k-splits, rows of x per CTA) the kernel of `path` ("small_m"/"tensor_core") uses on the current GPU."""
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
