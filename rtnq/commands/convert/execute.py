"""`rtnq convert`, step 2: stream every tensor of a plan into a temporary directory, then rename it to OUT.

Never prints: progress goes to a callback. Reading, quantizing and writing overlap
(rtnq.checkpoint.pipeline): the next chunk is read while this one is quantized and the previous tensor
is written; memory is a few chunks plus two quantized tensors' outputs, whatever the number of layers.

    source chunk (mapped) -> rows in the 16-bit dtype -> numerics.fused.quantize_rows -> codes + scales
    in the format's layout -> ShardWriter at the planned offset -> fsync -> rename

An FP8 source weight (rtnq.checkpoint.fp8) is dequantized on the reader thread, a run of whole rows at a
time, so the main thread gets the same 16-bit rows as from a 16-bit source, and an FP8 weight that
passes through is written as those dense rows; its scale tensor is read whole once, and never written.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from rtnq import dtypes
from rtnq.checkpoint import fp8, pipeline
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.journal import Journal
from rtnq.checkpoint.shards import sharded_output
from rtnq.checkpoint.writer import write_text
from rtnq.checkpoint.source import Reader
from rtnq.commands.convert import resume
from rtnq.commands.convert.outputs import build_manifest, write_config
from rtnq.commands.convert.plan import ConvertPlan, Item
from rtnq.errors import InvalidWeightError
from rtnq.numerics import fused, rtn

CHUNK_BYTES = 8 * 1024 * 1024  # one read: large enough for few syscalls, small enough to stay in cache
IN_FLIGHT = 8  # chunks mapped at once: read ahead of the quantizer, passthrough ones being written
OUT_BUFFERS = 2  # quantized tensors in flight: one being filled, one being written


@dataclass(frozen=True)
class Progress:
    name: str
    tensors_done: int
    tensors_total: int
    bytes_done: int  # source bytes consumed so far
    bytes_total: int


@dataclass
class ConvertResult:
    plan: ConvertPlan
    manifest: mf.Manifest
    seconds: float
    warnings: list[str] = field(default_factory=list)


def _raise_if_cast_overflow(chunk: torch.Tensor, qdt: torch.dtype, name: str) -> None:
    """A finite fp32 weight beyond the 16-bit type's range becomes inf in the cast: say that, not "NaN or
    Inf in the source" (which would send the user looking for a corruption that is not there)."""
    if chunk.dtype == qdt or not torch.isfinite(chunk).all():
        return
    big = chunk.abs().max().item()
    raise InvalidWeightError(f"{name}: a {chunk.dtype} value of magnitude {big:.4g} overflows {qdt} (largest "
                             f"{torch.finfo(qdt).max:.4g}), the dtype it is quantized in; "
                             + ("use --dtype bf16 or " if qdt == torch.float16 else "") + "--skip it")


def quantize_item(
    item: Item,
    w: torch.Tensor | Iterable[torch.Tensor],
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    layout: str = "marlin",
    scale: str = "absmax",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Source weight -> (packed codes, scales, relative error of the dequantized weight) in `layout`.

    w: the whole weight, or its rows in order as (R, k) chunks (R a multiple of 64, within one
    expert of a 3-D weight), in the source dtype; each chunk is cast to the item's 16-bit dtype.
    out: preallocated (codes, scales) with the planned shapes, filled in place.
    Same bytes as the format's reference packing of rtn.quantize(w16, ...); the error is rtn.relative_error's.
    """
    d, spec = item.decision, item.spec
    qdt = item.quant_dtype.torch
    *lead, n, k = spec.shape
    experts = lead[0] if lead else 1
    if isinstance(w, torch.Tensor):
        w = list(w.reshape(experts, n, k))
    if out is None:
        out = (torch.empty(item.outputs[0].shape, dtype=torch.int32), torch.empty(item.outputs[1].shape, dtype=qdt))
    qweight, scales = out
    q3 = qweight.view(experts, *qweight.shape[-2:])
    s3 = scales.view(experts, *scales.shape[-2:])
    sums = [0.0, 0.0]
    done = 0  # rows of the (experts * n, k) weight quantized so far
    for chunk in w:
        e, row0 = divmod(done, n)
        try:
            fused.quantize_rows(chunk.to(qdt), row0, q3[e], s3[e], d.bits, d.group_size, sums, name=spec.name,
                                layout=layout, scale=scale)
        except InvalidWeightError:
            _raise_if_cast_overflow(chunk, qdt, spec.name)
            raise
        done += chunk.shape[0]
    if done != experts * n:
        raise ValueError(f"{spec.name}: got {done} rows, expected {experts * n}")
    rtn.check_scales(scales, spec.name)  # the C kernel writes an overflowed scale as inf: refuse it here
    return qweight, scales, fused.relative_error(sums)


def chunk_ranges(item: Item) -> list[tuple[int, int]]:
    """The (start, nbytes) pieces in which `run` reads a source tensor.

    A quantized weight comes in runs of whole 64-row Marlin blocks of one expert, a passthrough
    tensor in CHUNK_BYTES pieces; either way about CHUNK_BYTES at a time, whatever the model size.
    An FP8 weight always comes in whole rows of one expert (each is dequantized on its own), sized so that
    its dense rows, not its FP8 bytes, are about CHUNK_BYTES.
    """
    spec = item.spec
    if not item.quantized and item.fp8 is None:
        if spec.nbytes == 0:
            return [(0, 0)]
        return [(s, min(CHUNK_BYTES, spec.nbytes - s)) for s in range(0, spec.nbytes, CHUNK_BYTES)]
    *lead, n, k = spec.shape
    row_bytes = k * dtypes.BY_ST[spec.dtype].itemsize
    dense_row = k * item.quant_dtype.itemsize if item.fp8 else row_bytes  # what a chunk holds in memory
    rows = max(fused.ROW_ALIGN, CHUNK_BYTES // dense_row // fused.ROW_ALIGN * fused.ROW_ALIGN)
    return [((e * n + r) * row_bytes, min(rows, n - r) * row_bytes)
            for e in range(lead[0] if lead else 1) for r in range(0, n, rows)]


def _processing_order(plan: ConvertPlan) -> dict[str, list[Item]]:
    """Each output shard's items in the order they are processed. Within a shard, passthrough tensors
    (embeddings, lm_head: pure I/O) go first, so the disk writes them back while the CPU quantizes the
    rest instead of after it; the writer puts every tensor at its planned offset, so the file is the same."""
    by_shard: dict[str, list[Item]] = {fname: [] for fname, _ in plan.shards}
    for item in plan.items:
        by_shard[item.out_shard].append(item)
    return {fname: sorted(items, key=lambda i: i.quantized) for fname, items in by_shard.items()}


def run(plan: ConvertPlan, progress: Callable[[Progress], None] | None = None) -> ConvertResult:
    """Execute `plan`: stream every tensor into a temporary directory, then rename it to OUT.

    The directory holds a journal of the shards completed (rtnq.checkpoint.journal). Under --resume
    (plan.resume) it is the interrupted run's directory, and the items of the shards it completed are
    skipped: not read, not downloaded, their errors taken from the journal."""
    t0 = time.perf_counter()
    if plan.resume is not None:
        journal = plan.resume.journal
        errors: dict[str, float] = plan.resume.errors()
    else:
        journal = Journal(resume.plan_record(plan))
        errors = {}
    kept = set(journal.completed)
    by_shard = _processing_order(plan)
    order = [item for fname, _ in plan.shards if fname not in kept for item in by_shard[fname]]
    out_bytes = max((sum(e.nbytes for e in i.outputs[:2]) for i in order if i.quantized), default=1)
    fmt = plan.format
    skipped = [item for item in plan.items if item.out_shard in kept]
    done_bytes = sum(item.bytes_read for item in skipped)
    stop = threading.Event()
    with Reader(plan.src) as reader, sharded_output(plan.out, plan.options.force, plan.shards, plan.shard_metadata,
                                                    stop=stop, src=plan.src, small_files=plan.small_files,
                                                    journal=journal) as so, \
            contextlib.ExitStack() as staging:
        # The reader thread starts once the output directory exists, and is joined on any failure.
        dense = fp8.DenseFetch(reader, fp8.dense_dtype(plan.options.dtype).torch)
        jobs = [(functools.partial(dense, item.fp8) if item.fp8 else functools.partial(reader.map_range, item.spec),
                 chunk_ranges(item)) for item in order]
        # A hub source's shards are downloaded as the reader reaches them and deleted after their last read;
        # `order` holds no item of a shard completed before --resume, so its source is not downloaded again.
        if plan.hub is not None:
            touches = [list(dict.fromkeys([i.spec.shard] + ([i.fp8.scale.shard] if i.fp8 else []))) for i in order]
            jobs = staging.enter_context(plan.hub.staged(reader, jobs, touches))
        prefetch = pipeline.Prefetcher(jobs, pipeline.Slots(IN_FLIGHT, stop), stop)
        so.on_abort(prefetch.join)
        out_pool = pipeline.Pool(OUT_BUFFERS, out_bytes, stop)
        index = 0

        def notes(fname: str) -> dict:  # what a resumed run needs of a shard it will not convert again
            return {"errors": {i.spec.name: errors[i.spec.name] for i in by_shard[fname] if i.quantized}}

        for fname, writer in so.shards(notes):
            for item in by_shard[fname]:
                if item.quantized:
                    q_entry, s_entry, *const_entries = item.outputs
                    buf, out = out_pool.get_tensors([(q_entry.shape, torch.int32, q_entry.nbytes),
                                                     (s_entry.shape, item.quant_dtype.torch, s_entry.nbytes)])
                    # an FP8 weight's chunks arrive dense, in the dtype it is quantized in
                    rows = prefetch.rows(index, item.quant_dtype.torch if item.fp8 else item.spec.torch_dtype,
                                         item.spec.shape[-1])
                    qweight, scales, errors[item.spec.name] = quantize_item(item, rows, out, fmt.layout,
                                                                            plan.options.scale)
                    so.behind.submit(writer.write, q_entry.name, qweight)
                    so.behind.submit(writer.write, s_entry.name, scales, release=functools.partial(out_pool.put, buf))
                    consts = fmt.constants(item.spec.shape, item.decision.bits, item.decision.group_size)
                    for entry, value in zip(const_entries, consts, strict=True):
                        so.behind.submit(writer.write, entry.name, value)
                else:
                    for chunk in prefetch.chunks(index):
                        so.behind.submit(writer.write_part, item.outputs[0].name, chunk, release=prefetch.release)
                        del chunk
                index += 1
                done_bytes += item.bytes_read
                if progress:
                    progress(Progress(item.spec.name, len(skipped) + index, len(plan.items), done_bytes,
                                      plan.bytes_in))
        prefetch.join()
        write_config(plan, so.tmp)
        m = build_manifest(plan, errors)
        write_text(so.tmp / mf.FILENAME, m.dumps())
    return ConvertResult(plan, m, time.perf_counter() - t0, m.warnings)
