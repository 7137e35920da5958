"""The three output formats of `rtnq convert --format`: which tensors replace a quantized `P.weight`.

| format             | tensors per quantized module                          | read by                      |
|--------------------|-------------------------------------------------------|------------------------------|
| marlin             | qweight (Marlin layout), scales (Marlin-permuted)     | rtnq's runtime               |
| gptq               | qweight (k/pf, n), scales (k/g, n), qzeros, g_idx     | vLLM, SGLang, transformers   |
| compressed-tensors | weight_packed (n, k/pf), weight_scale (n, k/g),        | vLLM, SGLang, transformers   |
|                    | weight_shape                                          |                              |

The codes and scale values are the same RTN numbers in every format (the scales keep the dtype the
weight was quantized in); only their arrangement differs, so all three dequantize to identical weights.
The first two outputs of each format are the packed codes and the scales, filled by the converter's
quantizer (rtnq.numerics.fused, in the record's `layout`); the rest are constants of the shape (`constants`).

Shapes: GPTQ and compressed-tensors store the logical (n, k), which is what engines read. The marlin
format stores shapes its kernels cannot tile padded to `stored_shape` (zero codes, rtnq.numerics.marlin.pad);
`reference` pads and `unpack` crops, so callers always see logical codes and scales.

One record per format holds every name it goes by: the --format value, the manifest's "format", the
config's quant_method and the shards' safetensors metadata. Importing this module does not import torch
(the CLI validates --format with it); the packers are imported when a method needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rtnq.errors import ShapeError
from rtnq.numerics.shape_rule import padded
from rtnq.params import effective_group

if TYPE_CHECKING:
    import torch

MARLIN_TILE = 16  # rtnq.numerics.marlin.TILE: k rows per Marlin slab (kept here so planning needs no torch)


@dataclass(frozen=True)
class Format:
    name: str  # the --format value
    manifest_name: str  # the manifest's "format"
    quant_method: str  # config.json's quantization_config.quant_method
    layout: str  # rtnq.numerics.fused layout of the packed codes and scales: "marlin", "rows" or "cols"
    roles: tuple[str, ...]  # output tensor suffixes, codes and scales first
    stacked_experts: bool  # can hold a 3-D (E, n, k) expert tensor

    def shard_metadata(self, rtnq_version: str, manifest_version: int) -> dict[str, str]:
        """Each output shard's safetensors `__metadata__`."""
        if self.name == "marlin":  # only rtnq reads these shards, and it checks the manifest version
            return {"format": "rtnq", "rtnq_version": rtnq_version, "manifest_version": str(manifest_version)}
        # "format": "pt" is what transformers' safetensors loader expects of a checkpoint it reads.
        return {"format": "pt", "rtnq_version": rtnq_version, "rtnq_format": self.name}

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The (..., n, k) the packed outputs of a weight of `shape` hold: padded for marlin, else `shape`."""
        if self.name != "marlin":
            return tuple(shape)
        *lead, n, k = shape
        return (*lead, *padded(n, k))

    def entries(self, prefix: str, shape: tuple[int, ...], bits: int, group_size: int, scale_dtype: str):
        """(name, safetensors dtype, shape) of each output of the weight `prefix.weight` of `shape`;
        scale_dtype: the safetensors spelling of the 16-bit dtype the weight is quantized in."""
        *lead, n, k = self.stored_shape(shape)
        g = effective_group(k, group_size)
        pf = 32 // bits
        sdt = scale_dtype
        if self.name == "marlin":
            shapes = [("I32", (*lead, k // MARLIN_TILE, n * MARLIN_TILE * bits // 32)), (sdt, (*lead, k // g, n))]
        elif self.name == "gptq":
            shapes = [("I32", (k // pf, n)), (sdt, (k // g, n)), ("I32", (k // g, n // pf)), ("I32", (k,))]
        else:
            shapes = [("I32", (n, k // pf)), (sdt, (n, k // g)), ("I64", (2,))]
        return [(f"{prefix}.{role}", dt, s) for role, (dt, s) in zip(self.roles, shapes)]

    def constants(self, shape: tuple[int, ...], bits: int, group_size: int) -> list:
        """The outputs after codes and scales, which depend only on the shape, as numpy arrays (conversion
        writes them without torch): GPTQ's qzeros and g_idx, compressed-tensors' weight_shape. The same
        values as the torch reference's (kpack.qzeros, kpack.g_idx; `reference`)."""
        import numpy as np

        n, k = shape[-2:]
        g = effective_group(k, group_size)
        if self.name == "gptq":
            pf = 32 // bits
            if n % pf:
                raise ShapeError(f"n={n} is not a multiple of {pf} ({bits}-bit zeros per int32 word)")
            field = (1 << (bits - 1)) - 1  # v1 zero points: bias - 1 in every field (kpack.qzeros)
            word = sum(field << (bits * s) for s in range(pf))  # 0x77777777 / 0x7F7F7F7F, both < 2^31
            return [np.full((k // g, n // pf), word, dtype=np.int32), np.arange(k, dtype=np.int32) // g]
        if self.name == "compressed-tensors":
            return [np.array([n, k], dtype=np.int64)]
        return []

    def reference_constants(self, shape: tuple[int, ...], bits: int, group_size: int) -> list[torch.Tensor]:
        """`constants` by the torch reference (kpack), as tensors."""
        import torch

        from rtnq.numerics import kpack

        n, k = shape[-2:]
        g = effective_group(k, group_size)
        if self.name == "gptq":
            return [kpack.qzeros(bits, k // g, n), kpack.g_idx(k, g)]
        if self.name == "compressed-tensors":
            return [torch.tensor([n, k], dtype=torch.int64)]
        return []

    def reference(self, codes: torch.Tensor, scales_ng: torch.Tensor, bits: int, group_size: int) -> list[torch.Tensor]:
        """Every output from rtn.quantize's (codes, scales) of the logical weight, with the readable
        reference packers (marlin: padded first)."""
        from rtnq.numerics import kpack, marlin

        if self.name == "marlin":
            return list(marlin.pack(*marlin.pad(codes, scales_ng, bits, group_size), bits))
        if self.name == "gptq":
            packed = [kpack.pack_cols(codes, bits), scales_ng.t().contiguous()]
        else:
            packed = [kpack.pack_rows(codes, bits), scales_ng.contiguous()]
        return packed + self.reference_constants(tuple(codes.shape), bits, group_size)

    def unpack(self, packed: torch.Tensor, scales: torch.Tensor, bits: int, n: int, k: int):
        """The packed codes and scales outputs of a logical (n, k) weight -> (codes uint8 (..., n, k),
        scales (..., n, k/g)), the inputs of `reference` (and of rtn.dequantize)."""
        from rtnq.numerics import kpack, marlin

        if self.name == "marlin":
            return marlin.crop(*marlin.unpack(packed, scales, bits, *padded(n, k)), n, k)
        if self.name == "gptq":
            return kpack.unpack_cols(packed, bits), scales.t().contiguous()
        return kpack.unpack_rows(packed, bits), scales


MARLIN = Format("marlin", "rtnq-marlin", "rtnq", "marlin", ("qweight", "scales"), True)
GPTQ = Format("gptq", "gptq", "gptq", "cols", ("qweight", "scales", "qzeros", "g_idx"), False)
COMPRESSED_TENSORS = Format("compressed-tensors", "compressed-tensors", "compressed-tensors", "rows",
                            ("weight_packed", "weight_scale", "weight_shape"), False)
ALL = (MARLIN, GPTQ, COMPRESSED_TENSORS)
FORMATS = tuple(f.name for f in ALL)  # the --format values, default first
BY_NAME = {f.name: f for f in ALL}
BY_MANIFEST_NAME = {f.manifest_name: f for f in ALL}
BY_QUANT_METHOD = {f.quant_method: f for f in ALL}
