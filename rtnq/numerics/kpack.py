"""Codes packed along k: the weight layouts of the GPTQ and compressed-tensors exports (pure torch).

Shared FORMATS.md sections 5, 6.1 and 6.3. Both formats store the unsigned RTN codes (q + 2^(bits-1),
the same codes as the Marlin layout) LSB-first in int32 words, 32/bits consecutive k-values per word:

* compressed-tensors `weight_packed`: (n, k*bits/32), row-major over W[n, k]; word w of row r holds
  W-codes [r, w*pf + s] in bits [bits*s, bits*s + bits), pf = 32/bits.
* GPTQ `qweight`: (k/pf, n), the transpose of that: word (w, c) holds codes [c, w*pf + s].

Scales are stored plain (not permuted): GPTQ `scales` (k/g, n), compressed-tensors `weight_scale`
(n, k/g). GPTQ's `qzeros` for symmetric weights are constants, written in the "v1" convention
(zero - 1 per field, FORMATS.md 6.1), and `g_idx[i] = i // g`.
"""

from __future__ import annotations

import torch

from rtnq.errors import ShapeError
from rtnq.numerics.rtn import bias
from rtnq.params import BITS


def per_word(bits: int) -> int:
    """Codes per int32 word: 8 for 4-bit, 4 for 8-bit."""
    if bits not in BITS:
        raise ShapeError(f"bits must be 4 or 8, got {bits}")
    return 32 // bits


def pack_rows(codes_nk: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (n, k) -> int32 (n, k*bits/32), each row packed along k (compressed-tensors)."""
    pf = per_word(bits)
    n, k = codes_nk.shape
    if k % pf:
        raise ShapeError(f"k={k} is not a multiple of {pf} ({bits}-bit codes per int32 word)")
    fields = codes_nk.to(torch.int64).reshape(n, k // pf, pf)
    shifts = torch.arange(pf, dtype=torch.int64) * bits
    words = (fields << shifts).sum(-1)  # < 2^32: the fields do not overlap
    return (words - ((words >> 31) << 32)).to(torch.int32)  # reinterpret as signed


def unpack_rows(words_nw: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (n, k*bits/32) -> uint8 codes (n, k); the inverse of pack_rows.

    Works on the words' little-endian bytes (rtnq.numerics.marlin refuses big-endian machines): an 8-bit
    code is a byte, a 4-bit byte holds code 2i in its low and 2i+1 in its high nibble.
    """
    per_word(bits)
    n = words_nw.shape[0]
    raw = words_nw.contiguous().view(torch.uint8).reshape(n, -1)
    if bits == 8:
        return raw.clone()
    return torch.stack((raw & 0xF, raw >> 4), dim=-1).reshape(n, -1)


def pack_cols(codes_nk: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (n, k) -> GPTQ qweight int32 (k/pf, n): packed along k, one column per output."""
    return pack_rows(codes_nk, bits).t().contiguous()


def unpack_cols(qweight_wn: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight int32 (k/pf, n) -> uint8 codes (n, k)."""
    return unpack_rows(qweight_wn.t(), bits)


def qzeros(bits: int, groups: int, n: int) -> torch.Tensor:
    """GPTQ v1 zero points of a symmetric weight: every field is bias - 1 (7 or 127), (groups, n/pf)."""
    pf = per_word(bits)
    if n % pf:
        raise ShapeError(f"n={n} is not a multiple of {pf} ({bits}-bit zeros per int32 word)")
    field = bias(bits) - 1
    word = sum(field << (bits * s) for s in range(pf))  # 0x77777777 / 0x7F7F7F7F, both < 2^31
    return torch.full((groups, n // pf), word, dtype=torch.int32)


def g_idx(k: int, group: int) -> torch.Tensor:
    """GPTQ g_idx: the scale row of each input index, i // g (group = k for one group per row)."""
    return torch.div(torch.arange(k, dtype=torch.int32), group, rounding_mode="floor")
