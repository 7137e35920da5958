"""Where `rtnq bench` runs: whether torch can use a CUDA GPU, what rtnq's runtime reports about it, and
a seeded tensor factory on the device that the weight, peer and stack builders share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rtnq import dtypes
from rtnq.errors import KernelUnavailable
from rtnq.runtime import library

SEED = 20250101


@dataclass(frozen=True)
class RuntimeInfo:
    """What rtnq.runtime's library reports, for the environment stamp and the dispatch keys."""

    abi_version: int | None  # None on a CPU run without the library (the reference path needs none)
    device_info: dict = field(default_factory=dict)  # library.device_info() on CUDA runs; {} on the CPU


def load_runtime(device: str) -> RuntimeInfo:
    """cuda: the CUDA library must load, else KernelUnavailable (one line). cpu: the library is optional."""
    if device == "cuda":
        library.load()
        return RuntimeInfo(library.abi_version(), dict(library.device_info()))
    try:
        return RuntimeInfo(library.abi_version())
    except KernelUnavailable:  # no library on a CPU machine is fine for the reference path
        return RuntimeInfo(None)


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here (one line), or None if it can."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = "this torch build has no CUDA support" if not built else "no CUDA device is visible"
        return f"no CUDA GPU: {why} (torch {torch.__version__}); use --device cpu to check the plumbing on the CPU reference path"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; rtnq's kernels need 8.0 or newer"
    return None


class Device:
    """The run's device and activation dtype, with fixed-seed random tensors on it.

    Every random tensor is drawn from its own generator seeded with seed + salt, so a weight or an
    activation is the same whichever variants, shapes or batch sizes were built before it.
    """

    def __init__(self, device: str, dtype_name: str, *, seed: int = SEED, log: Callable[[str], None] = lambda s: None):
        self.type = device  # "cuda" or "cpu"
        self.dtype_name = dtype_name
        self.dtype = dtypes.BY_SHORT[dtype_name].torch
        self.seed = seed
        self.log = log
        if device == "cuda":
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            # torch builds before L2_cache_size existed: assume a 64 MB L2 (more copies, never fewer)
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
        else:
            self.l2_bytes = 0  # CPU: no rotation (plumbing only)

    @property
    def cuda(self) -> bool:
        return self.type == "cuda"

    def randn(self, shape: tuple[int, ...], salt: int, std: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        g = torch.Generator(device=self.type)
        g.manual_seed(self.seed + salt)
        t = torch.randn(shape, generator=g, device=self.type, dtype=dtype or self.dtype)
        return t.mul_(std) if std != 1.0 else t

    def free_bytes(self) -> int:
        if self.cuda:
            return int(torch.cuda.mem_get_info()[0])
        return 8 << 30  # CPU: the tiny shapes never come near this

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def release(self) -> None:
        """Wait for the GPU and return cached blocks, so the next shape or stack starts with free memory."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def on_device_or_cpu(self, what: str, fn: Callable[..., Any], *tensors: torch.Tensor) -> tuple:
        """Run a pure-torch rtnq step (quantize, pack, unpack) on the device; if it fails there (an op
        missing for this dtype on this GPU), run it on the CPU and move the results back."""
        try:
            return fn(*tensors)
        except (RuntimeError, NotImplementedError) as e:
            if not self.cuda:
                raise
            self.log(f"  {what} failed on the GPU ({str(e).splitlines()[0][:80]}); using the CPU")
            res = fn(*(t.cpu() for t in tensors))
            return tuple(r.to(self.type) for r in res)
