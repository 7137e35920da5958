"""Overlapped conversion I/O: a reader thread ahead of the quantizer, a writer thread behind it.

    reader thread   maps each planned tensor, in processing order, a chunk at a time (page cache,
                    no copy; see Reader.map_range), at most a few chunks ahead
    main thread     quantizes chunks into an output buffer (the C fast path drops the GIL and
                    splits each chunk across the cores); passthrough chunks go straight on
    writer thread   writes finished tensors and passthrough chunks at their planned offsets,
                    returns each buffer to its pool
    fsync thread    starts the disk on each 32 MB written (writer.start_writeback) and fsyncs each
                    finished shard, so the writer thread never waits for the disk

Chunks in flight and output buffers are bounded (a few chunks, two quantized tensors), so memory does
not depend on the model size, and a fast stage waits for a slow one instead of queueing data. Errors
in any thread are re-raised in the main thread with their own type; on any error the writer calls
`WriteBehind.abort`, sets the stop flag and joins the reader, so nothing writes into the temporary
output directory after it starts being removed (rtnq.checkpoint.shards does that for both commands).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from rtnq.checkpoint.writer import start_writeback

_POLL = 0.05  # seconds between checks of the stop flag while blocked


class Stopped(Exception):
    """The pipeline was closed while a thread waited (never seen by callers of `run`)."""


class Pool:
    """Up to `count` reusable byte buffers (numpy) of `nbytes` each, allocated on first use."""

    def __init__(self, count: int, nbytes: int, stop: threading.Event):
        self.nbytes = nbytes
        self._free: queue.Queue[np.ndarray] = queue.Queue()
        self._left = count
        self._lock = threading.Lock()
        self._stop = stop

    def get(self, nbytes: int) -> np.ndarray:
        """A buffer (its first `nbytes` bytes); waits for one to be returned when all are out."""
        if nbytes > self.nbytes:
            raise ValueError(f"buffer of {nbytes} bytes requested from a pool of {self.nbytes}-byte buffers")
        with self._lock:
            if self._free.empty() and self._left > 0:
                self._left -= 1
                return np.empty(self.nbytes, dtype=np.uint8)[:nbytes]
        while True:
            try:
                buf = self._free.get(timeout=_POLL)
            except queue.Empty:
                if self._stop.is_set():
                    raise Stopped from None
                continue
            return buf[:nbytes]

    def get_arrays(self, parts: list[tuple[tuple[int, ...], np.dtype, int]]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One buffer cut into arrays of the given (shape, dtype, nbytes), back to back. Give the
        buffer back with `put` once every one of them has been written."""
        buf = self.get(sum(nbytes for *_, nbytes in parts))
        out, at = [], 0
        for shape, dtype, nbytes in parts:
            out.append(buf[at : at + nbytes].view(dtype).reshape(shape))
            at += nbytes
        return buf, out

    def put(self, buf: np.ndarray) -> None:
        self._free.put(buf.base if buf.base is not None else buf)


class Slots:
    """At most `count` chunks in flight: `acquire` waits for a `release`."""

    def __init__(self, count: int, stop: threading.Event):
        self._sem = threading.Semaphore(count)
        self._stop = stop

    def acquire(self) -> None:
        while not self._sem.acquire(timeout=_POLL):
            if self._stop.is_set():
                raise Stopped

    def release(self, *_) -> None:
        self._sem.release()


class Prefetcher:
    """Fetches `jobs` in order on a thread: each job is (fetch(start, nbytes) -> uint8 array, [(start, nbytes), ...]).

    Each chunk holds one of `slots` until the consumer releases it.
    """

    def __init__(self, jobs: list[tuple[Callable[[int, int], np.ndarray], list[tuple[int, int]]]], slots: Slots,
                 stop: threading.Event):
        self._jobs = jobs
        self._slots = slots
        self._stop = stop
        self._ready: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="rtnq-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for index, (fetch, ranges) in enumerate(self._jobs):
                for start, nbytes in ranges:
                    self._slots.acquire()
                    self._ready.put((index, fetch(start, nbytes)))
        except Stopped:
            pass
        except BaseException as e:  # re-raised in the main thread by `chunks`
            self._ready.put((-1, e))

    def chunks(self, index: int):
        """The chunks of job `index`, in order; call for every job in order."""
        for _ in self._jobs[index][1]:
            while True:
                try:
                    got, payload = self._ready.get(timeout=_POLL)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._ready.empty():
                        raise RuntimeError("the reader thread stopped unexpectedly") from None
            if got == -1:
                raise payload
            if got != index:
                raise RuntimeError(f"reader out of order: got chunk of job {got}, expected {index}")
            yield payload

    def rows(self, index: int, dtype: np.dtype, k: int):
        """The chunks of job `index` as (R, k) arrays of `dtype`, in order. Each chunk's slot is
        released when the consumer asks for the next one, so it must not keep references to a chunk
        (the mapping goes away with the last one)."""
        for chunk in self.chunks(index):
            try:
                yield chunk.view(dtype).reshape(-1, k)
            finally:
                del chunk
                self._slots.release()

    def release(self, *_) -> None:
        """Give back one chunk's slot (for chunks taken with `chunks`, once they are written)."""
        self._slots.release()

    def join(self) -> None:
        self._thread.join()


class WriteBehind:
    """Runs write jobs in submission order on one thread; fsyncs run on another, overlapped."""

    def __init__(self, stop: threading.Event):
        self._stop = stop
        self._jobs: queue.Queue = queue.Queue()
        self._syncs: list[Future] = []
        self._sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtnq-fsync")
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="rtnq-write", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, release = job
            try:
                if self.error is None and not self._stop.is_set():
                    fn(*args)
            except BaseException as e:
                self.error = e
            finally:
                if release is not None:
                    release()

    def submit(self, fn: Callable, *args, release: Callable[[], None] | None = None) -> None:
        """Queue fn(*args); `release` runs after it (also when it is skipped after an error)."""
        if self.error is not None:
            raise self.error
        self._jobs.put((fn, args, release))

    def writeback(self, fd: int, offset: int, length: int) -> None:
        """Start the disk on a written range, on the fsync thread (it may wait for the disk there)."""
        self._syncs.append(self._sync_pool.submit(start_writeback, fd, offset, length))

    def sync_later(self, fn: Callable[[], None]) -> None:
        """Queue `fn` (an fsync-and-close) to run after the writes before it, off the write thread."""
        self.submit(lambda: self._syncs.append(self._sync_pool.submit(fn)))

    def finish(self) -> None:
        """Wait for every job and fsync; raise the first error."""
        self._jobs.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        for f in self._syncs:
            f.result()
        self._sync_pool.shutdown()

    def abort(self) -> None:
        """Skip what is queued, wait for the job in progress and any fsync, never raise."""
        self._stop.set()
        self._jobs.put(None)
        self._thread.join()
        self._sync_pool.shutdown(wait=True)
