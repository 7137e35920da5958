"""`rtnq bench` from options to report: validate, pick the device, measure the ceilings, sweep,
choose and save dispatcher thresholds, time the linear stack, then print / write the results.

Shared by the typer command (`rtnq bench`, rtnq/cli/bench.py) and the typer-free `python -m rtnq.bench`
(for GPU machines that have torch but not rtnq's CLI dependencies); both build `Options` from the one
table in options.py. torch and rtnq.runtime are imported inside `run`, so importing this module is cheap.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rtnq import dtypes, params
from rtnq.bench.options import Options
from rtnq.errors import CheckpointError, RtnqError, UsageError

if TYPE_CHECKING:
    from rtnq.checkpoint.manifest import Manifest

STACK_BATCHES = (1, 16, 64)


def _validate(o: Options) -> None:
    """Every value check of the options (the parsers only convert types), so both entry points say the same."""
    if o.device not in ("cuda", "cpu"):
        raise UsageError(f"--device must be cuda or cpu, got {o.device!r}")
    params.check(dtype=o.dtype)
    if o.out_dir is None and o.synthetic is None:
        raise UsageError("give a converted checkpoint directory OUT, or --synthetic MODEL (e.g. llama-3.1-8b)")
    if o.out_dir is not None and o.synthetic is not None:
        raise UsageError("give either OUT or --synthetic, not both")
    if o.out_dir is not None and (o.bits is not None or o.group_size is not None):
        raise UsageError("--bits and --group-size apply to --synthetic; a checkpoint's come from its manifest")
    if o.plot is not None:
        from rtnq.bench.output import check_plot_available

        check_plot_available()
        if not Path(o.plot).parent.exists():
            raise UsageError(f"--plot {o.plot}: directory {Path(o.plot).parent} does not exist")


def _checkpoint_entries(out_dir: Path) -> tuple[Manifest, dict[str, tuple[int, int, int, int]], list[str], str | None]:
    from rtnq.checkpoint import manifest as manifest_mod

    m = manifest_mod.read(out_dir)
    entries, skipped = {}, []
    for name, e in sorted(m.quantized().items()):
        if len(e.shape) != 2:
            skipped.append(name)
            continue
        n, k = e.shape
        entries[name] = (int(n), int(k), int(e.bits), int(e.group_size))
    if not entries:
        raise CheckpointError(f"{out_dir}: the manifest lists no 2-D quantized linear to benchmark")
    dt = str(m.defaults.get("dtype", "bfloat16"))
    row = dtypes.BY_NAME.get(dt) or dtypes.BY_SHORT.get(dt)
    dtype = row.short if row is not None and row.short in dtypes.SIXTEEN_BIT else None  # else: --dtype's default
    return m, entries, skipped, dtype


def save_thresholds(thresholds: list[dict], gpu: str, dtype: str, used: list[dict], save: bool, source: str) -> None:
    """Write each chosen threshold pair with rtnq.runtime.dispatch.save_thresholds (per GPU name, bits and
    dtype); record in each entry where it went, or why not."""
    from rtnq.runtime import dispatch

    for t in thresholds:
        t["used_before"] = next((u for u in used if u.get("bits") == t["bits"]), None)
        if not t.get("chosen"):
            continue
        if not save:
            t["not_saved"] = "--no-save-dispatch"
            continue
        try:
            written = dispatch.save_thresholds(gpu, t["bits"], dtype, t["small_m_max"], t["tensor_core_max"],
                                               source=source)
            t["saved"] = str(written)
        except (RtnqError, OSError) as e:  # a failed write is reported with the results
            t["not_saved"] = f"{type(e).__name__}: {e}"


def run(o: Options, printer: Any, stdout: TextIO) -> dict:
    """Run the benchmark and report; returns the JSON document (also printed with --json)."""
    _validate(o)
    from rtnq.bench import shapes as sh
    from rtnq.bench.output import dumps, environment, nvidia_smi, plot, render, stamp

    batches = sh.parse_int_list(o.batches, "--batch")
    notes: list[str] = []
    manifest = None
    model = None
    if o.synthetic is not None:
        model = sh.synthetic_model(o.synthetic)
        bits = sh.parse_int_list(o.bits or "4", "--bits", allowed=params.BITS)
        group_size = 128 if o.group_size is None else o.group_size
        params.check(group_size=group_size)
        groups = sh.synthetic_groups(model, bits, group_size)
        dtype = o.dtype or "bf16"
        source = f"synthetic {model.name}"
    else:
        manifest, entries, skipped, ck_dtype = _checkpoint_entries(Path(o.out_dir))
        groups = sh.checkpoint_groups(entries)
        bits = sorted({c.bits for g in groups for c in g.configs})
        dtype = o.dtype or ck_dtype or "bf16"
        source = f"checkpoint {o.out_dir}"
        if skipped:
            notes.append(f"not benchmarked: {len(skipped)} 3-D (expert) tensors, e.g. {skipped[0]}")
        if ck_dtype and dtype != ck_dtype:
            notes.append(f"--dtype {dtype}: the checkpoint's {ck_dtype} scales were cast to {dtype} for timing")
    groups = sh.filter_groups(groups, o.shapes)

    from rtnq.bench import backends, device, harness, timing, weights
    from rtnq.errors import KernelUnavailable
    from rtnq.runtime import dispatch

    if o.device == "cuda":
        problem = device.cuda_problem()
        if problem:
            raise KernelUnavailable(problem)
    rt = device.load_runtime(o.device)
    env = environment(o.device, rt)
    tstamp = stamp(env)
    forced = os.environ.get(dispatch.ENV_FORCE)
    if forced:
        env[dispatch.ENV_FORCE] = forced
        notes.append(f"RTNQ_FORCE_PATH={forced} is set: 'auto' (and the rtnq linear stack) ran the {forced} path only")
    printer.line(f"rtnq bench: {source}, {len(groups)} shapes, M = {','.join(map(str, batches))}, {dtype}, "
                 f"device {o.device}" + (" (CPU reference path: plumbing check, not GPU speed)" if o.device == "cpu" else ""))

    torch_dtype = dtypes.BY_SHORT[dtype].torch
    printer.line("measuring copy bandwidth and matmul rate ...", "dim")
    ceilings = timing.measure_ceilings(o.device, torch_dtype, quick=o.quick)
    if o.device == "cuda":
        timer: Any = timing.CudaGraphTimer()
        settings = harness.SweepSettings(batches, rounds=3, per_round=4 if o.quick else 10)
    else:
        timer = timing.WallTimer()
        settings = harness.SweepSettings(batches, rounds=2, per_round=2, replay_target_us=1.0, max_reps=2)

    used = []
    # dispatch keys use the library's name for the GPU (cudaDeviceProp.name, as torch reports it too)
    gpu_key = str(rt.device_info.get("name") or env.get("gpu"))
    if o.device == "cuda":
        for b in bits:
            try:
                th = dispatch.load_thresholds(gpu_key, b, dtype)
                used.append({"bits": b, "small_m_max": th.small_m_max, "tensor_core_max": th.tensor_core_max,
                             "measured": th.measured})
            except RtnqError as e:  # an unreadable dispatch file is reported; the sweep does not depend on it
                used.append({"bits": b, "error": f"{type(e).__name__}: {e}"})

    checkpoint = None if manifest is None else weights.Checkpoint(Path(o.out_dir), manifest)
    backend = backends.TorchBackend(o.device, dtype, model=model, checkpoint=checkpoint, checks=o.checks,
                                    peers=o.peers, log=lambda s: printer.line(s, "dim"))
    t0 = time.time()
    records = harness.sweep(groups, backend, timer, ceilings, settings, progress=lambda s: printer.line(s, "dim"))
    for r in records:
        r["env"] = tstamp
    summaries = harness.summarize(records, batches)

    thresholds: list[dict] = []
    if o.device == "cuda":
        thresholds = harness.choose_thresholds(records)
        save_thresholds(thresholds, gpu_key, dtype, used, o.save_dispatch,
                        source=f"rtnq bench {source} M={','.join(map(str, batches))} git {env['git']} "
                               f"{time.strftime('%Y-%m-%d')}")
        for t in thresholds:
            t["env"] = tstamp
    else:
        notes.append("CPU run: no dispatcher thresholds are chosen or written (they describe GPU kernels)")

    stack: list[dict] = []
    if o.stack:
        stack_bits: list[int | None] = list(bits) if manifest is None else [None]
        label = model.name if model else Path(o.out_dir).name
        for m in STACK_BATCHES:
            printer.line(f"linear stack: M={m}", "dim")
            recs = harness.time_stack(backend.stack_plans(groups, m, stack_bits), m, timer, ceilings,
                                      replays=3 if o.device == "cpu" else 20, model=label,
                                      device=o.device, dtype=dtype)
            for r in recs:
                r["env"] = tstamp
            stack.extend(recs)
        if model is not None and not model.quantize_lm_head:
            notes.append(f"linear stack: lm_head stays {dtype} in the rtnq stack (rtnq convert's default)")
        if o.shapes:
            notes.append(f"linear stack covers only the shapes selected by --shapes {o.shapes}")

    if o.device == "cuda":
        env["nvidia_smi_after"] = nvidia_smi()
    bad = [r for r in records if r.get("check") == "FAIL"]
    if bad:
        notes.append(f"{len(bad)} timed variant(s) computed a WRONG result (check column); their times are not "
                     f"speed results, e.g. {bad[0]['variant']} {bad[0]['shape']} M={bad[0]['m']} rel_err {bad[0]['rel_err']:.2e}")
    doc = {
        "schema": "rtnq-bench/1",
        "env": env,
        "ceilings": ceilings.to_json(),
        "settings": {
            "source": source, "dtype": dtype, "batches": batches, "device": o.device,
            "samples": settings.rounds * settings.per_round, "rounds": settings.rounds,
            "per_round": settings.per_round, "timer": timer.method, "quick": o.quick,
            "stack_batches": list(STACK_BATCHES) if o.stack else [], "options": _opts_json(o),
            "seconds": round(time.time() - t0, 1),
        },
        "dispatch_used": used,
        "records": records,
        "summaries": summaries,
        "thresholds": thresholds,
        "stack": stack,
        "notes": notes,
    }
    render(doc, printer)
    if o.plot is not None:
        plot(doc, Path(o.plot))
        printer.line(f"wrote {o.plot}")
    if o.json:
        stdout.write(dumps(doc) + "\n")
        stdout.flush()
    return doc


def _opts_json(o: Options) -> dict:
    d = asdict(o)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
