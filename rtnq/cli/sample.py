"""`rtnq sample`: write the built-in synthetic checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from rtnq.cli.app import app
from rtnq.cli.output import print_line

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

    from rtnq import synthetic
    from rtnq.errors import UsageError

    if dtype not in synthetic.DTYPES:
        raise UsageError(f"--dtype must be bf16, fp16 or fp32, got {dtype}")
    if Path(out_dir).exists() and not force:
        raise UsageError(f"{out_dir} already exists; pass --force to write into it")
    spec = synthetic.SampleSpec(hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab,
                              shards=shards, dtype=dtype, tied=tied, odd_linear=odd_linear)
    synthetic.write_checkpoint(out_dir, spec)
    print_line(f"wrote {out_dir}")  # the result, like convert's "wrote OUT": stdout


