"""The sweep: for every shape group and batch size M, build each variant's call, time all variants
interleaved, and turn the samples into records with the report arithmetic.

Device-independent: `sweep` and `time_stack` take a backend (what to call: rtnq/backends.py for torch,
a fake in the tests) and a timer (how to time: timing.py, or a fake), so the whole pipeline from
samples to records, summaries and thresholds runs on a CPU with made-up numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from rtnq.bench import report
from rtnq.bench.report import Ceilings
from rtnq.bench.shapes import QuantConfig, ShapeGroup
from rtnq.bench.timing import Call, Timer, VariantFailed, handle_method

# Variant names. rtnq's own paths are "rtnq:<path>"; on the CPU the only one is "rtnq:reference".
RTNQ_PATHS = ("small_m", "tensor_core", "dequant", "auto")
# The dense baselines are cuBLAS on a GPU (F.linear / torch.mm) and torch's CPU GEMM with --device cpu.
DENSE = "dense"  # F.linear on the dense (n, k) weight, in the run's dtype
DENSE_KN = "dense:kn"  # torch.mm on a pre-transposed (k, n) copy; the faster of the two is the baseline
DENSE_BF16 = "dense:bf16"  # fp16 runs also time bf16 (the headline baseline)
TINYGEMM = "tinygemm"  # torch.ops.aten._weight_int4pack_mm (bf16, W4, zero = 0)
INT8PACK = "int8pack"  # torch.ops.aten._weight_int8pack_mm (per-channel W8)


@dataclass
class Case:
    """One variant at one (shape, M): what to call and what it streams."""

    variant: str
    role: str  # "rtnq", "baseline" or "peer"
    fmt: str  # report.FORMATS entry: the weight format whose compulsory bytes it is judged by
    config: QuantConfig | None  # None for dense baselines
    fn: Call | None = None  # fn(i): the i-th back-to-back call (i picks the weight copy)
    copies: int = 1  # weight copies rotated through
    weight_bytes: int = 0  # bytes of one weight copy
    unavailable: str | None = None  # why it cannot run here (reported, not fatal)
    note: str = ""
    rel_err: float | None = None  # ||out - ref|| / ||ref|| against its dequantized weight, fp32
    check_limit: float | None = None


class Backend(Protocol):
    device: str
    dtype_name: str
    l2_bytes: int

    def setup(self, group: ShapeGroup) -> Any: ...

    def cases(self, state: Any, m: int) -> list[Case]: ...

    def teardown(self, state: Any) -> None: ...


@dataclass
class SweepSettings:
    batches: list[int]
    rounds: int = 3  # interleaved rounds (A, B, C, A, B, C, ...)
    per_round: int = 10  # replays per variant per round: rounds * per_round samples in all
    replay_target_us: float = 2000.0
    max_reps: int = 64
    launch_us: float = 3.0  # added to the floor for the repeat plan (not to any reported figure)


def _est_us(case: Case, m: int, n: int, k: int, ceilings: Ceilings, launch_us: float) -> float:
    bits = case.config.bits if case.config else 16
    g = case.config.group_size if case.config else -1
    if case.variant == "rtnq:dequant":
        nbytes = report.bytes_moved_dequant(m, n, k, bits, g)
    else:
        nbytes = report.bytes_min(case.fmt, m, n, k, bits, g)
    fl, _ = report.floor_us(nbytes, report.flops(m, n, k), ceilings)
    return fl + launch_us


def sweep(
    groups: Sequence[ShapeGroup],
    backend: Backend,
    timer: Timer,
    ceilings: Ceilings,
    settings: SweepSettings,
    progress: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Time every variant of every shape group at every M; returns one record (dict) per
    (shape, config, M, variant), unavailable variants included with their reason."""
    records: list[dict] = []
    for group in groups:
        progress(f"{group.label}: preparing weights")
        state = backend.setup(group)
        try:
            for m in settings.batches:
                progress(f"{group.label}: M={m}")
                records.extend(_time_point(group, m, backend, backend.cases(state, m), timer, ceilings, settings))
        finally:
            backend.teardown(state)
    return records


def _time_point(group: ShapeGroup, m: int, backend: Backend, cases: list[Case], timer: Timer,
                ceilings: Ceilings, settings: SweepSettings) -> list[dict]:
    n, k = group.n, group.k
    handles: dict[int, Any] = {}
    reps_of: dict[int, int] = {}
    failed: dict[int, str] = {}
    for idx, case in enumerate(cases):
        if case.unavailable or case.fn is None:
            continue
        reps = report.plan_repeats(_est_us(case, m, n, k, ceilings, settings.launch_us),
                                   replay_target_us=settings.replay_target_us)
        reps = min(max(reps, case.copies), settings.max_reps)
        try:
            handles[idx] = timer.prepare((group.label, m, case.variant, case.config), case.fn, reps)
            reps_of[idx] = int(getattr(handles[idx], "reps", reps))  # a timer may cap R for slow calls
        except VariantFailed as e:
            failed[idx] = str(e)
    samples: dict[int, list[float]] = {i: [] for i in handles}
    round_medians: dict[int, list[float]] = {i: [] for i in handles}
    try:
        for _ in range(settings.rounds):  # interleave: every variant once per round
            for idx, h in handles.items():
                s = timer.replay(h, settings.per_round)
                samples[idx].extend(s)
                round_medians[idx].append(report.percentile(s, 50))
    finally:
        for h in handles.values():
            timer.release(h)

    out = []
    for idx, case in enumerate(cases):
        rec = _base_record(group, m, case, backend)
        if idx in handles:
            st = report.summarize(samples[idx])
            reps = reps_of[idx]
            rec.update(
                time_us=st.median, p10_us=st.p10, p90_us=st.p90, samples=st.n,
                round_medians_us=round_medians[idx], noise=report.round_noise(round_medians[idx]),
                method=handle_method(timer, handles[idx]), reps=reps, copies=case.copies,
                bytes_per_replay=min(reps, case.copies) * case.weight_bytes,
                l2_bytes=backend.l2_bytes,
                rotation_ok=(backend.l2_bytes <= 0)
                or min(reps, case.copies) * case.weight_bytes > 2 * backend.l2_bytes,
            )
            mt = report.metrics(st.median, rec["bytes"], rec["flops"], ceilings)
            rec.update(gbps=mt.gbps, pct_copy=mt.pct_copy, tflops=mt.tflops, pct_peak=mt.pct_peak,
                       floor_us=mt.floor_us, bound=mt.bound, x_floor=mt.x_floor)
        else:
            rec["time_us"] = None
            rec["unavailable"] = case.unavailable or failed.get(idx) or "no call"
        out.append(rec)
    _add_speedups(out)
    return out


def _base_record(group: ShapeGroup, m: int, case: Case, backend: Backend) -> dict:
    cfg = case.config
    bits = cfg.bits if cfg else None
    g = cfg.group_size if cfg else None
    n, k = group.n, group.k
    count = len(group.members.get(cfg, [])) if (cfg and group.members) else group.count
    rec = {
        "kind": "gemm",
        "device": backend.device,
        "dtype": backend.dtype_name,
        "shape": group.name,
        "n": n,
        "k": k,
        "count": count,
        "bits": bits,
        "group_size": g,
        "m": m,
        "variant": case.variant,
        "role": case.role,
        "fmt": case.fmt,
        "bytes": report.bytes_min(case.fmt, m, n, k, bits or 16, g or -1),
        "flops": report.flops(m, n, k),
        "rel_err": case.rel_err,
        "check": _check_label(case),
        "note": case.note,
    }
    if case.variant == "rtnq:dequant" and cfg:
        rec["bytes_moved"] = report.bytes_moved_dequant(m, n, k, cfg.bits, cfg.group_size)
    return rec


def _check_label(case: Case) -> str:
    if case.rel_err is None:
        return "-"
    if case.rel_err != case.rel_err:  # NaN
        return "FAIL"
    if case.check_limit is not None and case.rel_err > case.check_limit:
        return "FAIL"
    return "ok"


def _add_speedups(recs: list[dict]) -> None:
    """Baseline = the faster of cuBLAS on (n, k) and on a pre-transposed (k, n) weight (named in
    `baseline`); fp16 runs also get a speedup over bf16 cuBLAS."""
    by_variant = {r["variant"]: r for r in recs}
    name, base = report.best_of({v: by_variant[v]["time_us"] for v in (DENSE, DENSE_KN) if v in by_variant},
                                (DENSE, DENSE_KN))
    bf16 = by_variant.get(DENSE_BF16, {}).get("time_us")
    for r in recs:
        r["baseline"] = name
        r["baseline_us"] = base
        r["speedup_vs_dense"] = report.speedup(base, r["time_us"])
        if bf16 is not None:
            r["speedup_vs_dense_bf16"] = report.speedup(bf16, r["time_us"])


# ------------------------------------------------------------------------------------ summaries


def _key(r: dict) -> tuple:
    return (r["shape"], r["n"], r["k"])


def summarize(records: Sequence[dict], batches: Sequence[int]) -> list[dict]:
    """Per (shape, bits, group_size): speedups of each rtnq path and peer per M, where dequantize +
    cuBLAS takes over from the fused kernels, up to which M the quantized layer beats cuBLAS, and
    how far the dispatcher ("auto") is from its fastest path."""
    shapes: dict[tuple, list[dict]] = {}
    for r in records:
        shapes.setdefault(_key(r), []).append(r)
    out = []
    for key, recs in shapes.items():
        configs = sorted({(r["bits"], r["group_size"]) for r in recs if r["bits"] is not None})
        baseline = {r["m"]: r["baseline_us"] for r in recs}
        noise_by_m = {r["m"]: r.get("noise", 0.0) for r in recs if r["variant"] in (DENSE, DENSE_KN)
                      and r.get("noise") is not None and r["variant"] == r.get("baseline")}
        noise = max(noise_by_m.values(), default=0.0)
        for bits, g in configs:
            t: dict[str, dict[int, float | None]] = {}
            for r in recs:
                if r["bits"] == bits and r["group_size"] == g:
                    t.setdefault(r["variant"], {})[r["m"]] = r["time_us"]
            fused = {m: report.best_of({p: t.get(f"rtnq:{p}", {}).get(m) for p in ("small_m", "tensor_core")},
                                       ("small_m", "tensor_core"))[1] for m in batches}
            best_path = {m: report.best_of({p: t.get(f"rtnq:{p}", {}).get(m) for p in report.PATHS},
                                           report.PATHS) for m in batches}
            auto = t.get("rtnq:auto") or t.get("rtnq:reference") or {}
            auto_vs_best = {m: (auto[m] / best_path[m][1]) if auto.get(m) and best_path[m][1] else None
                            for m in batches}
            worst = max((v for v in auto_vs_best.values() if v is not None), default=None)
            out.append({
                "kind": "summary",
                "shape": key[0], "n": key[1], "k": key[2], "bits": bits, "group_size": g,
                "count": next((r["count"] for r in recs if r["bits"] == bits and r["group_size"] == g), None),
                "noise": noise,
                "speedup_vs_dense": {v: {m: report.speedup(baseline.get(m), tm) for m, tm in sorted(ts.items())}
                                      for v, ts in sorted(t.items())},
                "fastest_path": {m: best_path[m][0] for m in batches},
                "dequant_wins_from_m": report.crossover(batches, t.get("rtnq:dequant", {}), fused, noise),
                "beats_dense_up_to_m": report.last_win(batches, auto, baseline, noise),
                "auto_vs_best": auto_vs_best,
                "auto_worst_vs_best": worst,
                "auto_ok": None if worst is None else worst <= 1.0 + max(noise, 0.02),
            })
    return out


def threshold_costs(records: Sequence[dict], bits: int) -> dict[int, dict[str, float | None]]:
    """M -> {path: count-weighted total time over all shapes of this bit width}. A path that is
    missing for any shape at M gets None there (it cannot serve the whole model at that M)."""
    per: dict[tuple, dict[int, dict[str, float | None]]] = {}
    counts: dict[tuple, int] = {}
    for r in records:
        if r["bits"] != bits or not r["variant"].startswith("rtnq:"):
            continue
        path = r["variant"].split(":", 1)[1]
        if path not in report.PATHS:
            continue
        key = (r["shape"], r["n"], r["k"], r["group_size"])
        counts[key] = r["count"] or 1
        per.setdefault(key, {}).setdefault(r["m"], {})[path] = r["time_us"]
    costs: dict[int, dict[str, float | None]] = {}
    ms = sorted({m for d in per.values() for m in d})
    for m in ms:
        costs[m] = {}
        for p in report.PATHS:
            total: float | None = 0.0
            for key, d in per.items():
                t = d.get(m, {}).get(p)
                if t is None:
                    total = None
                    break
                total += counts[key] * t
            costs[m][p] = total
    return costs


def choose_thresholds(records: Sequence[dict]) -> list[dict]:
    """One threshold choice per bit width present among the rtnq path records."""
    out = []
    dtype = next((r["dtype"] for r in records), None)
    for bits in sorted({r["bits"] for r in records if r["bits"] is not None}):
        costs = threshold_costs(records, bits)
        choice = report.select_thresholds(costs) if costs else None
        entry = {"kind": "thresholds", "bits": bits, "dtype": dtype, "batches": sorted(costs)}
        if choice is None:
            entry["chosen"] = None
            entry["reason"] = "no rtnq path was measured at every shape"
        else:
            entry.update(chosen=True, small_m_max=choice.small_m_max, tensor_core_max=choice.tensor_core_max,
                         crossover_reached=choice.crossover_reached, cost_us=choice.cost, best_cost_us=choice.best_cost)
        out.append(entry)
    return out


# -------------------------------------------------------------------------------- linear stack


@dataclass
class StackPlan:
    """One forward of a model's linears at batch M, as one call."""

    label: str  # "rtnq W4" / "bf16"
    fn: Call | None
    floor_items: list[tuple]  # (fmt, count, m, n, k, bits, group_size), for report.stack_floor_us
    scale: float = 1.0  # time multiplier when only part of the stack fitted in memory
    note: str = ""
    unavailable: str | None = None
    cleanup: Callable[[], None] = field(default=lambda: None)


def time_stack(plans: Iterable[Callable[[], StackPlan]], m: int, timer: Timer, ceilings: Ceilings,
               *, replays: int = 20, model: str = "", device: str = "", dtype: str = "") -> list[dict]:
    """Time one forward of each stack (built one at a time, so the dense stack of a big model never
    shares the GPU with the quantized one) under a CUDA graph; floor = sum of per-linear floors."""
    out = []
    for build in plans:
        plan = build()
        rec = {"kind": "stack", "model": model, "device": device, "dtype": dtype, "m": m, "variant": plan.label,
               "floor_ms": report.stack_floor_us(plan.floor_items, ceilings) / 1e3, "note": plan.note,
               "scale": plan.scale}
        try:
            if plan.unavailable or plan.fn is None:
                rec.update(time_ms=None, unavailable=plan.unavailable or "no call")
            else:
                try:
                    h = timer.prepare((model, m, plan.label), plan.fn, 1)
                except VariantFailed as e:
                    rec.update(time_ms=None, unavailable=str(e))
                else:
                    try:
                        s = timer.replay(h, replays)
                    finally:
                        timer.release(h)
                    st = report.summarize(s)
                    rec.update(time_ms=st.median * plan.scale / 1e3, p10_ms=st.p10 * plan.scale / 1e3,
                               p90_ms=st.p90 * plan.scale / 1e3, samples=st.n, method=handle_method(timer, h))
                    rec["x_floor"] = rec["time_ms"] / rec["floor_ms"] if rec["floor_ms"] else None
        finally:
            plan.cleanup()
        out.append(rec)
    dense = next((r for r in out if r["variant"].startswith("dense")), None)
    for r in out:
        r["speedup_vs_dense"] = report.speedup(dense["time_ms"] if dense else None, r.get("time_ms"))
    return out
