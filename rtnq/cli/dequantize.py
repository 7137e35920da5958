"""`rtnq dequantize`: a quantized checkpoint back to dense."""

from __future__ import annotations

from typing import Annotated

import typer

from rtnq.cli.app import JsonOpt, app, err
from rtnq.cli.output import emit_json, print_line
from rtnq.errors import Interrupted

@app.command()
def dequantize(
    src: Annotated[str, typer.Argument(help="A GPTQ, compressed-tensors or rtnq marlin checkpoint directory.")],
    out: Annotated[str, typer.Argument(help="Output directory for the dense checkpoint (must not exist unless --force).")],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a dense copy of a quantized checkpoint: every quantized weight becomes (code - bias) x scale."""
    from rtnq.commands import dequantize as deq

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
        emit_json(summary)
        return
    by_bits = ", ".join(f"{c} INT{b}" for b, c in sorted(result.bits.items()))
    print_line(f"dequantized {result.modules} {plan.method} modules ({by_bits}), copied {len(plan.passthrough)} "
               f"tensors, in {result.seconds:.2f} s")
    print_line(f"wrote {plan.out}")


