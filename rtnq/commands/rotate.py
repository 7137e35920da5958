"""The rotation fold: a data-free, function-preserving rotation of a pre-norm RMSNorm decoder's residual
stream (QuaRot/SpinQuant-style, without training), so RTN sees weights whose outliers are spread.

With x the residual stream (row vectors), W an nn.Linear weight (out, in) (y = x W^T), gamma an RMSNorm
weight and Q an orthogonal h x h matrix (rtnq.numerics.hadamard.rotation):

    fold     every RMSNorm feeding linears gives its gamma to them, W <- W diag(gamma), gamma <- 1:
             input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, model.norm -> lm_head
    rotate   embed_tokens E <- E Q; readers of the stream W <- W Q (q/k/v, gate/up, lm_head);
             writers W <- Q^T W and their bias b <- b Q (o_proj, down_proj)

RMSNorm with unit weight commutes with Q (the mean of squares is invariant), so the rotated model
computes the same function in exact arithmetic. Biases of the readers and Qwen3's q_norm/k_norm
(head_dim, after the projections) are unchanged. Tied embeddings are un-tied: the output gains an
explicit lm_head.weight = E diag(gamma_final) Q and the config `tie_word_embeddings: false`.

Arithmetic runs in `compute_dtype` (float32 by default) and each result is cast back to the dtype of
the tensor it replaces. Memory: one tensor at a time, Q and the norm vectors; weights are rotated in
chunks along the dimension Q does not mix.

`Rotation.check(specs, config)` refuses, with one UsageError line, every checkpoint the fold cannot
keep exact: other model types, post-sublayer norms (Gemma2/3, OLMo2), LayerNorm with bias (GPT-2, NeoX,
Phi-2, ...), MoE, missing norms or linears, and tensors it does not recognise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtnq import dtypes
from rtnq.checkpoint.source import TensorSpec
from rtnq.errors import UsageError
from rtnq.numerics import hadamard

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # pre-norm RMSNorm decoders with HF Llama naming
_POST_NORM = ("gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3", "cohere2")
_NORM_OFFSET = ("gemma", "gemma3n", "recurrent_gemma")  # RMSNorm scales by (1 + weight)
_LAYERNORM = ("gpt2", "gpt_neox", "gptj", "phi", "opt", "bloom", "falcon", "gpt_bigcode", "starcoder2",
              "stablelm", "mpt", "codegen", "cohere", "bert", "roberta", "t5", "olmo")
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"
CHUNK_BYTES = 64 * 1024 * 1024  # float32 bytes of one rotated chunk

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# tensor inside a layer -> (action, norm feeding it)
_IN_LAYER = {
    "input_layernorm.weight": ("norm", None),
    "post_attention_layernorm.weight": ("norm", None),
    **{f"self_attn.{p}_proj.weight": ("read", "input_layernorm.weight") for p in "qkv"},
    **{f"self_attn.{p}_proj.bias": ("keep", None) for p in "qkv"},
    "self_attn.o_proj.weight": ("write", None),
    "self_attn.o_proj.bias": ("write_bias", None),
    "self_attn.q_norm.weight": ("keep", None),
    "self_attn.k_norm.weight": ("keep", None),
    "self_attn.rotary_emb.inv_freq": ("keep", None),
    **{f"mlp.{p}_proj.weight": ("read", "post_attention_layernorm.weight") for p in ("gate", "up")},
    **{f"mlp.{p}_proj.bias": ("keep", None) for p in ("gate", "up")},
    "mlp.down_proj.weight": ("write", None),
    "mlp.down_proj.bias": ("write_bias", None),
}
_REQUIRED_IN_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight",
                      "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                      "mlp.down_proj.weight")


@dataclass(frozen=True)
class Action:
    kind: str  # "embed", "norm", "read", "head", "write", "write_bias", "keep"
    norm: str | None = None  # the RMSNorm weight folded into a reader


def _refuse(model_type: str, why: str) -> UsageError:
    return UsageError(f"--rotate cannot rotate model_type {model_type!r}: {why}")


def _check_config(config: dict) -> str:
    mt = str(config.get("model_type", "")) or "<none>"
    if any(config.get(k) for k in _MOE_CONFIG_KEYS) or "moe" in mt:
        raise _refuse(mt, "mixture-of-experts models are not supported yet")
    if mt in _POST_NORM:
        raise _refuse(mt, "it has post-sublayer norms (a norm after attention/MLP), which do not commute "
                          "with the rotation")
    if mt in _NORM_OFFSET:
        raise _refuse(mt, "its RMSNorm scales by (1 + weight); only plain RMSNorm decoders are supported")
    if mt in _LAYERNORM:
        raise _refuse(mt, "it uses LayerNorm (mean-centred, with bias), which does not commute with the "
                          "rotation; only RMSNorm decoders are supported")
    if mt not in SUPPORTED:
        raise _refuse(mt, f"supported model types are {', '.join(SUPPORTED)}")
    if not isinstance(config.get("hidden_size"), int):
        raise UsageError("--rotate: config.json has no integer hidden_size")
    return mt


def _actions(specs: Sequence[TensorSpec], config: dict) -> dict[str, Action]:
    """The action of every source tensor, after checking the checkpoint is one the fold keeps exact."""
    mt = _check_config(config)
    h = config["hidden_size"]
    by = {s.name: s for s in specs}
    out: dict[str, Action] = {}
    layers: dict[int, set[str]] = {}
    for s in specs:
        n = s.name
        if ".experts." in n or "block_sparse_moe" in n or ".moe." in n:
            raise _refuse(mt, f"tensor {n} belongs to a mixture-of-experts layer; MoE is not supported yet")
        if n.endswith("norm.bias") or n.endswith("layernorm.bias"):
            raise _refuse(mt, f"tensor {n} is a norm bias (LayerNorm); only RMSNorm decoders are supported")
        m = _LAYER.match(n)
        if n == EMBED:
            out[n] = Action("embed")
        elif n == FINAL_NORM:
            out[n] = Action("norm")
        elif n == HEAD:
            out[n] = Action("head", FINAL_NORM)
        elif n == "lm_head.bias":
            out[n] = Action("keep")
        elif m and m.group(2) in _IN_LAYER:
            kind, norm = _IN_LAYER[m.group(2)]
            out[n] = Action(kind, f"model.layers.{m.group(1)}.{norm}" if norm else None)
            layers.setdefault(int(m.group(1)), set()).add(m.group(2))
        else:
            raise UsageError(f"--rotate: tensor {n} is not part of a {mt} decoder as rtnq knows it; "
                             "the rotation cannot tell how it touches the residual stream")
    expected = config.get("num_hidden_layers")
    count = expected if isinstance(expected, int) else (max(layers) + 1 if layers else 0)
    for need in (EMBED, FINAL_NORM):
        if need not in by:
            raise UsageError(f"--rotate: the checkpoint has no {need}; the rotation needs it")
    for i in range(count):
        for leaf in _REQUIRED_IN_LAYER:
            if leaf not in layers.get(i, ()):
                raise UsageError(f"--rotate: the checkpoint has no model.layers.{i}.{leaf}; the rotation "
                                 "needs every layer's norms and linears")
    if layers and max(layers) >= count:
        raise UsageError(f"--rotate: the checkpoint has layer {max(layers)} but config.json says "
                         f"num_hidden_layers {count}")
    # shapes and dtypes: the residual dimension sits where each action expects it
    for n, a in out.items():
        s = by[n]
        if a.kind == "keep":
            continue
        if s.dtype not in dtypes.FLOATS:
            raise UsageError(f"--rotate: tensor {n} is {s.dtype}; the rotation needs a floating-point tensor")
        ok = {
            "embed": len(s.shape) == 2 and s.shape[1] == h,
            "head": len(s.shape) == 2 and s.shape[1] == h,
            "read": len(s.shape) == 2 and s.shape[1] == h,
            "norm": s.shape == (h,),
            "write": len(s.shape) == 2 and s.shape[0] == h,
            "write_bias": s.shape == (h,),
        }[a.kind]
        if not ok:
            raise UsageError(f"--rotate: tensor {n} has shape {list(s.shape)}, which does not fit hidden_size {h}")
    return out


class Rotation:
    """The rotation fold of one checkpoint: which tensors change, how, and what the output gains.

    Build it from the source's specs (rtnq.checkpoint.source.scan) and config.json; it raises a
    UsageError for checkpoints it cannot keep exact (see `check`). Then, per source tensor,
    `transform(name, tensor, fetch)` returns the tensor the output holds under that name; `extra_tensors`
    lists the tensors the output gains (the un-tied lm_head), which `transform(name, None, fetch)`
    computes; `config_changes` is what to set in the output's config.json.
    """

    def __init__(self, specs: Sequence[TensorSpec], config: dict, seed: int = 0,
                 compute_dtype: torch.dtype = torch.float32):
        self._actions = _actions(specs, config)
        self._specs = {s.name: s for s in specs}
        self.hidden: int = config["hidden_size"]
        self.seed = int(seed)
        self.compute_dtype = compute_dtype
        # tied when config says so or when there is no lm_head tensor: the head is then the embedding
        self.tied = bool(config.get("tie_word_embeddings", False)) or HEAD not in self._specs
        if self.tied:
            self._actions[HEAD] = Action("head", FINAL_NORM)
        self.construction = hadamard.describe(self.hidden)
        q, self.kind = hadamard.rotation(self.hidden, self.seed, torch.float64)
        self.q = q.to(compute_dtype)
        self._norms: dict[str, torch.Tensor] = {}

    @staticmethod
    def check(specs: Sequence[TensorSpec], config: dict) -> None:
        """Raise UsageError (one line, naming why) when the fold cannot rotate this checkpoint exactly."""
        _actions(specs, config)

    def manifest(self) -> dict:
        """What a manifest records: kind ("hadamard" or "random"), seed, order and construction."""
        return {"kind": self.kind, "seed": self.seed, "order": self.hidden,
                "construction": self.construction if self.kind == "hadamard" else "qr-of-gaussian"}

    def changes(self, name: str) -> bool:
        """Whether the output's tensor `name` differs from the source's (False: copy it unchanged)."""
        return self._actions[name].kind != "keep"

    def extra_tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, safetensors dtype) of each tensor the output has and the source lacks."""
        if self.tied and HEAD not in self._specs:
            e = self._specs[EMBED]
            return [(HEAD, e.shape, e.dtype)]
        return []

    def config_changes(self) -> dict:
        return {"tie_word_embeddings": False} if self.tied else {}

    def _gamma(self, norm: str, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
        g = self._norms.get(norm)
        if g is None:
            g = self._norms[norm] = fetch(norm).to(self.compute_dtype).reshape(-1)
        return g

    def transform(self, name: str, tensor: torch.Tensor | None, fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The output's tensor `name`, cast to the dtype of `tensor` (of the embedding, for a computed head).

        `fetch(other)` returns a source tensor by name: the norm weights folded into readers (cached
        here; small) and, for a tied head, the embedding.
        """
        a = self._actions.get(name)
        if a is None:
            raise KeyError(f"{name} is not a tensor of this checkpoint")
        if a.kind == "head" and self.tied:
            tensor = fetch(EMBED)
        if tensor is None:
            raise ValueError(f"{name}: transform needs the source tensor")
        out_dtype = tensor.dtype
        if a.kind == "keep":
            return tensor
        if a.kind == "norm":
            return torch.ones_like(tensor)
        if a.kind == "write_bias":
            return (tensor.to(self.compute_dtype) @ self.q).to(out_dtype)
        if a.kind in ("embed", "read", "head"):
            gamma = self._gamma(a.norm, fetch) if a.norm else None
            return self._right(tensor, gamma, out_dtype)
        return self._left(tensor, out_dtype)  # write: Q^T W

    def _rows(self, width: int) -> int:
        return max(1, CHUNK_BYTES // (4 * max(1, width)))

    def _right(self, w: torch.Tensor, gamma: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """W diag(gamma) Q, a chunk of rows at a time (only the chunk is held in compute_dtype)."""
        out = torch.empty(w.shape, dtype=out_dtype)
        step = self._rows(w.shape[1])
        for i in range(0, w.shape[0], step):
            c = w[i:i + step].to(self.compute_dtype)
            if gamma is not None:
                c = c * gamma
            out[i:i + step] = c @ self.q
        return out

    def _left(self, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Q^T W, a chunk of columns at a time."""
        out = torch.empty(w.shape, dtype=out_dtype)
        step = self._rows(w.shape[0])
        qt = self.q.t()
        for j in range(0, w.shape[1], step):
            out[:, j:j + step] = qt @ w[:, j:j + step].to(self.compute_dtype)
        return out
