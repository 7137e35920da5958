"""Converting from the hub: wall time against converting the local copy, and peak staged disk against the
output size (issue 14). The "hub" is tests/hubserver.py on 127.0.0.1 serving a local checkpoint the way the
Hugging Face hub does (302 to a second origin for LFS files, ranged GETs, sha256 ETags), so the figures
measure rtnq's own overhead (the real client, sha256 checks, staging, deletion), not a network.

    .venv/bin/python scripts/bench_hub.py [--src bench-cache/llama-l22] [--repeats 3]

Prints, per run (interleaved: local, then hub), the wall seconds, the peak bytes staged at once, the
output size, and the dry-run's bytes read from shard headers; then medians. Progress on stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / "bench-cache" / "llama-l22"))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = Path(args.src)
    work = Path(tempfile.mkdtemp(prefix="rtnq-bench-hub-", dir=REPO / "bench-cache"))
    home = work / "hf"
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from hubserver import HubServer

    server = HubServer().start()
    try:
        server.add_repo("bench/model", src)
        os.environ["HF_ENDPOINT"] = server.endpoint
        from huggingface_hub import constants

        constants.ENDPOINT = server.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HOME, constants.HF_HUB_CACHE = str(home), str(home / "hub")
        from rtnq.commands import convert as conv

        rows = {"local": [], "hub": []}
        peak = out_size = header = 0
        plan = conv.make_plan("bench/model", work / "dry", conv.ConvertOptions(dry_run=True))
        header = plan.hub.header_bytes
        plan.close()
        for r in range(args.repeats):
            for case in ("local", "hub"):
                out = work / f"out-{case}"
                shutil.rmtree(out, ignore_errors=True)
                t0 = time.perf_counter()
                plan = conv.make_plan(str(src) if case == "local" else "bench/model", out, conv.ConvertOptions())
                try:
                    conv.run(plan)
                finally:
                    if plan.hub is not None:
                        peak = plan.hub.stats["peak_bytes"]
                    plan.close()
                rows[case].append(time.perf_counter() - t0)
                out_size = _size(out)
                print(f"repeat {r + 1} {case}: {rows[case][-1]:.2f} s", file=sys.stderr)
        shards = sorted((p.stat().st_size for p in src.glob("*.safetensors")), reverse=True)
        repo = _size(src)
        print(f"| source | {repo / 1e9:.3f} GB in {len(shards)} shards |")
        print(f"| dry run: bytes read from shard headers | {header} ({header / repo:.5%} of the repo) |")
        print(f"| convert local copy, median of {args.repeats} | {statistics.median(rows['local']):.2f} s |")
        print(f"| convert from the local hub, median of {args.repeats} | {statistics.median(rows['hub']):.2f} s "
              f"({statistics.median(rows['hub']) / statistics.median(rows['local']):.2f}x) |")
        print(f"| peak staged at once | {peak / 1e9:.3f} GB (two largest shards {sum(shards[:2]) / 1e9:.3f} GB) |")
        print(f"| output | {out_size / 1e9:.3f} GB |")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
