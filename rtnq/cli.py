"""The `rtnq` command line: argument parsing, rich output and exit codes. No math lives here.

One error boundary (`main`): library code raises RtnqError subclasses, which become one red line on
stderr and the exit code from rtnq.errors (RTNQ_DEBUG=1 re-raises for the traceback). Human output
goes to stderr; machine output (`--json`) is the only thing written to stdout.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from rtnq.errors import Interrupted, RtnqError

app = typer.Typer(
    name="rtnq",
    help="Calibration-free selective RTN quantization of LLM checkpoints into the Marlin layout.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _split(values: Optional[list[str]]) -> list[str]:
    """Options may repeat and hold comma lists: --keep-int8 layers.0,mlp --keep-int8 o."""
    return [part.strip() for v in values or [] for part in v.split(",") if part.strip()]


def _bits(value: int) -> int:
    if value not in (4, 8):
        raise typer.BadParameter("must be 4 or 8")
    return value


def _group(value: int) -> int:
    if value not in (32, 64, 128, -1):
        raise typer.BadParameter("must be 32, 64, 128 or -1 (channelwise)")
    return value


def _dtype(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("bf16", "fp16"):
        raise typer.BadParameter("must be bf16 or fp16")
    return value


def _format(value: str) -> str:
    if value not in ("marlin", "gptq", "compressed-tensors"):
        raise typer.BadParameter("must be marlin, gptq or compressed-tensors")
    return value


def _tp(value: Optional[str]) -> list[int]:
    try:
        degrees = [int(x) for x in (value or "").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("must be a comma list of integers, e.g. 2,4,8") from None
    if any(d < 1 for d in degrees):
        raise typer.BadParameter("degrees must be >= 1")
    return degrees


def _emit_json(data) -> None:
    """Plain JSON on stdout (rich would wrap long lines at the console width)."""
    import json

    typer.echo(json.dumps(data, indent=1, sort_keys=True, default=str))


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


CONVERT_EXAMPLES = """
Examples:

  rtnq convert llama-3.1-8b/ llama-3.1-8b-rtnq/                      # INT4, group 128

  rtnq convert model/ out/ --bits 4 --keep-int8 layers.0,layers.-1,down   # selective INT8

  rtnq convert model/ out/ --keep-int8 qkv --skip layers.-1 --dry-run  # print the plan only

  rtnq convert model/ out/ --format gptq --keep-int8 layers.0 --dry-run --tp 2,4,8   # for vLLM/SGLang
"""


@app.command(epilog=CONVERT_EXAMPLES)
def convert(
    src: Annotated[str, typer.Argument(help="Model directory with model.safetensors or shards + index.")],
    out: Annotated[str, typer.Argument(help="Output directory (must not exist unless --force).")],
    bits: Annotated[int, typer.Option(callback=_bits, help="Default precision: 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", callback=_group, help="32, 64, 128 or -1 (channelwise).")] = 128,
    keep_int8: Annotated[Optional[list[str]], typer.Option("--keep-int8", help="Selectors kept in INT8 (comma list).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Selectors kept in 16-bit (comma list).")] = None,
    dtype: Annotated[Optional[str], typer.Option(callback=_dtype, help="Cast weights to bf16/fp16 before quantizing (default: keep 16-bit, fp32 -> bf16).")] = None,
    fmt: Annotated[str, typer.Option("--format", callback=_format, help="marlin (rtnq's runtime), gptq or compressed-tensors (vLLM, SGLang, transformers).")] = "marlin",
    tp: Annotated[Optional[str], typer.Option("--tp", help="List the tensors that fail the Marlin shape rules when split for these tensor-parallel degrees, e.g. 2,4,8.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and output size; read no weights.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail instead of passing Marlin-incompatible shapes through.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Quantize SRC with round-to-nearest into Marlin-packed INT4/INT8 and write OUT with a manifest."""
    from rtnq import convert as conv

    options = conv.Options(
        bits=bits, group_size=group_size, keep_int8=_split(keep_int8), skip=_split(skip),
        dtype=dtype, strict=strict, force=force, tp=_tp(tp), format=fmt,
    )
    plan = conv.make_plan(src, out, options)
    from rtnq import fastquant

    slow = None if dry_run else fastquant.problem()
    for w in plan.precision.warnings + ([slow] if slow else []):
        err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    if dry_run:
        _print_plan(plan, json_out)
        err.print(_tp_summary(plan.precision.tp_failures), highlight=False, soft_wrap=True)
        return
    try:
        result = _run_with_progress(conv, plan)
    except KeyboardInterrupt:
        # click would turn this into "Aborted!" and exit 1; the contract is a named error and 130.
        raise Interrupted(f"interrupted; nothing was written to {plan.out}") from None
    if json_out:
        _emit_json({"out": str(plan.out), "seconds": round(result.seconds, 3), "format": fmt,
                    **result.manifest.to_json()["totals"]})
    else:
        _print_summary(result)
    err.print(_tp_summary(plan.precision.tp_failures), highlight=False, soft_wrap=True)


def _tp_summary(failures: dict[int, list]) -> str:
    """One line on every run: which tensor-parallel degrees keep every quantized tensor Marlin-loadable."""
    parts = []
    for t, fails in sorted(failures.items()):
        parts.append(f"TP{t} ok" if not fails else f"TP{t}: {len(fails)} quantized tensors fail")
    line = "tensor parallel (Marlin shape rules per rank): " + ", ".join(parts)
    bad = [t for t, f in sorted(failures.items()) if f]
    if bad:
        line += f" (rtnq convert --dry-run --tp {','.join(map(str, bad))} lists them)"
    return line


def _run_with_progress(conv, plan):
    if not err.is_terminal:
        return conv.run(plan)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.fields[tensors]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("convert", total=plan.bytes_in, tensors=f"0/{len(plan.items)} tensors")

        def update(p):
            bar.update(task, completed=p.bytes_done, tensors=f"{p.tensors_done}/{p.tensors_total} tensors")

        return conv.run(plan, update)


def _print_plan(plan, json_out: bool) -> None:
    from rtnq import convert as conv

    t = conv.totals(plan)
    if json_out:
        tensors = [
            {"name": i.spec.name, "kind": i.decision.kind, "bits": i.decision.bits, "rule": i.decision.rule,
             "reason": i.decision.reason, "outputs": [e.name for e in i.outputs], "shard": i.out_shard}
            for i in plan.items
        ]
        tp = {str(d): [{"name": n, "why": why} for n, why in plan.precision.tp_failures[d]]
              for d in plan.options.tp}
        _emit_json({"dry_run": True, "format": plan.options.format, "totals": t, "rules": plan.precision.rules,
                    "warnings": plan.precision.warnings, "tensors": tensors, "tp": tp})
        return
    from rich.table import Table

    table = Table(title=f"plan: {plan.src} -> {plan.out}, format {plan.options.format} (dry run, nothing written)")
    for col in ("tensor", "shape", "becomes", "why"):
        table.add_column(col)
    for i in plan.items:
        d = i.decision
        becomes = f"int{d.bits} g{d.group_size}" if d.kind == "marlin" else i.spec.dtype.lower()
        table.add_row(i.spec.name, "x".join(map(str, i.spec.shape)), becomes, d.rule if d.kind == "marlin" else (d.reason or ""))
    err.print(table)
    for d in plan.options.tp:
        fails = plan.precision.tp_failures[d]
        if not fails:
            continue
        tp_table = Table(title=f"tensor parallel {d}: quantized tensors that fail the Marlin shape rules per rank")
        tp_table.add_column("tensor")
        tp_table.add_column("why")
        for name, why in fails:
            tp_table.add_row(name, why)
        err.print(tp_table)
    _print_totals(t)


def _print_totals(t: dict, seconds: float | None = None) -> None:
    from rich.table import Table

    c = t["tensors"]
    table = Table(show_header=False, title="summary")
    table.add_row("quantized INT4 / INT8", f"{c['marlin4']} / {c['marlin8']} tensors")
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(t["passthrough_reasons"].items()))
    table.add_row("passed through", f"{c['passthrough']} tensors" + (f" ({reasons})" if reasons else ""))
    table.add_row("bytes in -> out", f"{_gb(t['bytes_in'])} -> {_gb(t['bytes_out'])}")
    if t["bits_per_weight"] is not None:
        table.add_row("bits per weight (quantized linears, scales included)", f"{t['bits_per_weight']:.4f}")
    if t["model_bits_per_weight"] is not None:
        table.add_row("bits per weight (whole model)", f"{t['model_bits_per_weight']:.4f}")
    if seconds is not None:
        table.add_row("wall time", f"{seconds:.2f} s ({t['bytes_in'] / max(seconds, 1e-9) / 1e9:.2f} GB/s of input)")
    err.print(table)


def _print_summary(result) -> None:
    _print_totals(result.manifest.totals, result.seconds)
    err.print(f"wrote {result.plan.out}", highlight=False)


@app.command()
def inspect(
    out_dir: Annotated[str, typer.Argument(help="A directory written by `rtnq convert`.")],
    json_out: JsonOpt = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Draw the precision map into this PNG file (needs matplotlib).")] = None,
) -> None:
    """Show the precision manifest: precision per layer and module, totals and bits per weight."""
    from rtnq import manifest as mf
    from rtnq import precision_map

    m = mf.read(out_dir)
    if json_out:
        _emit_json(m.to_json())
    else:
        err.print(f"format: {m.format} (manifest version {m.version})", highlight=False)
        _print_precision_map(precision_map.build(m))
        for w in m.warnings:
            err.print(f"[yellow]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
        _print_totals(m.totals)
        tp = m.totals.get("tp_failures")  # absent in manifests written before rtnq recorded it
        if tp:
            err.print(_tp_summary({int(t): [None] * c for t, c in tp.items()}), highlight=False, soft_wrap=True)
    if plot:
        from rtnq import plotting

        plotting.precision_map_png(precision_map.build(m), plot)
        err.print(f"wrote {plot}", highlight=False)


_STYLE = {"int4": "green", "int8": "yellow"}


def _print_precision_map(pm) -> None:
    from rich.table import Table

    table = Table(title="precision by layer and module")
    table.add_column("layer", justify="right")
    from rtnq.precision_map import short_names

    for header in short_names(pm.modules):
        table.add_column(header)
    for layer in pm.layers:
        row = [str(layer)]
        for module in pm.modules:
            v = pm.cells.get((layer, module), "")
            row.append(f"[{_STYLE[v]}]{v}[/]" if v in _STYLE else v)
        table.add_row(*row)
    err.print(table)
    if pm.other:
        other = Table(title="outside the blocks")
        other.add_column("tensor")
        other.add_column("precision")
        for name, v in pm.other.items():
            other.add_row(name, v)
        err.print(other)


@app.command()
def verify(
    out_dir: Annotated[str, typer.Argument(help="A directory written by `rtnq convert`.")],
    against: Annotated[str, typer.Option("--against", help="The source model directory it was converted from.")],
    json_out: JsonOpt = False,
) -> None:
    """Re-derive every output tensor from the source and check the bytes are identical."""
    from rtnq import verify as ver
    from rtnq.errors import VerifyMismatch

    checks = ver.verify(out_dir, against)
    bad = [c for c in checks if not c.ok]
    if json_out:
        _emit_json({"ok": not bad, "checked": len(checks), "mismatches": len(bad),
                             "tensors": [c.__dict__ for c in checks]})
    else:
        from rich.table import Table

        table = Table(title=f"verify {out_dir} against {against}")
        for col in ("tensor", "kind", "result", "rel. error"):
            table.add_column(col)
        for c in checks:
            result = "[green]identical[/]" if c.ok else f"[red]{c.detail}[/]"
            table.add_row(c.name, c.kind, result, "" if c.error is None else f"{c.error:.2e}")
        err.print(table)
    if bad:
        raise VerifyMismatch(f"{len(bad)} of {len(checks)} tensors differ, first: {bad[0].name} ({bad[0].detail})")
    if not json_out:
        err.print(f"[green]ok:[/] all {len(checks)} tensors match", highlight=False)


@app.command()
def dequantize(
    src: Annotated[str, typer.Argument(help="A GPTQ, compressed-tensors or rtnq marlin checkpoint directory.")],
    out: Annotated[str, typer.Argument(help="Output directory for the dense checkpoint (must not exist unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a dense copy of a quantized checkpoint: every quantized weight becomes (code - bias) x scale."""
    from rtnq import dequantize as deq

    plan = deq.make_plan(src, out, force)
    try:
        if err.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            with Progress(BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
                task = bar.add_task("dequantize", total=None)
                result = deq.run(plan, lambda done, total: bar.update(task, completed=done, total=total))
        else:
            result = deq.run(plan)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; nothing was written to {plan.out}") from None
    summary = {"out": str(plan.out), "method": plan.method, "modules": result.modules,
               "modules_by_bits": {str(b): c for b, c in sorted(result.bits.items())},
               "passthrough": len(plan.passthrough), "seconds": round(result.seconds, 3)}
    if json_out:
        _emit_json(summary)
        return
    by_bits = ", ".join(f"{c} INT{b}" for b, c in sorted(result.bits.items()))
    err.print(f"dequantized {result.modules} {plan.method} modules ({by_bits}), copied {len(plan.passthrough)} "
              f"tensors, in {result.seconds:.2f} s", highlight=False)
    err.print(f"wrote {plan.out}", highlight=False)


@app.command()
def sample(
    out_dir: Annotated[str, typer.Argument(help="Directory to write the synthetic checkpoint into.")],
    layers: Annotated[int, typer.Option(help="Number of transformer blocks.")] = 2,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 256,
    intermediate: Annotated[int, typer.Option(help="MLP intermediate size.")] = 512,
    vocab: Annotated[int, typer.Option(help="Vocabulary size.")] = 512,
    shards: Annotated[int, typer.Option(help="Number of shard files.")] = 2,
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    tied: Annotated[bool, typer.Option("--tied", help="Tie lm_head to the embeddings.")] = False,
    odd_linear: Annotated[bool, typer.Option("--odd-linear", help="Add a linear whose shape Marlin cannot take.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write even if the directory exists.")] = False,
) -> None:
    """Write the built-in synthetic Llama-style sample checkpoint (deterministic)."""
    from pathlib import Path

    from rtnq import testing
    from rtnq.errors import UsageError

    if dtype not in testing.DTYPES:
        raise UsageError(f"--dtype must be bf16, fp16 or fp32, got {dtype}")
    if Path(out_dir).exists() and not force:
        raise UsageError(f"{out_dir} already exists; pass --force to write into it")
    spec = testing.SampleSpec(hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab,
                              shards=shards, dtype=dtype, tied=tied, odd_linear=odd_linear)
    testing.write_checkpoint(out_dir, spec)
    err.print(f"wrote {out_dir}", highlight=False)


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
    dtype: Annotated[Optional[str], typer.Option(callback=_dtype, help="Activations: bf16 or fp16 (default: the checkpoint's; bf16 with --synthetic).")] = None,
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


def main() -> None:
    # Everything imported so far (torch, typer, rich) lives until exit: freezing it keeps the cyclic
    # GC from re-scanning it during the run and at interpreter shutdown (0.3-0.6 s with torch loaded).
    gc.freeze()
    try:
        app()
    except RtnqError as e:
        if os.environ.get("RTNQ_DEBUG"):
            raise
        # Messages quote user input and shell commands ("pip install 'rtnq[plot]'"): never markup.
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
