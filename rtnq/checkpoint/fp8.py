"""FP8 sources: which tensors are FP8 weights with a scale, and their dense values, a few rows at a time.

Two checkpoint families store linear weights as float8_e4m3fn (safetensors F8_E4M3) with float scales
beside them; the dense weight is the FP8 value times its scale, computed in float32 and rounded once to
the 16-bit dtype rtnq quantizes in (bf16, or --dtype):

    block-scaled   quantization_config {"quant_method": "fp8", "weight_block_size": [bn, bk]}
                   (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8): P.weight (n, k) and P.weight_scale_inv float32
                   (ceil(n/bn), ceil(k/bk)); w[i, j] = weight[i, j] * weight_scale_inv[i // bn, j // bk],
                   the last block of a row or column cut short where bn or bk does not divide n or k.
                   "inv" because it is what the quantizer divided by, so dequantizing multiplies by it.
                   Without weight_block_size (AutoFP8 / vLLM per-tensor FP8) P.weight_scale is one value.
    compressed-    {"quant_method": "compressed-tensors"} whose config_groups quantize weights as
    tensors        {"num_bits": 8, "type": "float"} (format "float-quantized"; the library's
                   FloatQuantizationCompressor): P.weight (n, k) and P.weight_scale per tensor ([], [1]),
                   per channel (n, 1), per group (n, k/g) or per block (ceil(n/bn), ceil(k/bk)); the
                   library dequantizes as weight.to(scale.dtype) * scale, which equals the float32 product
                   rounded once for the bf16 scales it writes. P.input_scale (a static activation scale) is
                   dropped: rtnq's outputs quantize weights only.

Every scheme is one rule here: a scale tensor of (ceil(n/bn), ceil(k/bk)) blocks, per tensor being one
(n, k) block and per channel (1, k) blocks. The modules such checkpoints leave unquantized (embeddings,
norms, lm_head, MoE routers: `modules_to_not_convert` / `ignore`) are simply stored in 16-bit, so the
tensors' dtypes, not those lists, say which weights are FP8.

Consumed tensors (the scales, input scales, and KV-cache scales `k_scale`/`v_scale`, which would make an
engine expect an FP8 KV cache that rtnq's config does not declare) are read or dropped, never written.
`detect` says which they are, from config.json and the headers only. Two implementations of the one
dequantization rule give the same bytes (tests/test_fp8.py): `dense_rows` (numpy, what convert runs on
its reader thread, `DenseFetch`, so that conversion needs no torch) and `dequantize_rows` (torch, the
reference, which verify and eval share through `read_dense`). Torch is imported by the torch functions only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rtnq import dtypes
from rtnq.checkpoint import layout
from rtnq.checkpoint.source import Reader, TensorSpec
from rtnq.errors import CheckpointError, InvalidWeightError
from rtnq.numerics import halfcast

if TYPE_CHECKING:
    import torch

WEIGHT_DTYPE = "F8_E4M3"  # the only FP8 weight dtype both families write (compressed-tensors: FP8_E4M3_DATA)
SCALE_DTYPES = ("F32", "BF16", "F16")
ACTIVATION_SCALES = (".input_scale", ".output_scale", ".k_scale", ".v_scale", ".kv_scale")  # dropped
_STEP_ELEMS = 1 << 20  # weights dequantized per step: bounds the float32 temporary to 4 MiB


@dataclass(frozen=True)
class Fp8Weight:
    """One FP8 weight and the scale tensor that dequantizes it."""

    weight: TensorSpec  # F8_E4M3, (n, k) or (E, n, k)
    scale: TensorSpec  # read whole (small: one value per block)
    block: tuple[int, int]  # (bn, bk): the rows and columns one scale value covers
    grid: tuple[int, ...]  # the scale's shape as used: (..., ceil(n/bn), ceil(k/bk))


@dataclass(frozen=True)
class Fp8Source:
    """What `detect` found: the scheme in words, every FP8 weight, and the source tensors not written."""

    scheme: str  # "block-scaled (128x128)", "per-tensor", "per-channel", ... (several: joined with "/")
    method: str  # the quantization_config's quant_method: "fp8" or "compressed-tensors"
    weights: dict[str, Fp8Weight]  # weight name -> its FP8 facts
    consumed: frozenset[str] = field(default_factory=frozenset)  # scales and activation scales: not written

    def describe(self, dense: str) -> str:
        """The line convert prints (--dry-run too): where the dense weights come from."""
        if not self.weights:  # e.g. DeepSeek's fp8_cast_bf16.py output, which keeps the FP8 config.json
            return (f"config.json declares an FP8 quantization ({self.method}) but no weight is stored as "
                    f"{WEIGHT_DTYPE}: converted as the 16-bit checkpoint it holds")
        return (f"source: FP8 {self.scheme}, dequantized to {dense} on the fly ({len(self.weights)} weights, "
                f"quant_method {self.method}); its {len(self.consumed)} scale tensors are read or dropped, not written")


def _qconfig(config: dict | None) -> dict | None:
    q = (config or {}).get("quantization_config")
    return q if isinstance(q, dict) else None


def _blocks_of(q: dict) -> tuple[str, list[tuple[str, tuple[int, int] | None]]] | None:
    """(scale-name suffix, [(scheme, block or None for per-tensor/per-channel)]) the config allows, or
    None when the config is not an FP8 one rtnq reads (refusals.check_source then refuses it as today)."""
    method = q.get("quant_method")
    if method == "fp8":
        wbs = q.get("weight_block_size")
        if wbs is None:  # per-tensor FP8 (AutoFP8, vLLM's fp8 export): one weight_scale per weight
            return "weight_scale", [("per-tensor", None)]
        if not (isinstance(wbs, list) and len(wbs) == 2 and all(type(b) is int and b > 0 for b in wbs)):
            raise CheckpointError(f"config.json: quantization_config weight_block_size {wbs!r} is not two positive "
                                  "integers [rows, columns]")
        return "weight_scale_inv", [(f"block-scaled ({wbs[0]}x{wbs[1]})", (wbs[0], wbs[1]))]
    if method != "compressed-tensors":
        return None
    # Only dense FP8 weights: sparsity (2:4 bitmasks) and transforms (rotations folded into the weights,
    # undone at run time) change what the stored values mean, so those stay refused.
    if q.get("format") not in ("float-quantized", "naive-quantized", None) or q.get("sparsity_config") \
            or q.get("transform_config"):
        return None
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None
    schemes = []
    for g in groups.values():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict) or w.get("type") != "float" or w.get("num_bits") != 8 \
                or w.get("symmetric", True) is not True or w.get("dynamic", False) is not False:
            return None
        strategy = w.get("strategy")
        if strategy in ("tensor", "channel"):
            schemes.append((f"per-{strategy}", None))
        elif strategy == "group" and type(w.get("group_size")) is int and w["group_size"] > 0:
            schemes.append((f"per-group ({w['group_size']})", (1, w["group_size"])))
        elif strategy == "block" and isinstance(w.get("block_structure"), list) and len(w["block_structure"]) == 2 \
                and all(type(b) is int and b > 0 for b in w["block_structure"]):
            bn, bk = w["block_structure"]
            schemes.append((f"block-scaled ({bn}x{bk})", (bn, bk)))
        else:
            return None
    return "weight_scale", list(dict.fromkeys(schemes))


def _fit(w: TensorSpec, s: TensorSpec, schemes) -> tuple[str, tuple[int, int], tuple[int, ...]] | None:
    """(scheme, block, grid) the scale's shape matches for this weight, or None."""
    *lead, n, k = w.shape
    shape = tuple(s.shape)
    for scheme, block in schemes:
        if block is not None:
            grid = (*lead, -(-n // block[0]), -(-k // block[1]))
            if shape == grid:
                return scheme, block, grid
        elif scheme == "per-channel" and not lead and shape in ((n, 1), (n,)):
            return scheme, (1, k), (n, 1)
    if not lead and math.prod(shape) == 1 and len(shape) <= 2:
        # one value: the whole weight is one block (compressed-tensors stores [1], older exports [])
        return "per-tensor", (n, k), (1, 1)
    return None


def detect(config: dict | None, specs: list[TensorSpec]) -> Fp8Source | None:
    """The source's FP8 facts from config.json and the headers, or None when it is no FP8 source rtnq reads.

    CheckpointError (exit 4, one line) when the config is FP8 but the tensors do not fit it: an FP8 weight
    without its scale, a scale of the wrong shape or dtype, a scale without an FP8 weight, another FP8 tensor.
    """
    q = _qconfig(config)
    allowed = _blocks_of(q) if q is not None else None
    if allowed is None:
        return None
    suffix, schemes = allowed
    by_name = {s.name: s for s in specs}
    weights: dict[str, Fp8Weight] = {}
    used: list[str] = []
    consumed: set[str] = set()
    for s in specs:
        if s.dtype != WEIGHT_DTYPE:
            if s.dtype.startswith("F8"):
                raise CheckpointError(f"{s.name} is {s.dtype}; rtnq reads FP8 weights stored as {WEIGHT_DTYPE} only")
            continue
        prefix = s.name.removesuffix(".weight")
        scale = by_name.get(f"{prefix}.{suffix}")
        if not s.name.endswith(".weight") or len(s.shape) not in (2, 3) or 0 in s.shape:
            raise CheckpointError(f"{s.name} is {s.dtype} {list(s.shape)} but not a non-empty 2-D or 3-D weight; "
                                  "rtnq reads FP8 linear weights only")
        if scale is None:
            raise CheckpointError(f"{s.name} is {s.dtype} but its scale {prefix}.{suffix} is missing; the checkpoint "
                                  "is incomplete (copy the shard that holds it)")
        if scale.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{scale.name} is {scale.dtype}; FP8 scales must be F32, BF16 or F16")
        fit = _fit(s, scale, schemes)
        if fit is None:
            raise CheckpointError(f"{scale.name} has shape {list(scale.shape)}, which matches no scale layout of "
                                  f"the config ({', '.join(x for x, _ in schemes)}) for {s.name} {list(s.shape)}")
        scheme, block, grid = fit
        weights[s.name] = Fp8Weight(s, scale, block, grid)
        used.append(scheme)
        consumed.add(scale.name)
    for s in specs:
        if s.name.endswith(ACTIVATION_SCALES):
            consumed.add(s.name)
        elif s.name.endswith(f".{suffix}") and s.name not in consumed:
            raise CheckpointError(f"{s.name} is a weight scale but {s.name.removesuffix('.' + suffix)}.weight is "
                                  f"not an {WEIGHT_DTYPE} weight; the checkpoint does not match its config.json")
    scheme = "/".join(dict.fromkeys(used)) or schemes[0][0]
    return Fp8Source(scheme, str(q["quant_method"]), weights, frozenset(consumed))


def for_source(src_dir: Path, specs: list[TensorSpec]) -> Fp8Source | None:
    """`detect` with the source's config.json read (verify and eval start from a directory and its scan)."""
    path = src_dir / layout.CONFIG_NAME
    return detect(layout.read_json_object(path) if path.is_file() else None, specs)


def dense_dtype(option: str | None) -> dtypes.DType:
    """The 16-bit dtype FP8 weights are dequantized to: --dtype, else bf16 (what both families' own
    dequantizers produce)."""
    return dtypes.quantized_in(WEIGHT_DTYPE, option)


def _scale_grid(w: Fp8Weight, scale: torch.Tensor, expert: int) -> torch.Tensor:
    """The (ceil(n/bn), ceil(k/bk)) float32 scales of one expert (or of the whole 2-D weight)."""
    import torch

    grid = scale.to(torch.float32).reshape(-1, *w.grid[-2:])
    return grid[expert]


@functools.cache
def _lut() -> torch.Tensor:
    """float32 value of each of the 256 FP8 codes, by torch's own conversion: gathering from it gives the
    same values as w8.to(float32), 3-5x faster on CPU than that conversion (measured with torch 2.13)."""
    import torch

    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def to_float32(w8: torch.Tensor) -> torch.Tensor:
    """An FP8 (or its raw bytes) tensor as float32, exactly."""
    import torch

    codes = w8.contiguous().view(torch.uint8)
    return torch.index_select(_lut(), 0, codes.reshape(-1).to(torch.int32)).view(codes.shape)


def dequantize_rows(w8: torch.Tensor, scales: torch.Tensor, row0: int, block: tuple[int, int],
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [row0, row0 + R) of one (n, k) FP8 weight, dense: float32(w8) * scale of its block, rounded once
    to `dtype`.

    w8: (R, k) float8_e4m3fn (or its raw bytes); scales: (ceil(n/bn), ceil(k/bk)) float32 of that weight (one
    expert); block: (bn, bk). Any row0 and R: a chunk may start and end inside a block.
    """
    import torch

    rows, k = w8.shape
    bn, bk = block
    full = k // bk  # whole column blocks; a cut-short last one, if any, is handled after them
    if out is None:
        out = torch.empty((rows, k), dtype=dtype)
    step = max(1, _STEP_ELEMS // max(k, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        s = scales[torch.arange(row0 + a, row0 + b) // bn]  # (r, ceil(k/bk)): each row's block scales
        w = to_float32(w8[a:b])
        if full:
            w[:, : full * bk].view(b - a, full, bk).mul_(s[:, :full, None])
        if full * bk < k:
            w[:, full * bk :].mul_(s[:, full : full + 1])
        out[a:b] = w  # the one rounding to the 16-bit dtype (round to nearest even, as .to() does)
    return out


@functools.cache
def lut() -> np.ndarray:
    """float32 value of each of the 256 float8_e4m3fn codes, from the format: sign, 4 exponent bits (bias 7),
    3 mantissa bits, subnormals at exponent 0, no infinities, NaN at S.1111.111. The NaNs carry the
    payload torch's conversion gives them (the code's bits shifted into a float32: 0x7FF00000, signed), which
    a cast to fp16 keeps; tests check the whole table against torch's (`_lut`), bit for bit."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 7
    mag = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    values = (sign * mag).astype(np.float32)
    nan = (codes & 0x7F) == 0x7F
    values.view(np.uint32)[nan] = np.where(codes[nan] & 0x80, 0xFFF00000, 0x7FF00000)
    return values


def dense_rows(w8: np.ndarray, scales: np.ndarray, row0: int, block: tuple[int, int], dtype: str) -> np.ndarray:
    """`dequantize_rows` in numpy: rows [row0, row0 + R) of one (n, k) FP8 weight as the storage of the
    16-bit `dtype` ("BF16" as uint16 bit patterns, or "F16"). w8: (R, k) uint8 codes; scales:
    (ceil(n/bn), ceil(k/bk)) float32. Same products (float32, one rounding each) and the same one
    rounding to the 16-bit dtype, so the same bytes."""
    rows, k = w8.shape
    bn, bk = block
    full = k // bk
    out = np.empty((rows, k), dtype=dtypes.BY_ST[dtype].numpy)
    table = lut()
    step = max(1, _STEP_ELEMS // max(k, 1))
    for a in range(0, rows, step):
        b = min(rows, a + step)
        s = scales[np.arange(row0 + a, row0 + b) // bn]
        w = table[w8[a:b]]
        if full:  # assigned back: a reshape of the strided slice could be a copy
            w[:, : full * bk] = (w[:, : full * bk].reshape(b - a, full, bk) * s[:, :full, None]).reshape(b - a, -1)
        if full * bk < k:
            w[:, full * bk :] *= s[:, full : full + 1]
        out[a:b] = halfcast.cast(w, "F32", dtype)
    return out


def _scale_grid_np(w: Fp8Weight, raw: np.ndarray, expert: int) -> np.ndarray:
    st = w.scale.dtype
    grid = halfcast.to_float32(raw.view(dtypes.BY_ST[st].numpy), st).reshape(-1, *w.grid[-2:])
    return grid[expert]


class DenseFetch:
    """The converter's reader-thread fetch for FP8 weights: maps a run of whole rows of one expert, reads
    that weight's scale tensor once (held until the next FP8 weight: one scale tensor at a time, never the
    model's), and returns the rows dense in `dtype` ("BF16"/"F16") as bytes, so the quantizer and the
    writer see what a 16-bit source would have given them. Dequantizing here overlaps it with the quantizer
    on the main thread. numpy (`dense_rows`): conversion imports no torch."""

    def __init__(self, reader: Reader, dtype: str):
        self.reader = reader
        self.dtype = dtype
        self._held: tuple[str, np.ndarray] | None = None  # (weight name, its scales): one weight at a time

    def __call__(self, w: Fp8Weight, start: int, nbytes: int) -> np.ndarray:
        n, k = w.weight.shape[-2:]
        first, rows = start // k, nbytes // k
        expert, row0 = divmod(first, n)
        if start % k or nbytes % k or row0 + rows > n:
            raise ValueError(f"{w.weight.name}: bytes [{start}, {start + nbytes}) are not whole rows of one expert")
        if self._held is None or self._held[0] != w.weight.name:
            self._held = None  # drop the previous weight's scales before reading the next
            self._held = (w.weight.name, self.reader.read_array(w.scale))
        raw = self.reader.map_array(w.weight, start, nbytes).reshape(rows, k)
        dense = dense_rows(raw, _scale_grid_np(w, self._held[1], expert), row0, w.block, self.dtype)
        if self.dtype == "F16" and not np.isfinite(dense).all() and not np.isnan(lut()[raw]).any():
            # fp16 tops out at 65504: say so, rather than let the quantizer report "NaN or Inf" in the source
            raise InvalidWeightError(f"{w.weight.name}: an FP8 value times its scale overflows float16, the dtype "
                                     "it is dequantized to; use --dtype bf16 or leave --dtype out")
        del raw  # unmapped here: only the dense rows stay in flight
        return dense.reshape(-1).view(np.uint8)


def read_dense(reader: Reader, w: Fp8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight, dense in `dtype`, with its shape (for verify and eval, which read whole tensors)."""
    import torch

    n, k = w.weight.shape[-2:]
    raw = reader.read_bytes(w.weight).reshape(-1, n, k)
    scale = reader.read(w.scale)
    out = torch.empty(raw.shape, dtype=dtype)
    for e in range(raw.shape[0]):
        dequantize_rows(raw[e], _scale_grid(w, scale, e), 0, w.block, dtype, out[e])
    return out.reshape(w.weight.shape)
