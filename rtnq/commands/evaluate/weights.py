"""The two sets of weights `rtnq eval` compares, read one tensor at a time by name.

    Source     SRC's tensors as stored.
    Converted  a converted OUT (marlin, gptq or compressed-tensors): each quantized module dequantized
               with rtnq's own unpacking (commands.dequantize), every other tensor as stored in OUT.
    WhatIf     what `rtnq convert SRC` with the given options would write, without writing it: the
               convert planner's decision per tensor, and rtn.dequantize(rtn.quantize(w16)) for the
               quantized ones, with w16 the source weight in the planned 16-bit dtype. That is the
               same dense weight Converted unpacks from the written checkpoint, bit for bit. Under --rotate
               the source is read through the rotation (rtnq.commands.rotate.RotatedReader), as convert does.

A rotated candidate (--rotate) computes the source's function with other weights: its norms are ones, and
a tied source's head becomes its own lm_head.weight (`head`).

`native(name)` is the tensor in its stored (or dequantized) dtype; `get(name)` is it in float32, the
dtype every eval computation runs in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rtnq.checkpoint import fp8, layout
from rtnq.checkpoint.source import Reader, TensorSpec, scan
from rtnq.errors import CheckpointError, UsageError
from rtnq.numerics import fused, kpack, rtn

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class Source:
    def __init__(self, model_dir: Path, specs: list[TensorSpec] | None = None,
                 source_fp8: fp8.Fp8Source | None = None):
        self.dir = model_dir
        if specs is None:
            specs = scan(model_dir)
            source_fp8 = fp8.for_source(model_dir, specs)
        # An FP8 source (rtnq.checkpoint.fp8): its scales have no counterpart in OUT, its FP8 weights are
        # read dense, in bf16 as convert dequantizes them by default.
        self.fp8 = source_fp8
        consumed = source_fp8.consumed if source_fp8 else frozenset()
        self.specs = {s.name: s for s in specs if s.name not in consumed}
        self.reader = Reader(model_dir)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(s.shape) for n, s in self.specs.items()}

    def _spec(self, name: str) -> TensorSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise CheckpointError(f"{self.dir}: no tensor {name}, which the model's transformers class needs")
        return spec

    def native(self, name: str) -> torch.Tensor:
        w8 = self.fp8.weights.get(name) if self.fp8 else None
        if w8 is not None:
            return fp8.read_dense(self.reader, w8, fp8.dense_dtype(None).torch)
        return self.reader.read(self._spec(name))

    def get(self, name: str) -> torch.Tensor:
        return self.native(name).float()

    def head(self, tied: bool) -> str:
        """The tensor the output projection uses: the embedding when the source's config ties them (as
        transformers does), unless this candidate was given a head of its own."""
        return EMBED if tied and not self.own_head else HEAD

    own_head = False  # a rotated candidate of a tied source: lm_head.weight differs from the embedding

    def close(self) -> None:
        self.reader.close()


class Converted(Source):
    def __init__(self, out_dir: Path):
        from rtnq.commands import dequantize

        self.config, self.method, specs, modules = dequantize.read_modules(out_dir)
        self.modules = {m.out.name: m for m in modules}
        consumed = {s.name for m in modules for s in m.inputs.values()}
        super().__init__(out_dir, [s for s in specs if s.name not in consumed])
        # convert --rotate of a tied source writes an explicit head and un-ties it in config.json
        self.own_head = self.config.get("tie_word_embeddings") is False and HEAD in self.shapes()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().shapes(), **{n: tuple(m.out.shape) for n, m in self.modules.items()}}

    def native(self, name: str) -> torch.Tensor:
        m = self.modules.get(name)
        if m is None:
            return super().native(name)
        from rtnq.commands import dequantize

        return dequantize.dense_weight(m, self.method, self.reader).reshape(m.out.shape)


class WhatIf(Source):
    def __init__(self, src_dir: Path, plan):
        super().__init__(src_dir, [item.spec for item in plan.items], plan.fp8)
        self.items = {item.spec.name: item for item in plan.items}
        self.scale = plan.options.scale
        if plan.rotation is not None:
            self.reader.close()
            self.reader = plan.rotation.reader(src_dir)
            self.own_head = plan.rotation.tied
        for name, item in self.items.items():
            if item.quantized and len(item.spec.shape) != 2:
                raise UsageError(f"{name} is a stacked {len(item.spec.shape)}-D expert tensor; eval's what-if mode "
                                 "quantizes 2-D linears only. Add --skip experts, or convert and eval OUT")

    def native(self, name: str) -> torch.Tensor:
        item = self.items[name]
        # an FP8 weight: dense in the dtype convert dequantizes it to (--dtype), as convert writes or quantizes it
        w = fp8.read_dense(self.reader, item.fp8, item.quant_dtype.torch) if item.fp8 else super().native(name)
        if not item.quantized:
            return w
        d = item.decision
        # The codes convert writes, by its own kernel (the C library when built: --scale mse is ~10x the torch
        # reference's speed there), packed along k and unpacked again: the same codes as rtn.quantize.
        qweight, scales, _ = fused.quantize_pack(w.to(item.quant_dtype.torch).contiguous(), d.bits, d.group_size,
                                                 name=name, layout="rows", scale=self.scale)
        rtn.check_scales(scales, name)  # convert refuses it too: never evaluate what it would not write
        return rtn.dequantize(kpack.unpack_rows(qweight, d.bits), scales, d.bits, d.group_size)


def is_quantized(model_dir: Path) -> bool:
    cfg = layout.read_json_object(model_dir / layout.CONFIG_NAME)
    return bool(cfg.get("quantization_config") or cfg.get("compression_config")
                or (model_dir / layout.GPTQ_CONFIG_NAME).is_file())


def candidate(out_dir: Path) -> Source:
    """A converted OUT, or a dense one (no quantization config: `rtnq dequantize`'s output, SRC itself)."""
    return Converted(out_dir) if is_quantized(out_dir) else Source(out_dir)


def check_pair(out: Source, src: Source) -> None:
    """OUT must hold a dense counterpart of every SRC tensor with its shape, and nothing else."""
    have, want = out.shapes(), src.shapes()
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want) - ({HEAD} if out.own_head else set()))
    differ = sorted(n for n in set(want) & set(have) if have[n] != want[n])
    for what, names in (("has no counterpart of", missing), ("has tensors not in", extra)):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise UsageError(f"{out.dir} does not match {src.dir}: it {what} the source ({names[0]}{more}); "
                             "pass the SRC that OUT was converted from")
    if differ:
        n = differ[0]
        raise UsageError(f"{out.dir} does not match {src.dir}: {n} is {list(have[n])} in OUT but {list(want[n])} "
                         f"in SRC ({len(differ)} tensors differ); pass the SRC that OUT was converted from")


def source_dir(path: str | Path, option: str = "SRC") -> Path:
    """A dense 16-bit model directory: the reference every candidate is measured against."""
    d = model_dir(path)
    if is_quantized(d) and fp8.for_source(d, scan(d)) is None:  # an FP8 source is read dense
        raise UsageError(f"{option} {path} is a quantized checkpoint; pass the 16-bit source it was converted from")
    return d


def model_dir(path: str | Path) -> Path:
    d = layout.resolve(path)
    if not (d / layout.CONFIG_NAME).is_file():
        raise CheckpointError(f"{d}: no config.json; eval builds the model from it")
    return d
