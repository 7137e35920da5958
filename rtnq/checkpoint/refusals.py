"""Sources `rtnq convert` must refuse rather than "convert" into something wrong.

An already-quantized checkpoint (rtnq's own output, GPTQ, AWQ, int compressed-tensors, bitsandbytes, ...)
has integer or 8-bit tensors where the linear weights belong, plus scales beside them. Read as a plain
checkpoint, every such tensor would pass through unchanged and the output's config would claim a fresh
4-bit quantization of a model that has none: exit 0 and a checkpoint no engine loads correctly. So the
source's own quantization_config (or, without one, its tensor names and dtypes) is checked first, and
the refusal names the format and, where rtnq reads it, the way back to a dense model (`rtnq dequantize`).
FP8 sources that rtnq.checkpoint.fp8 reads (block-scaled `fp8`, compressed-tensors float-quantized) are the
exception: their weights are dequantized on the fly, so only their own scale tensors may carry the marks.
GPT-2 style Conv1D weights are stored (in, out), the transpose of what the packers expect; until they are
quantized along their input dimension with every export restoring the orientation, they are refused too.
"""

from __future__ import annotations

from pathlib import Path

from rtnq import dtypes
from rtnq.checkpoint.source import TensorSpec
from rtnq.errors import CheckpointError

DEQUANTIZABLE = ("rtnq", "gptq", "compressed-tensors")  # what `rtnq dequantize` reads (commands/dequantize.py)

# Tensor-name suffixes only quantized checkpoints have: GPTQ/AWQ/rtnq (qweight, qzeros, scales, g_idx),
# compressed-tensors (weight_packed, weight_scale, weight_zero_point), DeepSeek-style FP8 (weight_scale_inv),
# bitsandbytes (SCB, weight_format, absmax, quant_map, quant_state).
_QUANT_SUFFIXES = (".qweight", ".qzeros", ".g_idx", ".weight_packed", ".weight_scale", ".weight_scale_inv",
                   ".weight_zero_point", ".SCB", ".weight_format", ".absmax", ".quant_map",
                   ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


def _method(config: dict) -> str | None:
    q = config.get("quantization_config") or config.get("compression_config")
    if isinstance(q, dict):
        method = q.get("quant_method") or ("bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else None)
        return str(method) if method else "unknown"
    return None


def _advice(method: str) -> str:
    if method in DEQUANTIZABLE:
        return f"run `rtnq dequantize SRC DENSE` first and convert DENSE"
    if "fp8" in method:
        return ("this FP8 variant is not supported (rtnq reads quant_method 'fp8' and compressed-tensors "
                "float-quantized FP8); convert the original 16-bit checkpoint")
    return "convert the original 16-bit checkpoint"


def check_source(src: Path, config: dict | None, specs: list[TensorSpec], consumed: frozenset[str] | None = None) -> None:
    """CheckpointError if the source is already quantized, by its config or its tensor names.
    config: config.json's object (None when absent). consumed: an FP8 source's scale tensors
    (rtnq.checkpoint.fp8.detect), whose config then passes; None for any other source."""
    method = _method(config or {})
    if method is not None and consumed is None:
        raise CheckpointError(f"{src} is already quantized (quantization_config quant_method {method!r}); rtnq "
                              f"quantizes 16-bit or fp32 checkpoints only: {_advice(method)}")
    marker = next((s.name for s in specs if s.name.endswith(_QUANT_SUFFIXES) and s.name not in (consumed or ())), None)
    if marker is not None:
        if consumed is not None:
            raise CheckpointError(f"{src} holds {marker}, a tensor of a quantized checkpoint that its FP8 "
                                  "quantization_config does not explain; convert the original checkpoint")
        raise CheckpointError(f"{src} holds {marker}, a tensor of a quantized checkpoint, but its config.json says "
                              "nothing of a quantization; rtnq quantizes 16-bit or fp32 checkpoints only: convert the "
                              "original one")


def check_linears(linear_slots: list[TensorSpec], conv1d: list[str]) -> None:
    """CheckpointError for a linear weight rtnq cannot quantize correctly. linear_slots: the tensors the
    selection reads as linear weights inside the blocks by name and rank, whatever their dtype; conv1d:
    the GPT-2 Conv1D weights it found."""
    odd = next((s for s in linear_slots if s.dtype not in dtypes.FLOATS), None)
    if odd is not None:
        raise CheckpointError(f"{odd.name} is {odd.dtype} where a linear weight belongs; rtnq quantizes F16, BF16 "
                              "and F32 weights only (is the checkpoint already quantized?)")
    if conv1d:
        raise CheckpointError(f"{conv1d[0]} is a GPT-2 style Conv1D weight, stored (in, out); rtnq quantizes "
                              f"nn.Linear (out, in) weights only, and would leave all {len(conv1d)} such weights "
                              "unquantized")
