"""`rtnq eval`: perplexity, KL and top-1 of a candidate against its 16-bit source, as a table or JSON."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from rtnq.cli.app import JsonOpt, app, err, out
from rtnq.cli.output import (
    emit_json,
    parse_bits,
    parse_budget,
    parse_budget_score,
    parse_scale,
    parse_format,
    parse_group,
    print_line,
    split_list,
    warn,
)
from rtnq.errors import Interrupted, UsageError

EVAL_EXAMPLES = """
Examples:

  rtnq eval llama-rtnq/ --against llama/ --text wiki.txt            # a converted checkpoint

  rtnq eval llama/ --text wiki.txt --bits 4 --keep-int8 layers.0     # what-if: nothing is written
"""


def _bits(value: Optional[int]) -> Optional[int]:
    return value if value is None else parse_bits(value)


def _group(value: Optional[int]) -> Optional[int]:
    return value if value is None else parse_group(value)


def _format(value: Optional[str]) -> Optional[str]:
    return value if value is None else parse_format(value)


@app.command("eval", epilog=EVAL_EXAMPLES)
def eval_(
    model: Annotated[str, typer.Argument(help="A converted OUT (with --against SRC), or SRC itself (with --bits).")],
    text: Annotated[str, typer.Option("--text", help="UTF-8 text file to score.")],
    against: Annotated[Optional[str], typer.Option("--against", help="The 16-bit SRC that OUT was converted from.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", help="Score the first N tokens of the text.")] = 4096,
    window: Annotated[int, typer.Option("--window", help="Tokens per window (the model's BOS included).")] = 512,
    bits: Annotated[Optional[int], typer.Option("--bits", callback=_bits, help="What-if: convert SRC in memory at 4 or 8 bits.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", callback=_group, help="What-if: 32, 64, 128 or -1.")] = None,
    keep_int8: Annotated[Optional[list[str]], typer.Option("--keep-int8", help="What-if: selectors kept in INT8.")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="What-if: selectors kept in 16-bit.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", callback=_format, help="What-if: the format whose rules decide (default marlin).")] = None,
    budget: Annotated[Optional[float], typer.Option("--budget", callback=parse_budget, help="What-if: promote units to INT8 within this many bits per weight (see convert --budget).")] = None,
    budget_groups: Annotated[bool, typer.Option("--budget-groups", help="What-if: --budget may also choose groups of 64 or 32 (see convert --budget-groups).")] = False,
    budget_score: Annotated[Optional[str], typer.Option("--budget-score", callback=parse_budget_score, help="What-if: the score --budget ranks by.")] = None,
    scale: Annotated[Optional[str], typer.Option("--scale", callback=parse_scale, help="What-if: absmax or mse (see convert --scale).")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="What-if: rotate the residual stream first (see convert --rotate).")] = False,
    rotate_seed: Annotated[Optional[int], typer.Option("--rotate-seed", help="What-if: the rotation's seed.")] = None,
    rotate_spare: Annotated[Optional[str], typer.Option("--rotate-spare", help="What-if: channels left out of the rotation (auto, none, or indices).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch (default: torch's).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Score a candidate against its source on text: perplexity of both, mean KL(source || candidate), top-1."""
    what_if = {"--bits": bits, "--group-size": group_size, "--keep-int8": keep_int8, "--skip": skip, "--format": fmt,
               "--budget": budget, "--budget-score": budget_score, "--budget-groups": budget_groups, "--scale": scale,
               "--rotate": rotate, "--rotate-seed": rotate_seed is not None, "--rotate-spare": rotate_spare}
    given = [k for k, v in what_if.items() if v]
    if against is not None and given:
        raise UsageError(f"{given[0]} describes a what-if conversion of SRC; with --against OUT is already converted")
    if against is None and bits is None:
        raise UsageError("pass --against SRC to evaluate a converted OUT, or --bits to evaluate a what-if "
                         "conversion of SRC")
    from rtnq.commands import evaluate

    convert_options = None
    if against is None:
        from rtnq.commands.convert import ConvertOptions

        convert_options = ConvertOptions(bits=bits, group_size=128 if group_size is None else group_size,
                                         keep_int8=split_list(keep_int8), skip=split_list(skip),
                                         format=fmt or "marlin", dry_run=True, budget=budget,
                                         budget_score=budget_score, budget_groups=budget_groups,
                                         scale=scale or "absmax", rotate=rotate, rotate_seed=rotate_seed or 0,
                                         rotate_spare=rotate_spare or "auto")
    options = evaluate.EvalOptions(text=text, tokens=tokens, window=window, against=against,
                                   convert=convert_options, threads=threads)
    try:
        result = _run(evaluate, model, options)
    except KeyboardInterrupt:
        raise Interrupted("interrupted; eval writes nothing") from None
    for w in result.warnings:
        warn(w)
    if json_out:
        emit_json(result.figures)
    else:
        _print(result.figures)


def _run(evaluate, model, options):
    if not err.is_terminal:
        return evaluate.run(model, options)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("eval layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("eval", total=None)
        return evaluate.run(model, options, lambda done, total: bar.update(task, completed=done, total=total))


def _print(f: dict) -> None:
    from rich.table import Table

    table = Table(title=f"eval ({f['mode']})")
    table.add_column("")
    table.add_column("source", justify="right")
    table.add_column("candidate", justify="right")
    table.add_row("perplexity", f"{f['source']['perplexity']:.4f}", f"{f['candidate']['perplexity']:.4f}")
    table.add_row("top-1 accuracy", f"{f['source']['top1_accuracy']:.4f}", f"{f['candidate']['top1_accuracy']:.4f}")
    table.add_row("KL(source || candidate), nats", "", f"{f['kl']:.6f}")
    table.add_row("top-1 agreement", "", f"{f['top1_agreement']:.4f}")
    out.print(table)
    bos = ", each starting with BOS" if f["bos"] else ""
    print_line(f"{f['tokens_scored']} positions scored in {f['windows']} windows of {f['window']} tokens{bos}; "
               f"{f['layers']} layers in {f['seconds']:.2f} s, peak RSS {f['peak_rss_bytes'] / 2**20:.0f} MiB "
               f"(hidden states {f['hidden_state_bytes'] / 2**20:.1f} MiB)")
