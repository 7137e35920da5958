"""rtnq's CUDA runtime: a ctypes binding of librtnq_cuda.so, QuantLinear and a checkpoint loader.

Importing this package loads no library and needs no GPU (it imports torch). The library is opened on the
first call that needs it (rtnq.runtime.library.load); on a machine without it or without a GPU those calls
raise KernelUnavailable with one line saying what is missing. QuantLinear also runs on the CPU, through
the reference path (unpack + dequantize + matmul). See docs/RUNTIME.md.

    from rtnq.runtime import QuantLinear, load_checkpoint
    ckpt = load_checkpoint("out/llama-rtnq", device="cuda")
    y = ckpt.linears["model.layers.0.mlp.down_proj"](x)

A layer's packed weight travels as one checked value, MarlinWeight (weight.py): ops.gemm(x, weight),
ops.dequantize(weight), QuantLinear(weight), layer.packed.
"""

from __future__ import annotations

from rtnq.runtime import dispatch, library, loader, ops
from rtnq.runtime.loader import LoadedCheckpoint, load_checkpoint
from rtnq.runtime.quant_linear import QuantLinear
from rtnq.runtime.weight import MarlinWeight

__all__ = ["MarlinWeight", "QuantLinear", "LoadedCheckpoint", "load_checkpoint", "dispatch", "library", "loader", "ops"]
