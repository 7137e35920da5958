"""Everything `rtnq bench` shows or writes: the environment stamp, the human tables (rich when it is
installed, plain text otherwise, always on stderr), the JSON document (stdout) and the plot.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from rtnq.errors import UsageError

if TYPE_CHECKING:  # device.py imports torch; this module must not at import time
    from rtnq.bench.device import RuntimeInfo

SCHEMA = "rtnq-bench/1"
STAMP_KEYS = ("device", "gpu", "driver", "cuda", "torch", "abi_version", "git")


# ----------------------------------------------------------------------------------- environment


def git_revision() -> str:
    """RTNQ_GIT_REV if set (scripts/gpu_check.sh sets it for copies without .git), else `git rev-parse`
    of the checkout rtnq runs from (+ "-dirty" with uncommitted tracked changes), else "unknown"."""
    rev = os.environ.get("RTNQ_GIT_REV")
    if rev:
        return rev
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "") if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def nvidia_smi(fields: str = "name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw") -> dict | None:
    """One read-only nvidia-smi query (GPU.md 4.2: record clocks, never set them)."""
    try:
        res = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0 or not res.stdout.strip():
        return None
    values = [v.strip() for v in res.stdout.strip().splitlines()[0].split(",")]
    return dict(zip(fields.split(","), values))


def rtnq_version() -> str:
    try:
        from importlib.metadata import version

        return version("rtnq")
    except Exception:  # noqa: BLE001 - not installed (run from a source tree)
        return "unknown"


def environment(device: str, runtime: RuntimeInfo) -> dict:
    import torch

    env: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "rtnq": rtnq_version(),
        "git": git_revision(),
        "abi_version": runtime.abi_version,
        "runtime": "rtnq.runtime",
    }
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info = dict(runtime.device_info)
        smi = nvidia_smi()
        env.update(
            gpu=torch.cuda.get_device_name(idx),
            capability=".".join(map(str, torch.cuda.get_device_capability(idx))),
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            memory_bytes=props.total_memory,
            # the NVIDIA driver release (nvidia-smi, e.g. 580.159.04); without nvidia-smi, the CUDA driver API
            # version the library reports (e.g. 13000), which device_info also keeps
            driver=(smi or {}).get("driver_version") or info.get("driver_version"),
            device_info=info,
            nvidia_smi_before=smi,
        )
    else:
        env.update(gpu=None, driver=None, cpu=platform.processor() or platform.machine(),
                   threads=torch.get_num_threads())
    return env


def stamp(env: dict) -> dict:
    return {k: env.get(k) for k in STAMP_KEYS}


# --------------------------------------------------------------------------------------- printers


class PlainPrinter:
    """Fixed-width text on stderr, for machines without rich (`python -m rtnq.bench` on a GPU box)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr

    def line(self, text: str, style: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        print(f"\n{title}", file=self.stream)
        print("  ".join(c.rjust(w) for c, w in zip(columns, widths)), file=self.stream)
        print("  ".join("-" * w for w in widths), file=self.stream)
        for r in rows:
            print("  ".join(v.rjust(w) for v, w in zip(r, widths)), file=self.stream)
        self.stream.flush()


class RichPrinter:
    def __init__(self, console: Any):
        self.console = console

    def line(self, text: str, style: str = "") -> None:
        from rich.markup import escape

        self.console.print(f"[{style}]{escape(text)}[/]" if style else escape(text), highlight=False, soft_wrap=True)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        from rich import box
        from rich.table import Table

        t = Table(title=title, title_justify="left", show_lines=False, pad_edge=False, box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True)
        for i, c in enumerate(columns):  # fold rather than truncate: a clipped number is a wrong number
            t.add_column(c, justify="left" if i in (0, 1) else "right", overflow="fold")
        for r in rows:
            t.add_row(*r)
        self.console.print(t)


def default_printer() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return PlainPrinter()
    return RichPrinter(Console(stderr=True))


# ----------------------------------------------------------------------------------- formatting


def _f(v: Any, fmt: str, suffix: str = "") -> str:
    if v is None:
        return "-"
    try:
        return format(v, fmt) + suffix
    except (TypeError, ValueError):
        return str(v)


def _time(r: dict) -> str:
    if r.get("time_us") is None:
        return "n/a"
    t = r["time_us"]
    prec = ".2f" if t < 10 else ".1f" if t < 100 else ".0f"
    return f"{t:{prec}}"


def _spread(r: dict) -> str:
    """Width of the middle 80 % of samples relative to the median: (p90 - p10) / median."""
    if r.get("time_us") is None:
        return "-"
    return f"{100 * (r['p90_us'] - r['p10_us']) / r['time_us']:.0f}%"


def _variant_label(r: dict, device: str) -> str:
    """Short row labels: "cuBLAS", "cuBLAS kn", "W4g128 auto", "W4g128 tinygemm" ..."""
    v = r["variant"]
    if v.startswith("dense"):
        lib = "cuBLAS" if device == "cuda" else "CPU mm"
        return {"dense": lib, "dense:kn": f"{lib} kn", "dense:bf16": f"{lib} bf16"}.get(v, v)
    g = r.get("group_size")
    q = f"W{r['bits']}g{'ch' if g == -1 else g}" if r.get("bits") else ""
    name = v.split(":", 1)[1] if v.startswith("rtnq:") else v
    name = {"tensor_core": "tc", "reference": "ref"}.get(name, name)
    return f"{q} {name}".strip()


def render(doc: dict, printer: Any) -> None:
    env, ceil = doc["env"], doc["ceilings"]
    cpu = env["device"] == "cpu"
    tag = "CPU reference path - plumbing check, NOT GPU speed" if cpu else env.get("gpu") or "cuda"
    base = "x CPU mm" if cpu else "x cuBLAS"
    unit = "us CPU" if cpu else "us"
    printer.line(
        f"{tag}: copy {ceil['copy_gbps']:.0f} GB/s, {doc['settings']['dtype']} matmul {ceil['matmul_tflops']:.1f} TFLOP/s "
        f"(measured at start); torch {env['torch']}, CUDA {env.get('cuda')}, "
        f"driver {env.get('driver')}, ABI {env.get('abi_version')}, git {env.get('git')}"
    )
    printer.line("variants: tc = tensor-core kernel, dequant = dequantize + cuBLAS, auto = the dispatcher; "
                 "kn = cuBLAS on a pre-transposed weight; x floor = time / roofline floor; "
                 f"{base} = speedup over the faster dense layout", "dim")
    by_shape: dict[tuple, list[dict]] = {}
    for r in doc["records"]:
        by_shape.setdefault((r["shape"], r["n"], r["k"]), []).append(r)
    for (shape, n, k), recs in by_shape.items():
        rows = []
        for r in recs:
            label = _variant_label(r, env["device"])
            if r.get("time_us") is None:
                rows.append([str(r["m"]), label, "n/a", "-", "-", "-", "-", "-", "-", (r.get("unavailable") or "")[:70]])
                continue
            flags = []
            if r.get("check") == "FAIL":
                flags.append(f"WRONG (rel err {r['rel_err']:.1e})")
            if r.get("rotation_ok") is False and not cpu:
                flags.append("L2-resident")
            if str(r.get("method", "")).startswith("cuda-events"):
                flags.append("no graph")
            rows.append([
                str(r["m"]), label, _time(r), _spread(r), _f(r["gbps"], ".0f"), _f(r["pct_copy"], ".0f", "%"),
                _f(r["tflops"], ".3g"), _f(r["x_floor"], ".2f"), _f(r.get("speedup_vs_dense"), ".2f"),
                ", ".join(flags),
            ])
        printer.table(
            f"{shape} n={n} k={k} ({tag}; {doc['settings']['dtype']}; per-call median of "
            f"{doc['settings']['samples']} samples, spread = (p90 - p10) / median)",
            ["M", "variant", unit, "spread", "GB/s", "%copy", "TFLOP/s", "x floor", base, "notes"], rows)

    sums = doc.get("summaries", [])
    if sums:
        batches = doc["settings"]["batches"]
        rows = []
        auto_key = "rtnq:reference" if cpu else "rtnq:auto"
        for s in sums:
            sp = s["speedup_vs_dense"].get(auto_key, {})
            rows.append([f"{s['shape']} {s['n']}x{s['k']}", f"W{s['bits']} g{s['group_size']}"]
                        + [_f(sp.get(m), ".2f", "x") for m in batches]
                        + [_f(s["dequant_wins_from_m"], "d") if not cpu else "-",
                           _f(s["beats_dense_up_to_m"], "d"),
                           _f(s["auto_worst_vs_best"], ".2f") if not cpu else "-"])
        printer.table(f"Summary [{tag}]: {auto_key} speedup {base} per M; M from which dequant+cuBLAS beats the "
                      "fused kernels; M up to which rtnq beats dense; dispatcher time / its fastest path (worst M)",
                      ["shape", "quant"] + [f"M={m}" for m in batches] + ["dequant wins from", "beats dense to",
                                                                        "auto/best"], rows)
    th = doc.get("thresholds", [])
    if th:
        rows = []
        for t in th:
            if not t.get("chosen"):
                rows.append([f"W{t['bits']}", str(t.get("dtype")), "-", "-", "-", t.get("reason", "")])
                continue
            rows.append([f"W{t['bits']}", str(t["dtype"]), str(t["small_m_max"]), str(t["tensor_core_max"]),
                         "yes" if t["crossover_reached"] else f"no (> {max(t['batches'])})",
                         t.get("saved") or t.get("not_saved", "")])
        printer.table("Dispatcher thresholds measured (M <= small_m_max: small-M kernel; <= tensor_core_max: "
                      "tensor-core kernel; above: dequantize + cuBLAS)",
                      ["bits", "dtype", "small_m_max", "tensor_core_max", "dequant reached", "written"], rows)
    st = doc.get("stack", [])
    if st:
        rows = []
        for r in st:
            rows.append([r["model"], str(r["m"]), r["variant"],
                         _f(r.get("time_ms"), ".3f") if r.get("time_ms") is not None else "n/a",
                         _f(r["floor_ms"], ".3f"), _f(r.get("x_floor"), ".2f"),
                         _f(r.get("speedup_vs_dense"), ".2f", "x"), r.get("note") or r.get("unavailable") or ""])
        printer.table(f"Linear stack: one forward of all linears [{tag}; ms; floor = sum of per-linear rooflines "
                      "at the measured ceilings]",
                      ["model", "M", "variant", "time ms" + (" (CPU)" if cpu else ""), "floor ms", "x floor",
                       "vs dense", "notes"], rows)
    for note in doc.get("notes", []):
        printer.line(note, "yellow")


# --------------------------------------------------------------------------------------- json/plot


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def dumps(doc: dict) -> str:
    return json.dumps(_jsonable(doc), indent=1, sort_keys=True, default=str)


def check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)") from None


def plot(doc: dict, path: Path) -> None:
    """Speedup over the dense baseline vs batch size, one line per (shape, quant config) for what rtnq
    runs (the dispatcher; the reference path on a CPU), dashed for PyTorch's tinygemm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    env = doc["env"]
    cpu = env["device"] == "cpu"
    fig, ax = plt.subplots(figsize=(8, 5))
    auto_key = "rtnq:reference" if cpu else "rtnq:auto"
    for s in doc.get("summaries", []):
        for variant, style in ((auto_key, "-o"), ("tinygemm", "--x")):
            sp = s["speedup_vs_dense"].get(variant)
            if not sp:
                continue
            pts = sorted((int(m), v) for m, v in sp.items() if v is not None)
            if not pts:
                continue
            label = f"{s['shape']} {s['n']}x{s['k']} W{s['bits']}" + ("" if variant == auto_key else " tinygemm")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=4)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xlabel("batch size M (rows of x)")
    ax.set_ylabel(("speedup vs CPU dense" if cpu else "speedup vs cuBLAS") + f" {doc['settings']['dtype']}")
    where = "CPU reference path (plumbing check, not GPU speed)" if cpu else f"{env.get('gpu')}, torch {env['torch']}"
    ax.set_title(f"rtnq bench: {where}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


Progress = Callable[[str], None]
