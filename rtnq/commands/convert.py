"""The conversion pipeline: headers -> decisions -> output plan -> stream tensors -> atomic rename.

Never prints. `make_plan` reads only safetensors headers; `run` reads, quantizes, packs and writes
one tensor at a time, reporting progress through a callback, and returns the manifest. Output shards
mirror the source shards one for one, so the index keeps the source's grouping.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from rtnq.checkpoint import manifest as mf
from rtnq.formats import engine_config
from rtnq.numerics import fused
from rtnq import formats
from rtnq.checkpoint import pipeline
from rtnq.selection import precision
from rtnq.errors import CheckpointError, UsageError
from rtnq import dtypes, params
from rtnq.checkpoint.source import INDEX_NAME, SINGLE_NAME, Reader, TensorSpec, read_json_object, resolve, scan
from rtnq.checkpoint.writer import Entry, ShardWriter, atomic_dir, check_output_location, shard_size, write_index, write_json

VERSION = "0.1.0"
GPTQ_CONFIG_NAME = "quantize_config.json"
# Files in SRC that are weights in some other format: never copied (and never unpickled).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
MAX_COPY_BYTES = 256 * 1024 * 1024  # tokenizer and config files are small; anything bigger is a weight
CHUNK_BYTES = 8 * 1024 * 1024  # one read: large enough for few syscalls, small enough to stay in cache
IN_FLIGHT = 8  # chunks mapped at once: read ahead of the quantizer, passthrough ones being written
OUT_BUFFERS = 2  # quantized tensors in flight: one being filled, one being written


@dataclass(frozen=True)
class Options:
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


@dataclass
class Item:
    """One source tensor and what it becomes."""

    spec: TensorSpec
    decision: precision.Decision
    outputs: list[Entry]
    out_shard: str
    quant_dtype: torch.dtype | None = None  # the 16-bit dtype the RTN arithmetic runs in
    layout: str = "marlin"  # rtnq.numerics.fused layout of the packed codes (the format's)


@dataclass
class Plan:
    src: Path
    out: Path
    options: Options
    items: list[Item]
    shards: list[tuple[str, list[Entry]]]
    precision: precision.Selection
    small_files: list[str]
    warnings: list[str] = field(default_factory=list)  # for the user: the selection's, plus this machine's

    @property
    def bytes_in(self) -> int:
        return sum(i.spec.nbytes for i in self.items)

    @property
    def bytes_out(self) -> int:
        meta = shard_metadata(self.options)
        return sum(shard_size(entries, meta) for _, entries in self.shards)


@dataclass(frozen=True)
class Progress:
    name: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes consumed so far
    bytes_total: int


@dataclass
class Result:
    plan: Plan
    manifest: mf.Manifest
    seconds: float
    warnings: list[str] = field(default_factory=list)


def shard_metadata(options: Options) -> dict[str, str]:
    # "format": "pt" is what transformers' safetensors loader expects of a checkpoint it reads.
    if options.format == "marlin":
        return {"format": "rtnq", "rtnq_version": VERSION, "manifest_version": str(mf.VERSION)}
    return {"format": "pt", "rtnq_version": VERSION, "rtnq_format": options.format}


def module_prefix(name: str) -> str:
    """`P.weight` -> `P`; a name without `.weight` (stacked MoE experts) is its own prefix."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def quant_dtype(spec: TensorSpec, options: Options) -> torch.dtype:
    if options.dtype is not None:
        return dtypes.BY_SHORT[options.dtype].torch
    dt = spec.torch_dtype
    return dt if dt in (torch.bfloat16, torch.float16) else torch.bfloat16


def output_entries(
    spec: TensorSpec, d: precision.Decision, qdt: torch.dtype | None, fmt: formats.Format = formats.MARLIN
) -> list[Entry]:
    """The planned outputs of one source tensor: itself, or the format's tensors for a quantized weight
    (packed codes and scales first)."""
    if d.kind != "quantized":
        return [Entry(spec.name, spec.dtype, spec.shape)]
    return [Entry(*e) for e in fmt.entries(module_prefix(spec.name), spec.shape, d.bits, d.group_size, qdt)]


def out_shard_names(src_shards: list[str]) -> dict[str, str]:
    n = len(src_shards)
    if n == 1:
        return {src_shards[0]: SINGLE_NAME}
    return {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(src_shards)}


def small_files(src: Path) -> list[str]:
    """Top-level non-weight files to copy unchanged (config.json is rewritten, not copied)."""
    keep = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in ("config.json", INDEX_NAME, mf.FILENAME, GPTQ_CONFIG_NAME):
            continue
        if p.suffix in WEIGHT_SUFFIXES or p.stat().st_size > MAX_COPY_BYTES:
            continue
        keep.append(p.name)
    return keep


def _kv_heads(src: Path) -> int | None:
    """num_key_value_heads (else num_attention_heads) from config.json, for the TP check; None if unknown.
    Best effort: a broken config.json is reported when it is rewritten, not here."""
    try:
        cfg = json.loads((src / "config.json").read_text())
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads > 0 else None


def make_plan(src: str | Path, out: str | Path, options: Options) -> Plan:
    """Everything about the output, from headers only: decisions, names, dtypes, shapes, shards."""
    params.check(options.bits, options.group_size, options.dtype)
    if options.format not in formats.BY_NAME:
        raise UsageError(f"--format must be one of {', '.join(formats.FORMATS)}, got {options.format}")
    fmt = formats.BY_NAME[options.format]
    src_dir = resolve(src)
    out_dir = Path(out)
    check_output_location(src_dir, out_dir, options.force or options.dry_run)
    specs = scan(src_dir)
    pplan = precision.select(
        specs,
        bits=options.bits,
        group_size=options.group_size,
        keep_int8=options.keep_int8,
        skip=options.skip,
        strict=options.strict,
        tp=options.tp,
        kv_heads=_kv_heads(src_dir),
    )
    names = out_shard_names(list(dict.fromkeys(s.shard for s in specs)))
    items = []
    for spec in specs:
        d = pplan.decisions[spec.name]
        if d.kind == "quantized" and len(spec.shape) == 3 and not fmt.stacked_experts:
            raise UsageError(
                f"{spec.name} is a stacked (E, n, k) expert tensor; {fmt.name} stores each expert as its own "
                "module, so it cannot hold it. Use --format marlin, or --skip experts"
            )
        qdt = quant_dtype(spec, options) if d.kind == "quantized" else None
        items.append(Item(spec, d, output_entries(spec, d, qdt, fmt), names[spec.shard], qdt, fmt.pack_layout))
    if fmt is formats.GPTQ:
        # SGLang's GPTQ MoE layers never read `dynamic` (checked with scripts/check_vllm_matching.py
        # --engine sglang): every expert loads at the default bits.
        odd = [i for i in items if "experts" in i.spec.name.lower().split(".")
               and ((i.decision.kind == "quantized" and i.decision.bits != options.bits)
                    or engine_config.unquantized_linear(i.decision))]
        if odd:
            d = odd[0].decision
            what = f"{d.bits}-bit" if d.kind == "quantized" else "16-bit"
            pplan.warnings.append(
                f"{len(odd)} MoE expert weights (e.g. {odd[0].spec.name}) are {what} while the default is "
                f"{options.bits}-bit: vLLM reads that from the GPTQ `dynamic` overrides, but SGLang loads every "
                "expert at the default bits; for SGLang use --format compressed-tensors"
            )
    shards: dict[str, list[Entry]] = {}
    for item in items:
        shards.setdefault(item.out_shard, []).extend(item.outputs)
    seen: set[str] = set()
    for entries in shards.values():
        for e in entries:
            if e.name in seen:
                raise CheckpointError(f"output tensor name {e.name} would be written twice; the source already has it")
            seen.add(e.name)
    warnings = list(pplan.warnings)
    slow = None if options.dry_run else fused.problem()
    if slow:
        warnings.append(slow)  # not in the manifest: it is about this machine, not the output
    return Plan(src_dir, out_dir, options, items, list(shards.items()), pplan, small_files(src_dir), warnings)


def plan_format(plan: Plan) -> formats.Format:
    return formats.BY_NAME[plan.options.format]


def quantize_item(
    item: Item,
    w: torch.Tensor | Iterable[torch.Tensor],
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Source weight -> (Marlin qweight, Marlin scales, relative error of the dequantized weight).

    w: the whole weight, or its rows in order as (R, k) chunks (R a multiple of 64, within one
    expert of a 3-D weight), in the source dtype; each chunk is cast to the item's 16-bit dtype.
    out: preallocated (qweight, scales) with the planned shapes, filled in place.
    Same bytes as marlin.pack(*rtn.quantize(w16, ...)); the error is rtn.relative_error's.
    """
    d, spec = item.decision, item.spec
    *lead, n, k = spec.shape
    experts = lead[0] if lead else 1
    if isinstance(w, torch.Tensor):
        w = list(w.reshape(experts, n, k))
    if out is None:
        out = (torch.empty(item.outputs[0].shape, dtype=torch.int32),
               torch.empty(item.outputs[1].shape, dtype=item.quant_dtype))
    qweight, scales = out
    q3 = qweight.view(experts, *qweight.shape[-2:])
    s3 = scales.view(experts, *scales.shape[-2:])
    sums = [0.0, 0.0]
    done = 0  # rows of the (experts * n, k) weight quantized so far
    for chunk in w:
        e, row0 = divmod(done, n)
        fused.quantize_rows(chunk.to(item.quant_dtype), row0, q3[e], s3[e], d.bits, d.group_size, sums,
                                name=spec.name, layout=item.layout)
        done += chunk.shape[0]
    if done != experts * n:
        raise ValueError(f"{spec.name}: got {done} rows, expected {experts * n}")
    return qweight, scales, fused.relative_error(sums)


def chunk_ranges(item: Item) -> list[tuple[int, int]]:
    """The (start, nbytes) pieces in which `run` reads a source tensor.

    A quantized weight comes in runs of whole 64-row Marlin blocks of one expert, a passthrough
    tensor in CHUNK_BYTES pieces; either way about CHUNK_BYTES at a time, whatever the model size.
    """
    spec = item.spec
    if item.decision.kind != "quantized":
        if spec.nbytes == 0:
            return [(0, 0)]
        return [(s, min(CHUNK_BYTES, spec.nbytes - s)) for s in range(0, spec.nbytes, CHUNK_BYTES)]
    *lead, n, k = spec.shape
    row_bytes = k * dtypes.BY_ST[spec.dtype].itemsize
    rows = max(fused.ROW_ALIGN, CHUNK_BYTES // row_bytes // fused.ROW_ALIGN * fused.ROW_ALIGN)
    return [((e * n + r) * row_bytes, min(rows, n - r) * row_bytes)
            for e in range(lead[0] if lead else 1) for r in range(0, n, rows)]


def _entry(item: Item, error: float | None) -> mf.TensorEntry:
    d, spec = item.decision, item.spec
    if d.kind == "quantized":
        outputs = {e.name.rpartition(".")[2]: e.name for e in item.outputs}
    else:
        outputs = {"tensor": item.outputs[0].name}
    return mf.TensorEntry(
        kind=d.kind,
        shape=list(spec.shape),
        dtype=dtypes.BY_ST[spec.dtype].name,
        outputs=outputs,
        shard=item.out_shard,
        bits=d.bits if d.kind == "quantized" else None,
        group_size=d.group_size if d.kind == "quantized" else None,
        rule=d.rule if d.kind == "quantized" else None,
        reason=d.reason if d.kind != "quantized" else None,
        error=error,
    )


def totals(plan: Plan) -> dict:
    """Counts, bytes and effective bits per weight (scales included) of the planned output."""
    counts = {"int4": 0, "int8": 0, "passthrough": 0}
    reasons: dict[str, int] = {}
    params = q_params = q_bits = 0
    for item in plan.items:
        params += item.spec.numel
        d = item.decision
        if d.kind == "quantized":
            counts[f"int{d.bits}"] += 1
            q_params += item.spec.numel
            q_bits += 8 * sum(e.nbytes for e in item.outputs)
        else:
            counts["passthrough"] += 1
            key = (d.reason or "passthrough").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    weight_bits = 8 * sum(e.nbytes for _, entries in plan.shards for e in entries)
    return {
        "tensors": counts,
        "passthrough_reasons": reasons,
        "parameters": params,
        "quantized_parameters": q_params,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "bits_per_weight": round(q_bits / q_params, 4) if q_params else None,
        "model_bits_per_weight": round(weight_bits / params, 4) if params else None,
        "tp_failures": {str(t): len(f) for t, f in plan.precision.tp_failures.items()},
    }


def build_manifest(plan: Plan, errors: dict[str, float]) -> mf.Manifest:
    o = plan.options
    return mf.Manifest(
        defaults={
            "bits": o.bits,
            "group_size": o.group_size,
            "scale_rule": mf.SCALE_RULE,
            "dtype": o.dtype or "source (fp32 -> bf16)",
        },
        tensors={i.spec.name: _entry(i, errors.get(i.spec.name)) for i in plan.items},
        rules=plan.precision.rules,
        totals=totals(plan),
        warnings=list(plan.precision.warnings),
        rtnq_version=VERSION,
        format=plan_format(plan).manifest_name,
    )


def quantization_config(plan: Plan) -> dict:
    """config.json's quantization_config: rtnq's own for marlin, the engines' for gptq and compressed-tensors."""
    o = plan.options
    if o.format != "marlin":
        decisions = [i.decision for i in plan.items]
        infos = plan.precision.infos
        ndim = {i.spec.name: len(i.spec.shape) for i in plan.items}
        if o.format == "gptq":
            return engine_config.gptq(decisions, infos, ndim, bits=o.bits, group_size=o.group_size)
        return engine_config.compressed_tensors(decisions, infos, ndim, bits=o.bits, group_size=o.group_size)
    int8 = sorted(module_prefix(i.spec.name) for i in plan.items if i.decision.kind == "quantized" and i.decision.bits == 8)
    return {
        "quant_method": "rtnq",
        "format": "marlin",
        "bits": o.bits,
        "group_size": o.group_size,
        "sym": True,
        "scale_rule": mf.SCALE_RULE,
        "manifest": mf.FILENAME,
        "manifest_version": mf.VERSION,
        "int8_modules": int8,
    }


def write_config(plan: Plan, tmp: Path) -> None:
    cfg_path = plan.src / "config.json"
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
    qcfg = quantization_config(plan)
    cfg["quantization_config"] = qcfg
    write_json(tmp / "config.json", cfg)
    if plan.options.format == "gptq":  # what AutoGPTQ-era loaders read when config.json has no quantization_config
        write_json(tmp / GPTQ_CONFIG_NAME, qcfg)


def run(plan: Plan, progress: Callable[[Progress], None] | None = None) -> Result:
    """Execute `plan`: stream every tensor into a temporary directory, then rename it to OUT.

    Reading, quantizing and writing overlap (rtnq/checkpoint/pipeline.py): the next chunk is read while this
    one is quantized and the previous tensor is written; memory is a few chunks plus two quantized
    tensors' outputs, whatever the number of layers.
    """
    t0 = time.perf_counter()
    errors: dict[str, float] = {}
    total_bytes = plan.bytes_in
    done_bytes = 0
    by_shard: dict[str, list[Item]] = {}
    for item in plan.items:
        by_shard.setdefault(item.out_shard, []).append(item)
    # Within a shard, passthrough tensors (embeddings, lm_head: pure I/O) go first, so the disk
    # writes them back while the CPU quantizes the rest instead of after it; the writer puts every
    # tensor at its planned offset, so the file is the same.
    for fname in by_shard:
        by_shard[fname].sort(key=lambda i: i.decision.kind == "quantized")
    order = [item for fname, _ in plan.shards for item in by_shard[fname]]
    ranges = [chunk_ranges(item) for item in order]
    out_bytes = max((sum(e.nbytes for e in i.outputs) for i in order if i.decision.kind == "quantized"), default=1)
    meta = shard_metadata(plan.options)
    stop = threading.Event()
    with atomic_dir(plan.out, plan.options.force) as tmp, Reader(plan.src) as reader:
        slots = pipeline.Slots(IN_FLIGHT, stop)
        out_pool = pipeline.Pool(OUT_BUFFERS, max(out_bytes, 1), stop)
        jobs = [(functools.partial(reader.map_range, item.spec), r) for item, r in zip(order, ranges)]
        prefetch = pipeline.Prefetcher(jobs, slots, stop)
        behind = pipeline.WriteBehind(stop)
        writers: list[ShardWriter] = []

        def rows(index: int, item: Item):
            k = item.spec.shape[-1]
            for chunk in prefetch.chunks(index):
                try:
                    yield chunk.view(item.spec.torch_dtype).view(-1, k)
                finally:
                    del chunk  # unmapped once the quantizer has dropped its views too
                    slots.release()

        try:
            index = 0
            for fname, entries in plan.shards:
                writer = ShardWriter(tmp / fname, entries, meta, writeback=behind.writeback)
                writers.append(writer)
                for item in by_shard[fname]:
                    if item.decision.kind == "quantized":
                        q_entry, s_entry, *const_entries = item.outputs
                        buf = out_pool.get(q_entry.nbytes + s_entry.nbytes)
                        out = (buf[: q_entry.nbytes].view(torch.int32).view(q_entry.shape),
                               buf[q_entry.nbytes :].view(item.quant_dtype).view(s_entry.shape))
                        qweight, scales, errors[item.spec.name] = quantize_item(item, rows(index, item), out)
                        behind.submit(writer.write, q_entry.name, qweight)
                        behind.submit(writer.write, s_entry.name, scales, release=functools.partial(out_pool.put, buf))
                        consts = plan_format(plan).constants(item.spec.shape, item.decision.bits, item.decision.group_size)
                        for entry, value in zip(const_entries, consts, strict=True):
                            behind.submit(writer.write, entry.name, value)
                    else:
                        for chunk in prefetch.chunks(index):
                            behind.submit(writer.write_part, item.outputs[0].name, chunk, release=slots.release)
                            del chunk
                    index += 1
                    done_bytes += item.spec.nbytes
                    if progress:
                        progress(Progress(item.spec.name, index, len(plan.items), done_bytes, total_bytes))
                behind.submit(writer.finish)
                behind.sync_later(writer.sync_close)
            behind.finish()
            prefetch.join()
        except BaseException:
            behind.abort()
            stop.set()
            prefetch.join()
            for writer in writers:
                writer.abort()
            raise
        write_index(tmp, plan.shards, INDEX_NAME)
        write_config(plan, tmp)
        for name in plan.small_files:
            shutil.copy2(plan.src / name, tmp / name)
        m = build_manifest(plan, errors)
        (tmp / mf.FILENAME).write_text(m.dumps())
    return Result(plan, m, time.perf_counter() - t0, m.warnings)
