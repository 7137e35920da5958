"""The quantization parameters a user can choose, checked in one place (torch-free).

The CLI's option callbacks, the planner, the quantizer and the runtime all ask `problem` (or `check`),
so the accepted values and the wording of the error are the same wherever a bad value comes in.
"""

from __future__ import annotations

from rtnq import dtypes
from rtnq.errors import UsageError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, -1)  # -1: one group per row ("channelwise")
SCALES = ("absmax", "mse")  # --scale: the paper's absmax scale, or the per-group clipping search (rtn.py)
# --budget-score: the data-free scores of rtnq.numerics.sensitivity, the default first
BUDGET_SCORES = ("position", "norm_error", "error", "relative", "kurtosis", "max_over_rms")

_ALLOWED = {  # option -> (accepted values, how the error says them)
    "--bits": (BITS, "4 or 8"),
    "--group-size": (GROUP_SIZES, "32, 64, 128 or -1 (channelwise)"),
    "--dtype": (dtypes.SIXTEEN_BIT, "bf16 or fp16"),
    "--budget-score": (BUDGET_SCORES, ", ".join(BUDGET_SCORES)),
    "--scale": (SCALES, "absmax or mse"),
}


def problem(option: str, value) -> str | None:
    """'must be ..., got X' when `value` is not accepted for `option` (--bits, --group-size, --dtype,
    --budget-score)."""
    accepted, text = _ALLOWED[option]
    if value in accepted and not isinstance(value, bool):
        return None
    return f"must be {text}, got {value}"


def check(bits: int | None = None, group_size: int | None = None, dtype: str | None = None,
          budget_score: str | None = None, scale: str | None = None) -> None:
    """UsageError for a value outside the supported set; None arguments are not checked."""
    for option, value in (("--bits", bits), ("--group-size", group_size), ("--dtype", dtype),
                          ("--budget-score", budget_score), ("--scale", scale)):
        why = None if value is None else problem(option, value)
        if why:
            raise UsageError(f"{option}: {why}")


def effective_group(k: int, group_size: int) -> int:
    """The group length along k: `group_size`, or k itself for channelwise (-1)."""
    return k if group_size == -1 else group_size
