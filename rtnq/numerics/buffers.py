"""Host buffers for code that takes either numpy arrays or torch tensors (the writer, the reader's `read_into`).

Conversion holds its data in numpy arrays so that it runs without torch (bf16 as uint16 bit patterns,
`dtypes.DType.numpy`); dequantize, verify and the tests hand over torch tensors. Both are just bytes to
the writer: these helpers get at them without importing torch (a tensor means torch is loaded already).
"""

from __future__ import annotations

import numpy as np

from rtnq import dtypes


def is_array(x) -> bool:
    return isinstance(x, np.ndarray)


def raw_bytes(x) -> np.ndarray:
    """The bytes of an array or tensor as a 1-D uint8 array: a view, or a copy when `x` is not contiguous."""
    if is_array(x):
        return np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    import torch  # `x` is a tensor: torch is loaded

    return x.contiguous().view(torch.uint8).reshape(-1).numpy()


def dtype_of(x) -> str:
    """A tensor's safetensors dtype, or an array's numpy dtype name (uint16 may hold BF16 or U16)."""
    return x.dtype.name if is_array(x) else (dtypes.st_of_torch(x.dtype) or str(x.dtype))


def holds(x, st: str) -> bool:
    """Whether `x` holds values of safetensors dtype `st`: a tensor of that dtype, or an array of its
    numpy storage type (`dtypes.DType.numpy`)."""
    if is_array(x):
        return x.dtype == dtypes.BY_ST[st].numpy
    return dtypes.st_of_torch(x.dtype) == st
