"""`rtnq eval`: how far a candidate's next-token distributions are from its 16-bit source, on real text.

Two modes, told apart by the arguments:
    eval OUT --against SRC      a written checkpoint (marlin, gptq or compressed-tensors) against SRC
    eval SRC --bits B [...]     what `rtnq convert SRC --bits B ...` would give, computed in memory

    windows.py  the text, the source's tokenizer and its special tokens, fixed windows
    weights.py  source, converted-OUT and what-if weights, one tensor at a time by name
    layers.py   the layer-major runner on transformers' classes
    metrics.py  the sums and the figures (perplexity, KL, top-1)
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from rtnq.commands import heap
from rtnq.errors import UsageError

DEFAULT_TOKENS = 4096
DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class EvalOptions:
    text: str
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW
    against: str | None = None  # SRC, when the model argument is a converted OUT
    convert: object | None = None  # ConvertOptions of the what-if mode
    threads: int | None = None


@dataclass
class EvalResult:
    figures: dict  # the JSON object of `rtnq eval --json`
    warnings: list[str] = field(default_factory=list)


def run(model: str | Path, options: EvalOptions, progress: Callable[[int, int], None] | None = None) -> EvalResult:
    import torch

    from rtnq.commands.evaluate import layers, weights, windows

    if (options.against is None) == (options.convert is None):
        raise UsageError("pass --against SRC to evaluate a converted OUT, or --bits to evaluate a what-if "
                         "conversion of SRC (not both)")
    if options.threads is not None:
        if options.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {options.threads}")
        torch.set_num_threads(options.threads)
    if options.tokens < options.window:  # before anything slow is loaded
        raise UsageError(f"--tokens {options.tokens} is smaller than one window (--window {options.window})")
    text = windows.read_text(options.text)
    heap.fixed_mmap_threshold()
    t0 = time.perf_counter()
    src_dir = (weights.source_dir(options.against, "--against") if options.against is not None
               else weights.source_dir(model))
    win = windows.make_windows(windows.load_tokenizer(src_dir), text, options.tokens, options.window)
    source = weights.Source(src_dir)
    candidate = None
    try:
        if options.against is not None:
            candidate = weights.candidate(weights.model_dir(model))
            weights.check_pair(candidate, source)
        else:
            candidate = weights.WhatIf(src_dir, _what_if_plan(src_dir, options.convert))
        done = layers.evaluate(src_dir, source, candidate, win.ids, progress)
    finally:
        source.close()
        if candidate is not None:
            candidate.close()
    figures = done.sums.figures()
    figures.update(
        mode=("what-if" if options.against is None else
              "converted" if isinstance(candidate, weights.Converted) else "dense"),
        windows=int(win.ids.shape[0]), window=int(win.ids.shape[1]), bos=bool(win.prefix),
        layers=done.layers, seconds=round(time.perf_counter() - t0, 3), peak_rss_bytes=peak_rss(),
        hidden_state_bytes=done.hidden_state_bytes, threads=torch.get_num_threads(),
    )
    warnings = list(win.warnings)
    if done.max_positions and win.ids.shape[1] > done.max_positions:
        warnings.append(f"--window {win.ids.shape[1]} is longer than the model's max_position_embeddings "
                        f"({done.max_positions}); positions past it were never trained")
    if done.unused:
        warnings.append(f"{len(done.unused)} source tensors are not used by the model's class "
                        f"(e.g. {done.unused[0]}); is config.json the checkpoint's own?")
    return EvalResult(figures, warnings)


def _what_if_plan(src_dir: Path, options):
    from rtnq.commands import convert

    # A dry-run plan writes nothing and only checks that OUT is not inside SRC: any sibling name will do.
    return convert.make_plan(src_dir, src_dir.parent / f".{src_dir.name}.rtnq-eval", replace(options, dry_run=True))


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
