"""GPU tests: run only where torch sees a CUDA GPU and librtnq_cuda.so loads (scripts/gpu_check.sh builds it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _why_skip() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    from rtnq.errors import KernelUnavailable
    from rtnq.runtime import library

    try:
        library.load()
        library.device_count()
    except KernelUnavailable as e:
        return f"CUDA library unavailable: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    mine = [item for item in items if HERE in Path(str(item.fspath)).resolve().parents]
    if not mine:
        return
    reason = _why_skip()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
