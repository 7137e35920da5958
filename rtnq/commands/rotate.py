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

Spared channels (`spare`, e.g. `massive_channels`' pick) stay outside both: their norm weights are kept, Q is
the identity on them and a rotation of the other h - |spare| channels elsewhere. Still exact (the mean of
squares is invariant under that block rotation too). It exists because the fold alone hurts models whose norms
damp a few residual channels carrying massive activations (SmolLM2: channels 247 and 507): folded, those
columns become so small that 4-bit RTN zeroes them, while the activations they multiply are huge.

Arithmetic runs in `compute_dtype` (float32 by default) and each result is cast back to the dtype of
the tensor it replaces. Memory: one tensor at a time, Q's Kronecker factors (never Q itself, unless no Hadamard
order fits) and the norm vectors; weights are rotated in chunks along the dimension Q does not mix.

`Rotation.check(specs, config)` refuses, with one UsageError line, every checkpoint the fold cannot
keep exact: other model types, post-sublayer norms (Gemma2/3, OLMo2), LayerNorm with bias (GPT-2, NeoX,
Phi-2, ...), MoE, missing norms or linears, and tensors it does not recognise.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rtnq import dtypes
from rtnq.checkpoint.source import Reader, TensorSpec
from rtnq.commands import heap
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
CHUNK_BYTES = 16 * 1024 * 1024  # float32 bytes of one rotated chunk (its temporaries are a few more of them)
# massive_channels: a channel is spared when its |norm weight| is below SPARE_RATIO x that norm's median in at
# least SPARE_SHARE of the norms that feed linears (SmolLM2-135M: channels 247 and 507, below a tenth of the
# median in 15 and 17 of its 61 norms; no other channel in more than 2)
SPARE_RATIO = 0.1
SPARE_SHARE = 0.125

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
                 compute_dtype: torch.dtype = torch.float32, spare: Sequence[int] = ()):
        self._actions = _actions(specs, config)
        self._specs = {s.name: s for s in specs}
        self.hidden: int = config["hidden_size"]
        self.seed = int(seed)
        self.compute_dtype = compute_dtype
        # tied when config says so or when there is no lm_head tensor: the head is then the embedding
        self.tied = bool(config.get("tie_word_embeddings", False)) or HEAD not in self._specs
        if self.tied:
            self._actions[HEAD] = Action("head", FINAL_NORM)
        self.spare = tuple(sorted({int(c) for c in spare}))
        if any(not 0 <= c < self.hidden for c in self.spare) or len(self.spare) >= self.hidden:
            raise UsageError(f"--rotate-spare: channels must be distinct, fewer than hidden_size {self.hidden} and "
                             f"in 0..{self.hidden - 1}, got {list(self.spare)}")
        order = self.hidden - len(self.spare)
        self.construction = hadamard.describe(order)
        self.kind = "hadamard" if hadamard.has_hadamard(order) else "random"
        # Q on the other channels: H diag(s) / sqrt(order) applied factor by factor (hadamard.times), or a
        # dense seeded orthogonal matrix where no Hadamard order fits
        if self.kind == "hadamard":
            self._factors = [f.to(compute_dtype) for f in hadamard.grouped(hadamard.factors(order))]
            self._signs = hadamard.random_signs(order, self.seed).to(compute_dtype) / math.sqrt(order)
        else:
            self._dense = hadamard.random_orthogonal(order, self.seed, compute_dtype)
        self._rest = torch.tensor([c for c in range(self.hidden) if c not in set(self.spare)])
        self._norms: dict[str, torch.Tensor] = {}

    @property
    def q(self) -> torch.Tensor:
        """Q as a dense hidden x hidden matrix (for tests and small models: `_times` never builds it)."""
        return self._times(torch.eye(self.hidden, dtype=self.compute_dtype))

    def _times(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Q for x (rows, hidden) in compute_dtype: the spared columns as they are, the others rotated."""
        rest = x if not self.spare else x[:, self._rest]
        if self.kind == "hadamard":
            rot = hadamard.times(rest, self._factors) * self._signs
        else:
            rot = rest @ self._dense
        if not self.spare:
            return rot
        out = x.clone()
        out[:, self._rest] = rot
        return out

    @staticmethod
    def check(specs: Sequence[TensorSpec], config: dict) -> None:
        """Raise UsageError (one line, naming why) when the fold cannot rotate this checkpoint exactly."""
        _actions(specs, config)

    def manifest(self) -> dict:
        """What a manifest records: kind ("hadamard" or "random"), seed, order (hidden_size less the spared
        channels), construction and the spared channels."""
        return {"kind": self.kind, "seed": self.seed, "order": self.hidden - len(self.spare),
                "construction": self.construction if self.kind == "hadamard" else "qr-of-gaussian",
                "spare": list(self.spare)}

    def extra_specs(self) -> list[TensorSpec]:
        """The tensors the output gains (the un-tied head), as specs a plan can carry: the embedding's
        location under the head's name (RotatedReader computes it from the embedding)."""
        return [replace(self._specs[EMBED], name=name) for name, _, _ in self.extra_tensors()]

    def reader(self, model_dir: str | Path) -> "RotatedReader":
        return RotatedReader(model_dir, self)

    def source_spec(self, name: str) -> TensorSpec | None:
        """The source tensor `name` (None for one the output gains, such as the un-tied head)."""
        return self._specs.get(name)

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
        """The part of a norm's weight folded into its readers: all of it but the spared channels'."""
        g = self._norms.get(norm)
        if g is None:
            g = fetch(norm).to(self.compute_dtype).reshape(-1).clone()
            g[list(self.spare)] = 1.0
            self._norms[norm] = g
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
        if a.kind == "norm":  # what stays of it: the spared channels' weights
            out = torch.ones_like(tensor)
            out[list(self.spare)] = tensor[list(self.spare)]
            return out
        if a.kind == "write_bias":
            return self._times(tensor.to(self.compute_dtype).reshape(1, -1)).reshape(tensor.shape).to(out_dtype)
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
            out[i:i + step] = self._times(c)
        return out

    def _left(self, w: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Q^T W, a chunk of columns at a time."""
        out = torch.empty(w.shape, dtype=out_dtype)
        step = self._rows(w.shape[0])
        for j in range(0, w.shape[1], step):  # Q^T C = (C^T Q)^T
            c = w[:, j:j + step].t().to(self.compute_dtype).contiguous()  # strided, _times would be ~8x slower
            out[:, j:j + step] = self._times(c).t()
        return out


def massive_channels(norms: Sequence[torch.Tensor]) -> list[int]:
    """The residual channels to spare: those whose |weight| is below SPARE_RATIO x the norm's median |weight|
    in at least SPARE_SHARE of `norms` (the RMSNorm weights that feed linears). Norms damp the channels that
    carry massive activations; those are the ones the fold must not touch."""
    if not norms:
        return []
    low = torch.zeros(norms[0].numel(), dtype=torch.int64)
    for g in norms:
        a = g.float().abs().reshape(-1)
        low += (a < SPARE_RATIO * a.median()).to(torch.int64)
    return [int(c) for c in torch.nonzero(low >= SPARE_SHARE * len(norms)).reshape(-1)]


def norm_names(specs: Sequence[TensorSpec]) -> list[str]:
    """The RMSNorm weights a Rotation folds (every layer's two and the final norm), in checkpoint order."""
    return [s.name for s in specs if s.name == FINAL_NORM or s.name.endswith(("input_layernorm.weight",
                                                                                 "post_attention_layernorm.weight"))]


class RotatedReader(Reader):
    """A Reader of the rotated checkpoint: the same specs (and `Rotation.extra_specs`), the rotated bytes.

    Every read of a tensor the rotation changes gets the bytes of `transform`'s result, computed from the
    source on first use and held until another tensor is asked for, so that a converter reading a tensor in
    chunks rotates it once (memory: the source tensor and its rotation while it is computed, then the rotation
    until another tensor is asked for; chunks are copies). Unchanged tensors are read from the source as
    before. Source reads for the fold (norms, a tied head's embedding) bypass it.
    """

    def __init__(self, model_dir: str | Path, rotation: Rotation):
        super().__init__(model_dir)
        self.rotation = rotation
        self._held: tuple[str, np.ndarray] | None = None
        self._hold = threading.Lock()

    def _source(self, spec: TensorSpec) -> torch.Tensor:
        buf = torch.empty(spec.nbytes, dtype=torch.uint8)
        super().read_into(spec, buf)
        return buf.view(spec.torch_dtype).reshape(spec.shape)

    def _rotated(self, spec: TensorSpec, keep: bool) -> np.ndarray:
        rot = self.rotation
        with self._hold:
            if self._held is not None and self._held[0] == spec.name:
                return self._held[1]
            self._held = None  # drop the previous tensor before computing the next
            extra = rot.source_spec(spec.name) is None  # the un-tied head: computed from the embedding
            t = rot.transform(spec.name, None if extra else self._source(spec),
                              lambda name: self._source(rot.source_spec(name)))
            data = t.contiguous().view(torch.uint8).numpy().reshape(-1)
            if data.nbytes != spec.nbytes:
                raise ValueError(f"{spec.name}: the rotated tensor has {data.nbytes} bytes, the spec {spec.nbytes}")
            if keep:
                self._held = (spec.name, data)
            return data

    def read_into(self, spec: TensorSpec, buf, start: int = 0) -> None:
        if not self.rotation.changes(spec.name):
            return super().read_into(spec, buf, start)
        dst = buf if isinstance(buf, np.ndarray) else buf.numpy()
        if start < 0 or start + dst.nbytes > spec.nbytes:
            raise ValueError(f"{spec.name}: bytes [{start}, {start + dst.nbytes}) outside its {spec.nbytes}")
        whole = start == 0 and dst.nbytes == spec.nbytes  # read in one go: nothing to hold for a next chunk
        dst.reshape(-1).view(np.uint8)[:] = self._rotated(spec, keep=not whole)[start:start + dst.nbytes]

    def map_array(self, spec: TensorSpec, start: int, nbytes: int) -> np.ndarray:
        if not self.rotation.changes(spec.name):
            return super().map_array(spec, start, nbytes)
        if start < 0 or start + nbytes > spec.nbytes:
            raise ValueError(f"{spec.name}: bytes [{start}, {start + nbytes}) outside its {spec.nbytes}")
        # a copy: a chunk still in flight must not keep the whole rotated tensor alive once the next one is read
        return self._rotated(spec, keep=True)[start:start + nbytes].copy()

    def close(self) -> None:
        self._held = None
        super().close()


def parse_spare(value: str) -> str:
    """--rotate-spare: "auto", "none" or a comma list of channel indices, normalised; UsageError otherwise."""
    v = value.strip().lower()
    if v in ("auto", "none"):
        return v
    try:
        chans = sorted({int(c) for c in v.split(",") if c.strip()})
    except ValueError:
        raise UsageError(f"--rotate-spare takes auto, none or a comma list of channel indices, got {value!r}") from None
    if not chans:
        raise UsageError(f"--rotate-spare takes auto, none or a comma list of channel indices, got {value!r}")
    return ",".join(map(str, chans))


def for_source(src_dir: Path, specs: Sequence[TensorSpec], config: dict | None, seed: int, spare: str) -> Rotation:
    """The Rotation `--rotate --rotate-seed SEED --rotate-spare SPARE` applies to SRC (refusing, with one line,
    a checkpoint it cannot keep exact). spare "auto" reads the norm weights (kilobytes) for massive_channels."""
    if config is None:
        raise UsageError(f"--rotate needs {src_dir}/config.json: the rotation must know the model's type and "
                         "hidden_size")
    Rotation.check(specs, config)
    spare = parse_spare(spare)
    # Every changed tensor is rotated whole and freed again: with glibc's moving mmap threshold those blocks
    # land on the heap and fragment it (convert --rotate of a 2.2 GB model: peak RSS 1.2 GB, 0.67 GB fixed).
    heap.fixed_mmap_threshold()
    if spare == "auto":
        by = {s.name: s for s in specs}
        with Reader(src_dir) as r:
            chans = massive_channels([r.read(by[n]) for n in norm_names(specs)])
    else:
        chans = [] if spare == "none" else [int(c) for c in spare.split(",")]
    return Rotation(specs, config, seed=seed, spare=chans)
