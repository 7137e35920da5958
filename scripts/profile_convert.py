"""Where `rtnq convert` spends its time: per-thread CPU time and the main thread's waits.

    .venv/bin/python scripts/profile_convert.py SRC [--bits 4] [--keep-int8 SEL]

Runs one conversion in this process (into a temporary directory next to SRC, removed afterwards)
with timers around each pipeline stage and prints, per stage, wall seconds and thread CPU seconds
(time.thread_time: user + system of that thread). Start-up (Python, torch import) is measured
separately as the time to import rtnq.commands.convert (no torch while the C fast path is built; issue 15).
For a sampling profile of the whole process use
py-spy (`pip install py-spy`): py-spy record -r 200 -f raw -o prof.txt -- rtnq convert SRC OUT.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import tempfile
import threading
import time
from pathlib import Path

T_START = time.perf_counter()
from rtnq.commands import convert  # noqa: E402  (the import time is what we measure)
from rtnq.numerics import cpu as fused  # the C library's loader (torch-free; rtnq.numerics.fused re-exports it)
from rtnq.checkpoint import pipeline
from rtnq.checkpoint import source as run_mod
from rtnq.checkpoint import writer as writer_mod
from rtnq.checkpoint import journal as journal_mod
from rtnq.commands.convert import execute

T_IMPORT = time.perf_counter() - T_START
STATS: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])  # wall, cpu, calls
LOCK = threading.Lock()


def timed(label, fn):
    def wrapper(*a, **k):
        w0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            with LOCK:
                s = STATS[label if isinstance(label, str) else label()]
                s[0] += time.perf_counter() - w0
                s[1] += time.thread_time() - c0
                s[2] += 1
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--keep-int8", default="")
    ap.add_argument("--no-fsync", action="store_true", help="diagnostic: skip fsync to see what the disk costs")
    args = ap.parse_args()
    if args.no_fsync:
        from rtnq.checkpoint import writer

        writer.os = type("os_without_fsync", (), {"__getattr__": lambda self, n: getattr(__import__("os"), n),
                                                  "fsync": staticmethod(lambda fd: None)})()

    lib = fused.library()
    if lib is not None:  # the C call, per thread (main vs helper)
        real = lib.rtnq_quant_pack

        class Timed:
            argtypes, restype = real.argtypes, real.restype
            __call__ = staticmethod(timed(lambda: f"quantize (C) [{threading.current_thread().name}]", real))

        lib.rtnq_quant_pack = Timed()
    pipeline.Prefetcher._run = timed("reader thread (total)", pipeline.Prefetcher._run)
    pipeline.WriteBehind._run = timed("writer thread (total)", pipeline.WriteBehind._run)
    run_mod.Reader.read_into = timed("  read_into (preadv)", run_mod.Reader.read_into)
    writer_mod.ShardWriter.write_part = timed("  write_part (file write)", writer_mod.ShardWriter.write_part)
    writer_mod.ShardWriter.sync_close = timed("fsync + close (fsync thread)", writer_mod.ShardWriter.sync_close)
    pipeline.start_writeback = timed("start_writeback (fsync thread)", pipeline.start_writeback)
    chunks = pipeline.Prefetcher.chunks

    def waited_chunks(self, index):
        it = chunks(self, index)
        while True:
            w0 = time.perf_counter()
            try:
                c = next(it)
            except StopIteration:
                return
            finally:
                with LOCK:
                    STATS["main: waiting for the reader"][0] += time.perf_counter() - w0
            yield c

    pipeline.Prefetcher.chunks = waited_chunks
    pipeline.Pool.get = timed(lambda: f"pool.get [{threading.current_thread().name}]", pipeline.Pool.get)
    execute.quantize_item = timed("main: quantize_item (incl. waits)", execute.quantize_item)
    journal_mod.Journal.record = timed("journal: sha256 of each shard (fsync thread)", journal_mod.Journal.record)

    keep = [s for s in args.keep_int8.split(",") if s]
    tmp = Path(tempfile.mkdtemp(dir=args.src.parent, prefix=".rtnq-profile-"))
    try:
        out = tmp / "out"
        w0, c0 = time.perf_counter(), time.process_time()
        plan = convert.make_plan(args.src, out, convert.ConvertOptions(bits=args.bits, keep_int8=keep))
        t_plan = time.perf_counter() - w0
        convert.run(plan)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gb = plan.bytes_in / 1e9
    print(f"implementation: {fused.implementation()}, {fused.workers()} quantize threads")
    print(f"import rtnq.commands.convert (python start-up not included): {T_IMPORT:.2f} s")
    print(f"make_plan: {t_plan:.2f} s; plan + run: {wall:.2f} s wall, {cpu:.2f} s CPU (all threads), "
          f"{gb:.2f} GB in -> {gb / wall:.2f} GB/s")
    print(f"{'stage':<48} {'wall s':>8} {'cpu s':>8} {'calls':>7}")
    for label, (w, c, n) in sorted(STATS.items()):
        print(f"{label:<48} {w:>8.2f} {c:>8.2f} {n:>7}")


if __name__ == "__main__":
    main()
