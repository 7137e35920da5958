"""Does a written checkpoint evaluate in transformers to the KL `rtnq eval` reports for it?

    .venv/bin/python scripts/check_transformers_kl.py SRC OUT [--tokens 2048] [--window 2048]
        [--text /usr/share/common-licenses/GPL-3]

OUT is any checkpoint transformers loads itself (a compressed-tensors export through its compressed-tensors
integration, a dense `rtnq dequantize` output, a `--rotate` output with its un-tied head). Both models are
loaded whole by `AutoModelForCausalLM.from_pretrained(dtype=float32)` and run over the windows `rtnq eval`
scores (tokens // window windows, each starting with the tokenizer's BOS if it adds one); the script prints
the mean KL(SRC || OUT) over the scored positions and OUT's perplexity, then runs `rtnq eval OUT --against SRC`
on the same windows and prints its figures beside them, with the relative difference.

Transformers dequantizes compressed-tensors weights in float32 (codes times scales), rtnq in the scales'
16-bit dtype as the kernels do, so the two agree closely, not to the last digit (issue 13 measured 0.3278
against 0.3265 for a 4.5-bit SmolLM2 export). Real models only; not run in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RTNQ = str(REPO / ".venv" / "bin" / "rtnq")
sys.path.insert(0, str(REPO / "scripts"))
from bench_eval import windows  # noqa: E402  (the windows `rtnq eval` documents)


def log_probs(model_dir: Path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for row in ids:
            out.append(torch.log_softmax(model(row.unsqueeze(0)).logits[0, :-1].float(), dim=-1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=2048)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.src), local_files_only=True)
    ids, _ = windows(tok, args.text.read_text(encoding="utf-8"), args.tokens, args.window)
    kl = nll = 0.0
    scored = 0
    for row, ls, lc in zip(ids, log_probs(args.src, ids), log_probs(args.out, ids)):
        kl += (ls.exp() * (ls - lc)).sum().double().item()
        nll += -lc.gather(-1, row[1:].unsqueeze(-1)).double().sum().item()
        scored += row.numel() - 1
    theirs = {"kl": kl / scored, "perplexity": math.exp(nll / scored), "tokens_scored": scored}
    r = subprocess.run([RTNQ, "eval", str(args.out), "--against", str(args.src), "--text", str(args.text),
                        "--tokens", str(args.tokens), "--window", str(args.window), "--json"],
                       check=True, capture_output=True, text=True)
    ours = json.loads(r.stdout)
    print(f"transformers: KL {theirs['kl']:.6f}, perplexity {theirs['perplexity']:.4f} over {scored} positions")
    print(f"rtnq eval:    KL {ours['kl']:.6f}, perplexity {ours['candidate']['perplexity']:.4f} over "
          f"{ours['tokens_scored']} positions")
    print(f"relative KL difference: {abs(ours['kl'] - theirs['kl']) / theirs['kl']:.2e}")


if __name__ == "__main__":
    main()
