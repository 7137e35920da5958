"""MarlinWeight: one linear layer's packed weight, the value every runtime entry point takes.

The same six values (qweight, scales, bits, n, k, group_size) used to travel as loose arguments through
ops.gemm, ops.dequantize, QuantLinear, the loader and `rtnq bench`, and each re-checked them. They are
checked once, here, when the value is made; the dataclass is frozen so a checked value stays checked.

n and k are always the LOGICAL out/in features (what x and y have). A weight whose shape misses the
kernels' tiles (n % 64, k % 128) is stored padded to (n_stored, k_stored) = shape_rule.padded(n, k):
bias codes (0.0) and zero scale groups fill the extra part (marlin.pad), so it adds nothing to x @ W^T.
The kernels run at the stored dims; ops pads x and crops the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtnq import dtypes, params
from rtnq.errors import ShapeError, UsageError
from rtnq.numerics import marlin, rtn
from rtnq.numerics.shape_rule import padded

# The scale dtypes the kernels read (the activation dtypes, --dtype).
SCALE_DTYPES = tuple(dtypes.BY_SHORT[s].torch for s in dtypes.SIXTEEN_BIT)


def scale_groups(k: int, group_size: int) -> int:
    """Rows of the scale tensor: k / group_size, or 1 for channelwise (-1)."""
    return 1 if group_size == -1 else k // group_size


# eq=False: the generated __eq__ would compare tensors with ==, whose truth value is ambiguous.
@dataclass(frozen=True, eq=False)
class MarlinWeight:
    """A quantized (n, k) linear weight in the Marlin layout (FORMATS.md 3.3), checked on construction.

    With (n', k') = (n_stored, k_stored), the padded dims (equal to (n, k) when n % 64 == k % 128 == 0):

    qweight  int32, shape (k'/16, n'*bits/2): (k'/16, 2n') for 4-bit, (k'/16, 4n') for 8-bit; 16 x 64 tiles
             of biased codes (q + 2**(bits-1)), each lane's B fragments contiguous; padding = bias codes.
    scales   float16 or bfloat16, shape (k'/group_size, n'), or (1, n') for channelwise; Marlin-permuted
             columns; padding groups 0; the activation dtype on CUDA. Same device as qweight.
    bits     4 or 8.
    n        out_features (logical), >= 1.
    k        in_features (logical), >= 1, a multiple of group_size unless channelwise.
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
        n, k, bits, group, qweight, scales = self.n, self.k, self.bits, self.group_size, self.qweight, self.scales
        if n < 1 or k < 1:
            raise ShapeError(f"a Marlin weight needs n >= 1 and k >= 1, got n={n}, k={k}")
        # Groups must tile the logical k: the stored padding adds whole zero groups after it (128 % g == 0).
        if group != -1 and k % group:
            raise ShapeError(f"k={k} (in_features) is not a multiple of the group size {group}")
        n_s, k_s = self.n_stored, self.k_stored
        stored = "" if not self.is_padded else f" (stored padded to n={n_s}, k={k_s})"
        want = (k_s // 16, n_s * bits // 2)
        if qweight.dtype != torch.int32 or tuple(qweight.shape) != want:
            raise ShapeError(
                f"qweight must be int32 {want} for n={n}, k={k}{stored}, {bits}-bit; "
                f"got {qweight.dtype} {tuple(qweight.shape)}"
            )
        groups = scale_groups(k_s, group)
        if scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != (groups, n_s):
            raise ShapeError(
                f"scales must be float16/bfloat16 ({groups}, {n_s}) for group_size {group}{stored}; "
                f"got {scales.dtype} {tuple(scales.shape)}"
            )
        if scales.device != qweight.device:
            raise UsageError(f"qweight is on {qweight.device} but scales on {scales.device}")

    @classmethod
    def pack(cls, codes: torch.Tensor, scales_ng: torch.Tensor, bits: int, group_size: int) -> MarlinWeight:
        """From `rtn.quantize`'s output: codes uint8 (n, k) biased, scales (n, k/g) plain -> marlin.pad +
        marlin.pack (padding only when (n, k) misses the tiles)."""
        if codes.dim() != 2:
            raise ShapeError(f"MarlinWeight.pack: expected 2-D codes (n, k), got {tuple(codes.shape)}")
        n, k = codes.shape
        qweight, scales = marlin.pack(*marlin.pad(codes, scales_ng, bits, group_size), bits)
        return cls(qweight, scales, bits, n, k, group_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of `pack`: logical codes uint8 (n, k) and plain scales (n, k/g), on the weight's device."""
        codes, scales = marlin.unpack(self.qweight, self.scales, self.bits, self.n_stored, self.k_stored)
        return marlin.crop(codes, scales, self.n, self.k)

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
    def n_stored(self) -> int:
        """out_features as stored and as the kernels see it: n rounded up to a multiple of 64."""
        return padded(self.n, self.k)[0]

    @property
    def k_stored(self) -> int:
        """in_features as stored and as the kernels see it: k rounded up to a multiple of 128."""
        return padded(self.n, self.k)[1]

    @property
    def is_padded(self) -> bool:
        """Whether the stored tensors hold padding, i.e. (n_stored, k_stored) != (n, k)."""
        return (self.n_stored, self.k_stored) != (self.n, self.k)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def __repr__(self) -> str:
        group = "channelwise" if self.group_size == -1 else f"g{self.group_size}"
        stored = f", stored {self.n_stored}x{self.k_stored}" if self.is_padded else ""
        return (f"MarlinWeight(n={self.n}, k={self.k}{stored}, {self.bits}-bit, {group}, {self.scales.dtype}, "
                f"{self.device})")
