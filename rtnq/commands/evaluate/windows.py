"""The text `rtnq eval` scores: tokenized with the source's own tokenizer, cut into fixed windows.

Each window starts the way the model saw its training sequences start: when the tokenizer adds
special tokens in front of a text (a BOS), every window begins with them, followed by text tokens
up to the window length. Windows do not overlap, so a token is scored once, with the context of its
own window only (the figures are comparable across settings, not with a sliding-window perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rtnq.errors import CheckpointError, UsageError

# The files some tokenizer class loads from; a directory with none of them has no tokenizer at all.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


@dataclass(frozen=True)
class Windows:
    ids: torch.Tensor  # (windows, window) int64
    prefix: list[int]  # the special tokens each window starts with (BOS), possibly none
    text_tokens: int  # how many tokens the whole text has
    warnings: list[str]

    @property
    def scored(self) -> int:
        """Positions with a next token to predict: all but the last of each window."""
        return self.ids.shape[0] * (self.ids.shape[1] - 1)


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--text {path}: not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"--text {path}: cannot read it ({e.strerror})") from None
    if not text.strip():
        raise UsageError(f"--text {path}: the file is empty")
    return text


def load_tokenizer(src: Path):
    """The source's own tokenizer (AutoTokenizer, local files only)."""
    transformers = import_transformers()
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{src}: no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); eval tokenizes with the "
                              "source's own tokenizer, so copy its tokenizer files into it")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, KeyError...: a broken tokenizer)
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{src}: no usable tokenizer ({why[:200]}); eval tokenizes with the source's "
                              "own tokenizer, so copy its tokenizer files into it") from None


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("rtnq eval needs transformers: pip install 'rtnq[eval]'") from None
    return transformers


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts in front of any text: what `"a"` gains with special tokens on."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    start = _find(full, plain)
    return full[:start] if start is not None else []


def _find(seq: list[int], sub: list[int]) -> int | None:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return None


def _quietly(f):
    """f() without transformers' "sequence longer than model_max_length" warning: eval cuts it itself."""
    logging = import_transformers().logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return f()
    finally:
        logging.set_verbosity(level)


def make_windows(tokenizer, text: str, tokens: int, window: int) -> Windows:
    """The first `tokens` positions of the text as tokens // window windows of `window` tokens."""
    if window < 2:
        raise UsageError(f"--window must be at least 2, got {window}")
    if tokens < window:
        raise UsageError(f"--tokens {tokens} is smaller than one window (--window {window})")
    prefix = special_prefix(tokenizer)
    body = window - len(prefix)
    if body < 1:
        raise UsageError(f"--window {window} leaves no room after the {len(prefix)} special tokens of each window")
    ids = _quietly(lambda: list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    wanted = tokens // window
    have = len(ids) // body
    if have == 0:
        raise UsageError(f"the text has {len(ids)} tokens; one window of {window} needs {body} text tokens. "
                         "Pass a longer --text or a smaller --window")
    warnings = []
    if have < wanted:
        warnings.append(f"the text has {len(ids)} tokens: {have} windows of {window}, not the {wanted} that "
                        f"--tokens {tokens} asks for")
    n = min(have, wanted)
    rows = [prefix + ids[i * body:(i + 1) * body] for i in range(n)]
    return Windows(torch.tensor(rows, dtype=torch.int64), prefix, len(ids), warnings)
