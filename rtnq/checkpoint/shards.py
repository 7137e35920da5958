"""Writing a sharded output checkpoint: the skeleton `rtnq convert` and `rtnq dequantize` share.

    with sharded_output(out, force, shards, metadata, stop=stop, src=src, small_files=files) as so:
        for fname, writer in so.shards():       # one ShardWriter per planned file, in order
            so.behind.submit(writer.write, ...)  # the command's tensors, written behind on a thread
        ...                                      # then config.json, the manifest: into so.tmp

Shards are finished and fsynced on the write-behind threads (rtnq.checkpoint.pipeline); with a journal
(rtnq.checkpoint.journal, convert's), each is then recorded as complete, and the shards a resumed run's
journal already holds are not yielded at all. On success the
index and the small files are added and the temporary directory is renamed to OUT; on any error
(Ctrl-C included) the writers stop, the callbacks given to `on_abort` run (e.g. joining a reader thread,
so nothing touches the directory while it is removed) and the directory is deleted (rtnq.checkpoint.outdir).
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rtnq.checkpoint import pipeline
from rtnq.checkpoint.journal import Journal
from rtnq.checkpoint.layout import INDEX_NAME
from rtnq.checkpoint.outdir import atomic_dir
from rtnq.checkpoint.writer import Entry, ShardWriter, raise_os, write_index
from rtnq.errors import CheckpointError


class ShardedOutput:
    """The shards being written into `tmp`, and the write-behind threads they go through."""

    def __init__(self, tmp: Path, shards: list[tuple[str, list[Entry]]], metadata: dict[str, str],
                 stop: threading.Event, journal: Journal | None = None):
        self.tmp = tmp
        self.journal = journal
        self.skipped = set(journal.completed) if journal else set()  # complete before this run started
        self.behind = pipeline.WriteBehind(stop)
        self._shards = shards
        self._metadata = metadata
        self._writers: list[ShardWriter] = []
        self._cleanups: list[Callable[[], None]] = []

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run `fn` if the output fails, after the writers stopped and before the directory is removed
        (e.g. joining a reader thread, so nothing still touches the files)."""
        self._cleanups.append(fn)

    def shards(self, notes: Callable[[str], dict] | None = None) -> Iterator[tuple[str, ShardWriter]]:
        """(file name, its writer) for each planned shard not complete already; once the caller moves on,
        the shard is finished (every tensor checked as written) and fsynced behind, then journaled with
        notes(file name) (taken now, on the caller's thread: e.g. the errors it measured for the shard)."""
        for fname, entries in self._shards:
            if fname in self.skipped:
                continue
            # ShardWriter opens with "wb": a partial file of the interrupted run is truncated, not patched.
            writer = ShardWriter(self.tmp / fname, entries, self._metadata, writeback=self.behind.writeback,
                                 digest=self.journal is not None)
            self._writers.append(writer)
            yield fname, writer
            self.behind.submit(writer.finish)
            self.behind.sync_later(functools.partial(self._synced, writer, fname, notes(fname) if notes else {}))

    def _synced(self, writer: ShardWriter, fname: str, notes: dict) -> None:
        writer.sync_close()
        if self.journal is not None:  # only now: a shard the journal lists is on disk whatever happens next
            self.journal.record(fname, notes, writer.digest())

    def close_files(self) -> None:
        """Close every shard file without finishing it (after an error)."""
        for writer in self._writers:
            writer.abort()


@contextlib.contextmanager
def sharded_output(out: Path, force: bool, shards: list[tuple[str, list[Entry]]], metadata: dict[str, str], *,
                   stop: threading.Event, src: Path, small_files: Sequence[str] = (),
                   journal: Journal | None = None) -> Iterator[ShardedOutput]:
    """journal: record completed shards in the temporary directory (a fresh journal), or continue the
    directory a loaded one belongs to, skipping the shards it holds (--resume)."""
    with atomic_dir(out, force, reuse=journal.directory if journal else None) as tmp:
        complete = False
        try:
            if journal is not None:
                journal.start(tmp)
            so = ShardedOutput(tmp, shards, metadata, stop, journal)
            try:
                yield so
                so.behind.finish()
            except BaseException:
                so.behind.abort()  # sets `stop`: every thread of the pipeline winds down
                for fn in so._cleanups:
                    fn()
                so.close_files()
                raise
            write_index(tmp, shards, INDEX_NAME)
            for name in small_files:
                copy_small_file(src / name, tmp / name)
            complete = True
        finally:
            if journal is not None:
                journal.close(remove=complete)  # the journal is no part of OUT; on failure the directory goes


def check_readable(src: Path, names: Sequence[str]) -> None:
    """Open every small file to be copied before any weight is converted: an unreadable tokenizer must
    stop the run at once, not after an hour of conversion."""
    for name in names:
        try:
            with open(src / name, "rb"):
                pass
        except OSError as e:
            raise CheckpointError(f"{src / name}: cannot read ({e.strerror or e}); rtnq copies it into OUT") from None


def copy_small_file(a: Path, b: Path) -> None:
    """Copy a tokenizer/generation-config file; a read failure is the source's, a write failure OUT's."""
    try:
        fin = open(a, "rb")
    except OSError as e:
        raise CheckpointError(f"{a}: cannot read ({e.strerror or e})") from None
    with fin:
        try:
            with open(b, "wb") as fout:
                shutil.copyfileobj(fin, fout)
            shutil.copystat(a, b)
        except OSError as e:
            if e.filename == str(a):
                raise CheckpointError(f"{a}: cannot read ({e.strerror or e})") from None
            raise_os(b, e)
