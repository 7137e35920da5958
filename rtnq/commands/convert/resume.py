"""`rtnq convert ... --resume`: what an output depends on (the journal's fingerprint), and which shards of an
interrupted run's temporary directory can be kept.

The plan record holds rtnq's version, every option that changes a byte of the output, the source's identity
and the planned output layout. A local source is identified per shard by name, size, mtime_ns and a sha256
of its header (the tensor names, dtypes, shapes, offsets), plus config.json's bytes; the weights themselves
are not hashed, since reading every source byte would cost about as much as converting it again. A shard
rewritten in place with the same size, header and mtime would pass unnoticed (mtime_ns makes that
unlikely short of a deliberate `touch -d`). A hub source is its repo id and commit, which fix every byte.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from rtnq.checkpoint import journal as jr
from rtnq.checkpoint import layout
from rtnq.commands.convert.plan import VERSION, ConvertPlan
from rtnq.errors import UsageError

# The ConvertOptions fields that change the output; force, dry_run, tp and resume change only what is printed
# or where it goes.
OUTPUT_OPTIONS = ("bits", "group_size", "keep_int8", "skip", "dtype", "strict", "format", "budget",
                  "budget_score", "budget_groups", "scale", "rotate", "rotate_seed", "rotate_spare")
_HEADER_MAX = 100 * 1024 * 1024  # safetensors' own header limit; scan refused anything larger already


def plan_record(plan: ConvertPlan) -> dict:
    """Everything the output's bytes depend on, as JSON-able values (the journal's fingerprint is its digest)."""
    o = plan.options
    options = {k: list(v) if isinstance(v, (list, tuple)) else v for k in OUTPUT_OPTIONS for v in [getattr(o, k)]}
    layout_ = {"metadata": plan.shard_metadata,
               "shards": [[fname, [[e.name, e.dtype, list(e.shape)] for e in entries]] for fname, entries in plan.shards],
               "decisions": [[i.spec.name, i.decision.kind, i.decision.bits, i.decision.group_size] for i in plan.items]}
    return {"rtnq": VERSION, "options": options, "source": source_record(plan), "layout": jr.digest(layout_)}


def source_record(plan: ConvertPlan) -> dict:
    if plan.hub is not None:
        return {"hub": plan.hub.repo.repo_id, "commit": plan.hub.repo.commit}
    shards = []
    for name in layout.shard_files(plan.src):
        st = (plan.src / name).stat()
        shards.append([name, st.st_size, st.st_mtime_ns, _header_sha256(plan.src / name)])
    config = plan.src / layout.CONFIG_NAME
    return {"shards": shards, "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def _header_sha256(path: Path) -> str:
    """sha256 of a shard's length prefix and JSON header: every tensor's name, dtype, shape and offset."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        (n,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        return hashlib.sha256(prefix + f.read(min(n, _HEADER_MAX))).hexdigest()


@dataclass
class Resume:
    """An interrupted run's directory checked against this plan: what is kept and what is converted again."""

    journal: jr.Journal  # holds only the shards kept
    reused: list[str]
    redone: list[tuple[str, str]]  # (shard, why) for recorded shards that failed the check
    missing: list[str]  # every shard this run converts, in plan order

    @property
    def directory(self) -> Path:
        return self.journal.directory

    def errors(self) -> dict[str, float]:
        """The manifest's error of every quantized tensor in the kept shards, as measured when they were written."""
        return {name: err for e in self.journal.shards for name, err in e.get("errors", {}).items()}

    def line(self, dry_run: bool = False) -> str:
        verb = ("would reuse", "would convert") if dry_run else ("reusing", "converting")
        why = "".join(f"; {f} is converted again ({reason})" for f, reason in self.redone)
        return (f"resume {self.directory}: {verb[0]} {jr.count(len(self.reused), 'complete ')}, {verb[1]} "
                f"{len(self.missing)} of {len(self.reused) + len(self.missing)}{why}")


def check(plan: ConvertPlan, directory: Path) -> Resume:
    """Load the journal in `directory`, refuse it unless it was written for this very plan (UsageError naming
    what differs; nothing is changed), and re-hash every shard it records: one that is missing or whose
    bytes differ is converted again, never trusted."""
    old = jr.load(directory)
    new = plan_record(plan)
    if jr.digest(new) != old.fingerprint:
        raise UsageError(f"cannot resume {directory}: {_difference(old.plan, new)}; rerun with the interrupted "
                         f"run's source and options, or remove it (rm -r '{directory}') and convert without --resume")
    planned = [fname for fname, _ in plan.shards]
    kept, redone = [], []
    for entry in old.shards:
        if entry["file"] not in planned or entry["file"] in {e["file"] for e in kept}:
            continue  # cannot happen with an equal fingerprint; never trust it if it does
        why = jr.check(entry, directory)
        if why is None:
            kept.append(entry)
        else:
            redone.append((entry["file"], why))
    reused = [e["file"] for e in kept]
    return Resume(jr.Journal(old.plan, kept, old.directory), sorted(reused, key=planned.index), redone,
                  [f for f in planned if f not in reused])


def _difference(old: dict, new: dict) -> str:
    """What differs between two plan records, in words, the first thing found (most telling first)."""
    if old.get("rtnq") != new["rtnq"]:
        return f"rtnq's version differs ({new['rtnq']} now, {old.get('rtnq')} in the interrupted run)"
    o_old, o_new = old.get("options") or {}, new["options"]
    for k in OUTPUT_OPTIONS:
        if o_old.get(k) != o_new[k]:
            return (f"the options differ (--{k.replace('_', '-')} {_show(o_new[k])} now, {_show(o_old.get(k))} in "
                    "the interrupted run)")
    s_old, s_new = old.get("source") or {}, new["source"]
    if s_old != s_new:
        return f"the source differs ({_source_difference(s_old, s_new)})"
    return "the planned output differs (its shards or tensors)"


def _source_difference(old: dict, new: dict) -> str:
    if ("hub" in old) != ("hub" in new):
        now, then = ("a hub repo", "a local directory") if "hub" in new else ("a local directory", "a hub repo")
        return f"{now} now, {then} in the interrupted run"
    if "hub" in new:
        if old["hub"] != new["hub"]:
            return f"{new['hub']} now, {old['hub']} in the interrupted run"
        return f"commit {new['commit'][:12]} now, {str(old.get('commit'))[:12]} in the interrupted run"
    before = {s[0]: s for s in old.get("shards") or []}
    for shard in new["shards"]:
        was = before.pop(shard[0], None)
        if was is None:
            return f"{shard[0]} is new"
        if was != shard:
            what = [w for w, a, b in zip(("size", "mtime", "header"), was[1:], shard[1:]) if a != b]
            return f"{shard[0]} changed: {', '.join(what)}"
    if before:
        return f"{next(iter(before))} is gone"
    return f"its {layout.CONFIG_NAME} changed"


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)
