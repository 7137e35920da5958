"""Load a directory written by `rtnq convert` into QuantLinear layers and plain tensors.

The precision manifest (rtnq_manifest.json) says what every source tensor became; this module follows
it: each quantized linear `P.weight` (kind "quantized", 2-D) becomes `linears["P"]`, a QuantLinear built
from `P.qweight` + `P.scales` (with `P.bias` attached when the checkpoint has one), and every passthrough
tensor is returned as-is in `tensors`. Shards are read with safetensors (never unpickled); each tensor
the manifest names must exist with the shape and dtype the manifest implies, or CheckpointError says
which one is wrong.

GPTQ and compressed-tensors exports load too: their codes and scales are repacked into the Marlin
layout on the CPU first (what vLLM does on the GPU at load time), which gives the bytes the marlin
format would have held (tests/test_export.py checks that). Repacking runs at roughly 100-200 M weights/s.

Shapes: the manifest gives every weight's logical (n, k); the marlin format stores shapes off the
kernels' tiles padded (formats.Format.stored_shape), and exports are padded when repacked, so every
MarlinWeight is built with the logical (n, k) over tensors of the stored shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtnq import formats
from rtnq.numerics import marlin
from rtnq.checkpoint import manifest as manifest_mod
from rtnq.errors import CheckpointError, KernelUnavailable, RtnqError
from rtnq.selection import names
from rtnq.runtime.quant_linear import QuantLinear
from rtnq.runtime.weight import MarlinWeight


@dataclass
class LoadedCheckpoint:
    """linears: module name (source tensor name minus '.weight') -> QuantLinear.
    tensors: output tensor name -> tensor, for every passthrough entry (biases included, also when attached
    to a QuantLinear) and for quantized entries the runtime has no module for (3-D expert weights, kept as
    their raw qweight/scales tensors, at the stored, possibly padded, shape).  manifest: the parsed manifest.  path: the directory."""

    linears: dict[str, QuantLinear]
    tensors: dict[str, torch.Tensor]
    manifest: manifest_mod.Manifest
    path: Path
    skipped: list[str] = field(default_factory=list)  # quantized entries not turned into a QuantLinear, with why


def _device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KernelUnavailable(
                f"device={str(device)!r} needs a CUDA build of torch and a GPU, and torch {torch.__version__} sees none; "
                "load with device='cpu' for the reference path"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise RtnqError(f"device must be 'cuda' or 'cpu', got {str(device)!r}")
    return dev


def load_checkpoint(out_dir: str | Path, device: str | torch.device = "cuda") -> LoadedCheckpoint:
    """Read a converted checkpoint (an HF-style directory with rtnq_manifest.json) onto `device`."""
    from safetensors import safe_open  # imported here: `import rtnq.runtime` must stay light

    root = Path(out_dir)
    dev = _device(device)
    man = manifest_mod.read(root)
    fmt = formats.BY_MANIFEST_NAME[man.format]

    wanted: dict[str, list[str]] = {}  # shard -> output tensor names
    for name, entry in man.tensors.items():
        if entry.kind == "quantized":
            keys = fmt.roles[:2]  # packed codes and scales; the rest are constants of the shape
        elif entry.kind == "passthrough":
            keys = ("tensor",)
        else:
            raise CheckpointError(f"{root}: manifest entry {name} has unknown kind {entry.kind!r}")
        for key in keys:
            if key not in entry.outputs:
                raise CheckpointError(f"{root}: manifest entry {name} ({entry.kind}) has no '{key}' output")
            wanted.setdefault(entry.shard, []).append(entry.outputs[key])

    loaded: dict[str, torch.Tensor] = {}
    for shard, tensor_names in wanted.items():
        path = root / shard
        if not path.is_file():
            raise CheckpointError(f"{root}: shard {shard} named in the manifest is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                present = set(f.keys())
                for tname in tensor_names:
                    if tname not in present:
                        raise CheckpointError(f"{path}: tensor {tname} named in the manifest is missing")
                    # exports are repacked on the CPU first, then moved
                    loaded[tname] = f.get_tensor(tname) if fmt is not formats.MARLIN else f.get_tensor(tname).to(dev)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: cannot read the shard ({e})") from None

    linears: dict[str, QuantLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, entry in man.tensors.items():
        if entry.kind == "passthrough":
            tensors[entry.outputs["tensor"]] = loaded[entry.outputs["tensor"]]
            continue
        qweight, scales = (loaded[entry.outputs[role]] for role in fmt.roles[:2])
        if entry.bits is None or entry.group_size is None:
            raise CheckpointError(f"{root}: manifest entry {name} lacks bits or group_size")
        if fmt is not formats.MARLIN:
            qweight, scales = to_marlin(fmt, qweight, scales, entry, f"{root}: {name}")
            qweight, scales = qweight.to(dev), scales.to(dev)
        else:  # already stored (padded) as the kernels read it; 3-D expert tensors get no other check
            check_stored(fmt, qweight, scales, entry, f"{root}: {name}")
        if len(entry.shape) != 2:
            tensors[entry.outputs["qweight"]] = qweight
            tensors[entry.outputs["scales"]] = scales
            skipped.append(f"{name}: {len(entry.shape)}-D (expert) weight kept as raw qweight/scales")
            continue
        n, k = entry.shape
        try:
            linears[names.module_name(name)] = QuantLinear(MarlinWeight(qweight, scales, entry.bits, n, k, entry.group_size))
        except RtnqError as e:
            raise CheckpointError(f"{root}: {name} does not match its manifest entry: {e}") from None

    for module, layer in linears.items():
        bias = tensors.get(f"{module}.bias")
        if bias is not None:
            if tuple(bias.shape) != (layer.out_features,):
                raise CheckpointError(
                    f"{root}: {module}.bias has shape {tuple(bias.shape)}, expected ({layer.out_features},)"
                )
            layer.bias = bias
    return LoadedCheckpoint(linears=linears, tensors=tensors, manifest=man, path=root, skipped=skipped)


def check_stored(fmt, packed: torch.Tensor, scales: torch.Tensor, entry, where: str) -> None:
    """CheckpointError unless the packed codes (int32) and scales have the shapes `fmt` stores for the
    manifest entry's logical shape (for marlin: the padded one)."""
    stored = fmt.stored_shape(tuple(entry.shape))
    if entry.padded_shape is not None and tuple(entry.padded_shape) != stored:
        raise CheckpointError(
            f"{where} does not match its manifest entry: padded_shape {list(entry.padded_shape)} is not the stored "
            f"shape {stored} of {tuple(entry.shape)}"
        )
    planned = fmt.entries("", tuple(entry.shape), entry.bits, entry.group_size, str(scales.dtype))
    for role, tensor, (_, _, want) in zip(fmt.roles[:2], (packed, scales), planned[:2]):
        bad_dtype = role == fmt.roles[0] and tensor.dtype != torch.int32
        if tuple(tensor.shape) != tuple(want) or bad_dtype:
            dtype = "int32 " if role == fmt.roles[0] else ""
            raise CheckpointError(
                f"{where} does not match its manifest entry: {role} must be {dtype}{tuple(want)} for shape "
                f"{tuple(entry.shape)}, {entry.bits}-bit, group_size {entry.group_size}; "
                f"got {tensor.dtype} {tuple(tensor.shape)}"
            )


def to_marlin(fmt, packed: torch.Tensor, scales: torch.Tensor, entry, where: str):
    """A GPTQ / compressed-tensors module's packed codes and plain scales (logical shape) -> Marlin qweight
    and scales, padded like the marlin format stores them (a MarlinWeight with the entry's logical n, k)."""
    n, k = entry.shape
    planned = fmt.entries("", (n, k), entry.bits, entry.group_size, scales.dtype)
    want = tuple(shape for _, _, shape in planned[:2])
    if (tuple(packed.shape), tuple(scales.shape)) != want or packed.dtype != torch.int32:
        raise CheckpointError(f"{where}: {fmt.name} tensors {tuple(packed.shape)}, {tuple(scales.shape)} do not fit "
                              f"its manifest entry ({n}, {k}), {entry.bits}-bit")
    codes, scales_ng = fmt.unpack(packed, scales, entry.bits, n, k)
    return marlin.pack(*marlin.pad(codes, scales_ng, entry.bits, entry.group_size), entry.bits)
