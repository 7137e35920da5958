"""The one dtype table: safetensors, torch and CLI spellings of every dtype rtnq reads or writes.

Torch-free at import (selection and planning never need torch); `DType.torch` imports it on first use,
`DType.numpy` numpy (the type the torch-free conversion path holds the bytes in).

    safetensors  "BF16"        headers, TensorSpec.dtype, writer entries
    torch        "bfloat16"    manifests (TensorEntry.dtype), torch.bfloat16
    short        "bf16"        --dtype, `rtnq sample --dtype`, inspect labels
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    st: str  # safetensors spelling
    itemsize: int  # bytes per element
    name: str  # torch spelling, without "torch."
    short: str | None = None  # CLI spelling, for the float types users choose between

    @property
    def torch(self):
        """The torch.dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    @property
    def numpy(self):
        """The numpy dtype that holds this dtype's bytes (imports numpy): the same type where numpy has
        it; bf16 as uint16 and the FP8 types as uint8 bit patterns, since numpy has no such types (the C
        kernel and the writer only need the bytes)."""
        import numpy as np

        return np.dtype(_NUMPY_STORAGE.get(self.st, self.name))

    @property
    def label(self) -> str:
        """Short display name: "bf16" where there is one, else the torch spelling."""
        return self.short or self.name


# Only what torch can hold (a source in any other dtype is refused by name).
TABLE = (
    DType("BOOL", 1, "bool"),
    DType("U8", 1, "uint8"),
    DType("I8", 1, "int8"),
    DType("I16", 2, "int16"),
    DType("U16", 2, "uint16"),
    DType("I32", 4, "int32"),
    DType("U32", 4, "uint32"),
    DType("I64", 8, "int64"),
    DType("U64", 8, "uint64"),
    DType("F16", 2, "float16", "fp16"),
    DType("BF16", 2, "bfloat16", "bf16"),
    DType("F32", 4, "float32", "fp32"),
    DType("F64", 8, "float64"),
    DType("F8_E4M3", 1, "float8_e4m3fn"),
    DType("F8_E5M2", 1, "float8_e5m2"),
)
BY_ST = {d.st: d for d in TABLE}
_NUMPY_STORAGE = {"BF16": "uint16", "F8_E4M3": "uint8", "F8_E5M2": "uint8"}  # no numpy type of their own
BY_NAME = {d.name: d for d in TABLE}
BY_SHORT = {d.short: d for d in TABLE if d.short}
FLOATS = ("F16", "BF16", "F32")  # the source dtypes rtnq quantizes
SIXTEEN_BIT = ("bf16", "fp16")  # the dtypes RTN arithmetic runs in (--dtype)


def st_of_torch(dt) -> str | None:
    """safetensors spelling of a torch.dtype, None if it has none."""
    d = BY_NAME.get(str(dt).removeprefix("torch."))
    return d.st if d else None


def quantized_in(source_st: str, option: str | None = None) -> DType:
    """The 16-bit dtype RTN runs in for a tensor stored as `source_st`: --dtype (`option`, "bf16"/"fp16")
    if given, else the source's own 16-bit dtype; other floats (fp32) are quantized in bf16."""
    if option in SIXTEEN_BIT:
        return BY_SHORT[option]
    d = BY_ST[source_st]
    return d if d.short in SIXTEEN_BIT else BY_SHORT["bf16"]
