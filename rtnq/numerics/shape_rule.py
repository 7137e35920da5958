"""The Marlin shape gate: which (n, k, group size) the kernels can hold. Torch-free, so the planner
(precision.py) and the packer (marlin.py) share one rule and one wording."""

from __future__ import annotations

MIN_N = 64  # Marlin kernels' smallest thread_n: n must be a multiple
MIN_K = 128  # Marlin kernels' smallest thread_k: k must be a multiple


def check_shape(n: int, k: int, group_size: int) -> str | None:
    """Why Marlin cannot hold an (n, k) weight with this group size (-1 = channelwise), or None."""
    if n % MIN_N:
        return f"n={n} (out_features) is not a multiple of {MIN_N}"
    if k % MIN_K:
        return f"k={k} (in_features) is not a multiple of {MIN_K}"
    if group_size != -1 and k % group_size:
        return f"k={k} is not a multiple of the group size {group_size}"
    return None
