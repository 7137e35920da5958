"""Timers for `rtnq bench` (GPU.md 4.3) and the two ceilings measured at start.

A timer turns `fn(i)` (the i-th back-to-back call of one variant, i selecting the weight copy to
use) into per-call samples in microseconds, in two steps so that variants can be interleaved:

    handle = timer.prepare(key, fn, reps)   # warm up, then capture `reps` calls (CUDA graph)
    samples = timer.replay(handle, n)       # n replays, each timed with CUDA events: replay time / reps

The harness only talks to this interface, so tests inject a fake timer with made-up numbers.
torch is imported inside the functions: `import rtnq.bench` stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol

from rtnq import dtypes
from rtnq.bench.report import Ceilings

Call = Callable[[int], Any]


class VariantFailed(Exception):
    """A variant could not be run or captured; the reason lands in the report, the sweep goes on."""


class Timer(Protocol):
    device: str  # "cuda" or "cpu"
    method: str  # how samples are taken, recorded with every result

    def prepare(self, key: Hashable, fn: Call, reps: int) -> Any: ...

    def replay(self, handle: Any, n: int) -> list[float]: ...

    def release(self, handle: Any) -> None: ...


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph, or None when capture failed and calls are timed directly
    fn: Call
    reps: int
    method: str


class CudaGraphTimer:
    """Warm-up, then a CUDA graph of `reps` back-to-back calls, replayed and timed with CUDA events.

    If a variant cannot be captured (a library that synchronises or allocates with cudaMalloc inside
    the call), its calls are timed directly between the same events instead and the record says
    "cuda-events" rather than "cuda-graph".
    """

    device = "cuda"
    method = "cuda-graph"

    def __init__(self, warmup: int = 3, max_replay_ms: float = 25.0):
        import torch

        self.torch = torch
        self.warmup = warmup
        self.max_replay_ms = max_replay_ms  # fewer calls per graph when calls are slow (ms each)
        # One stream for warm-up *and* capture, reused for every variant: anything a library caches
        # per stream on its first call (rtnq.runtime's zero-filled GEMM workspace, cuBLAS handles) is then
        # created during the warm-up, outside the capture, and only once per run.
        self.stream = torch.cuda.Stream()

    def prepare(self, key: Hashable, fn: Call, reps: int) -> _Graph:
        """Warm up, time one call, cap `reps` so one replay stays under max_replay_ms (the number used
        is the handle's `reps`), touch every weight copy once, then capture."""
        torch = self.torch
        try:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm up on the capture stream, as graph capture requires
                for i in range(self.warmup):
                    fn(i)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(self.stream)
                fn(0)
                end.record(self.stream)
                end.synchronize()
                one_ms = max(start.elapsed_time(end), 1e-6)
                reps = max(1, min(reps, int(self.max_replay_ms // one_ms)))
                for i in range(self.warmup, reps):
                    fn(i)
            torch.cuda.current_stream().wait_stream(self.stream)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - any failure of a variant is reported, not fatal
            torch.cuda.synchronize()
            raise VariantFailed(_one_line(e)) from None
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                for i in range(reps):
                    fn(i)
            graph.replay()
            torch.cuda.synchronize()
            return _Graph(graph, fn, reps, "cuda-graph")
        except Exception as e:  # noqa: BLE001
            del graph
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
            try:  # the variant runs, it just cannot be captured: time direct launches
                for i in range(reps):
                    fn(i)
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001
                raise VariantFailed(f"capture failed ({_one_line(e)}) and direct calls failed ({_one_line(e2)})") from None
            return _Graph(None, fn, reps, f"cuda-events (graph capture failed: {_one_line(e)})")

    def replay(self, handle: _Graph, n: int) -> list[float]:
        torch = self.torch
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        out = []
        for _ in range(n):
            start.record()
            if handle.graph is not None:
                handle.graph.replay()
            else:
                for i in range(handle.reps):
                    handle.fn(i)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) * 1000.0 / handle.reps)  # ms -> us per call
        return out

    def release(self, handle: _Graph) -> None:
        handle.graph = None


class WallTimer:
    """CPU timing (`--device cpu`): wall clock around `reps` direct calls. For checking the plumbing
    of the report, not for speed claims; every figure it produces is labelled CPU."""

    device = "cpu"
    method = "cpu-wall"

    def __init__(self, warmup: int = 1):
        self.warmup = warmup

    def prepare(self, key: Hashable, fn: Call, reps: int) -> tuple[Call, int]:
        try:
            for i in range(self.warmup):
                fn(i)
        except Exception as e:  # noqa: BLE001
            raise VariantFailed(_one_line(e)) from None
        return (fn, reps)

    def replay(self, handle: tuple[Call, int], n: int) -> list[float]:
        fn, reps = handle
        out = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            for i in range(reps):
                fn(i)
            out.append((time.perf_counter_ns() - t0) / 1000.0 / reps)
        return out

    def release(self, handle: Any) -> None:
        pass


def handle_method(timer: Timer, handle: Any) -> str:
    return getattr(handle, "method", timer.method)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(e).__name__}: {first}"[:300]


# ------------------------------------------------------------------------------------ ceilings


def measure_ceilings(device: str, dtype: Any, *, quick: bool = False) -> Ceilings:
    """Measure copy bandwidth and dense matmul rate on `device` (GPU.md 4.2 step 1).

    cuda: a 1 GiB -> 1 GiB device-to-device copy (2.1 GB moved: read + write), and an 8192^3 matmul in
    `dtype` on random data; 3 warm-ups, then the median of 10 event-timed runs each.
    cpu: 64 MiB copies and a 512^3 matmul, wall clock (labelled CPU; plumbing only).
    """
    import torch

    from rtnq.bench.report import percentile

    if device == "cuda":
        nbytes = (256 << 20) if quick else (1 << 30)
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = cuda_median_ms(lambda: dst.copy_(src), 3, 10)
        del src, dst
        size = 4096 if quick else 8192
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        t_mm = cuda_median_ms(lambda: torch.mm(a, b), 3, 10)
        del a, b
        torch.cuda.empty_cache()
        return Ceilings(
            copy_gbps=2 * nbytes / (t_copy * 1e-3) / 1e9,
            matmul_tflops=2 * size**3 / (t_mm * 1e-3) / 1e12,
            device="cuda",
            detail=f"copy {nbytes >> 20} MiB d2d (read+write counted), {size}^3 {_dtype_name(dtype)} matmul, "
            "median of 10 after 3 warm-ups, CUDA events",
        )
    nbytes = 64 << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    t_copy = percentile(_wall_ms(lambda: dst.copy_(src), 1, 5), 50)
    size = 512
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    t_mm = percentile(_wall_ms(lambda: torch.mm(a, b), 1, 5), 50)
    return Ceilings(
        copy_gbps=2 * nbytes / (t_copy * 1e-3) / 1e9,
        matmul_tflops=2 * size**3 / (t_mm * 1e-3) / 1e12,
        device="cpu",
        detail=f"CPU: copy 64 MiB (read+write counted), {size}^3 {_dtype_name(dtype)} matmul, median of 5, wall clock",
    )


def cuda_median_ms(fn: Callable[[], Any], warmup: int, n: int) -> float:
    """Median milliseconds of fn() over n CUDA-event-timed runs, after `warmup` untimed ones."""
    import torch

    from rtnq.bench.report import percentile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return percentile(times, 50)


def _wall_ms(fn: Callable[[], Any], warmup: int, n: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def _dtype_name(dtype: Any) -> str:
    row = dtypes.BY_NAME.get(str(dtype).removeprefix("torch."))
    return row.label if row is not None else str(dtype)
