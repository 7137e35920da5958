"""Helpers of scripts/gpu_check.sh (run there with PYTHONPATH=<repo root>; needs torch with CUDA).

    python scripts/gpu_check.py env OUT.json          versions, GPU properties, measured copy / bf16 GEMM ceilings
    python scripts/gpu_check.py ptxas BUILD.log OUT   per-kernel registers / stack / spills from `-Xptxas -v`
    python scripts/gpu_check.py sanitize              small GEMMs on every path (run under compute-sanitizer)
    python scripts/gpu_check.py timing OUT.json       short timing table vs torch bf16 F.linear

Needs only torch and rtnq.runtime (no typer, rich or safetensors). Prints a short table last.
"""

from __future__ import annotations

import json
import math
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _torch():
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: torch sees no CUDA GPU")
    return torch


# ---- env ------------------------------------------------------------------------------------------------------------


def cmd_env(out: str) -> int:
    torch = _torch()
    from rtnq.bench import timing
    from rtnq.runtime import library

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    record = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mb": round(getattr(props, "L2_cache_size", 0) / 1e6, 1),
    }
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError:
        record["triton"] = None
    record["library"] = str(library.find_library())
    record["library_build"] = library.build_info()
    record["library_abi"] = library.abi_version()
    record["device_info"] = library.device_info()

    # Ceilings (GPU.md 4.2 step 1): the same measurement `rtnq bench` starts with.
    ceilings = timing.measure_ceilings("cuda", torch.bfloat16)
    record["copy_tb_s"] = round(ceilings.copy_gbps / 1e3, 3)
    record["bf16_tflops"] = round(ceilings.matmul_tflops, 1)
    record["ceilings_method"] = ceilings.detail
    Path(out).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for key in ("gpu", "capability", "sm_count", "torch", "torch_cuda", "library_build", "copy_tb_s", "bf16_tflops"):
        print(f"{key:15s} {record[key]}")
    return 0


# ---- ptxas ----------------------------------------------------------------------------------------------------------


def cmd_ptxas(log: str, out: str) -> int:
    """Summarise `-Xptxas -v` output: one line per (arch, kernel) with registers, smem, stack and spills."""
    rows, cur = [], None
    for line in Path(log).read_text(errors="replace").splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["static_smem"] = int(sm.group(1)) if sm else 0
            rows.append(cur)
            cur = None
    lines = [f"{'arch':6s} {'regs':>4s} {'stack':>5s} {'spill':>5s}  kernel"]
    for r in rows:
        name = re.sub(r"^_ZN4rtnq(\d+_GLOBAL__N__\w+?_\d+_)?", "", r["kernel"])
        lines.append(f"{r['arch']:6s} {r.get('regs', 0):4d} {r.get('stack', 0):5d} "
                     f"{r.get('spill_st', 0) + r.get('spill_ld', 0):5d}  {name}")
    spills = [r for r in rows if r.get("spill_st", 0) or r.get("spill_ld", 0)]
    lines.append(f"{len(rows)} kernels, {len(spills)} with spills")
    Path(out).write_text("\n".join(lines) + "\n")
    print(lines[-1])
    return 0


# ---- sanitize ---------------------------------------------------------------------------------------------------------


def cmd_sanitize() -> int:
    """Every path, both bit widths and dtypes, grouped and channelwise, on shapes that force split-K, a partial
    column tile and partial m-tiles. Inputs are made on the CPU and copied, and results are checked on the CPU, so
    the GPU runs almost nothing but rtnq's kernels (cheap under memcheck/racecheck)."""
    torch = _torch()
    from rtnq.numerics import rtn
    from rtnq.runtime import MarlinWeight, ops

    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    failures = 0
    for bits in (4, 8):
        for dtype in (torch.float16, torch.bfloat16):
            for group in (128, -1):
                n, k = 320, 1024  # 5 column blocks: a partial 256-column tile; 8 slabs per 128 rows: split-K
                codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=gen)
                groups = 1 if group == -1 else k // group
                scales = (1e-3 + 1e-2 * torch.rand(n, groups, generator=gen)).to(dtype)
                packed = MarlinWeight.pack(codes, scales, bits, group).to(dev)
                w = rtn.dequantize(codes, scales, bits, group).double()
                deq = ops.dequantize(packed).cpu()
                if not torch.equal(deq.double(), w):
                    print(f"FAIL dequantize w{bits} {dtype} g{group}")
                    failures += 1
                for m in (1, 5, 17, 40, 70):
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    ref = x.double() @ w.t()
                    for path in ("small_m", "tensor_core"):
                        out = ops.gemm(x.to(dev), packed, path=path).cpu()
                        err = float((out.double() - ref).norm() / ref.norm())
                        ok = math.isfinite(err) and err < (1e-3 if dtype == torch.float16 else 8e-3)
                        if not ok:
                            print(f"FAIL {path} w{bits} {dtype} g{group} m={m}: rel err {err:.2e}")
                            failures += 1
    torch.cuda.synchronize()
    print(f"sanitize: {failures} failures")
    return 1 if failures else 0


# ---- timing -------------------------------------------------------------------------------------------------------------

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
MS = [1, 16, 64, 256, 1024]


def cmd_timing(out: str, quick: bool = False) -> int:
    """Per-call µs of torch bf16 F.linear and of rtnq W4/W8 (every path and auto), Llama-3.1-8B shapes.

    Each measurement is a CUDA graph of R back-to-back calls over R weight copies (together > 2x the L2, so
    weights come from DRAM as in a real forward pass), replayed after warm-up; per-call time = median replay
    time / R. Small-M numbers are only taken for M <= 64 (the path re-reads weights per 8 rows).
    """
    torch = _torch()
    import torch.nn.functional as F

    from rtnq.bench import timing
    from rtnq.runtime import MarlinWeight, dispatch, library, ops

    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size or 50_000_000
    name = library.device_info()["name"]
    results = []
    shapes = SHAPES[:2] if quick else SHAPES

    capture = torch.cuda.Stream()

    def graph_us(calls):
        # Warm up on the capture stream outside capture, so the per-stream workspace, shared-memory attributes
        # and cuBLAS handles exist before capture and no set-up work ends up inside the timed graph.
        capture.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(capture):
            for c in calls:
                c()
        capture.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=capture):
            for c in calls:
                c()
        return timing.cuda_median_ms(g.replay, warmup=2, n=10) * 1e3 / len(calls)

    for label, k, n in shapes:
        copies = lambda nbytes: max(1, min(32, math.ceil(2.5 * l2 / nbytes)))  # noqa: E731
        w_bytes = n * k * 2
        r16 = copies(w_bytes)
        ws16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) for _ in range(r16)]
        packed = {}
        for bits in (4, 8):
            codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8)
            scales = (1e-3 + 1e-2 * torch.rand(n, k // 128)).to(torch.bfloat16)
            w = MarlinWeight.pack(codes, scales, bits, 128)
            r = copies(w.qweight.numel() * 4)
            packed[bits] = [w.to(dev) for _ in range(r)]
        for m in MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"shape": label, "k": k, "n": n, "m": m}
            row["bf16"] = graph_us([lambda w=w: F.linear(x, w) for w in ws16])
            for bits in (4, 8):
                th = dispatch.cached_thresholds(name, bits, torch.bfloat16)
                for path in ("small_m", "tensor_core", "dequant", "auto"):
                    if path == "small_m" and m > 64:
                        continue
                    calls = [lambda w=w, p=path: ops.gemm(x, w, path=p) for w in packed[bits]]
                    try:
                        row[f"w{bits}_{path}"] = graph_us(calls)
                    except Exception as e:  # report and keep timing the rest
                        row[f"w{bits}_{path}"] = None
                        row.setdefault("errors", []).append(f"w{bits} {path}: {type(e).__name__}: {e}")
                row[f"w{bits}_auto_path"] = dispatch.choose_path(m, th)
            w4_bytes = n * k / 2 + n * (k // 128) * 2 + 2 * m * k + 2 * m * n
            if row.get("w4_auto"):
                row["w4_auto_gb_s"] = w4_bytes / (row["w4_auto"] * 1e-6) / 1e9
            results.append(row)
            print(_row_text(row), flush=True)
        del ws16, packed
        torch.cuda.empty_cache()

    record = {"gpu": name, "thresholds_measured": dispatch.cached_thresholds(name, 4, torch.bfloat16).measured,
              "method": "CUDA graph of R calls over R weight copies (> 2.5x L2), median of 10 replays / R",
              "rows": results}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print()
    print(_table(results))
    return 0


def _fmt(v):
    return "-" if v is None else f"{v:8.1f}"


def _row_text(r) -> str:
    return " ".join(f"{k}={(round(v, 1) if isinstance(v, float) else v)}" for k, v in r.items() if k != "errors")


def _table(rows) -> str:
    head = (f"{'shape':8s} {'M':>5s} {'bf16 us':>8s} | {'W4 small':>8s} {'W4 tc':>8s} {'W4 deq':>8s} {'W4 auto':>8s} "
            f"{'x bf16':>6s} | {'W8 small':>8s} {'W8 tc':>8s} {'W8 deq':>8s} {'W8 auto':>8s} {'x bf16':>6s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        def sp(bits):
            a = r.get(f"w{bits}_auto")
            return "   -  " if not a else f"{r['bf16'] / a:5.2f}x"
        lines.append(
            f"{r['shape']:8s} {r['m']:5d} {_fmt(r['bf16'])} | {_fmt(r.get('w4_small_m'))} {_fmt(r.get('w4_tensor_core'))} "
            f"{_fmt(r.get('w4_dequant'))} {_fmt(r.get('w4_auto'))} {sp(4)} | {_fmt(r.get('w8_small_m'))} "
            f"{_fmt(r.get('w8_tensor_core'))} {_fmt(r.get('w8_dequant'))} {_fmt(r.get('w8_auto'))} {sp(8)}")
        for e in r.get("errors", []):
            lines.append(f"    error: {e}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "env" and len(args) == 1:
        return cmd_env(args[0])
    if cmd == "ptxas" and len(args) == 2:
        return cmd_ptxas(args[0], args[1])
    if cmd == "sanitize" and not args:
        return cmd_sanitize()
    if cmd == "timing" and len(args) in (1, 2):
        return cmd_timing(args[0], quick=args[1:] == ["--quick"])
    print(__doc__)
    return 2


if __name__ == "__main__":
    t0 = time.time()
    rc = main(sys.argv[1:])
    print(f"[gpu_check.py {' '.join(sys.argv[1:2])}: {time.time() - t0:.1f} s, exit {rc}]")
    sys.exit(rc)
