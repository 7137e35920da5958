"""QuantLinear: an nn.Module holding one Marlin-layout linear layer.

On CUDA, forward runs the library's GEMM through the measured dispatcher (ops.gemm, path "auto"). On the
CPU it runs the reference path every GPU result is checked against: marlin.unpack + rtn.dequantize +
F.linear, i.e. x @ ((code - bias) * scale)^T with the dequantized weight rounded to the scales' dtype.
Both see logical shapes: a weight stored padded (MarlinWeight.n_stored/k_stored) is cropped or run padded
inside ops and MarlinWeight, never by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rtnq import params
from rtnq.errors import ShapeError, UsageError
from rtnq.numerics import rtn, shape_rule
from rtnq.runtime import dispatch, ops
from rtnq.runtime.weight import MarlinWeight


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W stored as RTN codes and scales in the Marlin layout.

    weight: a MarlinWeight (its docstring gives the tensors' dtypes, shapes and layout); on CUDA its scales
    must have the activation dtype.  bias: optional (n,).  The weight's two tensors are registered as buffers
    `qweight` and `scales`, so .to(device) moves them and state_dict() saves them; `packed` gives them back
    as a MarlinWeight.
    """

    def __init__(self, weight: MarlinWeight, *, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, MarlinWeight):
            raise UsageError(f"QuantLinear takes a rtnq.runtime.MarlinWeight, got {type(weight).__name__}")
        if bias is not None and tuple(bias.shape) != (weight.n,):
            raise ShapeError(f"bias must have shape ({weight.n},), got {tuple(bias.shape)}")
        self.bits = weight.bits
        self.in_features = weight.k
        self.out_features = weight.n
        self.group_size = weight.group_size
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("bias", bias)

    @property
    def packed(self) -> MarlinWeight:
        """The layer's weight over its current buffers (wherever .to() moved them).

        Named `packed`, not `weight`: code that walks modules expects `.weight` to be a float tensor.
        """
        return MarlinWeight(self.qweight, self.scales, self.bits, self.out_features, self.in_features, self.group_size)

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
        """Quantize a float weight (n, k) with rtn.quantize and pack it with MarlinWeight.pack (on the CPU).

        Any (n, k) rtnq can store works (shape_rule.problem); one off the kernels' tiles is stored padded,
        in_features/out_features stay (k, n).

        bf16/fp16 weights are quantized in their own dtype (the reference rule); fp32 ones are cast to
        `dtype` first. The module is on the CPU; move it with .to(device).
        """
        if w_nk.dim() != 2:
            raise ShapeError(f"expected a 2-D (n, k) weight, got shape {tuple(w_nk.shape)}")
        n, k = w_nk.shape
        params.check(bits, group_size)
        # Before the quantize pass, with the converter's shape rule and wording: shapes off the kernels'
        # tiles are fine (MarlinWeight.pack pads them), but the group size must divide k exactly, since a
        # module takes the size it is given (the converter falls back per tensor, shape_rule.group_for).
        reason = shape_rule.problem(n, k, group_size)
        if reason:
            raise ShapeError(f"cannot quantize a ({n}, {k}) weight for the Marlin kernels: {reason}")
        if group_size != -1 and k % group_size:
            fits = shape_rule.group_for(k, group_size)
            raise ShapeError(
                f"cannot quantize a ({n}, {k}) weight with group size {group_size}: k={k} (in_features) is not a "
                f"multiple of {group_size}; choose group size {fits} (--group-size {fits}) or -1"
            )
        codes, scales = rtn.quantize(w_nk.detach().cpu(), bits, group_size, dtype=dtype)
        return cls(MarlinWeight.pack(codes, scales, bits, group_size), bias=bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with: (n, k) in the scales' dtype, on the layer's device.

        CUDA: the library's dequantize kernel. CPU: marlin.unpack + rtn.dequantize. Bit-identical; logical
        shape (padding cropped).
        """
        w = self.packed
        if self.qweight.is_cuda:
            return ops.dequantize(w)
        return w.reference_dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., k) -> (..., n). CUDA: x must have the scales' dtype. CPU: any float dtype, result in x.dtype."""
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"input has {x.shape[-1]} features, the layer expects {self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.is_cuda:
            if x2.dtype != self.scales.dtype:
                raise UsageError(f"input is {x2.dtype} but the layer's scales are {self.scales.dtype}; cast the input")
            y = ops.gemm(x2, self.packed, path=dispatch.forced_path() or "auto")
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
