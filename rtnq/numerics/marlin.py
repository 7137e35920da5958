"""Pack and unpack RTN codes and scales to and from the Marlin layout (4 and 8 bit, 16-bit activations).

Pure torch on the CPU; no CUDA import. The layout (shared FORMATS.md sections 3-4, docs/FORMAT.md):

* Weights are defined on B = W^T, shape (k, n). B is cut into 16-row slabs; within a slab each
  16 x 64 block is stored as 1024 consecutive entries in an order chosen so that one GPU lane's
  m16n8k16 B fragments (k rows 2t, 2t+1, 2t+8, 2t+9 of column c, for two n8 halves) are adjacent,
  then interleaved so the kernel's bit tricks produce ordered half2 pairs, then packed LSB-first
  into int32: 8 nibbles (4-bit) or 4 bytes (8-bit) per word. Result: (k/16, 2n) or (k/16, 4n) int32.
* Scales (k/g, n) in the activation dtype are permuted in chunks of 64 (an 8 x 8 transpose, grouped)
  or 32 (channelwise, i.e. a single scale row). A layer with k == g has one scale row and therefore
  uses the channelwise table, which is what the kernels infer from scales.size(0) == 1.

Both functions accept a leading expert axis (MoE): the layout is applied per expert and stacked.

Shapes the kernels cannot tile (n % 64, k % 128) are stored padded (`pad`, `crop`; shape_rule.padded):
the extra rows and columns hold the bias code (zero) and the extra scale groups 0, exactly what
quantizing the zero-padded weight gives, so `pad` + `pack` equals the converter's padded quantization.
"""

from __future__ import annotations

import functools
import sys

import torch

from rtnq.errors import ShapeError
from rtnq.numerics.shape_rule import MIN_K, MIN_N, check_shape, padded  # noqa: F401  (re-exported: marlin.check_shape)
from rtnq.params import BITS

TILE = 16  # rows per slab and the edge of one tensor-core tile
BLOCK_N = 64  # columns per permuted block: 4 tiles of 16 x 16

if sys.byteorder != "little":  # the packed words are built from little-endian bytes
    raise ImportError("rtnq.numerics.marlin needs a little-endian machine")


def _base_perm() -> torch.Tensor:
    """The 1024-entry fragment order before interleaving (FORMATS.md 3.2 step 3).

    Lane L = 0..31 of a warp, tile j = 0..3, slot e = 0..7: t = L % 4, c = L // 4; slot e reads row
    (2t, 2t+1, 2t+8, 2t+9)[e % 4] and column c + 8 * (e // 4) of tile j. Position 32L + 8j + e.
    """
    lane = torch.arange(32).view(32, 1, 1)
    tile = torch.arange(4).view(1, 4, 1)
    slot = torch.arange(8).view(1, 1, 8)
    t, c = lane % 4, lane // 4
    row_choice = torch.tensor([0, 1, 8, 9])[slot % 4]
    row = 2 * t + row_choice
    col = c + 8 * (slot // 4)
    return (256 * tile + 16 * row + col).reshape(1024)


@functools.cache
def weight_perm(bits: int) -> torch.Tensor:
    """out[i] = tiled_block[perm[i]] for each 1024-entry block, including the bits-specific interleave.

    The interleave lets the kernel's dequantizer emit (row 2t, row 2t+1) pairs from one mask: 4-bit
    reorders each group of 8 as (0, 2, 4, 6, 1, 3, 5, 7), 8-bit each group of 4 as (0, 2, 1, 3).
    """
    if bits not in BITS:
        raise ShapeError(f"bits must be 4 or 8, got {bits}")
    order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7] if bits == 4 else [0, 2, 1, 3])
    return _base_perm().view(-1, len(order))[:, order].reshape(1024)


@functools.cache
def _block_gather(bits: int) -> torch.Tensor:
    """Composite index into a row-major (16, 64) block: tiling plus the fragment permutation.

    Tiled index 256j + 16r + c (tile j, row r, column c) is row-major index 64r + 16j + c.
    """
    tiled = weight_perm(bits)
    j, r, c = tiled // 256, (tiled % 256) // 16, tiled % 16
    return 64 * r + 16 * j + c


@functools.cache
def scale_perm(single: bool) -> torch.Tensor:
    """Scale permutation: grouped = 8 x 8 transpose of each 64-chunk; single = the 32-entry table."""
    if single:
        i = torch.arange(4).view(4, 1)
        off = torch.tensor([0, 1, 8, 9, 16, 17, 24, 25]).view(1, 8)
        return (2 * i + off).reshape(32)
    i = torch.arange(8).view(8, 1)
    j = torch.arange(8).view(1, 8)
    return (8 * j + i).reshape(64)


def _check(n: int, k: int, groups: int, bits: int, what: str) -> None:
    if bits not in BITS:
        raise ShapeError(f"{what}: bits must be 4 or 8, got {bits}")
    if n % MIN_N or k % MIN_K:
        raise ShapeError(
            f"{what}: Marlin needs n % {MIN_N} == 0 and k % {MIN_K} == 0, got n={n}, k={k}"
        )
    if groups < 1 or k % groups:
        raise ShapeError(f"{what}: {groups} scale groups do not divide k={k}")


def pad(codes: torch.Tensor, scales_ng: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (..., n, k) and plain scales (..., n, G) -> the (..., n', k') codes and (..., n', G') scales
    of the padded shape (n', k') = shape_rule.padded(n, k), ready for `pack`; unchanged when no padding is needed.

    Padding codes are the bias (code of 0.0), padding scales 0 (rtn.quantize's rule for an all-zero
    group): the same numbers as quantizing the zero-padded weight. Channelwise (-1) keeps one group.
    """
    from rtnq.numerics.rtn import bias

    *lead, n, k = codes.shape
    n_p, k_p = padded(n, k)
    groups = 1 if group_size == -1 else k // group_size
    if group_size != -1 and k % group_size or tuple(scales_ng.shape) != (*lead, n, groups):
        raise ShapeError(f"marlin.pad: codes {tuple(codes.shape)} and scales {tuple(scales_ng.shape)} do not fit "
                         f"group size {group_size}")
    if (n_p, k_p) == (n, k):
        return codes, scales_ng
    groups_p = 1 if group_size == -1 else k_p // group_size
    codes_p = torch.full((*lead, n_p, k_p), bias(bits), dtype=codes.dtype, device=codes.device)
    codes_p[..., :n, :k] = codes
    scales_p = torch.zeros((*lead, n_p, groups_p), dtype=scales_ng.dtype, device=scales_ng.device)
    scales_p[..., :n, :groups] = scales_ng
    return codes_p, scales_p


def crop(codes_p: torch.Tensor, scales_p: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pad`: the logical (..., n, k) codes and (..., n, G) scales of padded ones.

    One padded group means channelwise (a padded k is >= 128, so any other group size leaves >= 2)."""
    k_p, groups_p = codes_p.shape[-1], scales_p.shape[-1]
    groups = 1 if groups_p == 1 else k // (k_p // groups_p)
    return codes_p[..., :n, :k].contiguous(), scales_p[..., :n, :groups].contiguous()


def pack(codes_nk: torch.Tensor, scales_ng: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales as `rtn.quantize` returns them -> Marlin qweight and scales.

    codes_nk: uint8 (n, k) or (E, n, k), biased codes.  scales_ng: (n, k/g) or (E, n, k/g), 16-bit.
    Returns qweight int32 (k/16, 2n) for 4-bit or (k/16, 4n) for 8-bit (leading E kept) and
    scales (k/g, n) Marlin-permuted, in scales_ng.dtype.
    """
    if codes_nk.dim() == 3:
        parts = [pack(c, s, bits) for c, s in zip(codes_nk, scales_ng)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    if codes_nk.dim() != 2 or scales_ng.dim() != 2 or scales_ng.shape[0] != codes_nk.shape[0]:
        raise ShapeError(
            f"marlin.pack: expected codes (n, k) and scales (n, groups), got {tuple(codes_nk.shape)} "
            f"and {tuple(scales_ng.shape)}"
        )
    n, k = codes_nk.shape
    _check(n, k, scales_ng.shape[1], bits, "marlin.pack")
    if bits == 4 and int(codes_nk.max()) > 15:
        raise ShapeError("marlin.pack: 4-bit codes must be in 0..15")

    # B = W^T as (k/16 slabs, 16 rows, n/64 blocks, 64 cols) -> one row-major 16x64 block per (slab, block).
    blocks = codes_nk.t().reshape(k // TILE, TILE, n // BLOCK_N, BLOCK_N).permute(0, 2, 1, 3)
    blocks = blocks.reshape(k // TILE, n // BLOCK_N, TILE * BLOCK_N)
    entries = blocks[:, :, _block_gather(bits)].reshape(k // TILE, -1)
    if bits == 4:
        # Entry 2b in the low nibble of byte b, entry 2b+1 in the high nibble: LSB-first words.
        pairs = entries.view(k // TILE, -1, 2)
        entries = pairs[..., 0] | (pairs[..., 1] << 4)
    qweight = entries.contiguous().view(torch.int32)
    return qweight, permute_scales(scales_ng.t())


def permute_scales(scales_gn: torch.Tensor) -> torch.Tensor:
    """(groups, n) plain scales -> the Marlin order (same shape and dtype)."""
    groups, n = scales_gn.shape
    perm = scale_perm(groups == 1)
    return scales_gn.reshape(-1, len(perm))[:, perm].reshape(groups, n).contiguous()


def unpermute_scales(scales_gn: torch.Tensor) -> torch.Tensor:
    """Inverse of `permute_scales`."""
    groups, n = scales_gn.shape
    perm = scale_perm(groups == 1)
    out = torch.empty_like(scales_gn).reshape(-1, len(perm))
    out[:, perm] = scales_gn.reshape(-1, len(perm))
    return out.reshape(groups, n)


def unpack(
    qweight: torch.Tensor, scales: torch.Tensor, bits: int, n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Marlin qweight and scales -> codes uint8 (n, k) and scales (n, k/g), the inputs of `pack`.

    qweight: int32 (k/16, 2n) or (k/16, 4n), optionally with a leading expert axis; scales (k/g, n).
    """
    if qweight.dim() == 3:
        parts = [unpack(q, s, bits, n, k) for q, s in zip(qweight, scales)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    if bits not in BITS:
        raise ShapeError(f"marlin.unpack: bits must be 4 or 8, got {bits}")
    words_per_row = n * TILE * bits // 32
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != (k // TILE, words_per_row):
        raise ShapeError(
            f"marlin.unpack: qweight must be int32 ({k // TILE}, {words_per_row}) for n={n}, k={k}, "
            f"{bits}-bit, got {qweight.dtype} {tuple(qweight.shape)}"
        )
    if scales.dim() != 2 or scales.shape[1] != n:
        raise ShapeError(f"marlin.unpack: scales must be (groups, {n}), got {tuple(scales.shape)}")
    _check(n, k, scales.shape[0], bits, "marlin.unpack")

    raw = qweight.contiguous().view(torch.uint8).reshape(k // TILE, -1)
    if bits == 4:
        raw = torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(k // TILE, -1)
    entries = raw.reshape(k // TILE, n // BLOCK_N, TILE * BLOCK_N)
    blocks = torch.empty_like(entries)
    blocks[:, :, _block_gather(bits)] = entries
    b_kn = blocks.reshape(k // TILE, n // BLOCK_N, TILE, BLOCK_N).permute(0, 2, 1, 3).reshape(k, n)
    return b_kn.t().contiguous(), unpermute_scales(scales).t().contiguous()
