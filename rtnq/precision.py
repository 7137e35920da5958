"""Which tensors rtnq quantizes, and to how many bits: one Decision per source tensor.

Pure and torch-free: it reads only the names, dtypes and shapes of the source tensors (headers), and
returns a Plan that the converter executes and the manifest records (DESIGN.md sections 5 and 6).

Selectors (`--keep-int8 A,B`, `--skip A,B`; a comma list, also accepted as a list of such strings)
    layers.0        plain: the dot-separated parts occur as a contiguous run of whole components of
                    the tensor name. `layers.1` never matches `layers.10`; `mlp` matches any `.mlp.`.
    layers.0-3      an index part may be an inclusive range,
    layers.-1       or negative, counted from the end of that numbered container (`h.-1`, `blocks.-2`,
    layers.-4--1    `experts.-1`). Each stack resolves on its own: `layers.-1` is the last encoder and
                    the last decoder layer; write `decoder.layers.-1` for one of them.
    qkv             a word from the alias table below matches that module family in any architecture
                    (and still the literal component of the same name: `mlp` matches every `.mlp.`).
    layers.0-3+down `+` joins terms that must all match the same tensor (plain runs or aliases).
    re:<regex>      Python regex, full match on the tensor name or on its module name (the name without
                    `.weight`/`.bias`). A whole item on its own (no `+`); commas inside (), [] or {}
                    do not split the list. Plain parts are case-sensitive; `*` is not a wildcard.
A selector that matches no tensor at all is a UsageError naming close candidates, so a typo never
ships a silently all-INT4 model. One that matches only tensors that pass through anyway is a warning.

Alias table (leaf module names, lower-cased; "in attention"/"in an MLP" = the enclosing component)
    qkv      q_proj k_proj v_proj qkv_proj (Llama/Qwen/Mistral/Phi-3), query_key_value (NeoX/Falcon/
             Bloom), wqkv (MPT, InternLM2), w_pack (Baichuan), c_attn (GPT-2/BigCode/Qwen-1), query
             key value (BERT), q k v (T5), wq wk wv (Meta Llama), q_lin k_lin v_lin (DistilBERT), and
             DeepSeek MLA q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj
    o        o_proj, o (T5), out_lin; in attention also out_proj dense wo c_proj proj
    gate_up  gate_proj up_proj gate_up_proj, w1 w3 (Mixtral/Meta Llama), fc1 fc_in lin1 c_fc
             dense_h_to_4h wi wi_0 wi_1 (T5), BERT intermediate.dense, Qwen-1 w1 w2 (beside c_proj)
    down     down_proj w2 fc2 fc_out lin2 dense_4h_to_h; in an MLP also c_proj wo (T5); BERT output.dense
    attn     everything under a component containing "attn"/"attention" (self_attn, attn, attention,
             self_attention, SelfAttention, EncDecAttention, encoder_attn, crossattention), plus q/k/v/o
             projections that sit directly in a block
    mlp, ffn everything under mlp, feed_forward, ffn, block_sparse_moe, moe, DenseReluDense,
             intermediate, plus gate/up/down projections directly in a block (OPT/Whisper fc1, fc2)
    experts  everything under an `experts` component (routed MoE experts; `shared_expert(s)` is not)

Default: quantize float (F16/BF16/F32) `.weight` tensors of linear layers inside the blocks, i.e. under
a numbered container in BLOCK_CONTAINERS (`layers.N`, `layer.N`, `h.N`, `blocks.N`, `block.N`, ...; the
first one in the name is the block, so T5's `block.0.layer.1` is block 0): 2-D `(n, k)`, or 3-D `(E, n, k)`
under `experts`. Everything else passes through unchanged with a reason: biases, non-`.weight` tensors,
lm_head, embeddings (T5's in-block relative_attention_bias too), norms, MoE routers, other ranks, tensors
outside blocks, non-float dtypes. Tied embeddings stay correct because neither side is ever quantized.
GPT-2's Conv1D weights are stored (in, out), transposed against nn.Linear. A checkpoint is taken to be in
that layout when a c_attn or c_fc weight has more columns than rows (a Linear stores (out, in), and both
modules widen); its c_attn/c_fc/c_proj weights then pass through, because rtnq does not transpose.
BigCode and Qwen-1 use the same names with real Linear layouts and are quantized as usual.

Precedence, per tensor: a default passthrough reason wins over every rule (rules never force a tensor into
Marlin); then --skip (16-bit) wins over the shape gate, which wins over --keep-int8; otherwise --bits.
Among selectors of one option the first in the list that matches is recorded as the rule.

Fused groups: inference engines load q/k/v (same attention module), gate/up (same MLP) and all routed
experts of one MoE layer as one layer, and need one precision for it. A rule that hits one member is
extended to the whole group (rule "fused-with:<member> (<option>:<selector>)") with a warning. If one
member fails the shape gate, the whole group passes through (a Marlin half and a 16-bit half cannot be
loaded as one layer); --strict raises instead.

Shape gate (Marlin): n % 64 == 0, k % 128 == 0, k % group_size == 0 (channelwise: k is the group).
--tp: a quantized tensor is also checked on its per-rank shape: column-parallel layers (q/k/v, gate/up)
split n, row-parallel ones (o, down) split k. Failures are warnings (Plan.tp_failures lists them all).
For fused qkv_proj/gate_up_proj the split is checked on the whole n, an approximation.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from rtnq.errors import ShapeError, UsageError

if TYPE_CHECKING:  # rtnq.source imports torch; the planner only reads .name, .dtype and .shape
    from rtnq.source import TensorSpec

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, -1)
MIN_N, MIN_K = 64, 128  # = rtnq.marlin.MIN_N / MIN_K; marlin imports torch, a test pins them equal
FLOAT_DTYPES = ("F16", "BF16", "F32")
BLOCK_CONTAINERS = frozenset({"layers", "layer", "h", "blocks", "block", "resblocks"})

# Leaf module name -> role. q/k/v and gate/up are the members of fused groups.
_ROLES = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "q_lin", "q_b_proj"), "q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "v_lin"), "v"),
    **dict.fromkeys(("qkv_proj", "qkv", "query_key_value", "wqkv", "w_pack", "c_attn"), "qkv"),
    "q_a_proj": "q_a", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",  # DeepSeek MLA
    **dict.fromkeys(("o_proj", "o", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1", "wi_0"), "gate"),
    **dict.fromkeys(("up_proj", "w3", "wi_1", "fc1", "c_fc", "dense_h_to_4h", "wi", "fc_in", "lin1"), "up"),
    "gate_up_proj": "gate_up",
    **dict.fromkeys(("down_proj", "w2", "fc2", "dense_4h_to_h", "fc_out", "lin2"), "down"),
}
_CONTEXT_LEAVES = frozenset({"out_proj", "dense", "wo", "c_proj", "proj"})  # o in attention; see _role
_ATTN_ROLES = frozenset({"q", "k", "v", "qkv", "q_a", "kv_a", "kv_b", "o"})
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up", "q_a": "qkv_a", "kv_a": "qkv_a"}
_COLUMN = frozenset({"q", "k", "v", "qkv", "kv_b", "gate", "up", "gate_up"})  # tensor parallel splits n
_ROW = frozenset({"o", "down"})  # splits k
_REPLICATED = frozenset({"q_a", "kv_a"})  # DeepSeek's low-rank q/kv down-projections: vLLM ReplicatedLinear
_ATTN_PART = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_PARTS = frozenset({"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "densereludense", "intermediate"})
_LM_HEAD = frozenset({"lm_head", "embed_out", "output_layer"})
_EMBED = frozenset({"wte", "wpe", "shared", "relative_attention_bias"})
_ROUTER = frozenset({"gate", "router", "shared_expert_gate"})
_LN = re.compile(r"ln(_|\d|$)")
_CONV1D = frozenset({"c_attn", "c_fc", "c_proj"})

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


@dataclass(frozen=True)
class Decision:
    name: str  # source tensor name
    kind: str  # "marlin" or "passthrough"
    bits: int | None = None  # 4 or 8 for marlin
    group_size: int | None = None  # as given (-1 = channelwise) for marlin
    rule: str | None = None  # what chose the precision: "default", "keep-int8:SEL", "skip:SEL", "fused-with:..."
    reason: str | None = None  # why it passes through


@dataclass
class Plan:
    decisions: dict[str, Decision]  # every input spec, in input order
    rules: list[dict]  # [{"option": "keep-int8", "selector": "layers.0", "matched": 7}, ...]
    warnings: list[str]
    tp_failures: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # tp -> [(name, why)]


# ---------------------------------------------------------------------------------------------------
# Names


@dataclass(frozen=True)
class _Info:
    """What the planner reads off one tensor name (shapes and dtypes stay on the spec)."""

    name: str
    comps: tuple[str, ...]
    sizes: tuple[int, ...]  # per component: size of the numbered container it indexes (0 if none)
    module: str  # name without a trailing .weight / .bias
    leaf: str  # last module component, lower-cased
    block: int | None  # position of the block index in comps; None outside the blocks
    role: str | None
    family: str | None  # "attn" or "mlp"
    experts: str | None  # "...mlp.experts" for routed MoE experts


def _is_index(c: str) -> bool:
    return c.isascii() and c.isdigit()


def _module_comps(comps: tuple[str, ...]) -> tuple[str, ...]:
    return comps[:-1] if len(comps) > 1 and comps[-1] in ("weight", "bias") else comps


def _analyse(specs: Sequence[TensorSpec]) -> list[_Info]:
    all_comps = [tuple(s.name.split(".")) for s in specs]
    size: dict[tuple[str, ...], int] = {}  # container path -> max index + 1, for negative indices
    siblings: dict[tuple[str, ...], set[str]] = {}
    for comps in all_comps:
        for i, c in enumerate(comps):
            if i and _is_index(c):
                size[comps[:i]] = max(size.get(comps[:i], 0), int(c) + 1)
        mod = _module_comps(comps)
        siblings.setdefault(mod[:-1], set()).add(mod[-1].lower())
    out = []
    for name, comps in zip((s.name for s in specs), all_comps):
        mod = _module_comps(comps)
        block = next((i for i in range(1, len(mod)) if _is_index(mod[i]) and mod[i - 1] in BLOCK_CONTAINERS), None)
        inner = [c.lower() for c in mod[(block + 1 if block is not None else 0) : -1]]
        family = "attn" if any(_ATTN_PART.search(c) for c in inner) else None
        family = family or ("mlp" if any(c in _MLP_PARTS for c in inner) else None)
        leaf = mod[-1].lower()
        role = _role(leaf, family, inner, siblings.get(mod[:-1], set()))
        if family is None and role is not None:  # OPT/Whisper fc1 directly in the block, BERT output.dense
            family = "attn" if role in _ATTN_ROLES else "mlp"
        low = [c.lower() for c in mod]
        experts = ".".join(mod[: low.index("experts") + 1]) if "experts" in low else None
        sizes = tuple(size.get(comps[:i], 0) if _is_index(c) else 0 for i, c in enumerate(comps))
        out.append(_Info(name, comps, sizes, ".".join(mod), leaf, block, role, family, experts))
    return out


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


def _conv1d_layout(specs: Sequence[TensorSpec], infos: list[_Info]) -> bool:
    """GPT-2 Conv1D stores (in, out); c_attn (3d) and c_fc (4d) widen, so in that layout they are wide."""
    return any(
        i.leaf in ("c_attn", "c_fc") and len(s.shape) == 2 and s.shape[1] > s.shape[0] for s, i in zip(specs, infos)
    )


def _default_reason(spec: TensorSpec, info: _Info, conv1d: bool) -> str | None:
    """Why this tensor is never quantized, whatever the rules say; None for a quantizable linear weight."""
    if spec.name.endswith(".bias"):
        return "bias"
    if not spec.name.endswith(".weight"):
        return "not a weight (the name does not end in .weight)"
    mod = [c.lower() for c in info.comps[:-1]]
    if any(c in _LM_HEAD for c in mod) or mod == ["output"]:  # Meta-format Llama calls it output.weight
        return "lm_head"
    if any("embed" in c or c in _EMBED for c in mod):
        return "embedding"
    if any("norm" in c or _LN.match(c) for c in mod):
        return "norm"
    if info.leaf in _ROUTER or "router" in mod:
        return "router gate"
    if info.block is None:
        return "not a linear weight inside a block"
    nd = len(spec.shape)
    if nd != 2 and not (nd == 3 and info.experts):
        return f"{nd}-D tensor is not a linear weight"
    if conv1d and info.leaf in _CONV1D:
        return "GPT-2 Conv1D weight stored (in, out); not supported"
    if spec.dtype not in FLOAT_DTYPES:
        if spec.dtype.startswith("F"):
            return f"dtype {spec.dtype} is not quantized (only F16, BF16 and F32 are)"
        return f"dtype {spec.dtype} is not a float"
    return None


def check_shape(n: int, k: int, group_size: int) -> str | None:
    """Why Marlin cannot hold an (n, k) weight with this group size, or None. Same as marlin.check_shape."""
    if n % MIN_N:
        return f"n={n} (out_features) is not a multiple of {MIN_N}"
    if k % MIN_K:
        return f"k={k} (in_features) is not a multiple of {MIN_K}"
    if group_size != -1 and k % group_size:
        return f"k={k} is not a multiple of the group size {group_size}"
    return None


# ---------------------------------------------------------------------------------------------------
# Selectors

Part = Union[str, tuple[int, int]]  # a literal component, or an inclusive index range (may be negative)
Term = Union[str, tuple[Part, ...]]  # an alias name, or a run of parts
_INDEX = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")


@dataclass(frozen=True)
class Selector:
    text: str  # the item as given, stripped; recorded in rules and manifests
    terms: tuple[Term, ...] = ()  # all must match
    regex: re.Pattern[str] | None = None

    def matches(self, info: _Info) -> bool:
        if self.regex is not None:
            return bool(self.regex.fullmatch(info.name) or self.regex.fullmatch(info.module))
        return all(_term_matches(t, info) for t in self.terms)


def _term_matches(term: Term, info: _Info) -> bool:
    if isinstance(term, str):
        return ALIASES[term](info) or _run_matches((term,), info)
    return _run_matches(term, info)


def _run_matches(parts: tuple[Part, ...], info: _Info) -> bool:
    comps, sizes = info.comps, info.sizes
    for s in range(len(comps) - len(parts) + 1):
        if all(_part_matches(p, comps[s + j], sizes[s + j]) for j, p in enumerate(parts)):
            return True
    return False


def _part_matches(part: Part, comp: str, size: int) -> bool:
    if isinstance(part, str):
        return part == comp
    if not _is_index(comp):
        return False
    lo, hi = (v if v >= 0 else size + v for v in part)  # -1 = size - 1: the last of this container
    return lo <= int(comp) <= hi


def _fmt(parts: Sequence[Part]) -> str:
    return ".".join(p if isinstance(p, str) else str(p[0]) if p[0] == p[1] else f"{p[0]}-{p[1]}" for p in parts)


def _split(text: str) -> list[str]:
    """Split on commas outside brackets, so `re:x{1,3}` and `re:(a|b),c` stay whole."""
    items, depth, cur, escaped = [], 0, [], False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(depth - 1, 0)
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    return [*items, "".join(cur)]


def parse_selectors(text: str | Sequence[str | Selector] | None) -> list[Selector]:
    """Parse `--keep-int8`/`--skip` values. None or [] -> []; "" is an error (an unset shell variable
    must not quietly mean "no rules"). UsageError names the item and what is wrong with it."""
    if text is None:
        return []
    out: list[Selector] = []
    for raw in [text] if isinstance(text, str) else text:
        if isinstance(raw, Selector):
            out.append(raw)
            continue
        out.extend(_parse_one(item.strip(), raw) for item in _split(raw))
    return out


def _parse_one(s: str, given: str) -> Selector:
    example = "write e.g. layers.0, mlp, layers.0-3+down or re:.*layers\\.0\\..*"
    if not s:
        raise UsageError(f"empty selector in {given!r} (a doubled, leading or trailing comma, or an empty value); {example}")
    if s.startswith("re:"):
        if not s[3:]:
            raise UsageError(f"selector {s!r}: empty regex; {example}")
        try:
            return Selector(s, regex=re.compile(s[3:]))
        except re.error as e:
            raise UsageError(f"selector {s!r}: invalid regex ({e})") from None
    if any(ch.isspace() for ch in s):
        raise UsageError(f"selector {s!r} contains whitespace; separate selectors with commas")
    if any(ch in s for ch in "*?"):
        raise UsageError(f"selector {s!r}: '*' and '?' are not wildcards; plain selectors match whole components, for patterns use re:<regex>")
    terms: list[Term] = []
    for t in s.split("+"):
        parts = t.split(".")
        if "" in parts:
            raise UsageError(f"selector {s!r}: empty component in {t!r} (a leading, trailing or doubled '.' or '+'); {example}")
        terms.append(parts[0] if len(parts) == 1 and parts[0] in ALIASES else tuple(_parse_part(p, s) for p in parts))
    return Selector(s, tuple(terms))


def _parse_part(p: str, s: str) -> Part:
    m = _INDEX.match(p)
    if m is None:
        return p
    lo = int(m[1])
    hi = int(m[2]) if m[2] is not None else lo
    if (lo < 0) == (hi < 0) and lo > hi:
        raise UsageError(f"selector {s!r}: the range {p} runs backwards; write {hi}-{lo}")
    return (lo, hi)


def _unmatched(option: str, sel: Selector, infos: list[_Info]) -> str:
    """The UsageError text for a selector that matches nothing, with the closest thing that does."""
    head = f"--{option} {sel.text}: matches no tensor"
    if sel.regex is not None:
        try:
            loose = re.compile(f".*(?:{sel.regex.pattern}).*")
        except re.error:  # e.g. inline global flags, which must stay at the start
            loose = sel.regex
        if any(loose.fullmatch(i.name) for i in infos):
            return f"{head}; regexes must match the whole name: did you mean re:.*{sel.regex.pattern}.*?"
        return f"{head}; regexes must match a whole tensor name such as {infos[0].name if infos else '(no tensors)'}"
    dead = [t for t in sel.terms if not any(_term_matches(t, i) for i in infos)]
    if not dead:
        return f"{head}; each of {' and '.join(map(_term_text, sel.terms))} matches tensors, but never the same one"
    return f"{head}; " + "; ".join(_term_hint(t, infos) for t in dead)


def _term_text(t: Term) -> str:
    return t if isinstance(t, str) else _fmt(t)


def _term_hint(term: Term, infos: list[_Info]) -> str:
    if isinstance(term, str):
        return f"no tensor belongs to the alias {term} in this checkpoint"
    def hits(text: str) -> bool:
        try:
            cand = _parse_one(text, text)
        except UsageError:
            return False
        return any(cand.matches(i) for i in infos)
    comps = {c for i in infos for c in i.comps}
    fixed = list(term)
    for j, p in enumerate(term):
        if isinstance(p, str) and p not in comps:
            close = difflib.get_close_matches(p, sorted(comps | set(ALIASES)), n=1, cutoff=0.6)
            if close:
                fixed[j] = close[0]
    if isinstance(term[0], str) and term[0] in BLOCK_CONTAINERS and term[0] not in comps:  # layers.0 on GPT-2
        swaps = [_fmt((c, *term[1:])) for c in sorted({i.comps[i.block - 1] for i in infos if i.block})]
        if any(hits(t) for t in swaps):
            return f"did you mean {' or '.join(t for t in swaps if hits(t))}?"
    if fixed != list(term) and hits(_fmt(fixed)):
        return f"did you mean {_fmt(fixed)}?"
    for j, p in enumerate(term):  # an alias inside a dotted run is literal: suggest the + form
        if len(term) > 1 and p in ALIASES and hits(f"{_fmt(term[:j] + term[j + 1 :])}+{p}"):
            return f"inside a dotted run {p} is a literal component; did you mean {_fmt(term[:j] + term[j + 1 :])}+{p}?"
    notes = [f"no tensor name has a component {p!r}" for p in term if isinstance(p, str) and p not in comps]
    for j, p in enumerate(term):  # an index past the end: say which indices exist
        if not isinstance(p, str) and j and isinstance(term[j - 1], str) and not hits(_fmt(term[j - 1 : j + 1])):
            sizes = sorted({i.sizes[k + 1] for i in infos for k, c in enumerate(i.comps[:-1]) if c == term[j - 1]} - {0})
            if sizes:
                notes.append(f"{term[j - 1]} has indices " + " or ".join(f"0-{n - 1}" for n in sizes))
    if notes:
        return "; ".join(notes)
    for cut in range(1, len(term)):  # parts that exist but are not adjacent: suggest the + form
        joined = f"{_fmt(term[:cut])}+{_fmt(term[cut:])}"
        if hits(joined):
            return f"the parts must be adjacent in the name; did you mean {joined} (both must match)?"
    L = len(term)
    pool = sorted({".".join(i.comps[s : s + L]) for i in infos for s in range(len(i.comps) - L + 1)})
    close = difflib.get_close_matches(_fmt(term), pool, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return "its components exist, but never next to each other in this order"


# ---------------------------------------------------------------------------------------------------
# The plan


def plan(
    specs: Sequence[TensorSpec],
    *,
    bits: int = 4,
    group_size: int = 128,
    keep_int8: str | Sequence[str | Selector] | None = (),
    skip: str | Sequence[str | Selector] | None = (),
    strict: bool = False,
    tp: Sequence[int] = (),
) -> Plan:
    """One Decision per spec (input order), the rules with match counts, and warnings.

    Raises UsageError for bad arguments or a selector that matches no tensor, and (strict=True) ShapeError
    for a tensor that would be quantized but fails the Marlin shape gate.
    """
    if bits not in BITS:
        raise UsageError(f"--bits must be 4 or 8, got {bits}")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size must be one of 32, 64, 128 or -1 (channelwise), got {group_size}")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in tp):
        raise UsageError(f"--tp takes positive integers such as 2,4,8, got {list(tp)}")
    options = [("keep-int8", s) for s in parse_selectors(keep_int8)] + [("skip", s) for s in parse_selectors(skip)]
    infos = _analyse(specs)
    matched: list[list[_Info]] = []
    for option, sel in options:
        matched.append([i for i in infos if sel.matches(i)])
        if not matched[-1]:
            raise UsageError(_unmatched(option, sel, infos))

    conv1d = _conv1d_layout(specs, infos)
    reason = {s.name: _default_reason(s, i, conv1d) for s, i in zip(specs, infos)}
    nk = {s.name: (s.shape[-2], s.shape[-1]) for s in specs if len(s.shape) >= 2}
    groups: dict[tuple[str, str], list[_Info]] = {}
    for i in infos:
        if reason[i.name] is None:
            groups.setdefault(_group_key(i), []).append(i)

    skip_idx = [j for j, (o, _) in enumerate(options) if o == "skip"]
    keep_idx = [j for j, (o, _) in enumerate(options) if o == "keep-int8"]
    hit_sets = [{i.name for i in m} for m in matched]
    skipped = _claim(groups, skip_idx, hit_sets)
    gated, failing = _gate(groups, skipped, nk, group_size)
    if strict and failing:
        name, why = failing[0]
        more = f" ({len(failing) - 1} more tensors fail too)" if len(failing) > 1 else ""
        raise ShapeError(
            f"{name}: {why}; Marlin needs n % {MIN_N} == 0, k % {MIN_K} == 0 and k % group_size == 0{more}. "
            f"Drop --strict to keep it in 16-bit, or --skip it"
        )
    live = {k: [m for m in v if m.name not in skipped and m.name not in gated] for k, v in groups.items()}
    int8 = _claim(live, keep_idx, hit_sets)

    decisions: dict[str, Decision] = {}
    credit = [0] * len(options)
    for s in specs:
        name = s.name
        if name in skipped:
            j, anchor = skipped[name]
            credit[j] += 1
            sel = f"skip:{options[j][1].text}"
            why = f"skipped by --skip {options[j][1].text}"
            if anchor is None:
                decisions[name] = Decision(name, "passthrough", rule=sel, reason=why)
            else:
                decisions[name] = Decision(name, "passthrough", rule=f"fused-with:{anchor} ({sel})", reason=f"{why} (fused with {anchor})")
        elif reason[name] or name in gated:
            decisions[name] = Decision(name, "passthrough", reason=reason[name] or gated[name])
        elif name in int8:
            j, anchor = int8[name]
            credit[j] += 1
            sel = f"keep-int8:{options[j][1].text}"
            decisions[name] = Decision(name, "marlin", 8, group_size, sel if anchor is None else f"fused-with:{anchor} ({sel})")
        else:
            decisions[name] = Decision(name, "marlin", bits, group_size, "default")

    warnings = _warnings(options, matched, credit, skipped, int8, reason, gated, decisions, bits)
    by_name = {i.name: i for i in infos}
    tp_failures = {t: _tp_check(t, decisions, by_name, nk, group_size) for t in dict.fromkeys(tp)}
    for t, fails in tp_failures.items():
        if fails:
            shown = "; ".join(f"{n} ({why})" for n, why in fails[:3])
            more = f"; and {len(fails) - 3} more" if len(fails) > 3 else ""
            warnings.append(f"--tp {t}: {len(fails)} quantized tensors would fail the Marlin shape gate per rank: {shown}{more}")
    known = _COLUMN | _ROW | _REPLICATED
    unknown = [n for n, d in decisions.items() if tp and d.kind == "marlin" and by_name[n].role not in known]
    if unknown:
        warnings.append(
            f"--tp: {len(unknown)} quantized tensors have no known tensor-parallel split and were not checked, "
            f"e.g. {unknown[0]}"
        )
    rules = [{"option": o, "selector": s.text, "matched": c} for (o, s), c in zip(options, credit)]
    return Plan(decisions, rules, warnings, tp_failures)


def _group_key(i: _Info) -> tuple[str, str]:
    """Tensors an inference engine loads as one layer share a key; everything else is its own group."""
    if i.experts is not None:
        return (i.experts, "experts")  # vLLM FusedMoE: all experts of a layer take one precision
    kind = _FUSED.get(i.role or "")
    return (i.module.rpartition(".")[0], kind) if kind else (i.name, "")


def _claim(groups: dict, idx: list[int], hits: list[set[str]]) -> dict[str, tuple[int, str | None]]:
    """name -> (index of the first selector that matches it, None) or (that of a fused partner, partner)."""
    out: dict[str, tuple[int, str | None]] = {}
    for members in groups.values():
        direct = {m.name: next((j for j in idx if m.name in hits[j]), None) for m in members}
        anchor = next((n for n, j in direct.items() if j is not None), None)
        if anchor is None:
            continue
        for n, j in direct.items():
            out[n] = (j, None) if j is not None else (direct[anchor], anchor)
    return out


def _gate(groups: dict, skipped: dict, nk: dict, group_size: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Shape gate per group: one failing member sends the whole (non-skipped) group to passthrough."""
    gated: dict[str, str] = {}
    failing: list[tuple[str, str]] = []
    for members in groups.values():
        live = [m.name for m in members if m.name not in skipped]
        fails = {n: why for n in live if (why := check_shape(*nk[n], group_size))}
        if not fails:
            continue
        failing.extend(fails.items())
        first = next(iter(fails))
        for n in live:
            gated[n] = f"shape: {fails[n]}" if n in fails else f"shape: fused with {first}, which fails the Marlin shape gate"
    return gated, failing


def _warnings(options, matched, credit, skipped, int8, reason, gated, decisions, bits) -> list[str]:
    out = []
    for j, (option, sel) in enumerate(options):
        claimed = skipped if option == "skip" else int8
        ext = [(n, a) for n, (k, a) in claimed.items() if k == j and a is not None]
        if ext:
            out.append(
                f"--{option} {sel.text}: extended to {len(ext)} fused partners (q/k/v, gate/up and the experts of "
                f"one MoE layer are loaded as one layer and need one precision), e.g. {ext[0][0]} (fused with {ext[0][1]})"
            )
        if credit[j] == 0:
            first = matched[j][0].name
            if all(reason[i.name] or i.name in gated for i in matched[j]):
                why = reason[first] or gated[first]
                out.append(f"--{option} {sel.text}: matches only tensors that pass through anyway, e.g. {first} ({why}); it changes nothing")
            else:
                out.append(f"--{option} {sel.text}: every tensor it matches was already decided by an earlier or stronger rule (--skip beats --keep-int8); it changes nothing")
    if bits == 8 and any(o == "keep-int8" for o, _ in options):
        out.append("--keep-int8 changes nothing with --bits 8: every quantized tensor is 8-bit already")
    shape = [n for n in gated if not gated[n].startswith("shape: fused")]
    if shape:
        out.append(f"{len(shape)} tensors fail the Marlin shape gate and pass through in 16-bit, e.g. {shape[0]} ({gated[shape[0]][7:]})")
    partners = [n for n in gated if gated[n].startswith("shape: fused")]
    if partners:
        out.append(f"{len(partners)} tensors pass through in 16-bit because a fused partner fails the shape gate, e.g. {partners[0]}")
    conv = [n for n, r in reason.items() if r and r.startswith("GPT-2 Conv1D")]
    if conv:
        out.append(f"{len(conv)} GPT-2 Conv1D weights are stored (in, out) and pass through in 16-bit; rtnq quantizes (out, in) nn.Linear weights only")
    if decisions and not any(d.kind == "marlin" for d in decisions.values()):
        out.append("no tensor is quantized: no float linear weight inside a numbered block passed the rules and the shape gate")
    return out


def _tp_check(t: int, decisions: dict[str, Decision], infos: dict[str, _Info], nk: dict, group_size: int) -> list[tuple[str, str]]:
    """Per-rank shape of each quantized tensor under tensor parallelism of degree t, if it fails."""
    fails = []
    for name, d in decisions.items():
        if d.kind != "marlin":
            continue
        n, k = nk[name]
        role = infos[name].role
        if role in _COLUMN:
            why = f"n={n} is not divisible by {t}" if n % t else check_shape(n // t, k, group_size)
            split = f"column-parallel, n/{t}"
        elif role in _ROW:
            why = f"k={k} is not divisible by {t}" if k % t else check_shape(n, k // t, group_size)
            split = f"row-parallel, k/{t}"
        else:
            continue
        if why:
            fails.append((name, f"{split}: {why}"))
    return fails
