"""The `--keep-int8` / `--skip` selector language (DESIGN.md section 5): parsing, matching, hints.

Pure and torch-free. `rtnq.selection.names` says what a name is (its block, module role and family);
this module says whether a selector matches it; `rtnq.selection.precision` decides what happens.

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

The alias words and what they match: rtnq.selection.names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

from rtnq.errors import UsageError
from rtnq.selection.names import ALIASES, BLOCK_CONTAINERS, NameInfo

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
