"""Layer-major evaluation on transformers' own model classes: one decoder layer in memory at a time.

The model is built from config.json on the meta device (no memory), so its classes do the math:
attention, rotary embeddings, norms, MLPs, each family's quirks. What rtnq changes is the order:

  1. Probe: the model's own forward runs once per window with every decoder layer replaced by a probe
     that records what the forward hands that layer (its input hidden states, the causal or sliding
     mask, the position embeddings of its layer type, ...) and passes the hidden states on. The first
     probe's input is the embedding output, scaling included (Gemma); the recorded arguments depend
     only on the window length, so one window's serve every window.
  2. Layers: for each decoder layer, its source weights are loaded (float32), every window's source
     hidden states go through it, then the candidate's weights replace them and every window's
     candidate hidden states go through it; then the layer returns to the meta device.
  3. Head: final norm, then lm_head a chunk of positions at a time, so (positions x vocab) logits never
     exist for a whole window of a 262k-vocabulary model.

Memory is one layer's float32 weights (twice the 16-bit size), lm_head in float32 (two copies only
when the candidate's differs from the source's), the embedding rows the text uses, and two (windows,
window, hidden) float32 hidden-state buffers: independent of depth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rtnq.commands.evaluate.metrics import Sums, log_probs
from rtnq.commands.evaluate.weights import Source
from rtnq.commands.evaluate.windows import import_transformers
from rtnq.errors import CheckpointError

CHUNK_LOGITS = 1 << 22  # float32 logits per head chunk and model (16 MB): positions = this // vocab
STRUCTURE = ("model", "model.embed_tokens", "model.layers", "model.norm", "lm_head")
EMBED = "model.embed_tokens.weight"


@dataclass
class Run:
    sums: Sums
    layers: int
    hidden_state_bytes: int
    unused: list[str]  # source tensors no module asked for
    max_positions: int | None  # the config's max_position_embeddings


class _Stop(Exception):
    """Raised by the last probe: the model's forward has nothing more to show."""


class _Probe(nn.Module):
    def __init__(self, seen: list, last: bool):
        super().__init__()
        self.seen, self.last = seen, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.seen.append((hidden, args[1:], kwargs))
        if self.last:
            raise _Stop
        return hidden


def build(src_dir: Path):
    """The model's transformers class on the meta device, checked for the layout eval streams."""
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(src_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 (unknown model_type, malformed config: ValueError/OSError/KeyError)
        raise CheckpointError(f"{src_dir}/config.json: transformers cannot read it ({_first_line(e)})") from None
    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 (whatever from_config raises, it means "not a causal LM")
        raise CheckpointError(f"{src_dir}: {type(config).__name__} has no transformers causal-LM class "
                              f"({_first_line(e)})") from None
    for path in STRUCTURE:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            raise CheckpointError(f"{src_dir}: {type(model).__name__} has no {path}; rtnq eval runs decoder-only "
                                  "models laid out as model.embed_tokens, model.layers, model.norm, lm_head")
    return model.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0].split(". ")[0] if text else type(e).__name__)[:200]


def _materialize(model, module: nn.Module, prefix: str, fetch: Callable[[str], torch.Tensor],
                 used: set[str]) -> None:
    """Give a meta module real storage: computed buffers (rotary frequencies, Gemma's embedding scale)
    from the model's own initializer, parameters from the checkpoint."""
    _realize(model, module)
    _assign(module, prefix, fetch, used)


def _realize(model, module: nn.Module) -> None:
    module.to_empty(device="cpu")
    for sub in module.modules():
        if next(sub.buffers(recurse=False), None) is not None:
            model._init_weights(sub)


def _assign(module: nn.Module, prefix: str, fetch: Callable[[str], torch.Tensor], used: set[str]) -> None:
    for name, p in module.named_parameters():
        w = fetch(prefix + name)
        if tuple(w.shape) != tuple(p.shape):
            raise CheckpointError(f"{prefix + name} is {list(w.shape)}; the model's config makes it {list(p.shape)}")
        p.data = w
        used.add(prefix + name)


def _apply(f: Callable[[torch.Tensor], torch.Tensor], hidden: list[torch.Tensor]) -> None:
    """Replace each window's hidden states in place, so the old buffer is freed window by window
    (a new list would hold both generations at once: twice hidden_state_bytes)."""
    for w, h in enumerate(hidden):
        hidden[w] = f(h)


def _call(layer: nn.Module, hidden: torch.Tensor, recorded) -> torch.Tensor:
    args, kwargs = recorded
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # older classes return (hidden, ...)


def evaluate(src_dir: Path, source: Source, candidate: Source, ids: torch.Tensor,
             progress: Callable[[int, int], None] | None = None) -> Run:
    """Score the (windows, window) token ids with both weight sets; see the module docstring."""
    model = build(src_dir)
    config = model.config
    inner = model.model
    layers = list(inner.layers)
    total = len(layers) + 1
    used: set[str] = set()
    with torch.no_grad():
        hidden_src, recorded = _embed(model, inner, source, ids, used)
        hidden_cand, _ = _embed(model, inner, candidate, ids, set())
        for i, layer in enumerate(layers):
            prefix = f"model.layers.{i}."
            _materialize(model, layer, prefix, source.get, used)
            run_layer = functools.partial(_call, layer, recorded=recorded[i])
            _apply(run_layer, hidden_src)
            _assign(layer, prefix, candidate.get, set())
            _apply(run_layer, hidden_cand)
            layer.to_empty(device="meta")  # frees this layer's weights before the next one loads
            if progress:
                progress(i + 1, total)
        sums = _head(model, inner, source, candidate, ids, hidden_src, hidden_cand, used)
        if progress:
            progress(total, total)
    hidden_bytes = 2 * ids.numel() * config.get_text_config().hidden_size * 4
    unused = sorted(set(source.specs) - used - ({"lm_head.weight"} if _tied(config) else set()))
    return Run(sums, len(layers), hidden_bytes, unused,
               getattr(config.get_text_config(), "max_position_embeddings", None))


def _embed(model, inner, weights: Source, ids: torch.Tensor, used: set[str]):
    """Layer-0 input of every window, and what the model's forward passes each layer.

    Only the embedding rows the windows use are loaded (a 262k x 5k table is GBs in float32): the
    ids are renumbered into that small table, which changes nothing the forward computes."""
    rows, local = torch.unique(ids, return_inverse=True)
    emb = inner.embed_tokens
    full = tuple(emb.weight.shape)
    layers = inner.layers  # the ModuleList itself, put back below
    padding_idx = emb.padding_idx  # put back below too
    seen: list = []
    inner.layers = nn.ModuleList(_Probe(seen, i == len(layers) - 1) for i in range(len(layers)))
    try:
        for name, child in inner.named_children():
            if name not in ("layers", "norm", "embed_tokens"):
                _materialize(model, child, f"model.{name}.", weights.get, used)
        _realize(model, emb)
        emb.weight.data = _rows(weights, EMBED, rows, full)
        # padding_idx (Qwen2: the pad token's id) only masks a gradient, but F.embedding checks it against the
        # table's size: against the small table it would be out of range
        emb.padding_idx = None
        used.add(EMBED)
        inputs, recorded = [], None
        for w in range(ids.shape[0]):
            seen.clear()
            try:
                inner(input_ids=local[w:w + 1], use_cache=False)
            except _Stop:
                pass
            if len(seen) != len(layers):
                raise CheckpointError(f"{type(model).__name__}'s forward did not call its {len(layers)} decoder "
                                      "layers in order; rtnq eval cannot stream it")
            inputs.append(seen[0][0])
            recorded = recorded or [(a, k) for _, a, k in seen]
    finally:
        inner.layers = layers
        emb.padding_idx = padding_idx
        emb.to_empty(device="meta")
        emb.weight.data = torch.empty(full, device="meta")  # the full table's shape, for the next call
    return inputs, recorded


def _rows(weights: Source, name: str, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    table = weights.native(name)
    if tuple(table.shape) != shape:
        raise CheckpointError(f"{name} is {list(table.shape)}; the model's config makes it {list(shape)}")
    return table[rows].float()


def _tied(config) -> bool:
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _head(model, inner, source: Source, candidate: Source, ids, hidden_src, hidden_cand, used) -> Sums:
    _materialize(model, inner.norm, "model.norm.", source.get, used)
    _apply(inner.norm, hidden_src)
    _assign(inner.norm, "model.norm.", candidate.get, set())
    _apply(inner.norm, hidden_cand)
    # Tied models use the embedding as lm_head, as transformers does when the config says so; a rotated
    # candidate of a tied source has a head of its own (weights.Source.head).
    name = source.head(_tied(model.config))
    head_src = source.get(name)
    head_cand = candidate.get(candidate.head(_tied(model.config)))
    if torch.equal(head_src, head_cand):  # usually kept 16-bit: one copy, not two
        head_cand = head_src
    used.add(name)
    bias_src = bias_cand = None
    if getattr(model.lm_head, "bias", None) is not None:
        bias_src, bias_cand = source.get("lm_head.bias"), candidate.get("lm_head.bias")
        used.add("lm_head.bias")
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    vocab = head_src.shape[0]
    step = max(1, CHUNK_LOGITS // vocab)
    sums = Sums()
    scored = ids.shape[1] - 1
    for w in range(ids.shape[0]):
        for p0 in range(0, scored, step):
            p1 = min(scored, p0 + step)
            ls = log_probs(nn.functional.linear(hidden_src[w][0, p0:p1], head_src, bias_src), softcap)
            lc = log_probs(nn.functional.linear(hidden_cand[w][0, p0:p1], head_cand, bias_cand), softcap)
            sums.add(ls, lc, ids[w, p0 + 1:p1 + 1])
    return sums
