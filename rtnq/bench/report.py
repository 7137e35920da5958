"""The arithmetic of `rtnq bench`: bytes, FLOPs, floors, percentiles, crossovers, thresholds.

Pure Python, no torch and no I/O, so every number the report prints can be unit-tested on a CPU with
fake timings (tests/test_bench.py). Units are in the names: `_us` microseconds, `_ms` milliseconds,
`gbps` 1e9 bytes per second, `tflops` 1e12 FLOP per second, `bytes` plain bytes.

Byte counts are the *compulsory* traffic of a format (GPU.md 4.3): every weight byte (packed values
plus scales) read once, activations (M, k) read once and the output (M, n) written once, both 16-bit.
That is what "achieved GB/s" and the roofline floor are measured against. The dequantize + cuBLAS
path moves more than its format's compulsory bytes (it writes and re-reads a dense 16-bit copy);
`bytes_moved` records that separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

ACT_BYTES = 2  # fp16 / bf16 activations and outputs

# Weight formats a variant can stream. "marlin": rtnq's packed codes + 16-bit group scales;
# "dense16": a bf16/fp16 (n, k) matrix; "tinygemm": PyTorch's int4 pack (4 bits + bf16 scale and
# zero per group); "int8_channel": int8 values + one 16-bit scale per output channel.
FORMATS = ("marlin", "dense16", "tinygemm", "int8_channel")

# The three paths rtnq's dispatcher chooses between, in the order the thresholds cut the M axis: the
# runtime's dispatch.PATHS (not imported: rtnq.runtime imports torch; tests/test_bench.py pins the two equal).
PATHS = ("small_m", "tensor_core", "dequant")


def n_groups(k: int, group_size: int) -> int:
    """Scale groups along k: k / group_size, or 1 for channelwise (-1)."""
    return 1 if group_size == -1 else k // group_size


def weight_bytes(fmt: str, n: int, k: int, bits: int = 4, group_size: int = 128) -> int:
    """Bytes of one (n, k) weight in `fmt`, scales included."""
    if fmt == "dense16":
        return 2 * n * k
    if fmt == "marlin":
        return n * k * bits // 8 + n_groups(k, group_size) * n * 2
    if fmt == "tinygemm":
        return n * k // 2 + n_groups(k, group_size) * n * 2 * 2
    if fmt == "int8_channel":
        return n * k + 2 * n
    raise ValueError(f"unknown weight format {fmt!r}")


def bytes_min(fmt: str, m: int, n: int, k: int, bits: int = 4, group_size: int = 128) -> int:
    """Compulsory bytes of y(M, n) = x(M, k) @ W.T: weights once, x once, y once."""
    return weight_bytes(fmt, n, k, bits, group_size) + ACT_BYTES * m * k + ACT_BYTES * m * n


def bytes_moved_dequant(m: int, n: int, k: int, bits: int, group_size: int) -> int:
    """What dequantize + cuBLAS moves: read the packed weight, write the dense copy, re-read it in
    the GEMM, plus activations and output (no L2 reuse assumed)."""
    return weight_bytes("marlin", n, k, bits, group_size) + 2 * (2 * n * k) + ACT_BYTES * m * (k + n)


def flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@dataclass(frozen=True)
class Ceilings:
    """The two ceilings measured on this device at start (never datasheet numbers)."""

    copy_gbps: float  # device-to-device copy, bytes read + bytes written per second / 1e9
    matmul_tflops: float  # large dense 16-bit matmul on random data
    device: str  # "cuda" or "cpu"
    detail: str = ""  # how they were measured

    def to_json(self) -> dict:
        return {"copy_gbps": self.copy_gbps, "matmul_tflops": self.matmul_tflops, "device": self.device,
                "detail": self.detail}


def floor_us(nbytes: float, nflops: float, ceilings: Ceilings) -> tuple[float, str]:
    """Roofline floor: max(bytes / copy bandwidth, flops / matmul rate), and which term binds."""
    t_mem = nbytes / (ceilings.copy_gbps * 1e9) * 1e6
    t_cmp = nflops / (ceilings.matmul_tflops * 1e12) * 1e6
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")


@dataclass(frozen=True)
class Metrics:
    time_us: float
    gbps: float  # compulsory bytes / time
    pct_copy: float  # gbps / measured copy bandwidth, in percent
    tflops: float
    pct_peak: float  # tflops / measured matmul rate, in percent
    floor_us: float
    bound: str  # "memory" or "compute": the larger term of the floor
    x_floor: float  # time / floor (1.0 = at the roofline)


def metrics(time_us: float, nbytes: float, nflops: float, ceilings: Ceilings) -> Metrics:
    if time_us <= 0:
        raise ValueError(f"time must be positive, got {time_us}")
    seconds = time_us * 1e-6
    gbps = nbytes / seconds / 1e9
    tflops = nflops / seconds / 1e12
    fl, bound = floor_us(nbytes, nflops, ceilings)
    return Metrics(
        time_us=time_us,
        gbps=gbps,
        pct_copy=100.0 * gbps / ceilings.copy_gbps,
        tflops=tflops,
        pct_peak=100.0 * tflops / ceilings.matmul_tflops,
        floor_us=fl,
        bound=bound,
        x_floor=time_us / fl,
    )


def speedup(baseline_us: float | None, time_us: float | None) -> float | None:
    """baseline / time (> 1: faster than the baseline); None if either is missing."""
    if baseline_us is None or time_us is None or time_us <= 0:
        return None
    return baseline_us / time_us


# ----------------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    median: float
    p10: float
    p90: float
    n: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the relative width of the middle 80 % of samples."""
        return (self.p90 - self.p10) / self.median if self.median else float("inf")


def summarize(samples: Sequence[float]) -> Stats:
    return Stats(percentile(samples, 50), percentile(samples, 10), percentile(samples, 90), len(samples))


def round_noise(round_medians: Sequence[float]) -> float:
    """Relative spread of one variant's per-round medians ((max - min) / median of them): timing the
    same thing several times, interleaved with the others. Differences below this are noise."""
    if len(round_medians) < 2:
        return 0.0
    mid = percentile(round_medians, 50)
    return (max(round_medians) - min(round_medians)) / mid if mid else 0.0


# ------------------------------------------------------------------------------- timing plans


def plan_repeats(est_us: float, *, replay_target_us: float = 2000.0, lo: int = 3, hi: int = 20) -> int:
    """Calls per captured graph (R): enough that one replay runs ~replay_target_us, within [lo, hi].

    GPU.md 4.3 asks for R = 10-20 back-to-back calls; calls of a millisecond or more need fewer
    (launch gaps are negligible there and the sweep must fit a short GPU window).
    """
    if est_us <= 0:
        return hi
    return max(lo, min(hi, math.ceil(replay_target_us / est_us)))


def rotation_copies(bytes_per_call: int, l2_bytes: int, *, factor: float = 2.0, cap: int = 64) -> int:
    """Weight copies to rotate through so that R >= copies back-to-back calls touch more than
    `factor` x L2 of distinct bytes (one copy more than strictly needed, so consecutive replays do
    not start on lines the previous replay left behind). At least 1, at most `cap`."""
    if l2_bytes <= 0 or bytes_per_call <= 0:
        return 1
    need = math.floor(factor * l2_bytes / bytes_per_call) + 1
    if need > 1:
        need += 1
    return max(1, min(cap, need))


# ------------------------------------------------------------------- crossovers and thresholds


def best_of(times: Mapping[str, float | None], names: Iterable[str]) -> tuple[str | None, float | None]:
    """(name, time) of the fastest measured variant among `names`."""
    best: tuple[str | None, float | None] = (None, None)
    for name in names:
        t = times.get(name)
        if t is not None and (best[1] is None or t < best[1]):
            best = (name, t)
    return best


def crossover(ms: Sequence[int], slow_then_fast: Mapping[int, float | None],
              fast_then_slow: Mapping[int, float | None], noise: float = 0.0) -> int | None:
    """Smallest measured M from which `slow_then_fast` beats `fast_then_slow` at every larger measured M.

    A win needs a margin: t_a < t_b * (1 - noise). Used with a = dequantize + cuBLAS and b = the best
    fused path: the answer is where the dequant path takes over. None if it does not win at the
    largest measured M (the crossover, if any, lies beyond the measured range).
    """
    result = None
    for m in sorted(ms, reverse=True):
        a, b = slow_then_fast.get(m), fast_then_slow.get(m)
        if a is None or b is None or not a < b * (1.0 - noise):
            break
        result = m
    return result


def last_win(ms: Sequence[int], a: Mapping[int, float | None], b: Mapping[int, float | None],
             noise: float = 0.0) -> int | None:
    """Largest M up to which `a` beats `b` at every measured M (from the smallest); None if it does not
    win at the smallest. Used for "quantized beats cuBLAS up to M = ...".
    """
    result = None
    for m in sorted(ms):
        ta, tb = a.get(m), b.get(m)
        if ta is None or tb is None or not ta < tb * (1.0 - noise):
            break
        result = m
    return result


@dataclass(frozen=True)
class ThresholdChoice:
    small_m_max: int  # M <= this: small-M kernel (0: never)
    tensor_core_max: int  # small_m_max < M <= this: tensor-core kernel; above: dequantize + cuBLAS
    crossover_reached: bool  # False: dequant won at no measured M; tensor_core_max is the largest M measured
    cost: float  # total time (us) of the measured points under this choice
    best_cost: float  # total time if every M used its own fastest path (lower bound)


def select_thresholds(costs: Mapping[int, Mapping[str, float | None]]) -> ThresholdChoice | None:
    """Pick the dispatcher's two cuts on the M axis from measured costs.

    costs: M -> {path: time}, where a path's time at M is typically the count-weighted sum over a
    model's shapes (what one forward's linears would take if every linear used that path). Paths are
    PATHS in order along M; a missing or None time means the path cannot run there. Every split of the
    sorted measured M's into [small_m | tensor_core | dequant] is tried; the cheapest wins, ties going
    to the split that keeps the fused kernels longer. Thresholds are measured M values (the last M each
    region covers), so the dispatcher is never sent to a path at an M where it was not measured faster.
    Returns None if no split is feasible.
    """
    ms = sorted(costs)
    if not ms:
        return None
    inf = float("inf")

    def c(m: int, path: str) -> float:
        t = costs[m].get(path)
        return inf if t is None else float(t)

    best: tuple[float, int, int] | None = None
    for i in range(len(ms) + 1):
        for j in range(i, len(ms) + 1):
            total = sum(c(m, "small_m") for m in ms[:i]) + sum(c(m, "tensor_core") for m in ms[i:j]) \
                + sum(c(m, "dequant") for m in ms[j:])
            if total == inf:
                continue
            key = (total, j, i)
            # ties (to rounding) prefer larger j, then larger i: keep fused kernels longer
            if best is None or total < best[0] * (1 - 1e-12) or (
                abs(total - best[0]) <= 1e-12 * max(1.0, best[0]) and (j, i) > (best[1], best[2])
            ):
                best = key
    if best is None:
        return None
    total, j, i = best
    small_max = ms[i - 1] if i > 0 else 0
    reached = j < len(ms)
    tc_max = ms[j - 1] if j > 0 else 0
    tc_max = max(tc_max, small_max)
    lower = sum(min(c(m, p) for p in PATHS) for m in ms)
    return ThresholdChoice(small_max, tc_max, reached, total, lower)


# ---------------------------------------------------------------------------------- stack floor


def stack_floor_us(items: Iterable[tuple[str, int, int, int, int, int, int]], ceilings: Ceilings) -> float:
    """Floor of one forward of a linear stack: the sum of each linear's own roofline floor.

    items: (fmt, count, m, n, k, bits, group_size) per family of identical linears.
    """
    total = 0.0
    for fmt, count, m, n, k, bits, group_size in items:
        fl, _ = floor_us(bytes_min(fmt, m, n, k, bits, group_size), flops(m, n, k), ceilings)
        total += count * fl
    return total
