"""`rtnq bench`: time the quantized linears on the CUDA runtime (rtnq.bench does the work)."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from rtnq.cli.app import JsonOpt, app, err
from rtnq.cli.output import parse_dtype

BENCH_EXAMPLES = """
Examples:

  rtnq bench llama-3.1-8b-rtnq/                                   # every quantized shape, M = 1..1024

  rtnq bench --synthetic llama-3.1-8b --bits 4,8 --json > bench.json   # real shapes, random weights

  rtnq bench --synthetic tiny --device cpu --batch 1,16            # plumbing check on the CPU reference path
"""


@app.command(epilog=BENCH_EXAMPLES)
def bench(
    out_dir: Annotated[Optional[str], typer.Argument(help="Converted checkpoint directory (omit with --synthetic).", show_default=False)] = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes M to time (comma list).")] = "1,16,64,256,1024",
    dtype: Annotated[Optional[str], typer.Option(callback=parse_dtype, help="Activations: bf16 or fp16 (default: the checkpoint's; bf16 with --synthetic).")] = None,
    json_out: JsonOpt = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write speedup vs batch size per shape to this PNG (needs matplotlib).")] = None,
    synthetic: Annotated[Optional[str], typer.Option("--synthetic", help="Random weights of a real model's shapes: llama-3.1-8b, llama-3.1-70b, llama-3.2-1b, llama-3.2-3b, tiny.")] = None,
    bits: Annotated[Optional[str], typer.Option("--bits", help="With --synthetic: 4, 8 or 4,8 (default 4).")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="With --synthetic: 32, 64, 128 (default) or -1.")] = None,
    device: Annotated[str, typer.Option("--device", help="cuda, or cpu: the CPU reference path, to check the plumbing (every figure labelled CPU).")] = "cuda",
    save_dispatch: Annotated[bool, typer.Option("--save-dispatch/--no-save-dispatch", help="Write the measured dispatcher thresholds for this GPU (GPU runs only).")] = True,
    stack: Annotated[bool, typer.Option("--stack/--no-stack", help="Also time one forward of all linears at M = 1, 16, 64.")] = True,
    shapes: Annotated[Optional[str], typer.Option("--shapes", help="Only these shapes (comma list of names, e.g. o,gate_up).")] = None,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time PyTorch's int4 (tinygemm) and int8 kernels.")] = True,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer samples per point (smoke runs).")] = False,
) -> None:
    """Time the quantized linears against cuBLAS and the GPU's measured copy bandwidth and matmul rate."""
    from pathlib import Path

    from rtnq.bench.app import Options, run
    from rtnq.bench.output import RichPrinter

    run(
        Options(out_dir=Path(out_dir) if out_dir else None, synthetic=synthetic, batches=batch, dtype=dtype,
                bits=bits, group_size=group_size, device=device, json=json_out, plot=Path(plot) if plot else None,
                save_dispatch=save_dispatch, stack=stack, shapes=shapes, peers=peers, quick=quick),
        RichPrinter(err),
        sys.stdout,
    )


