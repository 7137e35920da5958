"""Tensor names and the `--keep-int8` / `--skip` selector language (DESIGN.md section 5).

Pure and torch-free, like `rtnq.selection.precision`, which is its only user: this module says what a name is
(its block, module role and family) and whether a selector matches it; precision decides what happens.

Selectors (a comma list; a list of such strings is accepted too)
    layers.0        plain: the dot-separated parts occur as a contiguous run of whole components of the
                    tensor name. `layers.1` never matches `layers.10`; `mlp` matches any `.mlp.` component.
    layers.0-3      an index part may be an inclusive range,
    layers.-1       or negative, counted from the end of that numbered container (`h.-1`, `blocks.-2`,
    layers.-4--1    `experts.-1`). Each stack resolves on its own: `layers.-1` is the last encoder and the
                    last decoder layer of an encoder-decoder model; `decoder.layers.-1` picks one.
    qkv             a term that is one word from the alias table matches that module family in any
                    architecture, and still the literal component of that name (`mlp` matches `.mlp.`).
                    Inside a dotted run every part is literal: `layers.0.mlp` needs a `.mlp.` component.
    layers.0-3+down `+` joins terms that must all match the same tensor (plain runs or aliases).
    re:<regex>      Python regex, full match on the tensor name or on its module name (without `.weight`/
                    `.bias`). A whole item on its own (no `+`); commas inside (), [] or {} do not split.
Plain parts are case-sensitive; `*` is not a wildcard (an error that points to `re:`). An empty item, as
from an unset shell variable, is an error too.

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

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Union

from rtnq.errors import UsageError

if TYPE_CHECKING:  # rtnq.checkpoint.source imports torch; only .name is read here
    from rtnq.checkpoint.source import TensorSpec

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


def analyse(specs: Sequence[TensorSpec]) -> list[NameInfo]:
    all_comps = [tuple(s.name.split(".")) for s in specs]
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
    for name, comps in zip((s.name for s in specs), all_comps):
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


# ---------------------------------------------------------------------------------------------------------------
# The selector language

Part = Union[str, tuple[int, int]]  # a literal component, or an inclusive index range (ends may be negative)
Term = Union[str, tuple[Part, ...]]  # an alias name, or a run of parts
_INDEX = re.compile(r"^(-?\d+)(?:-(-?\d+))?$")
_EXAMPLE = "write e.g. layers.0, mlp, layers.0-3+down or re:.*layers\\.0\\..*"


@dataclass(frozen=True)
class Selector:
    text: str  # the item as given, stripped; recorded in rules and manifests
    terms: tuple[Term, ...] = ()  # all must match
    regex: re.Pattern[str] | None = None

    def matches(self, info: NameInfo) -> bool:
        if self.regex is not None:
            return bool(self.regex.fullmatch(info.name) or self.regex.fullmatch(info.module))
        return all(_term_matches(t, info) for t in self.terms)


def _term_matches(term: Term, info: NameInfo) -> bool:
    if isinstance(term, str):
        return ALIASES[term](info) or _run_matches((term,), info)
    return _run_matches(term, info)


def _run_matches(parts: tuple[Part, ...], info: NameInfo) -> bool:
    comps, sizes = info.comps, info.sizes
    literals = [(j, p) for j, p in enumerate(parts) if isinstance(p, str)]
    if not all(p in info.compset for _, p in literals):  # fast reject: most tensors, most selectors
        return False
    last = len(comps) - len(parts)
    if literals:  # only try the starts where the first literal part lines up
        j0, lit = literals[0]
        starts = [i - j0 for i, c in enumerate(comps) if c == lit and 0 <= i - j0 <= last]
    else:
        starts = range(last + 1)
    return any(all(_part_matches(p, comps[s + j], sizes[s + j]) for j, p in enumerate(parts)) for s in starts)


def _part_matches(part: Part, comp: str, size: int) -> bool:
    if isinstance(part, str):
        return part == comp
    if not comp.isdecimal():
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
    """Parse `--keep-int8`/`--skip` values. None or [] -> []; "" is an error (an unset shell variable must
    not quietly mean "no rules"). UsageError names the item and what is wrong with it."""
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
    if not s:
        raise UsageError(f"empty selector in {given!r} (a stray comma, or an empty value); {_EXAMPLE}")
    if s.startswith("re:"):
        if not s[3:]:
            raise UsageError(f"selector {s!r}: empty regex; {_EXAMPLE}")
        try:
            return Selector(s, regex=re.compile(s[3:]))
        except re.error as e:
            raise UsageError(f"selector {s!r}: invalid regex ({e})") from None
    if any(ch.isspace() for ch in s):
        raise UsageError(f"selector {s!r} contains whitespace; separate selectors with commas")
    if any(ch in s for ch in "*?"):
        raise UsageError(
            f"selector {s!r}: '*' and '?' are not wildcards; plain selectors match whole components, "
            "for patterns use re:<regex>"
        )
    terms: list[Term] = []
    for t in s.split("+"):
        parts = t.split(".")
        if "" in parts:
            raise UsageError(f"selector {s!r}: empty component in {t!r} (a stray '.' or '+'); {_EXAMPLE}")
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


# ---------------------------------------------------------------------------------------------------------------
# A selector that matches nothing: say what would have matched


def unmatched_message(option: str, sel: Selector, infos: list[NameInfo]) -> str:
    """The UsageError text for a selector that matches no tensor, with the closest thing that does."""
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
        both = " and ".join(t if isinstance(t, str) else _fmt(t) for t in sel.terms)
        return f"{head}; each of {both} matches tensors, but never the same one"
    return f"{head}; " + "; ".join(_term_hint(t, infos) for t in dead)


def _term_hint(term: Term, infos: list[NameInfo]) -> str:
    if isinstance(term, str):
        return f"no tensor belongs to the alias {term} in this checkpoint"

    def hits(text: str) -> bool:
        try:
            cand = _parse_one(text, text)
        except UsageError:
            return False
        return any(cand.matches(i) for i in infos)

    comps = {c for i in infos for c in i.comps}
    if isinstance(term[0], str) and term[0] in BLOCK_CONTAINERS and term[0] not in comps:  # layers.0 on GPT-2
        swaps = [_fmt((c, *term[1:])) for c in sorted({i.comps[i.block - 1] for i in infos if i.block})]
        if any(hits(t) for t in swaps):
            return f"did you mean {' or '.join(t for t in swaps if hits(t))}?"
    fixed = list(term)  # typos: each unknown component replaced by the closest known one
    for j, p in enumerate(term):
        if isinstance(p, str) and p not in comps:
            close = difflib.get_close_matches(p, sorted(comps | set(ALIASES)), n=1, cutoff=0.6)
            fixed[j] = close[0] if close else p
    if fixed != list(term) and hits(_fmt(fixed)):
        return f"did you mean {_fmt(fixed)}?"
    for j, p in enumerate(term):  # an alias inside a dotted run is literal: suggest the + form
        rest = _fmt(term[:j] + term[j + 1 :])
        if len(term) > 1 and p in ALIASES and hits(f"{rest}+{p}"):
            return f"inside a dotted run {p} is a literal component; did you mean {rest}+{p}?"
    notes = [
        f"no tensor name has a component {p!r}" + (f" (closest: {fixed[j]})" if fixed[j] != p else "")
        for j, p in enumerate(term)
        if isinstance(p, str) and p not in comps
    ]
    for j, p in enumerate(term):  # an index past the end: say which indices exist
        if not isinstance(p, str) and j and isinstance(term[j - 1], str) and not hits(_fmt(term[j - 1 : j + 1])):
            sizes = {i.sizes[k + 1] for i in infos for k, c in enumerate(i.comps[:-1]) if c == term[j - 1]}
            if sizes - {0}:
                notes.append(f"{term[j - 1]} has indices " + " or ".join(f"0-{n - 1}" for n in sorted(sizes - {0})))
    if notes:
        return "; ".join(notes)
    for cut in range(1, len(term)):  # parts that exist but are not adjacent: suggest the + form
        joined = f"{_fmt(term[:cut])}+{_fmt(term[cut:])}"
        if hits(joined):
            return f"the parts must be adjacent in the name; did you mean {joined} (both must match)?"
    n = len(term)
    pool = sorted({".".join(i.comps[s : s + n]) for i in infos for s in range(len(i.comps) - n + 1)})
    close = difflib.get_close_matches(_fmt(term), pool, n=3, cutoff=0.6)
    if close:
        return f"did you mean {' or '.join(close)}?"
    return "its components exist, but never next to each other in this order"
