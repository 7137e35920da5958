"""Conversion speed and memory against the I/O floor and peers (issue 4).

    .venv/bin/python scripts/bench_convert.py [--repeats 3] [--cases floor,rtnq4,...] [--markdown]

Generates (once, cached under bench-cache/, git-ignored) two synthetic Llama checkpoints with
rtnq.synthetic: the issue's 1.1B shape (hidden 2048, intermediate 5632, 22 layers, vocab 32000,
2.2 GB bf16 in 3 shards) and the same with 44 layers (4.1 GB, 6 shards). Then runs every case as a
separate process, interleaved (repeat 1 of every case, then repeat 2, ...), with the input read into
the page cache right before each run (some VMs evict idle page cache within seconds) and `sync`
before each run so that no earlier run's writeback lands in the next one, and prints per
case and model the median wall time, CPU time (user + system) and peak RSS of the child (from
os.wait4, i.e. the OS), GB/s of bf16 input, the ratio to the floor on the same model, the RSS
growth from 22 to 44 layers and the marginal rate (extra input bytes / extra wall time).

Cases (a case whose tool is missing is skipped with the command that installs it):
  floor       scripts/io_floor.py: import torch + safetensors, read every tensor, write a quarter
  rtnq4       rtnq convert --bits 4 (group 128, manifest, error statistics, all checks, fsync): the
              default path, torch-free with the C fast path built (issue 15)
  rtnq4-torch the same with torch and safetensors' torch bindings imported first: what the conversion
              cost before issue 15 made it torch-free (the same C kernel, torch's start-up added)
  rtnq4-ref   RTNQ_FASTPATH=0: the torch reference quantizer instead of the C kernel (the fallback
              when the library cannot be built; ~20x slower, not in the default cases)
  rtnq8       rtnq convert --bits 8
  rtnqkeep    rtnq convert --bits 4 --keep-int8 layers.0,mlp
  gptqkeep, ctkeep   the same with --format gptq / --format compressed-tensors
  rtnq4-nosync, rtnq8-nosync
              diagnostics, not product modes: rtnq with fsync and early writeback stubbed out, to
              show what durability costs on this disk (the floor and the peers never fsync: their
              output is still in the page cache when they exit)
  torchnaive  a naive torch RTN-g128 loop + nibble pack over safetensors' loader (save_file per shard)
  gguf        gguf-py's numpy Q4_0 over the same shards, written as GGUF (pip install gguf)
Peers run on the 22-layer model only unless --peers-deep. `--models sample` adds the built-in sample
(`rtnq sample`, 3 MB: start-up dominates). The fsync share of a case is 1 - wall(case-nofsync) / wall(case)
where both ran: the part of the wall time spent waiting for fsync (rtnq4-nofsync, rtnq8-nofsync: fsync
alone stubbed out, the early writeback kept; diagnostics like the -nosync ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RTNQ = [PY, "-m", "rtnq.cli"] if not (Path(PY).parent / "rtnq").exists() else [str(Path(PY).parent / "rtnq")]

TORCH_NAIVE = r'''
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
src, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True)
for shard in sorted(src.glob("*.safetensors")):
    result = {}
    with safe_open(str(shard), "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if w.dim() == 2 and ".layers." in name and w.shape[1] % 128 == 0:
                n, k = w.shape
                g = w.reshape(n, k // 128, 128)
                scale = g.abs().amax(-1, keepdim=True) * 2 / 15
                q = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).reshape(n, k)
                result[name[:-7] + ".qweight"] = q[:, 0::2] | (q[:, 1::2] << 4)
                result[name[:-7] + ".scales"] = scale.reshape(n, k // 128).contiguous()
            else:
                result[name] = w
    save_file(result, str(out / shard.name))
'''

# Diagnostic, not a product mode: rtnq with fsync and the early writeback stubbed out, to show what
# durability costs on this disk (the floor and the peers never fsync: their output is still in the
# page cache when they exit, and the disk writes it after the clock stops).
RTNQ_NO_FSYNC = r'''
import os, sys
from rtnq import cli  # first: it sets the environment the CLI runs in
from rtnq.checkpoint import journal, pipeline, writer
no_fsync = type("os_without_fsync", (), {"__getattr__": lambda self, n: getattr(os, n),
                                         "fsync": staticmethod(lambda fd: None)})()
writer.os = journal.os = no_fsync
pipeline.start_writeback = lambda fd, offset, length: None
sys.argv = ["rtnq"] + sys.argv[1:]
cli.main()
'''

# Diagnostic: fsync alone stubbed out (the early writeback kept, which is about the page cache, not
# durability): what waiting for the disk at the end of each shard costs. The "fsync share" column.
RTNQ_NO_FSYNC_ONLY = r'''
import os, sys
from rtnq import cli
from rtnq.checkpoint import journal, writer
writer.os = journal.os = type("os_without_fsync", (), {"__getattr__": lambda self, n: getattr(os, n),
                                                        "fsync": staticmethod(lambda fd: None)})()
sys.argv = ["rtnq"] + sys.argv[1:]
cli.main()
'''

# The conversion as it ran before issue 15: torch and safetensors' torch bindings loaded at start-up.
RTNQ_WITH_TORCH = r'''
import sys
import torch, safetensors.torch  # noqa: F401
from rtnq import cli
sys.argv = ["rtnq"] + sys.argv[1:]
cli.main()
'''

GGUF_Q4_0 = r'''
import sys, numpy as np, torch, gguf
from pathlib import Path
from safetensors import safe_open
src, out = Path(sys.argv[1]), Path(sys.argv[2]); out.mkdir(parents=True)
Q = gguf.GGMLQuantizationType
for shard in sorted(src.glob("*.safetensors")):
    w = gguf.GGUFWriter(str(out / (shard.stem + ".gguf")), "llama")
    with safe_open(str(shard), "pt") as f:
        for name in f.keys():
            data = f.get_tensor(name).float().numpy()
            if data.ndim == 2 and ".layers." in name and data.shape[1] % 32 == 0:
                w.add_tensor(name, gguf.quants.quantize(data, Q.Q4_0), raw_dtype=Q.Q4_0)
            else:
                w.add_tensor(name, data.astype(np.float16))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
'''


def cases() -> dict[str, list[str] | None]:
    have_gguf = subprocess.run([PY, "-c", "import gguf"], capture_output=True).returncode == 0
    return {
        "floor": [PY, str(ROOT / "scripts" / "io_floor.py"), "{src}", "{out}"],
        "rtnq4": RTNQ + ["convert", "{src}", "{out}", "--bits", "4"],
        "rtnq4-torch": [PY, "-c", RTNQ_WITH_TORCH, "convert", "{src}", "{out}", "--bits", "4"],
        "rtnq4-ref": ["env", "RTNQ_FASTPATH=0"] + RTNQ + ["convert", "{src}", "{out}", "--bits", "4"],
        "rtnq8": RTNQ + ["convert", "{src}", "{out}", "--bits", "8"],
        "rtnqkeep": RTNQ + ["convert", "{src}", "{out}", "--bits", "4", "--keep-int8", "layers.0,mlp"],
        "gptqkeep": RTNQ + ["convert", "{src}", "{out}", "--bits", "4", "--keep-int8", "layers.0,mlp", "--format", "gptq"],
        "ctkeep": RTNQ + ["convert", "{src}", "{out}", "--bits", "4", "--keep-int8", "layers.0,mlp",
                          "--format", "compressed-tensors"],
        "rtnq4-nosync": [PY, "-c", RTNQ_NO_FSYNC, "convert", "{src}", "{out}", "--bits", "4"],
        "rtnq8-nosync": [PY, "-c", RTNQ_NO_FSYNC, "convert", "{src}", "{out}", "--bits", "8"],
        "rtnq4-nofsync": [PY, "-c", RTNQ_NO_FSYNC_ONLY, "convert", "{src}", "{out}", "--bits", "4"],
        "rtnq8-nofsync": [PY, "-c", RTNQ_NO_FSYNC_ONLY, "convert", "{src}", "{out}", "--bits", "8"],
        "torchnaive": [PY, "-c", TORCH_NAIVE, "{src}", "{out}"],
        "gguf": [PY, "-c", GGUF_Q4_0, "{src}", "{out}"] if have_gguf else None,
    }


def models(cache: Path, wanted: list[str]) -> dict[str, Path]:
    from rtnq import synthetic

    out = {}
    for label, layers, shards in (("l22", 22, 3), ("l44", 44, 6), ("sample", None, None)):
        if label not in wanted:
            continue
        path = cache / f"llama-{label}"
        spec = synthetic.SampleSpec() if layers is None else \
            synthetic.SampleSpec(**{**synthetic.BENCH_1B, "layers": layers}, shards=shards)
        if not (path / "config.json").is_file():
            print(f"generating {path} ({layers} layers) ...", flush=True)
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            synthetic.write_checkpoint(tmp, spec)
            tmp.rename(path)
        out[label] = path
    return out


def input_bytes(src: Path) -> int:
    return sum(p.stat().st_size for p in src.glob("*.safetensors"))


def warm(src: Path) -> None:
    for p in src.glob("*.safetensors"):
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


# Each case runs under this small launcher, which times it and reads its rusage. Not from this process:
# Linux counts the memory of the process that forked a child into the child's peak RSS (exec records the
# old image's high-water mark), and this one holds torch (~0.28 GiB), which would hide any smaller peak.
LAUNCH = r'''
import json, os, subprocess, sys, time
t0 = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read().decode(errors="replace")
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": ru.ru_maxrss * 1024,
                  "code": os.waitstatus_to_exitcode(status), "err": err[-2000:]}))
'''


def run_once(cmd: list[str], src: Path, out: Path) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of one child process."""
    shutil.rmtree(out, ignore_errors=True)
    warm(src)  # right before each run: a VM's proactive reclaim (DAMON) evicts idle page cache
    os.sync()
    argv = [a.replace("{src}", str(src)).replace("{out}", str(out)) for a in cmd]
    r = json.loads(subprocess.run([PY, "-c", LAUNCH, *argv], capture_output=True, text=True, check=True).stdout)
    shutil.rmtree(out, ignore_errors=True)
    if r["code"]:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({r['code']}):\n{r['err']}")
    return r["wall"], r["cpu"], r["rss"]


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import version

    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Python {platform.python_version()}, "
            f"torch {version('torch')}, numpy {version('numpy')}, {platform.system()} {platform.release()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default="floor,rtnq4,rtnq4-torch,rtnq8,rtnqkeep,torchnaive,gguf")
    ap.add_argument("--models", default="l22,l44")
    ap.add_argument("--peers-deep", action="store_true", help="also run the peers on the 44-layer model")
    ap.add_argument("--cache", type=Path, default=ROOT / "bench-cache")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = ap.parse_args()

    avail = cases()
    wanted = [c for c in args.cases.split(",") if c]
    for c in wanted:
        if c not in avail:
            raise SystemExit(f"unknown case {c}; choose from {', '.join(avail)}")
        if avail[c] is None:
            print(f"skipping {c}: install it with `{PY} -m pip install gguf`")
    wanted = [c for c in wanted if avail[c] is not None]
    args.cache.mkdir(exist_ok=True)
    srcs = {k: v for k, v in models(args.cache, args.models.split(",")).items()}
    free = shutil.disk_usage(args.cache).free
    if free < 3 * 2**30:
        raise SystemExit(f"only {free / 2**30:.1f} GiB free under {args.cache}; outputs need about 2 GiB")
    out = args.cache / "out"
    runs: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    print(f"machine: {machine()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: {' '.join([Path(PY).name] + sys.argv)}")
    for label, src in srcs.items():
        warm(src)
    for rep in range(args.repeats):
        for case in wanted:
            for label, src in srcs.items():
                if label != "l22" and case in ("torchnaive", "gguf") and not args.peers_deep:
                    continue
                r = run_once(avail[case], src, out)
                runs.setdefault((case, label), []).append(r)
                print(f"  [{rep + 1}/{args.repeats}] {case:<12} {label}: {r[0]:6.2f} s wall, {r[1]:6.2f} s CPU, "
                      f"{r[2] / 2**20:5.0f} MiB peak RSS", flush=True)

    med = {key: tuple(statistics.median(x[i] for x in v) for i in range(3)) for key, v in runs.items()}
    size = {label: input_bytes(src) for label, src in srcs.items()}
    rows = []
    for case in wanted:
        for label in srcs:
            if (case, label) not in med:
                continue
            wall, cpu, rss = med[(case, label)]
            floor = med.get(("floor", label))
            ratio = f"{wall / floor[0]:.2f}x" if floor else "-"
            extra = ""
            if label == "l44" and (case, "l22") in med:
                w22, _, rss22 = med[(case, "l22")]
                marginal = (size["l44"] - size["l22"]) / (wall - w22) / 1e9 if wall > w22 else float("inf")
                extra = f"{marginal:.2f} GB/s marginal, RSS {100 * (rss / rss22 - 1):+.0f}% vs 22 layers"
            nosync = med.get((f"{case}-nofsync", label))
            share = f"{100 * (1 - nosync[0] / wall):.0f}%" if nosync else "-"
            rows.append((case, label, f"{wall:.2f}", f"{cpu:.2f}", f"{rss / 2**20:.0f}",
                         f"{size[label] / wall / 1e9:.2f}", ratio, share, extra))
    head = ("case", "model", "wall s", "CPU s", "peak RSS MiB", "GB/s in", "vs floor", "fsync share", "deep model")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\nmedian of {args.repeats}; input {', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in size.items())}")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" for _ in head) + "|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        for r in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
