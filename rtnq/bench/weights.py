"""The weights `rtnq bench` times: per shape group, one MarlinWeight per quantized configuration plus the
codes, plain scales and dequantized weight the checks and the peers start from.

Synthetic runs quantize fixed-seed random weights with rtnq's own rtn.quantize + marlin.pack; checkpoint
runs read one representative module per configuration from a converted directory (exports repacked into
the Marlin layout as the runtime's loader does).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rtnq import formats
from rtnq.bench.device import Device
from rtnq.bench.shapes import QuantConfig, ShapeGroup
from rtnq.checkpoint.manifest import Manifest
from rtnq.errors import CheckpointError
from rtnq.numerics import marlin, rtn
from rtnq.runtime.loader import to_marlin
from rtnq.runtime.weight import MarlinWeight

CHECK_LIMIT = {"bf16": 8e-3, "fp16": 2e-3}  # ||out - ref|| / ||ref|| for a 16-bit output (GPU.md 4.2)


@dataclass
class ConfigWeights:
    """One quantized configuration of a shape: the packed weight, its codes and its dequantized weight."""

    config: QuantConfig
    weight: MarlinWeight  # contiguous, scales in the run dtype
    codes: torch.Tensor  # uint8 (n, k), biased (q + 2**(bits-1))
    scales_ng: torch.Tensor  # (n, k/g) plain, run dtype
    dense: torch.Tensor  # (n, k) run dtype: exactly what the kernels must compute with


@dataclass(frozen=True)
class Checkpoint:
    """A converted directory being benchmarked: where it is and its parsed manifest."""

    out_dir: Path
    manifest: Manifest

    def read(self, module: str, cfg: QuantConfig, n: int, k: int) -> MarlinWeight:
        """One module's packed weight, on the CPU, in the checkpoint's scale dtype."""
        from safetensors import safe_open

        entry = self.manifest.tensors[module]
        path = self.out_dir / entry.shard
        fmt = formats.BY_MANIFEST_NAME[self.manifest.format]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                packed, scales = (f.get_tensor(entry.outputs[role]) for role in fmt.roles[:2])
            if fmt is not formats.MARLIN:  # an export: repack like the loader (and vLLM) do
                packed, scales = to_marlin(fmt, packed, scales, entry, f"{path}: {module}")
        except (OSError, KeyError, RuntimeError) as e:  # safetensors raises SafetensorError (an Exception)
            raise CheckpointError(f"{path}: cannot read {module} ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read {module} ({type(e).__name__}: {e})") from None
        return MarlinWeight(packed, scales, cfg.bits, n, k, cfg.group_size)

    def dense_lm_head(self) -> tuple[int, int] | None:
        """(n, k) of an lm_head the checkpoint kept in 16-bit (a passthrough lm_head.weight), or None."""
        for name, e in self.manifest.tensors.items():
            if e.kind == "passthrough" and name.endswith("lm_head.weight") and len(e.shape) == 2:
                return tuple(e.shape)  # type: ignore[return-value]
        return None


def shape_salt(group: ShapeGroup) -> int:
    """The seed offset of a shape's random weight: fixed by (n, k), so reruns time the same values."""
    return (group.n * 1_000_003 + group.k) % 1_000_000_007


def build(dev: Device, group: ShapeGroup, checkpoint: Checkpoint | None) -> list[ConfigWeights]:
    """ConfigWeights for every configuration of `group`, on the run's device, in `group.configs` order."""
    n, k = group.n, group.k
    out = []
    if checkpoint is None:  # synthetic: fixed-seed random weights through rtnq's own quantize + pack
        w = dev.randn((n, k), shape_salt(group), std=0.02)
        for cfg in group.configs:
            codes, s_ng = dev.on_device_or_cpu(
                "rtn.quantize", lambda t: rtn.quantize(t, cfg.bits, cfg.group_size, dtype=dev.dtype), w)
            q, s = dev.on_device_or_cpu(  # padded to the kernels' tiles where the shape needs it
                "marlin.pack", lambda c, s: marlin.pack(*marlin.pad(c, s, cfg.bits, cfg.group_size), cfg.bits),
                codes, s_ng)
            out.append(_config_weights(dev, cfg, MarlinWeight(q, s, cfg.bits, n, k, cfg.group_size), codes, s_ng))
        del w
    else:
        for cfg in group.configs:
            mw = checkpoint.read(group.members[cfg][0], cfg, n, k).to(dev.type)
            codes, s_ng = dev.on_device_or_cpu(
                "marlin.unpack", lambda a, b: marlin.crop(*marlin.unpack(a, b, cfg.bits, mw.n_stored, mw.k_stored), n, k),
                mw.qweight, mw.scales)
            # --dtype may differ from the checkpoint's: the scales are cast for timing (app.run notes it)
            out.append(_config_weights(dev, cfg, mw.to(scale_dtype=dev.dtype), codes, s_ng.to(dev.dtype)))
    return out


def _config_weights(dev: Device, cfg: QuantConfig, w: MarlinWeight, codes: torch.Tensor,
                    s_ng: torch.Tensor) -> ConfigWeights:
    dense = rtn.dequantize(codes, s_ng, w.bits, w.group_size).to(dev.dtype)
    return ConfigWeights(cfg, w.replace(w.qweight.contiguous(), w.scales.contiguous()), codes, s_ng, dense)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (the absolute error when ref is all zeros)."""
    ref = ref.float()
    num = torch.linalg.vector_norm(out.float() - ref)
    den = torch.linalg.vector_norm(ref)
    return float(num / den) if float(den) else float(num)
