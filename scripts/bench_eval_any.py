"""scripts/bench_eval.py for a model of any depth: the `q4km` setting follows the model's layer count.

    .venv/bin/python scripts/bench_eval_any.py --src bench-cache/gemma3-270m [bench_eval.py options]

bench_eval.py's `q4km` setting spells out llama.cpp's Q4_K_M rule for SmolLM2's 30 layers. This wrapper
reads num_hidden_layers from SRC/config.json, rebuilds that setting with the same rule for that depth,
and runs bench_eval.py's main() with the arguments as given (every other setting is unchanged; with
30 layers the rebuilt flags equal bench_eval.py's own).

The rule (llama.cpp, llama-quant.cpp `use_more_bits`): layer i of n gets more bits when
    i < n/8  or  i >= 7n/8  or  (i - n/8) % 3 == 2      (integer division)
for attn_v and ffn_down; as in bench_eval.py, q/k/v stand in for attn_v (engines fuse them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_eval  # noqa: E402


def more_bits_layers(n: int) -> list[int]:
    return [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]


def runs(layers: list[int]) -> list[str]:
    """[0, 1, 2, 5, 26, 27] -> ['0-2', '5', '26-27']: the ranges bench_eval.py's selector uses."""
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return out


def q4km_setting(n: int) -> tuple[str, list[str]]:
    sel = ",".join(f"layers.{r}+{part}" for r in runs(more_bits_layers(n)) for part in ("qkv", "down"))
    return (f"RTN-4, llama.cpp Q4_K_M rule for {n} layers (qkv+down)", ["--bits", "4", "--keep-int8", sel])


def src_arg(argv: list[str]) -> Path:
    for k, a in enumerate(argv):
        if a == "--src" and k + 1 < len(argv):
            return Path(argv[k + 1])
        if a.startswith("--src="):
            return Path(a.split("=", 1)[1])
    return bench_eval.REPO / "bench-cache" / "smollm2-135m"


def main() -> None:
    config = src_arg(sys.argv[1:]) / "config.json"
    if config.exists():
        cfg = json.loads(config.read_text())
        n = cfg.get("num_hidden_layers", cfg.get("text_config", {}).get("num_hidden_layers"))
        if n:
            bench_eval.SETTINGS["q4km"] = q4km_setting(int(n))
    bench_eval.main()


if __name__ == "__main__":
    main()
