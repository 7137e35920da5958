"""Quantize + pack throughput on real layer shapes (bf16 weights, CPU).

    .venv/bin/python scripts/bench_quant.py [--repeats 5] [--threads N] [--layout marlin|rows|cols|all]
                                            [--shapes 4096x4096,...] [--no-reference]

Prints, per shape, bit width and layout, the median wall time of the readable references
rtn.quantize, the layout's packer (marlin.pack, kpack.pack_rows or kpack.pack_cols) and both, then
of the fused fast path that conversion uses (rtnq.numerics.fused: quantize + pack + error statistic in
one pass, all cores), in million weights per second, plus a baseline in the same run: one plain
elementwise pass over the weight (w * 2 in bf16) so numbers from different (noisy) machines can be
compared as ratios. --no-reference times only the fused path (the references take seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rtnq.numerics import fused, kpack, marlin, rtn

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]  # (n, k): Llama-3-8B o/q, gate/up, down
PACKERS = {
    "marlin": lambda codes, scales, bits: marlin.pack(codes, scales, bits),
    "rows": lambda codes, scales, bits: (kpack.pack_rows(codes, bits), scales),
    "cols": lambda codes, scales, bits: (kpack.pack_cols(codes, bits), scales.t().contiguous()),
}


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--layout", choices=[*fused.LAYOUTS, "all"], default="marlin")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK (default: the Llama-3-8B shapes)")
    ap.add_argument("--no-reference", action="store_true", help="time only the fused path")
    args = ap.parse_args()
    layouts = fused.LAYOUTS if args.layout == "all" else (args.layout,)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"fused: {fused.implementation()}, {fused.workers()} threads")
    print(f"{'shape (n x k)':>14} {'bits':>4} {'layout':>6} {'quantize':>10} {'pack':>10} {'both':>10} {'Mw/s':>8}"
          f" {'x baseline':>10} {'fused':>10} {'Mw/s':>8} {'GB/s':>6}")
    for n, k in shapes:
        w = (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
        base = timed(lambda: w * 2, args.repeats)
        for bits in (4, 8):
            if not args.no_reference:
                codes, scales = rtn.quantize(w, bits, args.group_size)
                tq = timed(lambda: rtn.quantize(w, bits, args.group_size), args.repeats)
            for layout in layouts:
                if args.no_reference:
                    ref = f"{'-':>10} {'-':>10} {'-':>10} {'-':>8} {'-':>10}"
                else:
                    pack = PACKERS[layout]
                    tp = timed(lambda: pack(codes, scales, bits), args.repeats)
                    both = tq + tp
                    ref = (f"{tq * 1e3:>8.1f}ms {tp * 1e3:>8.1f}ms {both * 1e3:>8.1f}ms {n * k / both / 1e6:>8.0f}"
                           f" {both / base:>10.1f}")
                qshape, sshape = fused.out_shapes(n, k, bits, args.group_size, layout)
                qw, sc = torch.empty(qshape, dtype=torch.int32), torch.empty(sshape, dtype=w.dtype)
                tf = timed(lambda: fused.quantize_rows(w, 0, qw, sc, bits, args.group_size, [0.0, 0.0],
                                                           layout=layout), args.repeats)
                print(f"{n:>6} x {k:<6} {bits:>4} {layout:>6} {ref} {tf * 1e3:>8.1f}ms {n * k / tf / 1e6:>8.0f}"
                      f" {2 * n * k / tf / 1e9:>6.2f}")


if __name__ == "__main__":
    main()
