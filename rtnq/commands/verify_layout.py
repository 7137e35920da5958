"""`rtnq verify`, the header-only half: does OUT load, the way an engine loads it, as what SRC gives?

An engine never sees the manifest's promise that bytes match; it reads config.json's quantization_config,
opens the shards through the index and finds each tensor by name with the dtype and shape its layer
expects. So before (and besides) the byte comparison of rtnq.commands.verify, this module checks, from
the JSON files and the safetensors headers only (no weight bytes):

* the output's files: one copy of every tensor (`read_output`), each shard's `__metadata__`, the index
  (every tensor in the shard it names, nothing unlisted, nothing listed that no shard holds);
* per manifest entry: its outputs are the names, dtypes and shapes the format writes for the source
  tensor (`expected_outputs`), in the shard the manifest names; the manifest's dtype is the source's;
* config.json (and GPTQ's quantize_config.json) is exactly what convert writes, re-derived from SRC's
  config.json and the manifest's decisions by the converter's own function (`config_checks`).

What "exactly what convert writes" means: what *this* rtnq's convert writes (its manifest version in the
marlin config and the shard metadata), the same contract as the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rtnq import dtypes, formats, params
from rtnq.checkpoint import jsonfile, layout
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.source import TensorSpec, scan_shard_metadata
from rtnq.errors import CheckpointError
from rtnq.numerics import shape_rule
from rtnq.selection import names

# The kinds of the rows that are not one tensor's bytes. Only failures get such a row (like the
# "unknown" and "budget" rows): a passing output lists exactly one row per manifest entry.
CONFIG, LAYOUT, MANIFEST = "config", "layout", "manifest"
FILE_KINDS = (CONFIG, LAYOUT, MANIFEST)


@dataclass(frozen=True)
class Check:
    name: str  # source tensor name (or the file / output tensor a config or layout row is about)
    kind: str
    ok: bool
    detail: str  # "identical", or what differs
    error: float | None  # relative error of the dequantized weight (quantized tensors)


@dataclass
class Output:
    """What an engine finds in OUT: every tensor's header entry, the index, each shard's metadata."""

    specs: dict[str, TensorSpec]  # output tensor name -> its header entry (shard = the file it is in)
    index: dict | None  # model.safetensors.index.json, None when there is none
    metadata: dict[str, object]  # shard file -> its header's __metadata__ (None if it has none)


def read_output(out_dir: Path) -> Output:
    """The output's headers and index. CheckpointError (exit 4, unreadable) for a tensor stored twice.

    Why an error and not a failing check: with two copies of a name the output is not one checkpoint.
    Which copy an engine gets depends on the loader (the index names one, a loader that reads every
    shard keeps whichever it reads last), so there is no single tensor to compare, and rtnq itself
    refuses such a directory as a source (rtnq.checkpoint.source.scan). The same holds for a name listed
    twice in the index (jsonfile refuses the repeated key) or twice in one shard's header.
    """
    shards = layout.shard_files(out_dir)  # validates the index's weight_map (layout.index_map)
    index_path = out_dir / layout.INDEX_NAME
    index = jsonfile.read_object(index_path) if index_path.is_file() else None  # its metadata too
    specs: dict[str, TensorSpec] = {}
    metadata: dict[str, object] = {}
    for shard in shards:
        # one header read: jsonfile refuses a tensor named twice in it, scan its sizes and offsets
        shard_specs, metadata[shard] = scan_shard_metadata(out_dir / shard)
        for s in shard_specs:
            if s.name in specs:
                raise CheckpointError(f"{out_dir}: tensor {s.name} is stored in both {specs[s.name].shard} and "
                                      f"{shard}; an engine would load either copy, so the output is not loadable")
            specs[s.name] = s
    return Output(specs, index, metadata)


def expected_outputs(name: str, entry: mf.TensorEntry, src: TensorSpec, fmt: formats.Format,
                     dtype_option: str | None, fp8: bool = False) -> dict[str, tuple[str, str, tuple[int, ...]]] | str:
    """role -> (name, safetensors dtype, shape) of each tensor convert writes for this entry, from the
    source header and the manifest's kind, bits and group size; or why the entry cannot be re-derived
    (a kind whose outputs are not the format's roles, bits or a group size convert never writes)."""
    roles = set(entry.outputs)
    if entry.kind == "passthrough":
        if entry.outputs != {"tensor": name}:
            return f"passthrough, but the manifest names the outputs {_names(entry.outputs)}, not {name}"
        # an FP8 weight passes through dequantized, in the dtype it is quantized in (rtnq.checkpoint.fp8)
        dt = dtypes.quantized_in(src.dtype, dtype_option).st if fp8 else src.dtype
        return {"tensor": (name, dt, tuple(src.shape))}
    if entry.kind != "quantized":
        return f"the manifest's kind {entry.kind!r} is neither quantized nor passthrough"
    missing = [r for r in fmt.roles if r not in roles]
    if missing:
        return f"the manifest names no {missing[0]} output ({fmt.name} format)"
    if roles != set(fmt.roles):
        return f"the manifest names outputs {_names(entry.outputs)}, not the {fmt.name} format's {', '.join(fmt.roles)}"
    why = _unquantizable(entry, src, fmt, fp8)
    if why:
        return why
    scale_st = dtypes.quantized_in(src.dtype, dtype_option).st
    planned = fmt.entries(names.module_name(name), tuple(src.shape), entry.bits, entry.group_size, scale_st)
    return {role: (n, dt, tuple(shape)) for role, (n, dt, shape) in zip(fmt.roles, planned, strict=True)}


def _unquantizable(entry: mf.TensorEntry, src: TensorSpec, fmt: formats.Format, fp8: bool = False) -> str | None:
    """Why convert could never have written this quantized entry (so re-deriving it would only raise)."""
    if src.dtype not in dtypes.FLOATS and not fp8:
        return f"quantized, but the source tensor is {src.dtype}, which rtnq never quantizes"
    if len(src.shape) != 2 and not (len(src.shape) == 3 and fmt.stacked_experts):
        return f"quantized, but its shape {list(src.shape)} is no linear weight the {fmt.name} format holds"
    bits, group = entry.bits, entry.group_size
    if bits not in params.BITS or isinstance(bits, bool):
        return f"the manifest's bits {bits!r} are not {' or '.join(map(str, params.BITS))}"
    if group not in params.GROUP_SIZES or isinstance(group, bool):
        return f"the manifest's group_size {group!r} is not one of {', '.join(map(str, params.GROUP_SIZES))}"
    n, k = src.shape[-2:]
    if shape_rule.group_for(k, group) != group or shape_rule.problem(n, k, group, fmt.layout):
        return f"the manifest's group_size {group} is not one convert uses for k={k} ({fmt.name} format)"
    return None


def _names(outputs: dict) -> str:
    return ", ".join(f"{r}={n}" for r, n in outputs.items())


def _dims(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def header_problem(want: tuple[str, str, tuple[int, ...]], got: TensorSpec) -> str | None:
    """An output tensor's header against what convert writes: a wrong dtype or shape loads wrong (or not
    at all) even where the bytes happen to match."""
    _, dt, shape = want
    if got.dtype != dt or tuple(got.shape) != tuple(shape):
        return f"{got.name} is {got.dtype} {_dims(got.shape)} in its shard, convert writes {dt} {_dims(shape)}"
    return None


def layout_checks(m: mf.Manifest, fmt: formats.Format, src_specs: dict[str, TensorSpec], out: Output) -> list[Check]:
    """Failing rows for everything about where and how the outputs are stored (not their bytes)."""
    from rtnq.commands.convert.plan import VERSION

    checks: list[Check] = []
    want_meta = fmt.shard_metadata(VERSION, mf.VERSION)
    for shard, meta in out.metadata.items():
        if meta != want_meta:  # transformers refuses a shard whose metadata format is not "pt"
            checks.append(Check(shard, LAYOUT, False, f"__metadata__ is {_short(meta)}, convert writes "
                                f"{_short(want_meta)}", None))
    weight_map = None if out.index is None else out.index["weight_map"]
    if weight_map is None and len(out.metadata) > 1:
        checks.append(Check(layout.INDEX_NAME, LAYOUT, False, f"missing: the output has {len(out.metadata)} shards, "
                            "and engines find a sharded checkpoint's tensors through its index", None))
    for name, entry in m.tensors.items():
        src = src_specs[name]
        if entry.dtype != dtypes.BY_ST[src.dtype].name:
            checks.append(Check(name, MANIFEST, False, f"the manifest's dtype is {entry.dtype}, the source "
                                f"tensor's {dtypes.BY_ST[src.dtype].name}", None))
        for oname in entry.outputs.values():
            got = out.specs.get(oname)
            if got is None:
                continue  # the tensor's own row says it is missing
            why = None
            if got.shard != entry.shard:
                why = f"{oname} is in {got.shard}, the manifest says {entry.shard}"
            elif weight_map is not None and weight_map.get(oname) != got.shard:
                why = f"{oname} is in {got.shard}, the index says {weight_map.get(oname) or 'nothing'}"
            if why:
                checks.append(Check(name, LAYOUT, False, why, None))
                break  # one row per entry: a swapped shard would otherwise list every output
    if weight_map is not None:
        # Every index entry in a shard (an output tensor the index misses has its entry's row above, one the
        # manifest does not describe an "unknown" row), and the total convert writes.
        for oname in sorted(set(weight_map) - set(out.specs)):
            checks.append(Check(oname, LAYOUT, False, f"the index places it in {weight_map[oname]}, "
                                "but no shard holds it", None))
        total = sum(s.nbytes for s in out.specs.values())
        meta = out.index.get("metadata")
        got_total = meta.get("total_size") if isinstance(meta, dict) else None
        if got_total != total:
            checks.append(Check(layout.INDEX_NAME, LAYOUT, False, f"metadata.total_size is {got_total}, the "
                                f"shards hold {total} bytes of tensors", None))
    return checks


def config_checks(m: mf.Manifest, fmt: formats.Format, src_dir: Path, src_order: list[TensorSpec],
                  out_dir: Path, scale: str, rotation=None) -> list[Check]:
    """config.json re-derived from SRC's and the manifest, by the function convert writes it with
    (rtnq.commands.convert.outputs.quantization_config); failing rows only."""
    from rtnq.commands.convert.outputs import config_changes, quantization_config

    qcfg = _round_trip(quantization_config(_plan(m, fmt, src_dir, out_dir, src_order, scale)))
    src_cfg = src_dir / layout.CONFIG_NAME
    # convert: SRC's config.json with quantization_config set (a source without one: only that key)
    want = {**(jsonfile.read_object(src_cfg) if src_cfg.is_file() else {}), **config_changes(rotation),
            "quantization_config": qcfg}
    checks = [_compare_file(out_dir / layout.CONFIG_NAME, _round_trip(want), "engines read the quantization from it")]
    gptq_cfg = out_dir / layout.GPTQ_CONFIG_NAME
    if fmt is formats.GPTQ:  # AutoGPTQ-era loaders read it where config.json has no quantization_config
        checks.append(_compare_file(gptq_cfg, qcfg, "AutoGPTQ-era loaders read it"))
    elif gptq_cfg.exists():
        checks.append(Check(gptq_cfg.name, CONFIG, False, f"present, but convert writes none for the {fmt.name} "
                            "format (a GPTQ loader would read it)", None))
    return [c for c in checks if not c.ok]


def _plan(m: mf.Manifest, fmt: formats.Format, src_dir: Path, out_dir: Path, src_order: list[TensorSpec],
          scale: str):
    """The part of a ConvertPlan that quantization_config reads, rebuilt from the manifest: the decisions
    it records (kind, bits, group size, rule, reason), the source's names in file order, the defaults."""
    from rtnq.commands.convert.plan import ConvertOptions, ConvertPlan, Item
    from rtnq.selection import precision

    entries = {s.name: m.tensors[s.name] for s in src_order}
    decisions = {n: precision.Decision(n, e.kind, e.bits, e.group_size, e.rule, e.reason) for n, e in entries.items()}
    infos = names.analyse([s.name for s in src_order])
    selection = precision.Selection(decisions, m.rules, [], {}, infos)
    options = ConvertOptions(bits=m.defaults.get("bits"), group_size=m.defaults.get("group_size"),
                             format=fmt.name, scale=scale)
    items = [Item(s, decisions[s.name], [], entries[s.name].shard) for s in src_order]
    return ConvertPlan(src_dir, out_dir, options, fmt, items, [], selection, [])


def _round_trip(obj):
    """As the file holds it: tuples become lists, keys strings (what a parsed config.json compares to)."""
    return json.loads(json.dumps(obj))


def _compare_file(path: Path, want: dict, why_needed: str) -> Check:
    if not path.is_file():
        return Check(path.name, CONFIG, False, f"missing; convert writes it ({why_needed})", None)
    diff = first_difference(jsonfile.read_object(path), want)
    return Check(path.name, CONFIG, diff is None, diff or "identical", None)


def first_difference(got, want, path: str = "") -> str | None:
    """The first place two parsed JSON values differ, as `a.b[2] is X, convert writes Y`; None if equal.
    Types count: true is not 1, 4.0 is not 4."""
    here = path or "the file"
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            sub = f"{path}.{key}" if path else key
            if key not in got:
                return f"{sub} is missing, convert writes {_short(want[key])}"
            if key not in want:
                return f"{sub} is {_short(got[key])}, convert writes no such key"
            diff = first_difference(got[key], want[key], sub)
            if diff:
                return diff
        return None
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for i, (g, w) in enumerate(zip(got, want)):
            diff = first_difference(g, w, f"{path}[{i}]")
            if diff:
                return diff
        return None
    if type(got) is type(want) and got == want:
        return None
    return f"{here} is {_short(got)}, convert writes {_short(want)}"


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
