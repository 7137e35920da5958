"""`rtnq convert`, step 2: stream every tensor of a plan into a temporary directory, then rename it to OUT.

Never prints: progress goes to a callback. Reading, quantizing and writing overlap
(rtnq.checkpoint.pipeline): the next chunk is read while this one is quantized and the previous tensor
is written; memory is a few chunks plus two quantized tensors' outputs, whatever the number of layers.

    source chunk (mapped) -> rows in the 16-bit dtype -> numerics.cpu.quantize_rows -> codes + scales
    in the format's layout -> ShardWriter at the planned offset -> fsync -> rename

Torch-free: chunks and outputs are numpy arrays (bf16 as uint16 bit patterns) around the C kernel
(rtnq.numerics.cpu). Torch is imported only where its reference quantizer stands in for the kernel:
the library is not built or RTNQ_FASTPATH=0 (rtnq.numerics.fused.torch_tile).

An FP8 source weight (rtnq.checkpoint.fp8) is dequantized on the reader thread, a run of whole rows at a
time, so the main thread gets the same 16-bit rows as from a 16-bit source, and an FP8 weight that
passes through is written as those dense rows; its scale tensor is read whole once, and never written.

Under --rotate the reader is the rotation's (rtnq.commands.rotate.RotatedReader): each tensor the rotation
changes is rotated whole on the reader thread when its first chunk is asked for, and handed on in the same
chunks as a source tensor would be.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from rtnq import dtypes
from rtnq.checkpoint import fp8, pipeline
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.journal import Journal
from rtnq.checkpoint.shards import sharded_output
from rtnq.checkpoint.writer import write_text
from rtnq.checkpoint.source import open_reader
from rtnq.commands.convert import resume
from rtnq.commands.convert.outputs import build_manifest, write_config
from rtnq.commands.convert.plan import ConvertPlan, Item
from rtnq.errors import InvalidWeightError
from rtnq.numerics import cpu, halfcast

CHUNK_BYTES = 8 * 1024 * 1024  # one read: large enough for few syscalls, small enough to stay in cache
IN_FLIGHT = 4  # chunks mapped at once: read ahead of the quantizer, passthrough ones being written (each
# counts towards RSS while mapped: 4 keep the peak under 128 MiB, issue 15, at no measurable cost in time)
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


def _tile(scale: str):
    """The chunk kernel: None for the C library (both scale rules), else the torch reference (imports torch)."""
    if cpu.library() is not None:
        return None
    from rtnq.numerics import fused

    return fused.torch_tile(scale)


def quantize_item(
    item: Item,
    w: np.ndarray | Iterable[np.ndarray],
    out: tuple[np.ndarray, np.ndarray] | None = None,
    layout: str = "marlin",
    scale: str = "absmax",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Source weight -> (packed codes, scales, relative error of the dequantized weight) in `layout`.

    w: the whole weight, or its rows in order as (R, k) chunks (R a multiple of 64, within one
    expert of a 3-D weight), numpy arrays in the source dtype's storage (dtypes.DType.numpy; an FP8
    weight's chunks come dense in the item's 16-bit dtype); each chunk is cast to that 16-bit dtype.
    out: preallocated (codes int32, scales) with the planned shapes, filled in place.
    Same bytes as the format's reference packing of rtn.quantize(w16, ...); the error is rtn.relative_error's.
    """
    d, spec = item.decision, item.spec
    qst = item.quant_dtype.st
    src = qst if item.fp8 else spec.dtype
    *lead, n, k = spec.shape
    experts = lead[0] if lead else 1
    if isinstance(w, np.ndarray):
        w = list(w.reshape(experts, n, k))
    if out is None:
        out = (np.empty(item.outputs[0].shape, dtype=np.int32), np.empty(item.outputs[1].shape,
                                                                           dtype=item.quant_dtype.numpy))
    qweight, scales = out
    q3 = qweight.reshape(experts, *qweight.shape[-2:])
    s3 = scales.reshape(experts, *scales.shape[-2:])
    tile = _tile(scale)
    sums = [0.0, 0.0]
    done = 0  # rows of the (experts * n, k) weight quantized so far
    for chunk in w:
        e, row0 = divmod(done, n)
        try:
            cpu.quantize_rows(halfcast.cast(chunk, src, qst), row0, q3[e], s3[e], d.bits, d.group_size, sums,
                              name=spec.name, layout=layout, tile=tile, scale=scale)
        except InvalidWeightError:
            halfcast.raise_if_cast_overflow(chunk, src, qst, spec.name)
            raise
        done += chunk.shape[0]
    if done != experts * n:
        raise ValueError(f"{spec.name}: got {done} rows, expected {experts * n}")
    cpu.check_scales(scales, spec.name)  # the C kernel writes an overflowed scale as inf: refuse it here
    return qweight, scales, cpu.relative_error(sums)


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
    rows = max(cpu.ROW_ALIGN, CHUNK_BYTES // dense_row // cpu.ROW_ALIGN * cpu.ROW_ALIGN)
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
    # under --rotate every read is of the rotated checkpoint (commands.rotate.RotatedReader, which imports torch)
    with open_reader(plan.src, plan.rotation) as reader, sharded_output(plan.out, plan.options.force, plan.shards, plan.shard_metadata,
                                                    stop=stop, src=plan.src, small_files=plan.small_files,
                                                    journal=journal) as so, \
            contextlib.ExitStack() as staging:
        # The reader thread starts once the output directory exists, and is joined on any failure.
        dense = fp8.DenseFetch(reader, fp8.dense_dtype(plan.options.dtype).st)
        jobs = [(functools.partial(dense, item.fp8) if item.fp8 else functools.partial(reader.map_array, item.spec),
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
                    buf, out = out_pool.get_arrays([(q_entry.shape, np.int32, q_entry.nbytes),
                                                    (s_entry.shape, item.quant_dtype.numpy, s_entry.nbytes)])
                    # an FP8 weight's chunks arrive dense, in the dtype it is quantized in
                    rows = prefetch.rows(index, (item.quant_dtype if item.fp8 else dtypes.BY_ST[item.spec.dtype]).numpy,
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
