"""MarlinWeight: one linear layer's packed weight, the value every runtime entry point takes.

The same six values (qweight, scales, bits, n, k, group_size) used to travel as loose arguments through
ops.gemm, ops.dequantize, QuantLinear, the loader and `rtnq bench`, and each re-checked them. They are
checked once, here, when the value is made; the dataclass is frozen so a checked value stays checked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtnq import dtypes, params
from rtnq.errors import ShapeError, UsageError
from rtnq.numerics import marlin, rtn

# The scale dtypes the kernels read (the activation dtypes, --dtype).
SCALE_DTYPES = tuple(dtypes.BY_SHORT[s].torch for s in dtypes.SIXTEEN_BIT)


def scale_groups(k: int, group_size: int) -> int:
    """Rows of the scale tensor: k / group_size, or 1 for channelwise (-1)."""
    return 1 if group_size == -1 else k // group_size


# eq=False: the generated __eq__ would compare tensors with ==, whose truth value is ambiguous.
@dataclass(frozen=True, eq=False)
class MarlinWeight:
    """A quantized (n, k) linear weight in the Marlin layout (FORMATS.md 3.3), checked on construction.

    qweight  int32, shape (k/16, n*bits/2): (k/16, 2n) for 4-bit, (k/16, 4n) for 8-bit; 16 x 64 tiles of
             biased codes (q + 2**(bits-1)), each lane's B fragments contiguous.
    scales   float16 or bfloat16, shape (k/group_size, n), or (1, n) for channelwise; Marlin-permuted
             columns; the activation dtype on CUDA. Same device as qweight.
    bits     4 or 8.
    n        out_features, a multiple of 64.
    k        in_features, a multiple of 128 (and of group_size).
    group_size  32, 64, 128, or -1 for one group per row (channelwise).

    The tensors may be on any device; the CUDA kernels need them on the GPU (ops says so when not).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    bits: int
    n: int
    k: int
    group_size: int

    def __post_init__(self) -> None:
        params.check(self.bits, self.group_size)
        reason = marlin.check_shape(self.n, self.k, self.group_size)
        if reason:
            raise ShapeError(f"cannot run this layer on the Marlin kernels: {reason}")
        n, k, bits, qweight, scales = self.n, self.k, self.bits, self.qweight, self.scales
        want = (k // 16, n * bits // 2)
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
            raise ShapeError(
                f"qweight must be int32 {want} for n={n}, k={k}, {bits}-bit; got {qweight.dtype} {tuple(qweight.shape)}"
            )
        groups = scale_groups(k, self.group_size)
        if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (groups, n):
            raise ShapeError(
                f"scales must be float16/bfloat16 ({groups}, {n}) for group_size {self.group_size}; "
                f"got {scales.dtype} {tuple(scales.shape)}"
            )
        if scales.device != qweight.device:
            raise UsageError(f"qweight is on {qweight.device} but scales on {scales.device}")

    @classmethod
    def pack(cls, codes: torch.Tensor, scales_ng: torch.Tensor, bits: int, group_size: int) -> MarlinWeight:
        """From `rtn.quantize`'s output: codes uint8 (n, k) biased, scales (n, k/g) plain -> marlin.pack."""
        n, k = codes.shape
        qweight, scales = marlin.pack(codes, scales_ng, bits)
        return cls(qweight, scales, bits, n, k, group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `pack`: codes uint8 (n, k) and plain scales (n, k/g), on the weight's device."""
        return marlin.unpack(self.qweight, self.scales, self.bits, self.n, self.k)

    def reference_dequantize(self) -> torch.Tensor:
        """(n, k) in the scales' dtype by the pure-torch reference (unpack + rtn.dequantize): what every
        kernel result is checked against, and the CPU path of QuantLinear."""
        codes, scales_ng = self.unpack()
        return rtn.dequantize(codes, scales_ng, self.bits, self.group_size)

    def replace(self, qweight: torch.Tensor, scales: torch.Tensor) -> MarlinWeight:
        """The same layer description over other tensors (moved, cloned, cast), checked again."""
        return MarlinWeight(qweight, scales, self.bits, self.n, self.k, self.group_size)

    def to(self, device: torch.device | str | None = None, scale_dtype: torch.dtype | None = None) -> MarlinWeight:
        """Moved to `device` and/or with the scales cast to `scale_dtype` (None: unchanged)."""
        device = self.device if device is None else device
        return self.replace(self.qweight.to(device), self.scales.to(device=device, dtype=scale_dtype or self.scales.dtype))

    def clone(self) -> MarlinWeight:
        """A copy with its own contiguous storage (`rtnq bench` rotates through copies to defeat the L2)."""
        return self.replace(self.qweight.clone(memory_format=torch.contiguous_format),
                            self.scales.clone(memory_format=torch.contiguous_format))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def __repr__(self) -> str:
        group = "channelwise" if self.group_size == -1 else f"g{self.group_size}"
        return f"MarlinWeight(n={self.n}, k={self.k}, {self.bits}-bit, {group}, {self.scales.dtype}, {self.device})"
