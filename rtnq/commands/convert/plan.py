"""`rtnq convert`, step 1: everything about the output from the source's headers, before a weight is read.

Decisions (rtnq.selection), output names, dtypes, shapes and shards, the format's engine warnings and
the machine's fast-path warning. Output shards mirror the source shards one for one, so the index keeps
the source's grouping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from rtnq import dtypes, formats, params
from rtnq.checkpoint import fp8, layout, refusals
from rtnq.checkpoint.outdir import check_output_location, resumable, stale_temporaries
from rtnq.checkpoint.shards import check_readable
from rtnq.checkpoint.source import TensorSpec, scan
from rtnq.checkpoint.writer import Entry, shard_size
from rtnq.commands.convert import hub_source
from rtnq.errors import CheckpointError, UsageError
from rtnq.formats import engine_config
from rtnq.selection import names, precision

VERSION = "0.1.0"  # rtnq's version, recorded in every output
# --budget's score when none is given (docs/PRECISION.md has the measurements behind both): INT8-only budgets
# rank by the position prior (reads no weight, best on SmolLM2); budgets with finer groups by each unit's error
# relative to its weight's norm (best or within 0.02 of the best on SmolLM2, Qwen2.5 and Gemma 3 from 4.5 bits)
DEFAULT_SCORE, DEFAULT_GROUPS_SCORE = "position", "relative"


@dataclass(frozen=True)
class ConvertOptions:
    bits: int = 4
    group_size: int = 128
    keep_int8: Sequence[str] = ()
    skip: Sequence[str] = ()
    dtype: str | None = None  # "bf16"/"fp16": cast every quantized weight; None: keep 16-bit, fp32 -> bf16
    strict: bool = False
    force: bool = False
    tp: Sequence[int] = ()
    format: str = "marlin"  # one of formats.FORMATS
    dry_run: bool = False  # plan only: OUT may exist, since nothing will be written
    budget: float | None = None  # --budget: bits per weight of the quantized linears; promotes units to INT8
    budget_score: str | None = None  # --budget-score: what ranks them (params.BUDGET_SCORES; docs/PRECISION.md);
    # None: DEFAULT_GROUPS_SCORE under --budget-groups, else DEFAULT_SCORE
    budget_groups: bool = False  # --budget-groups: --budget may also give units groups of 64 or 32
    scale: str = "absmax"  # --scale: rtn.quantize's scale rule ("absmax", the paper's, or "mse")
    rotate: bool = False  # --rotate: fold a seeded rotation of the residual stream into the weights first
    rotate_seed: int = 0  # --rotate-seed
    rotate_spare: str = "auto"  # --rotate-spare: channels left out of the fold ("auto", "none", "3,17")
    resume: bool = False  # --resume: continue the interrupted run's temporary directory (commands.convert.resume)


@dataclass
class Item:
    """One source tensor and what it becomes."""

    spec: TensorSpec
    decision: precision.Decision
    outputs: list[Entry]  # quantized: the format's tensors, codes and scales first; else the tensor itself
    out_shard: str
    quant_dtype: dtypes.DType | None = None  # the 16-bit dtype the RTN arithmetic runs in (quantized, and FP8
    # weights, which are dequantized to it whether they are quantized or pass through)
    stored_shape: tuple[int, ...] = ()  # the weight shape the packed outputs hold (marlin: padded); quantized only
    fp8: fp8.Fp8Weight | None = None  # an FP8 source weight: its scale; spec stays the F8 tensor read

    @property
    def bytes_read(self) -> int:
        """Source bytes this item reads: the tensor, and an FP8 weight's scale."""
        return self.spec.nbytes + (self.fp8.scale.nbytes if self.fp8 else 0)

    @property
    def quantized(self) -> bool:
        return self.decision.kind == "quantized"


@dataclass
class ConvertPlan:
    src: Path
    out: Path
    options: ConvertOptions
    format: formats.Format
    items: list[Item]  # source order
    shards: list[tuple[str, list[Entry]]]  # output file -> its tensors, in file order
    selection: precision.Selection
    small_files: list[str]  # copied unchanged
    warnings: list[str] = field(default_factory=list)  # for the user: the selection's, the format's, the machine's
    manifest_warnings: list[str] = field(default_factory=list)  # the subset about the output itself
    budget: object | None = None  # commands.convert.budget.Scored under --budget
    fp8: fp8.Fp8Source | None = None  # an FP8 source: its scheme and the scale tensors it consumes (not items)
    hub: object | None = None  # commands.convert.hub_source.HubSource for ORG/NAME[@REV]; src is then its view
    resume: object | None = None  # commands.convert.resume.Resume under --resume: the shards kept and redone
    rotation: object | None = None  # commands.rotate.Rotation under --rotate: every read goes through it

    def close(self) -> None:
        """Remove what the plan put on disk (a hub source's small files and staged shards)."""
        if self.hub is not None:
            self.hub.close()

    @property
    def bytes_in(self) -> int:
        return sum(i.bytes_read for i in self.items)

    @property
    def shard_metadata(self) -> dict[str, str]:
        from rtnq.checkpoint import manifest

        return self.format.shard_metadata(VERSION, manifest.VERSION)

    @property
    def bytes_out(self) -> int:
        return sum(shard_size(entries, self.shard_metadata) for _, entries in self.shards)


def quant_dtype(spec: TensorSpec, options: ConvertOptions) -> dtypes.DType:
    """--dtype if given, else the source's 16-bit dtype; fp32 sources are quantized in bf16."""
    return dtypes.quantized_in(spec.dtype, options.dtype)


def output_entries(spec: TensorSpec, d: precision.Decision, qdt: dtypes.DType | None,
                   fmt: formats.Format = formats.MARLIN, dense: bool = False) -> list[Entry]:
    """The planned outputs of one source tensor: itself, or the format's tensors for a quantized weight
    (packed codes and scales first). dense: an FP8 weight, which passes through dequantized to `qdt`
    (raw FP8 without its scale would be a different weight)."""
    if d.kind != "quantized":
        return [Entry(spec.name, qdt.st if dense else spec.dtype, spec.shape)]
    prefix = names.module_name(spec.name)  # stacked (E, n, k) experts have no .weight: their own prefix
    return [Entry(*e) for e in fmt.entries(prefix, spec.shape, d.bits, d.group_size, qdt.st)]


def make_plan(src: str | Path, out: str | Path, options: ConvertOptions) -> ConvertPlan:
    """Everything about the output, from headers only: decisions, names, dtypes, shapes, shards."""
    params.check(options.bits, options.group_size, options.dtype, scale=options.scale)
    if options.budget_score is None:
        options = replace(options, budget_score=DEFAULT_GROUPS_SCORE if options.budget_groups else DEFAULT_SCORE)
    fmt = formats.BY_NAME.get(options.format)
    if fmt is None:
        raise UsageError(f"--format must be one of {', '.join(formats.FORMATS)}, got {options.format}")
    out_dir = Path(out)
    continued = resumable(out_dir) if options.resume else None  # a one-line usage error when there is none
    stale = stale_temporaries(out_dir, exclude=continued)  # before a hub source puts its own temporary directory there
    hub = hub_source.open_source(str(src), out_dir)
    try:
        plan = _make_plan(hub.view if hub else layout.resolve(src), out_dir, options, fmt, hub, stale)
        if continued is not None:
            from rtnq.commands.convert import resume  # it imports this module

            plan.hub = hub  # the source record needs it
            plan.resume = resume.check(plan, continued)
    except BaseException:
        if hub is not None:
            hub.close()
        raise
    plan.hub = hub
    return plan


def _make_plan(src_dir: Path, out_dir: Path, options: ConvertOptions, fmt: formats.Format, hub, stale: list[str]):
    check_output_location(src_dir, out_dir, options.force or options.dry_run)
    specs = hub.specs if hub else scan(src_dir)
    if hub is not None and options.budget is not None and options.budget_groups:
        raise UsageError("--budget-groups reads every weight before writing, which for a hub source is a second "
                         "download; download the model first, or leave --budget-groups out")
    if hub is not None and options.budget is not None and options.budget_score != "position":
        raise UsageError(f"--budget-score {options.budget_score} reads every weight before writing, which for a hub "
                         "source is a second download; use --budget-score position, or download the model first")
    config_path = src_dir / layout.CONFIG_NAME
    config = layout.read_json_object(config_path) if config_path.is_file() else None
    source_fp8 = fp8.detect(config, specs)
    refusals.check_source(src_dir, config, specs, source_fp8.consumed if source_fp8 else None)
    fp8_weights = source_fp8.weights if source_fp8 else {}
    rotation = None
    if options.rotate:
        if hub is not None:
            raise UsageError("--rotate reads norm weights and the embedding out of order, which a hub source "
                             "streamed shard by shard cannot give; download the model first")
        if source_fp8:
            raise UsageError("--rotate cannot rotate an FP8 source yet; dequantize it first (rtnq dequantize)")
        from rtnq.commands import rotate  # torch: only under --rotate

        rotation = rotate.for_source(src_dir, specs, config, options.rotate_seed, options.rotate_spare)
        specs = specs + rotation.extra_specs()  # the un-tied head, read as the embedding it is computed from
    elif options.rotate_seed != 0 or options.rotate_spare != "auto":
        raise UsageError("--rotate-seed and --rotate-spare describe --rotate; add --rotate")
    if source_fp8:
        specs = [s for s in specs if s.name not in source_fp8.consumed]
        # budget's scorer reads weights as stored; an FP8 weight read that way is not the model's
        if options.budget is not None and options.budget_groups:
            raise UsageError("--budget-groups reads the weights, which it cannot do for an FP8 source yet; use "
                             "--budget without it")
        if options.budget is not None and options.budget_score != "position":
            raise UsageError(f"--budget-score {options.budget_score} reads the weights, which it cannot do for an FP8 "
                             "source yet; use --budget-score position")
    dense = fp8.dense_dtype(options.dtype)
    # Selection sees an FP8 weight as the dense 16-bit weight it stands for (it would refuse F8_E4M3).
    selection = precision.select(
        [replace(s, dtype=dense.st) if s.name in fp8_weights else s for s in specs],
        bits=options.bits,
        group_size=options.group_size,
        keep_int8=options.keep_int8,
        skip=options.skip,
        strict=options.strict,
        tp=options.tp,
        kv_heads=layout.kv_heads(src_dir),
        layout=fmt.layout,
    )
    reasons = {name: d.reason or "" for name, d in selection.decisions.items()}
    refusals.check_linears([s for s in specs if reasons[s.name].startswith(precision.DTYPE_REASON)],
                           [n for n, r in reasons.items() if r.startswith(precision.CONV1D_REASON)])
    scored = None
    if options.budget_groups and options.budget is None:
        raise UsageError("--budget-groups widens what --budget may choose; give --budget BPW too")
    if options.budget is not None:
        from rtnq.commands.convert import budget  # reads and scores the weights (imports torch)

        if options.bits != 4:
            raise UsageError("--budget promotes INT4 tensors to INT8, so it needs --bits 4")
        scored = budget.apply(src_dir, specs, selection, options.budget, options.budget_score,
                              options.dtype, options.scale, options.budget_groups, fmt.layout, rotation)
        selection = scored.selection
    src_shards = list(dict.fromkeys(s.shard for s in specs))
    shard_names = {s: layout.shard_name(i, len(src_shards)) for i, s in enumerate(src_shards)}
    items = []
    for spec in specs:
        d = selection.decisions[spec.name]
        if d.kind == "quantized" and len(spec.shape) == 3 and not fmt.stacked_experts:
            raise UsageError(
                f"{spec.name} is a stacked (E, n, k) expert tensor; {fmt.name} stores each expert as its own "
                "module, so it cannot hold it. Use --format marlin, or --skip experts"
            )
        w8 = fp8_weights.get(spec.name)
        qdt = quant_dtype(spec, options) if d.kind == "quantized" or w8 else None
        stored = fmt.stored_shape(spec.shape) if d.kind == "quantized" else ()
        items.append(Item(spec, d, output_entries(spec, d, qdt, fmt, dense=w8 is not None), shard_names[spec.shard],
                          qdt, stored, w8))
    shards: dict[str, list[Entry]] = {}
    for item in items:
        shards.setdefault(item.out_shard, []).extend(item.outputs)
    seen: set[str] = set()
    for entries in shards.values():
        for e in entries:
            if e.name in seen:
                raise CheckpointError(f"output tensor name {e.name} would be written twice; the source already has it")
            seen.add(e.name)
    shapes = {spec.name: spec.shape for spec in specs}
    manifest_warnings = selection.warnings + engine_config.warnings(fmt, list(selection.decisions.values()),
                                                                    options.bits, shapes)
    warnings = list(manifest_warnings) + stale  # about this disk, not the output
    if source_fp8:  # about the source, not the output (whose manifest records the F8 dtypes)
        warnings.insert(0, source_fp8.describe(dense.label))
    if not (src_dir / layout.CONFIG_NAME).is_file():
        warnings.append(f"{src_dir} has no {layout.CONFIG_NAME}: OUT's will hold only the quantization_config, "
                        "and engines need the model's config to load it; copy the original config.json into OUT")
    small = layout.small_files(src_dir)
    check_readable(src_dir, small)
    if not options.dry_run:
        from rtnq.numerics import cpu  # loads the C library: only when the plan will run

        slow = cpu.problem()
        if slow:
            warnings.append(slow)  # not in the manifest: it is about this machine, not the output
    return ConvertPlan(src_dir, out_dir, options, fmt, items, list(shards.items()), selection,
                       small, warnings, manifest_warnings, scored, source_fp8, rotation=rotation)
