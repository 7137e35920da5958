"""What a tensor name says: its block, module role and family (DESIGN.md section 5). Pure, torch-free.

Shared by selection (which tensors are quantized, and which fused groups they belong to) and by
`rtnq inspect` (which block and module a manifest entry sits in), so the two always agree on what a
block is.

Alias table (leaf module names, lower-cased; "in attention"/"in an MLP" = an enclosing component)
    qkv      q_proj k_proj v_proj qkv_proj (Llama/Qwen/Mistral/Phi-3), query_key_value (NeoX/Falcon/Bloom),
             wqkv (MPT, InternLM2), w_pack (Baichuan), c_attn (GPT-2/BigCode/Qwen-1), query key value (BERT),
             q k v (T5), wq wk wv (Meta Llama), q_lin k_lin v_lin (DistilBERT), and DeepSeek MLA's
             q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj
    o        o_proj, o (T5), out_lin; in attention also out_proj, dense (NeoX/Falcon/Phi-2/BERT), wo,
             c_proj (GPT-2), proj (ViT)
    gate_up  gate_proj up_proj gate_up_proj, w1 w3 (Mixtral/Meta Llama), fc1 fc_in lin1 c_fc dense_h_to_4h,
             wi wi_0 wi_1 (T5), BERT intermediate.dense; Qwen-1's w1 w2 (when beside c_proj and no w3)
    down     down_proj w2 fc2 fc_out lin2 dense_4h_to_h; in an MLP also c_proj, wo (T5); BERT output.dense
    attn     everything under a component containing "attn"/"attention" (self_attn, attn, attention,
             self_attention, SelfAttention, EncDecAttention, encoder_attn, crossattention), plus q/k/v/o
             projections that sit directly in a block
    mlp, ffn everything under mlp, feed_forward, ffn, block_sparse_moe, moe, DenseReluDense, intermediate,
             plus gate/up/down projections that sit directly in a block (OPT/Whisper fc1, fc2)
    experts  everything under an `experts` component: routed MoE experts (`shared_expert(s)` is not)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

# The numbered containers that hold the transformer blocks. A closed list on purpose: a generic "any
# name followed by a number" would turn nn.Sequential projectors (`mm_projector.0`) into blocks.
BLOCK_CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "block", "resblocks"})

# Leaf module name -> role.
_ROLES = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "q_lin", "q_b_proj"), "q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "v_lin"), "v"),
    **dict.fromkeys(("qkv_proj", "qkv", "query_key_value", "wqkv", "w_pack", "c_attn"), "qkv"),
    "q_a_proj": "q_a",  # DeepSeek MLA low-rank down-projections, fused by vLLM as fused_qkv_a_proj
    "kv_a_proj_with_mqa": "kv_a",
    "kv_b_proj": "kv_b",
    **dict.fromkeys(("o_proj", "o", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1", "wi_0"), "gate"),
    **dict.fromkeys(("up_proj", "w3", "wi_1", "fc1", "c_fc", "dense_h_to_4h", "wi", "fc_in", "lin1"), "up"),
    "gate_up_proj": "gate_up",
    **dict.fromkeys(("down_proj", "w2", "fc2", "dense_4h_to_h", "fc_out", "lin2"), "down"),
}
_CONTEXT_LEAVES = frozenset({"out_proj", "dense", "wo", "c_proj", "proj"})  # meaning depends on the family
_ATTN_ROLES = frozenset({"q", "k", "v", "qkv", "q_a", "kv_a", "kv_b", "o"})
_ATTN_PART = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARTS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "densereludense", "intermediate"})

# Roles that inference engines load as one layer (per parent module), and how tensor parallelism splits them.
FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up", "q_a": "qkv_a", "kv_a": "qkv_a"}
COLUMN = frozenset({"q", "k", "v", "qkv", "kv_b", "gate", "up", "gate_up"})  # split n
ROW = frozenset({"o", "down"})  # split k
REPLICATED = frozenset({"q_a", "kv_a"})  # vLLM ReplicatedLinear: not split

ALIASES = {
    "qkv": lambda i: i.role in ("q", "k", "v", "qkv", "q_a", "kv_a", "kv_b"),
    "o": lambda i: i.role == "o",
    "gate_up": lambda i: i.role in ("gate", "up", "gate_up"),
    "down": lambda i: i.role == "down",
    "attn": lambda i: i.family == "attn",
    "mlp": lambda i: i.family == "mlp",
    "ffn": lambda i: i.family == "mlp",
    "experts": lambda i: i.experts is not None,
}


class NameInfo(NamedTuple):  # a NamedTuple: built once per tensor, 45k times for a large MoE
    """What can be read off one tensor name (shapes and dtypes stay on the spec)."""

    name: str
    comps: tuple[str, ...]
    sizes: tuple[int, ...]  # per component: size of the numbered container it indexes (0 if none)
    module: str  # the name without a trailing .weight / .bias
    leaf: str  # last module component, lower-cased
    block: int | None  # position of the block index in comps; None outside the blocks
    role: str | None  # q k v qkv q_a kv_a kv_b o gate up gate_up down, or None
    family: str | None  # "attn" or "mlp"
    experts: str | None  # "...mlp.experts" for routed MoE experts
    compset: frozenset[str]


def _module_comps(comps: tuple[str, ...]) -> tuple[str, ...]:
    return comps[:-1] if len(comps) > 1 and comps[-1] in ("weight", "bias") else comps


def module_name(name: str) -> str:
    """`P.weight` (or `P.bias`) -> `P`: the module a tensor belongs to; other names are their own module."""
    return ".".join(_module_comps(tuple(name.split("."))))


def analyse(names: Sequence[str]) -> list[NameInfo]:
    """One NameInfo per tensor name, in order. Needs every name of the checkpoint at once: negative
    indices and some roles (Qwen-1's w1/w2) are resolved against the other names."""
    all_comps = [tuple(name.split(".")) for name in names]
    size: dict[tuple[str, ...], int] = {}  # container path -> max index + 1, for negative indices
    siblings: dict[tuple[str, ...], set[str]] = {}  # module template (indices as "#") -> leaves under it
    for comps in all_comps:
        for i, c in enumerate(comps):
            if i and c.isdecimal() and size.get(comps[:i], 0) <= int(c):
                size[comps[:i]] = int(c) + 1
        tmpl = tuple("#" if c.isdecimal() else c for c in _module_comps(comps))
        siblings.setdefault(tmpl[:-1], set()).add(tmpl[-1].lower())
    cache: dict[tuple[str, ...], tuple] = {}  # a 671B MoE has 45k names but a few dozen templates
    out = []
    for name, comps in zip(names, all_comps):
        mod = _module_comps(comps)
        tmpl = tuple("#" if c.isdecimal() else c for c in mod)
        if tmpl not in cache:
            cache[tmpl] = _classify(tmpl, siblings.get(tmpl[:-1], set()))
        block, role, family, experts = cache[tmpl]
        sizes = tuple(size.get(comps[:i], 0) if c.isdecimal() else 0 for i, c in enumerate(comps))
        experts_prefix = ".".join(mod[:experts]) if experts else None
        leaf = tmpl[-1].lower()
        info = NameInfo(name, comps, sizes, ".".join(mod), leaf, block, role, family, experts_prefix, frozenset(comps))
        out.append(info)
    return out


def _classify(mod: tuple[str, ...], siblings: set[str]) -> tuple[int | None, str | None, str | None, int]:
    """(position of the block index, role, family, length of the experts prefix or 0) of a module template."""
    block = next((i for i in range(1, len(mod)) if mod[i] == "#" and mod[i - 1] in BLOCK_CONTAINERS), None)
    inner = [c.lower() for c in mod[(block + 1 if block is not None else 0) : -1]]
    family = "attn" if any(_ATTN_PART.search(c) for c in inner) else None
    family = family or ("mlp" if any(c in _MLP_PARTS for c in inner) else None)
    role = _role(mod[-1].lower(), family, inner, siblings)
    if family is None and role is not None:  # OPT/Whisper fc1 directly in the block, BERT output.dense
        family = "attn" if role in _ATTN_ROLES else "mlp"
    low = [c.lower() for c in mod]
    return block, role, family, low.index("experts") + 1 if "experts" in low else 0


def _role(leaf: str, family: str | None, inner: list[str], siblings: set[str]) -> str | None:
    if leaf in ("w1", "w2") and "c_proj" in siblings and "w3" not in siblings:
        return "gate" if leaf == "w2" else "up"  # Qwen-1: vLLM fuses w2 and w1 into gate_up_proj
    if leaf in _ROLES:
        return _ROLES[leaf]
    if leaf in _CONTEXT_LEAVES:
        if family == "attn":
            return "o"
        if leaf == "dense":  # BERT: layer.N.intermediate.dense (up), layer.N.output.dense (down)
            return {"intermediate": "up", "output": "down"}.get(inner[-1] if inner else "")
        if family == "mlp" and leaf in ("wo", "c_proj"):
            return "down"
    return None
