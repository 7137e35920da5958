"""Deterministic synthetic Hugging Face checkpoints (Llama-shaped) for tests, the demo and benchmarks.

Tensors are generated and written one at a time through rtnq's streaming writer, so a multi-GB
sample needs only one tensor's worth of memory. Every tensor's values depend only on (seed, name),
so the same call always writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rtnq import dtypes
from rtnq.checkpoint.layout import INDEX_NAME, shard_name
from rtnq.checkpoint.writer import Entry, ShardWriter

DTYPES = ("bf16", "fp16", "fp32")  # what `rtnq sample --dtype` accepts

# Shapes of the issue-4 benchmark model: a 1.1B-parameter Llama (TinyLlama-like), 2.2 GB in bf16.
BENCH_1B = dict(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4)


@dataclass
class SampleSpec:
    """Sizes and options of a synthetic Llama-style checkpoint (defaults: a tiny 2-layer model)."""

    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    dtype: str = "bf16"
    shards: int = 1  # number of shard files; >1 writes an index
    tied: bool = False  # tie lm_head to embed_tokens (no lm_head tensor, config says tied)
    odd_linear: bool = False  # add model.layers.0.mlp.odd_proj.weight (n=96, k=200): fails the Marlin gate
    outliers: bool = True  # sprinkle a few large values, like real weights
    seed: int = 0
    extra_files: dict[str, str] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def tensor_shapes(spec: SampleSpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order HF Llama checkpoints list them."""
    h, i, hd = spec.hidden, spec.intermediate, spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for n in range(spec.layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (spec.heads * hd, h)),
            (f"{p}.self_attn.k_proj.weight", (spec.kv_heads * hd, h)),
            (f"{p}.self_attn.v_proj.weight", (spec.kv_heads * hd, h)),
            (f"{p}.self_attn.o_proj.weight", (h, spec.heads * hd)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
        if n == 0 and spec.odd_linear:
            out.append((f"{p}.mlp.odd_proj.weight", (96, 200)))
    out.append(("model.norm.weight", (h,)))
    if not spec.tied:
        out.append(("lm_head.weight", (spec.vocab, h)))
    return out


def make_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, outliers: bool = True) -> torch.Tensor:
    """The deterministic values of one tensor: N(0, 0.02) weights (~1/997 outliers x25), norms near 1."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    if len(shape) == 1:
        return (1.0 + 0.05 * torch.randn(shape, generator=gen)).to(dtype)
    w = torch.randn(shape, generator=gen).mul_(0.02)
    if outliers:
        mask = torch.rand(shape, generator=gen) < (1 / 997)
        w[mask] *= 25
    return w.to(dtype)


def config(spec: SampleSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": dtypes.BY_SHORT[spec.dtype].name,
    }


def write_checkpoint(out_dir: str | Path, spec: SampleSpec | None = None) -> Path:
    """Write the synthetic checkpoint described by `spec` into `out_dir` (created if needed)."""
    spec = spec or SampleSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtypes.BY_SHORT[spec.dtype].torch
    st = dtypes.BY_SHORT[spec.dtype].st
    shapes = tensor_shapes(spec)
    entries = [Entry(name, st, shape) for name, shape in shapes]

    # Split into `shards` files of roughly equal byte size, keeping file order.
    total = sum(e.nbytes for e in entries)
    groups: list[list[Entry]] = [[]]
    target = total / max(1, spec.shards)
    acc = 0
    for e in entries:
        if groups[-1] and acc + e.nbytes / 2 > target * len(groups) and len(groups) < spec.shards:
            groups.append([])
        groups[-1].append(e)
        acc += e.nbytes
    n = len(groups)
    names = [shard_name(i, n) for i in range(n)]

    meta = {"format": "pt"}
    for fname, group in zip(names, groups):
        w = ShardWriter(out / fname, group, meta)
        for e in group:
            w.write(e.name, make_tensor(e.name, e.shape, dtype, spec.seed, spec.outliers))
        w.close(sync=False)
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {e.name: fname for fname, g in zip(names, groups) for e in g},
        }
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config(spec), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}) + "\n")
    for name, text in spec.extra_files.items():
        (out / name).write_text(text)
    return out
