"""Which (n, k) weights rtnq can quantize, and how: torch-free, so the planner (rtnq.selection), the
packers and the runtime share one rule and one wording.

Two rules live here:

* Marlin's kernel rule (`check_shape`): the kernels tile n by 64 and k by 128, and a group must not
  straddle a tile. A weight that misses it is stored *padded* (`padded`): zero codes (the bias, which
  dequantizes to 0) fill the extra rows and columns, so the padded part contributes nothing to x @ W^T.
* rtnq's storage rule (`problem`, `group_for`): the group size is chosen per tensor (the requested one,
  else the largest smaller one that divides k, so groups never straddle the end of a row, in every
  format alike) and the packed words need k (and, for GPTQ's qzeros, n) to be multiples of 8.
"""

from __future__ import annotations

MIN_N = 64  # Marlin kernels' smallest thread_n: n must be a multiple
MIN_K = 128  # Marlin kernels' smallest thread_k: k must be a multiple
GROUP_CHOICES = (128, 64, 32)  # the group sizes a tensor may fall back to, largest first
PACK = 8  # codes per int32 word at 4 bits: k (and GPTQ's n, its qzeros axis) must be a multiple


def check_shape(n: int, k: int, group_size: int) -> str | None:
    """Why the Marlin kernels cannot hold an (n, k) weight unpadded with this group size (-1 =
    channelwise), or None."""
    if n % MIN_N:
        return f"n={n} (out_features) is not a multiple of {MIN_N}"
    if k % MIN_K:
        return f"k={k} (in_features) is not a multiple of {MIN_K}"
    if group_size != -1 and k % group_size:
        return f"k={k} is not a multiple of the group size {group_size}"
    return None


def padded(n: int, k: int) -> tuple[int, int]:
    """The (n, k) an (n, k) weight is stored at in the Marlin layout: each rounded up to the kernels'
    tiles (64, 128). Every group size divides 128, so whole groups fit the padded k."""
    return -(-n // MIN_N) * MIN_N, -(-k // MIN_K) * MIN_K


def group_for(k: int, group_size: int) -> int | None:
    """The group size a weight with in_features k is quantized with: group_size if it divides k (-1,
    channelwise, always does), else the largest smaller choice that does; None when none does."""
    if group_size == -1:
        return -1
    return next((g for g in GROUP_CHOICES if g <= group_size and k % g == 0), None)


def problem(n: int, k: int, group_size: int, layout: str = "marlin") -> str | None:
    """Why rtnq cannot store an (n, k) weight in `layout` ("marlin", "rows" or "cols", the
    rtnq.numerics.fused layouts of the formats) with `group_size`, or None when it can."""
    if n < 1 or k < 1:
        return f"({n}, {k}) has no elements"
    if group_for(k, group_size) is None:
        sizes = [g for g in GROUP_CHOICES if g <= group_size]
        return f"k={k} (in_features) is not a multiple of any group size <= {group_size} ({', '.join(map(str, sizes))})"
    if k % PACK:
        return f"k={k} (in_features) is not a multiple of {PACK} (the codes are packed 8 to an int32 word along k)"
    if layout == "cols" and n % PACK:
        return f"n={n} (out_features) is not a multiple of {PACK} (GPTQ packs its qzeros along n)"
    return None
