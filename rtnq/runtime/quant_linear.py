"""QuantLinear: an nn.Module holding one Marlin-layout linear layer.

On CUDA, forward runs the library's GEMM through the measured dispatcher (ops.gemm, path "auto"). On the
CPU it runs the reference path every GPU result is checked against: marlin.unpack + rtn.dequantize +
F.linear, i.e. x @ ((code - bias) * scale)^T with the dequantized weight rounded to the scales' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtnq.numerics import marlin, rtn
from rtnq.errors import ShapeError, UsageError
from rtnq.runtime import dispatch, ops


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored as RTN codes and scales in the Marlin layout.

    qweight: int32 (k/16, 2n) for 4-bit or (k/16, 4n) for 8-bit.  scales: float16/bfloat16 (k/group_size, n),
    or (1, n) for channelwise (group_size -1), Marlin-permuted; the activation dtype on CUDA.
    bias: optional (n,).  n = out_features (multiple of 64), k = in_features (multiple of 128).
    Both tensors are registered as buffers, so .to(device) moves them and state_dict() saves them.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        *,
        bits: int,
        n: int,
        k: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        ops.check_weights(qweight, scales, bits, n, k, group_size)
        if bias is not None and tuple(bias.shape) != (n,):
            raise ShapeError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self.bits = bits
        self.in_features = k
        self.out_features = n
        self.group_size = group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(
        cls,
        w_nk: torch.Tensor,
        bits: int = 4,
        group_size: int = 128,
        *,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> "QuantLinear":
        """Quantize a float weight (n, k) with rtn.quantize and pack it with marlin.pack (on the CPU).

        bf16/fp16 weights are quantized in their own dtype (the reference rule); fp32 ones are cast to
        `dtype` first. The module is on the CPU; move it with .to(device).
        """
        if w_nk.dim() != 2:
            raise ShapeError(f"expected a 2-D (n, k) weight, got shape {tuple(w_nk.shape)}")
        n, k = w_nk.shape
        rtn.check_params(bits, group_size)
        reason = marlin.check_shape(n, k, group_size)
        if reason:
            raise ShapeError(f"cannot pack this weight for the Marlin kernels: {reason}")
        codes, scales = rtn.quantize(w_nk.detach().cpu(), bits, group_size, dtype=dtype)
        qweight, scales_p = marlin.pack(codes, scales, bits)
        return cls(qweight, scales_p, bits=bits, n=n, k=k, group_size=group_size, bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: (n, k) in the scales' dtype, on the layer's device.

        CUDA: the library's dequantize kernel. CPU: marlin.unpack + rtn.dequantize. Bit-identical.
        """
        n, k = self.out_features, self.in_features
        if self.qweight.is_cuda:
            return ops.dequantize(self.qweight, self.scales, bits=self.bits, n=n, k=k, group_size=self.group_size)
        codes, scales_ng = marlin.unpack(self.qweight, self.scales, self.bits, n, k)
        return rtn.dequantize(codes, scales_ng, self.bits, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., k) -> (..., n). CUDA: x must have the scales' dtype. CPU: any float dtype, result in x.dtype."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            if x2.dtype != self.scales.dtype:
                raise UsageError(f"input is {x2.dtype} but the layer's scales are {self.scales.dtype}; cast the input")
            y = ops.gemm(
                x2, self.qweight, self.scales, bits=self.bits, n=self.out_features, k=self.in_features,
                group_size=self.group_size, path=dispatch.forced_path() or "auto",
            )
            if self.bias is not None:
                y = y.add_(self.bias.to(y.dtype))
        else:
            w = self.dequantized_weight().to(x2.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        group = "channelwise" if self.group_size == -1 else f"group_size={self.group_size}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, "
            f"bias={self.bias is not None}"
        )
