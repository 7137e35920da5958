"""The quantization parameters a user can choose, checked in one place (torch-free).

The CLI, the planner, the quantizer and the runtime all call `check`, so the accepted values and the
wording of the error are the same wherever a bad value comes in.
"""

from __future__ import annotations

from rtnq import dtypes
from rtnq.errors import UsageError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per row ("channelwise")


def check(bits: int | None = None, group_size: int | None = None, dtype: str | None = None) -> None:
    """UsageError for a value outside the supported set; None arguments are not checked."""
    if bits is not None and (bits not in BITS or isinstance(bits, bool)):
        raise UsageError(f"--bits: bits must be 4 or 8, got {bits}")
    if group_size is not None and (group_size not in GROUP_SIZES or isinstance(group_size, bool)):
        raise UsageError(f"--group-size: group size must be one of 32, 64, 128 or -1 (channelwise), got {group_size}")
    if dtype is not None and dtype not in dtypes.SIXTEEN_BIT:
        raise UsageError(f"--dtype: dtype must be bf16 or fp16, got {dtype}")


def effective_group(k: int, group_size: int) -> int:
    """The group length along k: `group_size`, or k itself for channelwise (-1)."""
    return k if group_size == -1 else group_size
