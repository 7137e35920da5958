"""`rtnq bench`: the report arithmetic with fake timings, the sweep with a fake timer and backend, and
the CLI through the real entry point on the CPU reference path (no GPU needed anywhere here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cliutil import run, run_process
from rtnq.bench import harness, report, shapes
from rtnq.bench.harness import Case, StackPlan, SweepSettings
from rtnq.bench.report import Ceilings
from rtnq.bench.shapes import QuantConfig, ShapeGroup
from rtnq.bench.timing import VariantFailed
from rtnq.errors import UsageError
from rtnq.runtime import dispatch

ROOT = Path(__file__).resolve().parents[1]
H100 = Ceilings(copy_gbps=3000.0, matmul_tflops=798.0, device="cuda")  # GPU.md's measured H100 ceilings
H200 = Ceilings(copy_gbps=4300.0, matmul_tflops=790.0, device="cuda")
W4 = QuantConfig(4, 128)


# ---------------------------------------------------------------------------- bytes and floors


def test_weight_bytes_per_format():
    n, k = 4096, 4096
    assert report.weight_bytes("dense16", n, k) == 2 * n * k
    # 4 bits per weight + one 16-bit scale per 128 weights: 4.125 bits/weight, 8.65 MB (GPU.md 4.3)
    assert report.weight_bytes("marlin", n, k, 4, 128) == n * k // 2 + (k // 128) * n * 2 == 8_650_752
    assert report.weight_bytes("marlin", n, k, 8, 128) == n * k + (k // 128) * n * 2
    assert report.weight_bytes("marlin", n, k, 4, -1) == n * k // 2 + n * 2  # channelwise: one scale row
    assert report.weight_bytes("tinygemm", n, k, 4, 128) == n * k // 2 + (k // 128) * n * 4  # scale + zero
    assert report.weight_bytes("int8_channel", n, k) == n * k + 2 * n
    with pytest.raises(ValueError):
        report.weight_bytes("fp8", n, k)


def test_bytes_min_counts_activations_and_output_once():
    m, n, k = 16, 6144, 4096
    assert report.bytes_min("marlin", m, n, k, 4, 128) == report.weight_bytes("marlin", n, k) + 2 * m * k + 2 * m * n
    assert report.flops(m, n, k) == 2 * m * n * k
    # dequantize + cuBLAS writes and re-reads a dense copy: 4 extra bytes per weight
    extra = report.bytes_moved_dequant(m, n, k, 4, 128) - report.bytes_min("marlin", m, n, k, 4, 128)
    assert extra == 4 * n * k


def test_floors_match_gpu_md_anchors():
    # GPU.md 3.2, 70B o 8192x8192 at M=1 on the H100: bf16 44.8 us, W4 11.5 us, ideal speedup 3.88x
    d, bd = report.floor_us(report.bytes_min("dense16", 1, 8192, 8192), report.flops(1, 8192, 8192), H100)
    q, bq = report.floor_us(report.bytes_min("marlin", 1, 8192, 8192, 4, 128), report.flops(1, 8192, 8192), H100)
    assert (round(d, 1), round(q, 1), bd, bq) == (44.8, 11.5, "memory", "memory")
    assert d / q == pytest.approx(16 / 4.125, abs=0.01)
    # the W4 weight stream turns compute-bound between M = 64 and M = 96 on the H100 (ridge M ~ 69)
    for m, bound in ((64, "memory"), (96, "compute")):
        assert report.floor_us(report.bytes_min("marlin", m, 8192, 8192, 4, 128),
                               report.flops(m, 8192, 8192), H100)[1] == bound


@pytest.mark.parametrize(
    "model, ceilings, dense_ms, w4_ms, w4_all_ms, w8_ms",
    [  # GPU.md section 0: decode-step floors of the linear stack at batch 1
        ("llama-3.1-8b", H100, 5.00, 1.55, 1.29, 2.71),
        ("llama-3.1-8b", H200, 3.49, 1.08, 0.90, 1.89),
        ("llama-3.1-70b", H100, 46.3, 12.5, 11.95, 23.9),
        ("llama-3.1-70b", H200, 32.3, 8.70, 8.33, 16.7),
    ],
)
def test_stack_floor_reproduces_gpu_md_table(model, ceilings, dense_ms, w4_ms, w4_all_ms, w8_ms):
    lins = shapes.SYNTHETIC[model].linears()

    def floor(bits, head_quantized):
        items = [("marlin" if (bits and (lin.name != "lm_head" or head_quantized)) else "dense16",
                  lin.count, 1, lin.n, lin.k, bits or 16, 128) for lin in lins]
        return report.stack_floor_us(items, ceilings) / 1e3

    assert floor(None, False) == pytest.approx(dense_ms, rel=0.01)
    assert floor(4, False) == pytest.approx(w4_ms, rel=0.01)
    assert floor(4, True) == pytest.approx(w4_all_ms, rel=0.01)
    assert floor(8, False) == pytest.approx(w8_ms, rel=0.01)


def test_synthetic_shape_table():
    m8, m70 = shapes.SYNTHETIC["llama-3.1-8b"], shapes.SYNTHETIC["llama-3.1-70b"]
    assert [(lin.name, lin.n, lin.k, lin.count) for lin in m8.linears()] == [
        ("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32), ("gate_up", 28672, 4096, 32), ("down", 4096, 14336, 32),
        ("lm_head", 128256, 4096, 1)]
    assert [(lin.n, lin.k, lin.count) for lin in m70.linears()] == [
        (10240, 8192, 80), (8192, 8192, 80), (57344, 8192, 80), (8192, 28672, 80), (128256, 8192, 1)]
    for model in shapes.SYNTHETIC.values():  # every synthetic shape must be Marlin-legal at group 128
        for lin in model.linears():
            assert lin.n % 64 == 0 and lin.k % 128 == 0, (model.name, lin)


def test_metrics_at_the_floor_and_units():
    m, n, k = 1, 8192, 8192
    nbytes, nflops = report.bytes_min("marlin", m, n, k), report.flops(m, n, k)
    fl, _ = report.floor_us(nbytes, nflops, H100)
    mt = report.metrics(fl, nbytes, nflops, H100)
    assert mt.x_floor == pytest.approx(1.0)
    assert mt.pct_copy == pytest.approx(100.0)  # memory-bound at the floor = the copy bandwidth
    assert mt.gbps == pytest.approx(3000.0)
    slow = report.metrics(2 * fl, nbytes, nflops, H100)  # twice the time: half the rate, 2x the floor
    assert (slow.pct_copy, slow.x_floor) == (pytest.approx(50.0), pytest.approx(2.0))
    assert slow.tflops == pytest.approx(nflops / (2 * fl * 1e-6) / 1e12)
    with pytest.raises(ValueError):
        report.metrics(0.0, nbytes, nflops, H100)
    assert report.speedup(30.0, 10.0) == 3.0 and report.speedup(None, 1.0) is None


# ------------------------------------------------------------------------------------ statistics


def test_percentiles_interpolate_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert report.percentile(xs, 50) == 2.5
    assert report.percentile(xs, 10) == pytest.approx(1.3)
    assert report.percentile(xs, 90) == pytest.approx(3.7)
    assert report.percentile([7.0], 90) == 7.0
    st = report.summarize([10.0] * 8 + [11.0, 30.0])
    assert (st.median, st.n) == (10.0, 10) and st.p90 == pytest.approx(12.9)
    assert st.spread == pytest.approx((12.9 - 10.0) / 10.0)
    with pytest.raises(ValueError):
        report.percentile([], 50)
    assert report.round_noise([10.0, 10.5, 9.5]) == pytest.approx(0.1)
    assert report.round_noise([10.0]) == 0.0


def test_timing_plan_and_rotation():
    assert report.plan_repeats(5.0) == 20  # short calls: R = 20 back to back
    assert report.plan_repeats(500.0) == 4
    assert report.plan_repeats(50_000.0) == 3
    l2 = 50 * 10**6
    w = report.weight_bytes("marlin", 4096, 4096, 4, 128)  # 8.65 MB: would live in a 50 MB L2
    c = report.rotation_copies(w, l2)
    assert c * w > 2 * l2 and (c - 2) * w <= 2 * l2  # just over 2x L2, plus one spare copy
    assert report.rotation_copies(2 * 57344 * 8192, l2) == 1  # 940 MB streams from HBM anyway
    assert report.rotation_copies(1000, l2) == 64  # capped
    assert report.rotation_copies(w, 0) == 1  # CPU: no rotation


# ---------------------------------------------------------------------- crossovers, thresholds


def test_crossover_needs_a_win_at_every_larger_m():
    ms = [1, 16, 64, 256, 1024]
    fused = {1: 10, 16: 11, 64: 20, 256: 60, 1024: 240}
    deq = {1: 40, 16: 41, 64: 45, 256: 62, 1024: 200}
    assert report.crossover(ms, deq, fused) == 1024
    deq2 = {**deq, 256: 55}
    assert report.crossover(ms, deq2, fused) == 256
    assert report.crossover(ms, deq2, fused, noise=0.10) == 1024  # 55 vs 60 is within 10 % noise
    assert report.crossover(ms, {**deq2, 1024: 250}, fused) is None  # not reached in the measured range
    assert report.crossover(ms, {**deq2, 1024: None}, fused) is None
    dense = {1: 40, 16: 40, 64: 42, 256: 58, 1024: 210}
    assert report.last_win(ms, fused, dense) == 64
    assert report.last_win(ms, {1: 50}, dense) is None


def _costs(rows):
    return {m: dict(zip(report.PATHS, t)) for m, t in rows.items()}


def test_select_thresholds_three_regions():
    costs = _costs({1: (10, 14, 50), 16: (12, 14, 50), 64: (30, 20, 52), 256: (120, 60, 70),
                    1024: (480, 240, 200), 4096: (None, 960, 700)})
    ch = report.select_thresholds(costs)
    assert (ch.small_m_max, ch.tensor_core_max, ch.crossover_reached) == (16, 256, True)
    assert ch.cost == 10 + 12 + 20 + 60 + 200 + 700 == ch.best_cost
    chosen = dispatch.Thresholds(ch.small_m_max, ch.tensor_core_max, measured=True)  # what the runtime will use
    assert [dispatch.choose_path(m, chosen) for m in (1, 16, 17, 256, 257, 4096)] == [
        "small_m", "small_m", "tensor_core", "tensor_core", "dequant", "dequant"]


def test_select_thresholds_is_monotone_and_minimises_total_time():
    # tensor_core wins alone at M=16 by a hair, small_m at 1 and 64: one cut must lose somewhere
    costs = _costs({1: (10, 20, 90), 16: (15, 14.9, 90), 64: (30, 40, 90)})
    ch = report.select_thresholds(costs)
    assert (ch.small_m_max, ch.tensor_core_max) == (64, 64)  # all small_m: 55 < any split
    assert ch.cost == pytest.approx(55) and ch.best_cost == pytest.approx(54.9)


def test_select_thresholds_dequant_never_wins_and_ties():
    ch = report.select_thresholds(_costs({1: (10, 20, 90), 1024: (None, 200, 300)}))
    assert (ch.small_m_max, ch.tensor_core_max, ch.crossover_reached) == (1, 1024, False)
    tie = report.select_thresholds(_costs({256: (None, 50, 50)}))  # a tie keeps the fused kernel
    assert (tie.tensor_core_max, tie.crossover_reached) == (256, False)
    only_dequant = report.select_thresholds(_costs({1: (None, None, 5)}))
    assert (only_dequant.small_m_max, only_dequant.tensor_core_max, only_dequant.crossover_reached) == (0, 0, True)
    assert report.select_thresholds(_costs({1: (None, None, None)})) is None
    assert report.select_thresholds({}) is None


# --------------------------------------------------------------- the sweep, with fakes for both ends


def fake_time(variant: str, m: int) -> float:
    """Made-up per-call times (us): fused kernels win at small M, dequant + dense from M = 1024."""
    return {
        "dense": 40 + 0.2 * m,
        "dense:kn": 42 + 0.2 * m,
        "rtnq:small_m": 10 + 2.0 * m,
        "rtnq:tensor_core": 14 + 0.5 * m,
        "rtnq:dequant": 60 + 0.2 * m,
        "rtnq:auto": 10.5 + 0.5 * m,
    }[variant]


class FakeTimer:
    device = "cuda"
    method = "fake"

    def __init__(self, fail=()):
        self.fail = set(fail)
        self.log: list[tuple] = []
        self.reps: dict[str, int] = {}

    def prepare(self, key, fn, reps):
        _, m, variant, _cfg = key if len(key) == 4 else (*key, None)
        if variant in self.fail:
            raise VariantFailed("RuntimeError: no kernel for this shape")
        fn(0)
        self.reps[variant] = reps
        return (variant, m)

    def replay(self, handle, n):
        variant, m = handle
        self.log.append(handle)
        t = fake_time(variant, m) if variant in FAKE_VARIANTS else 100.0
        return [t * (1 + 0.01 * ((i % 3) - 1)) for i in range(n)]  # +-1 % jitter around the median

    def release(self, handle):
        pass


FAKE_VARIANTS = ("dense", "dense:kn", "rtnq:small_m", "rtnq:tensor_core", "rtnq:dequant", "rtnq:auto")


class FakeBackend:
    device = "cuda"
    dtype_name = "bf16"
    l2_bytes = 50 * 10**6

    def __init__(self):
        self.calls = 0

    def setup(self, group):
        return group

    def cases(self, group, m):
        def fn(i):
            self.calls += 1

        out = [Case("dense", "baseline", "dense16", None, fn=fn, copies=2, weight_bytes=2 * group.n * group.k),
               Case("dense:kn", "baseline", "dense16", None, fn=fn, copies=2, weight_bytes=2 * group.n * group.k)]
        for path in harness.RTNQ_PATHS:
            out.append(Case(f"rtnq:{path}", "rtnq", "marlin", W4, fn=fn, copies=13,
                            weight_bytes=report.weight_bytes("marlin", group.n, group.k), rel_err=1e-3,
                            check_limit=8e-3))
        out.append(Case("tinygemm", "peer", "tinygemm", W4, unavailable="not in this torch"))
        return out

    def teardown(self, state):
        pass


def _sweep(timer=None, batches=(1, 16, 64, 256, 1024)):
    groups = [ShapeGroup("o", 4096, 4096, 32, [W4]), ShapeGroup("down", 4096, 14336, 32, [W4])]
    timer = timer or FakeTimer()
    recs = harness.sweep(groups, FakeBackend(), timer, H100, SweepSettings(list(batches), rounds=3, per_round=5))
    return recs, timer


def test_sweep_records_metrics_and_speedups():
    recs, timer = _sweep()
    assert len(recs) == 2 * 5 * 7  # shapes x M x variants (the unavailable peer included)
    r = next(r for r in recs if r["shape"] == "o" and r["m"] == 16 and r["variant"] == "rtnq:small_m")
    assert r["time_us"] == pytest.approx(fake_time("rtnq:small_m", 16))  # median of the jittered samples
    assert r["p10_us"] < r["time_us"] < r["p90_us"] and r["samples"] == 15
    assert r["baseline"] == "dense"  # the faster of the (n, k) and (k, n) dense layouts
    assert r["speedup_vs_dense"] == pytest.approx(fake_time("dense", 16) / fake_time("rtnq:small_m", 16))
    assert r["bytes"] == report.bytes_min("marlin", 16, 4096, 4096, 4, 128)
    assert r["gbps"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9)
    assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / 3000)
    assert r["x_floor"] == pytest.approx(r["time_us"] / r["floor_us"])
    assert r["check"] == "ok" and r["reps"] >= r["copies"] == 13 and r["rotation_ok"] is True
    deq = next(r for r in recs if r["variant"] == "rtnq:dequant")
    assert deq["bytes_moved"] > deq["bytes"]
    peer = next(r for r in recs if r["variant"] == "tinygemm")
    assert peer["time_us"] is None and peer["unavailable"] == "not in this torch"
    dense = next(r for r in recs if r["variant"] == "dense" and r["shape"] == "down")
    assert dense["rotation_ok"] is True  # 2 copies x 117 MB > 2 x 50 MB
    assert dense["bits"] is None and dense["speedup_vs_dense"] == 1.0


def test_sweep_interleaves_variants_round_by_round():
    _, timer = _sweep(batches=(16,))
    first_point = [v for v, m in timer.log[:18]]  # 6 timed variants x 3 rounds for the first shape
    assert first_point == list(FAKE_VARIANTS) * 3


def test_failed_variant_is_reported_not_fatal():
    recs, _ = _sweep(timer=FakeTimer(fail={"rtnq:small_m"}), batches=(1, 16))
    bad = [r for r in recs if r["variant"] == "rtnq:small_m"]
    assert bad and all(r["time_us"] is None and "no kernel" in r["unavailable"] for r in bad)
    assert all(r["time_us"] is not None for r in recs if r["variant"] == "rtnq:tensor_core")


def test_summaries_and_thresholds_from_fake_timings():
    batches = [1, 16, 64, 256, 1024]
    recs, _ = _sweep(batches=batches)
    sums = {s["shape"]: s for s in harness.summarize(recs, batches)}
    o = sums["o"]
    # fused best: small_m at M=1 (12 < 14.5), tensor_core from 16; dequant (60 + 0.2 M) beats
    # tensor_core (14 + 0.5 M) once M > 153: at 256 and 1024
    assert o["fastest_path"] == {1: "small_m", 16: "tensor_core", 64: "tensor_core", 256: "dequant", 1024: "dequant"}
    assert o["dequant_wins_from_m"] == 256
    assert o["beats_dense_up_to_m"] == 64  # auto (10.5 + 0.5 M) vs dense (40 + 0.2 M): wins to M < 98
    assert o["auto_vs_best"][1] == pytest.approx(11 / 12)
    assert o["auto_worst_vs_best"] == pytest.approx((10.5 + 512) / (60 + 204.8)) and o["auto_ok"] is False
    assert o["speedup_vs_dense"]["rtnq:auto"][1] == pytest.approx(40.2 / 11.0)
    (th,) = harness.choose_thresholds(recs)
    assert (th["bits"], th["small_m_max"], th["tensor_core_max"], th["crossover_reached"]) == (4, 1, 64, True)
    costs = harness.threshold_costs(recs, 4)
    assert costs[1]["small_m"] == pytest.approx(2 * 32 * 12.0)  # count-weighted over both shapes


def test_time_stack_scales_partial_stacks():
    timer = FakeTimer()
    items = [("marlin", 32, 1, 4096, 4096, 4, 128)]

    def plan(label, scale):
        cleaned = []
        return lambda: StackPlan(label, lambda i: None, items, scale=scale, cleanup=lambda: cleaned.append(1))

    recs = harness.time_stack([plan("rtnq W4", 1.0), plan("dense bf16", 2.5)], 1, timer, H100, replays=3)
    q, d = recs
    assert q["time_ms"] == pytest.approx(0.1) and d["time_ms"] == pytest.approx(0.25)  # 100 us x scale
    assert q["floor_ms"] == pytest.approx(32 * report.floor_us(report.bytes_min("marlin", 1, 4096, 4096),
                                                               report.flops(1, 4096, 4096), H100)[0] / 1e3)
    assert q["speedup_vs_dense"] == pytest.approx(2.5) and q["x_floor"] == pytest.approx(0.1 / q["floor_ms"])


# ---------------------------------------------------------------------------------- shapes


def test_checkpoint_groups_share_dense_baselines_across_bits():
    entries = {
        "model.layers.0.self_attn.q_proj.weight": (256, 256, 8, 128),
        "model.layers.0.self_attn.o_proj.weight": (256, 256, 8, 128),
        "model.layers.1.self_attn.q_proj.weight": (256, 256, 4, 128),
        "model.layers.1.mlp.down_proj.weight": (256, 512, 4, 128),
    }
    groups = shapes.checkpoint_groups(entries)
    assert [(g.name, g.n, g.k, g.count) for g in groups] == [("o_proj/q_proj", 256, 256, 3), ("down_proj", 256, 512, 1)]
    assert groups[0].configs == [QuantConfig(8, 128), QuantConfig(4, 128)]
    assert len(groups[0].members[QuantConfig(8, 128)]) == 2
    assert shapes.filter_groups(groups, "q_proj") == [groups[0]]
    with pytest.raises(UsageError, match=r"--shapes 'gate' matches none of: o_proj/q_proj, down_proj"):
        shapes.filter_groups(groups, "gate")


def test_parse_int_list():
    assert shapes.parse_int_list("64, 1,16,1", "--batch") == [1, 16, 64]
    assert shapes.parse_int_list("8,4", "--bits", allowed=(4, 8)) == [4, 8]


@pytest.mark.parametrize("bad, message", [
    ("4,x", r"--bits: 'x' is not an integer \(expected a comma list like 1,16,64\)"),
    ("0", r"--bits: 0 is not one of 4, 8"),
    (",", r"--bits: empty list"),
    ("3", r"--bits: 3 is not one of 4, 8"),
])
def test_parse_int_list_errors_name_the_option(bad, message):
    with pytest.raises(UsageError, match=message):
        shapes.parse_int_list(bad, "--bits", allowed=(4, 8))


def test_parse_int_list_without_allowed_values():
    with pytest.raises(UsageError, match=r"--batch: 0 is not a positive integer"):
        shapes.parse_int_list("1,0", "--batch")


# ------------------------------------------------------------------------- CLI, real entry point


def _json(stdout: str) -> dict:
    doc = json.loads(stdout)
    assert doc["schema"] == "rtnq-bench/1"
    return doc


def test_cli_cpu_synthetic_tiny(tmp_path, monkeypatch):
    dispatch_file = tmp_path / "dispatch.json"
    monkeypatch.setenv("RTNQ_DISPATCH_FILE", str(dispatch_file))
    r = run("bench", "--synthetic", "tiny", "--device", "cpu", "--batch", "1,3", "--json")
    assert r.code == 0, r.err
    doc = _json(r.out)
    assert doc["env"]["device"] == "cpu" and doc["settings"]["timer"] == "cpu-wall"
    assert "CPU" in r.err and "NOT GPU speed" in r.err  # every human figure is labelled CPU
    recs = doc["records"]
    assert {(x["shape"], x["m"]) for x in recs} == {(s, m) for s in ("qkv", "o", "gate_up", "down", "lm_head")
                                                    for m in (1, 3)}
    for x in recs:  # every record stamped and labelled
        assert x["device"] == "cpu"
        assert set(x["env"]) == {"device", "gpu", "driver", "cuda", "torch", "abi_version", "git"}
        assert x["env"]["torch"] == torch.__version__
    ref = [x for x in recs if x["variant"] == "rtnq:reference"]
    assert len(ref) == 10 and all(x["time_us"] > 0 and x["check"] == "ok" for x in ref)
    dense = [x for x in recs if x["variant"] == "dense"]
    assert all(x["check"] == "ok" and x["speedup_vs_dense"] is not None for x in dense)
    # PyTorch's int4 kernel as a peer (its CPU op here): one record per shape and M whatever this torch has,
    # timed and correct when the CPU op exists, else unavailable with the reason; never silently left out.
    tg = {(x["shape"], x["m"]): x for x in recs if x["variant"] == "tinygemm"}
    assert set(tg) == {(x["shape"], x["m"]) for x in ref}
    if _has_cpu_int4pack():
        assert all(x["check"] == "ok" and x["time_us"] > 0 and "unavailable" not in x for x in tg.values()), tg
    else:
        assert all(x["time_us"] is None and x["unavailable"].startswith("cannot build the int4 pack")
                   for x in tg.values()), tg
    assert doc["thresholds"] == [] and not dispatch_file.exists()  # CPU runs never write thresholds
    stack = doc["stack"]
    assert {(x["m"], x["variant"]) for x in stack} == {(m, v) for m in (1, 16, 64) for v in ("rtnq W4", "dense bf16")}
    assert all(x["time_ms"] > 0 and x["floor_ms"] > 0 for x in stack)


def test_cli_no_gpu_is_one_line_and_exit_3():
    if torch.cuda.is_available():
        pytest.skip("this test checks the no-GPU error")
    p = run_process("bench", "--synthetic", "tiny", "--batch", "1")
    assert p.returncode == 3
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU"), p.stderr
    assert "--device cpu" in lines[0] and p.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "give a converted checkpoint"),
        (("somedir", "--synthetic", "tiny"), "not both"),
        (("--synthetic", "llama-9"), "not a known model"),
        (("--synthetic", "tiny", "--batch", "1,x"), "--batch"),
        (("--synthetic", "tiny", "--bits", "3"), "--bits"),
        (("--synthetic", "tiny", "--group-size", "100"), "--group-size"),
        (("--synthetic", "tiny", "--device", "tpu"), "--device"),
        (("--synthetic", "tiny", "--dtype", "fp32"), "bf16 or fp16"),
        (("somedir", "--bits", "8"), "apply to --synthetic"),
    ],
)
def test_cli_usage_errors_exit_2(args, message):
    r = run("bench", *args)
    assert r.code == 2, (r.code, r.err)
    assert message in r.err


def test_cli_plot(tmp_path):
    png = tmp_path / "speedup.png"
    r = run("bench", "--synthetic", "tiny", "--device", "cpu", "--batch", "1,2", "--shapes", "o",
            "--no-stack", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.code == 2 and "--plot needs matplotlib" in r.err
        assert len(r.err.strip().splitlines()) == 1
        return
    assert r.code == 0, r.err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("fmt", ["marlin", "gptq", "compressed-tensors"])
def test_cli_cpu_on_a_converted_checkpoint(tmp_path, fmt):
    from rtnq.checkpoint import manifest as mf
    from rtnq import synthetic

    src, out = tmp_path / "src", tmp_path / "out"
    synthetic.write_checkpoint(src, synthetic.SampleSpec(layers=2, shards=1))
    c = run("convert", src, out, "--bits", "4", "--keep-int8", "layers.0", "--format", fmt)
    assert c.code == 0, c.err
    r = run("bench", out, "--device", "cpu", "--batch", "1,5", "--json")
    assert r.code == 0, r.err
    doc = _json(r.out)
    man = mf.read(out)
    want = {(e.shape[0], e.shape[1], e.bits, e.group_size) for e in man.quantized().values()}
    got = {(x["n"], x["k"], x["bits"], x["group_size"]) for x in doc["records"] if x["variant"] == "rtnq:reference"}
    assert got == want and {b for *_, b, _ in want} == {4, 8}
    assert all(x["check"] == "ok" for x in doc["records"] if x["variant"] == "rtnq:reference")
    counts = {}
    for x in doc["records"]:
        if x["variant"] == "rtnq:reference" and x["m"] == 1:
            counts[(x["n"], x["k"], x["bits"])] = x["count"]
    assert sum(counts.values()) == len(man.quantized())  # every quantized linear is represented
    assert doc["settings"]["dtype"] == "bf16"  # the checkpoint's dtype by default
    assert [x["variant"] for x in doc["stack"] if x["m"] == 1] == ["rtnq", "dense bf16"]


def test_python_m_rtnq_bench_runs_without_typer_and_rich():
    """scripts/gpu_check.sh runs the bench on a machine that may lack typer and rich."""
    code = ("import sys; sys.modules['typer'] = None; sys.modules['rich'] = None\n"
            "from rtnq.bench.__main__ import main\n"
            "sys.exit(main(['--synthetic', 'tiny', '--device', 'cpu', '--batch', '2', '--shapes', 'down',"
            " '--no-stack', '--json']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    doc = _json(p.stdout)
    assert {x["shape"] for x in doc["records"]} == {"down"}
    assert "down n=256 k=256" in p.stderr  # plain-text table
    no_gpu = subprocess.run([sys.executable, "-m", "rtnq.bench", "--synthetic", "tiny"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if not torch.cuda.is_available():
        assert no_gpu.returncode == 3 and no_gpu.stderr.startswith("error: no CUDA GPU")


# ------------------------------------------- GPU plumbing on a CPU, with stand-ins for the runtime


class FakeOps:
    """Stands in for rtnq.runtime.ops.gemm on a CPU: the same signature, computed by the reference."""

    def __init__(self):
        self.calls = []

    def gemm(self, x, weight, *, path="auto", out=None):
        from rtnq.runtime import MarlinWeight

        assert isinstance(weight, MarlinWeight)  # the checked value type, never loose tensors
        self.calls.append((path, tuple(x.shape), weight.bits, weight.n, weight.k, weight.group_size, out is not None))
        if path == "small_m" and x.shape[0] > 16:
            raise RuntimeError("small-M kernel takes M <= 16")
        y = torch.nn.functional.linear(x, weight.reference_dequantize().to(x.dtype))
        if out is None:
            return y
        out.copy_(y)
        return out


def _has_cpu_int4pack() -> bool:
    return all(hasattr(torch.ops.aten, op) for op in ("_convert_weight_to_int4pack_for_cpu",
                                                     "_weight_int4pack_mm_for_cpu"))


def test_kernel_path_plumbing_with_a_stand_in_runtime(monkeypatch):
    from rtnq.bench import backends, timing
    from rtnq.runtime import ops as runtime_ops

    ops = FakeOps()
    monkeypatch.setattr(runtime_ops, "gemm", ops.gemm)
    model = shapes.SYNTHETIC["tiny"]
    groups = shapes.filter_groups(shapes.synthetic_groups(model, [4, 8], 128), "down")
    be = backends.TorchBackend("cpu", "bf16", model=model)
    be.kernel_paths = True  # what a GPU run does: one case per rtnq path, through ops.gemm
    recs = harness.sweep(groups, be, timing.WallTimer(), Ceilings(10.0, 0.1, "cpu"),
                         SweepSettings([3, 32], rounds=1, per_round=1, replay_target_us=1.0, max_reps=1))
    by = {(r["variant"], r["bits"], r["m"]): r for r in recs}
    for bits in (4, 8):
        for path in ("tensor_core", "dequant", "auto"):
            for m in (3, 32):
                assert by[(f"rtnq:{path}", bits, m)]["check"] == "ok"
        assert by[("rtnq:small_m", bits, 3)]["check"] == "ok"
        assert "M <= 16" in by[("rtnq:small_m", bits, 32)]["unavailable"]  # reported, not fatal
    int8 = by[("int8pack", 8, 3)]
    if hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        assert int8["check"] == "ok" and int8["time_us"] > 0
    else:
        assert int8["time_us"] is None and "_weight_int8pack_mm is not in this torch" in int8["unavailable"]
    if _has_cpu_int4pack():
        assert by[("tinygemm", 4, 3)]["check"] == "ok"
    else:
        assert by[("tinygemm", 4, 3)]["unavailable"].startswith("cannot build the int4 pack")
    assert ("tinygemm", 8, 3) not in by  # PyTorch's int4 kernel is a W4 peer only
    assert ("int8pack", 4, 3) not in by  # and its int8 kernel a W8 peer only
    assert {c[0] for c in ops.calls} == set(harness.RTNQ_PATHS)
    assert all(c[3:6] == (256, 256, 128) and c[6] for c in ops.calls)  # n, k, group_size, out= passed


def test_save_thresholds_through_the_dispatch_contract(tmp_path, monkeypatch):
    from rtnq.bench.app import save_thresholds

    saved = []

    def fake_save(gpu, bits, dtype, small_m_max, tensor_core_max, *, source="", path=None):
        saved.append((gpu, bits, dtype, small_m_max, tensor_core_max, source))
        return dispatch.dispatch_file()

    monkeypatch.setattr(dispatch, "save_thresholds", fake_save)
    monkeypatch.setenv("RTNQ_DISPATCH_FILE", str(tmp_path / "d.json"))
    recs, _ = _sweep(batches=[1, 16, 64, 256, 1024])
    th = harness.choose_thresholds(recs)
    used = [{"bits": 4, "small_m_max": 16, "tensor_core_max": 1024, "measured": False}]
    save_thresholds(th, "NVIDIA H100 80GB HBM3", "bf16", used, True, source="test")
    assert saved == [("NVIDIA H100 80GB HBM3", 4, "bf16", 1, 64, "test")]
    assert th[0]["saved"] == str(tmp_path / "d.json") and th[0]["used_before"] == used[0]
    th2 = harness.choose_thresholds(recs)
    save_thresholds(th2, "gpu", "bf16", [], False, source="test")
    assert th2[0]["not_saved"] == "--no-save-dispatch" and len(saved) == 1


def test_failed_threshold_write_is_reported_with_the_results(tmp_path, monkeypatch):
    from rtnq.bench.app import save_thresholds

    monkeypatch.setenv("RTNQ_DISPATCH_FILE", str(tmp_path / "d.json"))
    (tmp_path / "d.json").write_text("{not json")  # an unreadable file is not overwritten
    recs, _ = _sweep(batches=[1, 16, 64, 256, 1024])
    th = harness.choose_thresholds(recs)
    save_thresholds(th, "gpu", "bf16", [], True, source="test")
    assert "saved" not in th[0]
    assert th[0]["not_saved"].startswith("RtnqError: ") and "not a readable dispatch file" in th[0]["not_saved"]
    assert (tmp_path / "d.json").read_text() == "{not json"


def test_thresholds_round_trip_through_the_runtime_dispatcher(tmp_path, monkeypatch):
    from rtnq.bench.app import save_thresholds

    monkeypatch.setenv("RTNQ_DISPATCH_FILE", str(tmp_path / "dispatch.json"))
    dispatch.clear_cache()
    recs, _ = _sweep(batches=[1, 16, 64, 256, 1024])
    th = harness.choose_thresholds(recs)
    save_thresholds(th, "NVIDIA H100 80GB HBM3", "bf16", [], True, source="test_bench")
    assert th[0]["saved"] == str(tmp_path / "dispatch.json")
    got = dispatch.load_thresholds("NVIDIA H100 80GB HBM3", 4, "bf16")
    assert (got.small_m_max, got.tensor_core_max, got.measured) == (1, 64, True)
    assert [dispatch.choose_path(m, got) for m in (1, 16, 64, 65, 256)] == [
        "small_m", "tensor_core", "tensor_core", "dequant", "dequant"]
    assert dispatch.cached_thresholds("NVIDIA H100 80GB HBM3", 4, torch.bfloat16) == got  # what ops.gemm reads


# ------------------------------------------------------------- one option table, two entry points


def _typer_bench_command():
    import typer.main

    from rtnq.cli.app import app

    group = typer.main.get_command(app)
    return group.commands["bench"]


def test_both_entry_points_are_built_from_the_one_option_table():
    from rtnq.bench import options

    table = options.specs()
    want = {flag for s in table for flag in s.flags}
    assert {"--check", "--no-check", "--stack", "--no-stack", "--peers", "--no-peers", "--save-dispatch",
            "--no-save-dispatch", "--quick", "--json", "--batch", "--group-size"} <= want
    cmd = _typer_bench_command()
    typer_flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")} - {"--help"}
    parser = options.parser()
    argparse_flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert typer_flags == argparse_flags == want
    # the same defaults, and the same destination field for every flag
    assert options.parse([]) == options.Options()
    defaults = {p.name: p.default for p in cmd.params}
    assert defaults == {s.name: s.default for s in table}
    assert [p.name for p in cmd.params if p.param_type_name == "argument"] == ["out_dir"]


def test_no_check_in_both_entry_points(tmp_path):
    args = ["--synthetic", "tiny", "--device", "cpu", "--batch", "2", "--shapes", "o", "--no-stack", "--no-check",
            "--no-peers", "--json"]
    r = run("bench", *args)
    assert r.code == 0, r.err
    p = subprocess.run([sys.executable, "-m", "rtnq.bench", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    for doc in (_json(r.out), _json(p.stdout)):
        assert doc["settings"]["options"]["checks"] is False and doc["settings"]["options"]["peers"] is False
        recs = doc["records"]
        assert recs and all(x["check"] == "-" and x["rel_err"] is None for x in recs)
        assert not any(x["role"] == "peer" for x in recs)
    on = run("bench", *[a for a in args if a != "--no-check"], "--check")
    assert on.code == 0 and all(x["check"] == "ok" for x in _json(on.out)["records"])


def _no_typer_env(tmp_path) -> dict:
    """A sitecustomize that makes typer and rich unimportable, as on a bare GPU image."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['typer'] = None\nsys.modules['rich'] = None\n")
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


def test_python_m_rtnq_bench_entry_with_typer_blocked(tmp_path):
    env = _no_typer_env(tmp_path)
    blocked = subprocess.run([sys.executable, "-c", "import typer"], capture_output=True, text=True, env=env)
    assert blocked.returncode != 0 and "ModuleNotFoundError" in blocked.stderr  # the block works
    h = subprocess.run([sys.executable, "-m", "rtnq.bench", "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert h.returncode == 0, h.stderr
    assert "--no-check" in h.stdout and "--no-peers" in h.stdout and "--stack, --no-stack" in h.stdout
    p = subprocess.run([sys.executable, "-m", "rtnq.bench", "--synthetic", "tiny", "--device", "cpu", "--batch", "2",
                        "--shapes", "down", "--no-stack", "--no-check", "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr
    doc = _json(p.stdout)
    assert {x["shape"] for x in doc["records"]} == {"down"} and all(x["check"] == "-" for x in doc["records"])
    assert "down n=256 k=256" in p.stderr  # plain-text table
    bad = subprocess.run([sys.executable, "-m", "rtnq.bench", "--synthetic", "tiny", "--device", "tpu"],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    assert bad.returncode == 2 and bad.stderr == "error: --device must be cuda or cpu, got 'tpu'\n"


@pytest.mark.parametrize(
    "args, code",
    [
        (("--synthetic", "tiny", "--device", "tpu"), 2),
        (("--synthetic", "tiny", "--dtype", "fp32"), 2),
        (("--synthetic", "tiny", "--bits", "3"), 2),
        (("--synthetic", "tiny", "--group-size", "100"), 2),
        (("somedir", "--synthetic", "tiny"), 2),
        (("--synthetic", "llama-9"), 2),
        ((), 2),
    ],
)
def test_both_entry_points_map_errors_alike(args, code):
    """One mapping RtnqError -> message + exit code: `rtnq bench` and `python -m rtnq.bench` say the same."""
    r = run("bench", *args)
    p = subprocess.run([sys.executable, "-m", "rtnq.bench", *args], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.code == p.returncode == code, (r.err, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert " ".join(r.err.split()) == lines[0]  # rich may wrap the line; the words are the same


def test_python_m_rtnq_bench_syntax_errors_exit_2():
    p = subprocess.run([sys.executable, "-m", "rtnq.bench", "--group-size", "abc"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "--group-size" in p.stderr
    r = run("bench", "--group-size", "abc")
    assert r.code == 2 and "--group-size" in r.err


def test_bench_imports_stay_light():
    """`import rtnq.bench`, its options and app, and `rtnq bench --help` import neither torch nor the runtime."""
    code = ("import sys\n"
            "import rtnq.bench, rtnq.bench.options, rtnq.bench.app, rtnq.bench.report, rtnq.bench.harness\n"
            "heavy = [m for m in ('torch', 'rtnq.runtime', 'typer', 'rich') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "import rtnq.cli\n"
            "sys.argv = ['rtnq', 'bench', '--help']\n"
            "try:\n"
            "    rtnq.cli.main()\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = [m for m in ('torch', 'rtnq.runtime') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert "--no-check" in p.stdout


def test_report_paths_are_the_runtime_dispatchers():
    from rtnq.runtime import ops

    assert report.PATHS == dispatch.PATHS
    assert set(harness.RTNQ_PATHS) == set(ops.GEMM_PATHS)


# ------------------------------------------------------------------ peers: reported, never skipped


def _config_weights(bits, group_size, dtype_name="bf16"):
    from rtnq.bench import device, weights

    dev = device.Device("cpu", dtype_name)
    group = ShapeGroup("o", 256, 256, 1, [QuantConfig(bits, group_size)])
    return dev, weights.build(dev, group, None)[0]


def _peer_cases(dev, cw):
    from rtnq.bench import peers

    fam, unavailable = {}, {}
    peers.add_families(dev, cw, fam, unavailable)
    copies = {name: [make()] for name, (_, make) in fam.items() if name not in unavailable}
    xs = [torch.randn(2, 256, dtype=dev.dtype)]  # on the CPU even when a test poses as a CUDA device
    return fam, unavailable, list(peers.cases(dev, cw.config, fam, unavailable, copies, xs, xs, None, None))


class _Without:
    """An op namespace that lacks one op, as an older torch would."""

    def __init__(self, namespace, missing):
        self._namespace, self._missing = namespace, missing

    def __getattr__(self, name):
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._namespace, name)


@pytest.mark.parametrize("bits, group_size, variant, reason", [
    (4, -1, "tinygemm", "tinygemm supports group sizes (32, 64, 128, 256), not -1"),
    (8, 128, "int8pack", None),
])
def test_peer_that_cannot_run_is_a_case_with_its_reason(bits, group_size, variant, reason, monkeypatch):
    if reason is None:  # a torch without the int8 op (hasattr on torch.ops.aten resolves ops lazily: wrap it)
        monkeypatch.setattr(torch.ops, "aten", _Without(torch.ops.aten, "_weight_int8pack_mm"))
        reason = "AttributeError: torch.ops.aten._weight_int8pack_mm is not in this torch"
    dev, cw = _config_weights(bits, group_size)
    fam, unavailable, cases = _peer_cases(dev, cw)
    assert unavailable == {f"{variant}:{cw.config}": reason}
    assert [(c.variant, c.role, c.fn, c.unavailable) for c, _, _ in cases] == [(variant, "peer", None, reason)]


def test_tinygemm_build_failure_is_reported(monkeypatch):
    from rtnq.bench import peers

    def broken(dev, cw):
        raise RuntimeError("aten op changed\nsecond line")

    monkeypatch.setattr(peers, "tinygemm_pack", broken)
    dev, cw = _config_weights(4, 128)
    _, unavailable, cases = _peer_cases(dev, cw)
    (case, _, _), = cases
    assert case.unavailable == "cannot build the int4 pack: RuntimeError: aten op changed" and case.fn is None


def test_tinygemm_on_cuda_needs_bf16_activations():
    dev, cw = _config_weights(4, 128, "fp16")
    dev.type = "cuda"  # add_families decides from the device and dtype before touching any CUDA op
    _, unavailable, cases = _peer_cases(dev, cw)
    assert [c.unavailable for c, _, _ in cases] == ["tinygemm (_weight_int4pack_mm) runs bf16 activations only"]
