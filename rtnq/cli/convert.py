"""`rtnq convert`: plan, print the plan (--dry-run) or run it with a progress bar, print the summary."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer
from rich.markup import escape

from rtnq.cli.app import JsonOpt, app, err
from rtnq.cli.app import out as results  # `out` is the OUT argument here
from rtnq.cli.output import rotation_line, budget_line, emit_json, parse_bits, parse_budget, parse_budget_score, parse_dtype, parse_scale, parse_format, parse_group, parse_tp, print_line, print_summary, print_totals, split_list, tp_summary, warn
from rtnq.errors import Interrupted

CONVERT_EXAMPLES = """
Examples:

  rtnq convert llama-3.1-8b/ llama-3.1-8b-rtnq/                      # INT4, group 128

  rtnq convert HuggingFaceTB/SmolLM2-135M-Instruct smollm2-rtnq/     # from the hub, shard by shard

  rtnq convert model/ out/ --bits 4 --keep-int8 layers.0,layers.-1,down   # selective INT8

  rtnq convert model/ out/ --keep-int8 qkv --skip layers.-1 --dry-run  # print the plan only

  rtnq convert model/ out/ --format gptq --keep-int8 layers.0 --dry-run --tp 2,4,8   # for vLLM/SGLang

  rtnq convert model/ out/ --budget 4.75 --budget-groups --scale mse   # data-free mixed precision (docs/PRECISION.md)

  rtnq convert model/ out/ --resume       # continue a run that was killed (same SRC, OUT and options)
"""


@app.command(epilog=CONVERT_EXAMPLES)
def convert(
    src: Annotated[str, typer.Argument(help="Model directory with model.safetensors or shards + index, or a Hugging Face hub id ORG/NAME[@REVISION] (downloaded shard by shard, two on disk at most).")],
    out: Annotated[str, typer.Argument(help="Output directory (must not exist unless --force).")],
    bits: Annotated[int, typer.Option(callback=parse_bits, help="Default precision: 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", callback=parse_group, help="32, 64, 128 or -1 (channelwise).")] = 128,
    keep_int8: Annotated[Optional[list[str]], typer.Option("--keep-int8", help="Selectors kept in INT8 (comma list).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Selectors kept in 16-bit (comma list).")] = None,
    dtype: Annotated[Optional[str], typer.Option(callback=parse_dtype, help="Cast weights to bf16/fp16 before quantizing (default: keep 16-bit, fp32 -> bf16).")] = None,
    fmt: Annotated[str, typer.Option("--format", callback=parse_format, help="marlin (rtnq's runtime), gptq or compressed-tensors (vLLM, SGLang, transformers).")] = "marlin",
    tp: Annotated[Optional[str], typer.Option("--tp", help="List the tensors that fail the Marlin shape rules when split for these tensor-parallel degrees, e.g. 2,4,8.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and output size; read no weights (--budget reads them to score).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail instead of passing linears whose shape the format cannot hold through.")] = False,
    budget: Annotated[Optional[float], typer.Option("--budget", callback=parse_budget, help="Promote the INT4 units whose data-free score per extra bit is highest to INT8, while the quantized linears average at most this many bits per weight (codes and scales), e.g. 4.5. Reads the weights once more before writing.")] = None,
    scale: Annotated[str, typer.Option("--scale", callback=parse_scale, help="absmax (the paper's RTN, default) or mse: per group, the clipping of the scale (1.00 to 0.80 of maxabs) with the smallest squared error.")] = "absmax",
    budget_groups: Annotated[bool, typer.Option("--budget-groups", help="Let --budget also give INT4 units groups of 64 or 32 (0.125 or 0.375 more bits per weight than 128), not only INT8; each option is weighed by the weight error it leaves (--budget-score position, error, norm_error or relative). Reads every quantized weight before writing.")] = False,
    budget_score: Annotated[Optional[str], typer.Option("--budget-score", callback=parse_budget_score, help="What --budget ranks units by: position (the default without --budget-groups: first and last blocks, q/k/v and down first; reads no weight), or a statistic of the weight's 4-bit error: relative (the default with --budget-groups: the error over the weight's own norm), norm_error, error, kurtosis, max_over_rms.")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="Before quantizing, fold the RMSNorm weights into the linears and a seeded randomized-Hadamard rotation into the residual stream (pre-norm Llama/Mistral/Qwen2/Qwen3 only): the same function, an ordinary checkpoint, outliers spread. Imports torch.")] = False,
    rotate_seed: Annotated[int, typer.Option("--rotate-seed", help="The rotation's seed (random signs; the matrix where no Hadamard order fits).")] = 0,
    rotate_spare: Annotated[str, typer.Option("--rotate-spare", help="Residual channels left out of the fold and rotation: auto (those the norms damp, which carry massive activations), none, or a comma list of indices.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run for OUT that was killed (SIGKILL, power loss): keep the shards its .OUT.rtnq-tmp-* directory completed (re-hashed first), convert the rest; same SRC and options, or it is refused with what differs.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Quantize SRC with round-to-nearest into Marlin-packed INT4/INT8 and write OUT with a manifest."""
    degrees = parse_tp(tp)  # a usage error before torch is imported
    # convert never multiplies matrices with numpy, whose OpenBLAS otherwise starts a thread per CPU when numpy
    # is imported: 0.1 s of start-up on a 2-CPU machine (issue 15). Only here: eval's torch may use OpenBLAS
    # (aarch64 wheels), and a process-wide setting would make its matmuls single-threaded. A user's setting wins.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from rtnq.commands import convert as conv

    options = conv.ConvertOptions(
        bits=bits, group_size=group_size, keep_int8=split_list(keep_int8), skip=split_list(skip),
        dtype=dtype, strict=strict, force=force, tp=degrees, format=fmt, dry_run=dry_run,
        budget=budget, budget_score=budget_score, budget_groups=budget_groups, scale=scale, resume=resume,
        rotate=rotate, rotate_seed=rotate_seed, rotate_spare=rotate_spare,
    )
    plan = conv.make_plan(src, out, options)
    try:
        _plan_and_run(conv, plan, dry_run, json_out, fmt)
    finally:
        plan.close()  # a hub source's temporary directory


def _plan_and_run(conv, plan, dry_run: bool, json_out: bool, fmt: str) -> None:
    for w in plan.warnings:
        warn(w)
    # The TP line belongs to the summary (stdout), except under --json, where stdout is JSON only.
    summary_console = err if json_out else results
    if plan.resume is not None:  # what is kept and redone: a result line under --dry-run, progress otherwise
        print_line(plan.resume.line(dry_run), summary_console if dry_run else err)
    if dry_run:
        _print_plan(plan, json_out)
        if plan.hub is not None:
            print_line(plan.hub.plan_line(), summary_console)
        # The plan just listed the failing tensors for the --tp degrees: no hint to run it again.
        listed = () if json_out else plan.options.tp
        print_line(tp_summary(plan.selection.tp_failures, listed), summary_console)
        return
    try:
        result = _run_with_progress(conv, plan)
    except KeyboardInterrupt:
        # click would turn this into "Aborted!" and exit 1; the contract is a named error and 130.
        raise Interrupted(f"interrupted; nothing was written to {plan.out}") from None
    if json_out:
        emit_json({"out": str(plan.out), "seconds": round(result.seconds, 3), "format": fmt,
                    **result.manifest.to_json()["totals"]})
    else:
        print_summary(result)
    if plan.hub is not None:
        print_line(plan.hub.run_line(), summary_console)
    print_line(tp_summary(plan.selection.tp_failures), summary_console)


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
    from rtnq.commands import convert as conv

    t = conv.totals(plan)
    if json_out:
        tensors = [
            {"name": i.spec.name, "kind": i.decision.kind, "bits": i.decision.bits, "rule": i.decision.rule,
             "reason": i.decision.reason, "outputs": [e.name for e in i.outputs], "shard": i.out_shard}
            for i in plan.items
        ]
        tp = {str(d): [{"name": n, "why": why} for n, why in plan.selection.tp_failures[d]]
              for d in plan.options.tp}
        budget = None if plan.budget is None else {
            "bits_per_weight": plan.options.budget, "score": plan.budget.score_name, "groups": plan.budget.groups,
            "before": plan.budget.floor,
            "after": plan.budget.bits_per_weight, "promoted": sorted(plan.budget.promoted), "seconds": plan.budget.seconds}
        emit_json({"dry_run": True, "format": plan.options.format, "totals": t, "rules": plan.selection.rules,
                    "warnings": plan.manifest_warnings, "tensors": tensors, "tp": tp, "budget": budget,
                    "rotate": None if plan.rotation is None else plan.rotation.manifest()})
        return
    from rich.table import Table

    # Names and rules are user data (brackets would read as markup); "fold" keeps a long name whole
    # on a narrow terminal instead of cutting it with an ellipsis.
    table = Table(title=escape(f"plan: {plan.src} -> {plan.out}, format {plan.options.format} (dry run, nothing written)"))
    table.add_column("tensor", overflow="fold")
    for col in ("shape", "becomes", "why"):
        table.add_column(col)
    for i in plan.items:
        d = i.decision
        becomes = f"int{d.bits} g{d.group_size}" if d.kind == "quantized" else i.outputs[0].dtype.lower()
        why = d.rule if d.kind == "quantized" else (d.reason or "")
        table.add_row(escape(i.spec.name), "x".join(map(str, i.spec.shape)), becomes, escape(why))
    results.print(table)
    for d in plan.options.tp:
        fails = plan.selection.tp_failures[d]
        if not fails:
            continue
        tp_table = Table(title=f"tensor parallel {d}: quantized tensors that fail the Marlin shape rules per rank")
        tp_table.add_column("tensor", overflow="fold")
        tp_table.add_column("why")
        for name, why in fails:
            tp_table.add_row(escape(name), escape(why))
        results.print(tp_table)
    if plan.rotation is not None:
        print_line(rotation_line(plan.rotation.manifest()))
    if plan.budget is not None:
        print_line(budget_line(plan.budget))
    print_totals(t)


