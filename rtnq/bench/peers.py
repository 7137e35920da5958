"""PyTorch's own quantized GEMMs as peers of rtnq's kernels, built from the same codes and scales.

  tinygemm  torch.ops.aten._weight_int4pack_mm (CUDA, bf16 activations) / ..._for_cpu: W4 with zero = 0,
            which is rtnq's symmetric numerics exactly (group sizes 32..256)
  int8pack  torch.ops.aten._weight_int8pack_mm: W8 with one scale per output channel (rtnq's groups are
            folded to their per-row maximum, so bytes and numerics differ from rtnq's grouped W8)

A peer this torch or this configuration cannot run is still reported, with the reason, never skipped
silently: `add_families` records why in `unavailable`, and `cases` turns that into an unavailable Case.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from rtnq.bench import report
from rtnq.bench.device import Device
from rtnq.bench.harness import INT8PACK, TINYGEMM, Case
from rtnq.bench.shapes import QuantConfig
from rtnq.bench.weights import CHECK_LIMIT, ConfigWeights

TINYGEMM_GROUPS = (32, 64, 128, 256)
Family = tuple[int, Callable[[], Any]]  # (bytes of one weight copy, make one copy)


def add_families(dev: Device, cw: ConfigWeights, fam: dict[str, Family], unavailable: dict[str, str]) -> None:
    """The peers' weight families of one configuration: W4 -> tinygemm, W8 -> int8pack. A peer that cannot
    be built gets a zero-byte family (so `cases` still lists it) and its reason in `unavailable`."""
    cfg = cw.config
    n, k = cw.weight.n, cw.weight.k
    if cfg.bits == 4:
        name = f"{TINYGEMM}:{cfg}"
        why = None
        if dev.cuda and dev.dtype_name != "bf16":
            why = "tinygemm (_weight_int4pack_mm) runs bf16 activations only"
        elif cfg.group_size not in TINYGEMM_GROUPS:
            why = f"tinygemm supports group sizes {TINYGEMM_GROUPS}, not {cfg.group_size}"
        if why is None:
            try:
                packed, sz = tinygemm_pack(dev, cw)
            except Exception as e:  # noqa: BLE001 - a missing or changed aten op is reported
                why = f"cannot build the int4 pack: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if why:
            unavailable[name] = why
            fam[name] = (0, lambda: None)
        else:
            fam[name] = (report.weight_bytes("tinygemm", n, k, 4, cfg.group_size),
                         lambda p=packed, z=sz: (p.clone(), z.clone()))
    if cfg.bits == 8:
        name = f"{INT8PACK}:{cfg}"
        try:
            w8 = (cw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
            s = cw.scales_ng.float().amax(dim=1).to(dev.dtype).contiguous()  # one scale per channel
            if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                raise AttributeError("torch.ops.aten._weight_int8pack_mm is not in this torch")
            fam[name] = (report.weight_bytes("int8_channel", n, k), lambda w=w8, s=s: (w.clone(), s.clone()))
        except Exception as e:  # noqa: BLE001
            unavailable[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            fam[name] = (0, lambda: None)


def tinygemm_pack(dev: Device, cw: ConfigWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """rtnq's W4 codes in PyTorch's int4 layout. tinygemm dequantizes (q - 8) * scale + zero with
    q = the biased 4-bit code, so zero = 0 reproduces rtnq's symmetric numerics exactly.
    scales_and_zeros: (k/g, n, 2) bf16 = [scale, 0]. Weight: CUDA takes (n, k/2) uint8 with the
    even-k code in the high nibble, then `_convert_weight_to_int4pack(w, inner_k_tiles=8)`; the CPU
    op takes the unpacked (n, k) int32 codes (`_convert_weight_to_int4pack_for_cpu`)."""
    s = cw.scales_ng.to(torch.bfloat16)  # (n, g)
    sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).contiguous()  # (g, n, 2)
    if dev.cuda:
        c = cw.codes
        u8 = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(cw.codes.to(torch.int32).contiguous(), 2)
    return packed, sz


def cases(dev: Device, cfg: QuantConfig, fam: dict[str, Family], unavailable: dict[str, str],
          copies: dict[str, list[Any]], xs: list[torch.Tensor], xs_bf16: list[torch.Tensor],
          ref: torch.Tensor | None, ref_out: Callable[[torch.Tensor], torch.Tensor] | None,
          ) -> Iterator[tuple[Case, torch.Tensor | None, str]]:
    """(case, reference output or None, family name) per peer of `cfg`, for the backend's trial call."""
    cx = len(xs)
    for peer, fmt in ((TINYGEMM, "tinygemm"), (INT8PACK, "int8_channel")):
        fam_name = f"{peer}:{cfg}"
        if fam_name not in fam:
            continue  # not a peer of this bit width
        why = unavailable.get(fam_name)
        if why:
            yield Case(peer, "peer", fmt, cfg, unavailable=why), None, fam_name
            continue
        cp = copies[fam_name]
        if peer == TINYGEMM:
            xb = xs_bf16
            g = cfg.group_size
            if dev.cuda:
                fn = lambda i, cp=cp, g=g: torch.ops.aten._weight_int4pack_mm(xb[i % cx], cp[i % len(cp)][0], g,  # noqa: E731
                                                                               cp[i % len(cp)][1])
            else:
                fn = lambda i, cp=cp, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: E731
                    xb[i % cx], cp[i % len(cp)][0], g, cp[i % len(cp)][1])
            op = "_weight_int4pack_mm" if dev.cuda else "_weight_int4pack_mm_for_cpu"
            yield (Case(TINYGEMM, "peer", fmt, cfg, fn=fn, check_limit=CHECK_LIMIT["bf16"],
                        note=f"torch.ops.aten.{op}, bf16, zero = 0"), ref, fam_name)
        else:
            w8, s8 = cp[0]
            ref8 = ref_out(w8.float() * s8.float()[:, None]) if ref_out is not None else None
            fn = lambda i, cp=cp: torch.ops.aten._weight_int8pack_mm(xs[i % cx], cp[i % len(cp)][0],  # noqa: E731
                                                                     cp[i % len(cp)][1])
            note = "per-channel scales" + ("" if cfg.group_size == -1 else
                                           " (rtnq uses groups: bytes and numerics differ)")
            yield Case(INT8PACK, "peer", fmt, cfg, fn=fn, note=note), ref8, fam_name
