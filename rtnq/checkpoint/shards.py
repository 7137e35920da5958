"""Writing a sharded output checkpoint: the skeleton `rtnq convert` and `rtnq dequantize` share.

    with sharded_output(out, force, shards, metadata, stop=stop, src=src, small_files=files) as so:
        for fname, writer in so.shards():       # one ShardWriter per planned file, in order
            so.behind.submit(writer.write, ...)  # the command's tensors, written behind on a thread
        ...                                      # then config.json, the manifest: into so.tmp

Shards are finished and fsynced on the write-behind threads (rtnq.checkpoint.pipeline). On success the
index and the small files are added and the temporary directory is renamed to OUT; on any error
(Ctrl-C included) the writers stop, the callbacks given to `on_abort` run (e.g. joining a reader thread,
so nothing touches the directory while it is removed) and the directory is deleted (rtnq.checkpoint.outdir).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rtnq.checkpoint import pipeline
from rtnq.checkpoint.layout import INDEX_NAME
from rtnq.checkpoint.outdir import atomic_dir
from rtnq.checkpoint.writer import Entry, ShardWriter, raise_os, write_index
from rtnq.errors import CheckpointError


class ShardedOutput:
    """The shards being written into `tmp`, and the write-behind threads they go through."""

    def __init__(self, tmp: Path, shards: list[tuple[str, list[Entry]]], metadata: dict[str, str],
                 stop: threading.Event):
        self.tmp = tmp
        self.behind = pipeline.WriteBehind(stop)
        self._shards = shards
        self._metadata = metadata
        self._writers: list[ShardWriter] = []
        self._cleanups: list[Callable[[], None]] = []

    def on_abort(self, fn: Callable[[], None]) -> None:
        """Run `fn` if the output fails, after the writers stopped and before the directory is removed
        (e.g. joining a reader thread, so nothing still touches the files)."""
        self._cleanups.append(fn)

    def shards(self) -> Iterator[tuple[str, ShardWriter]]:
        """(file name, its writer) for each planned shard; once the caller moves on, the shard is
        finished (every tensor checked as written) and fsynced behind."""
        for fname, entries in self._shards:
            writer = ShardWriter(self.tmp / fname, entries, self._metadata, writeback=self.behind.writeback)
            self._writers.append(writer)
            yield fname, writer
            self.behind.submit(writer.finish)
            self.behind.sync_later(writer.sync_close)

    def close_files(self) -> None:
        """Close every shard file without finishing it (after an error)."""
        for writer in self._writers:
            writer.abort()


@contextlib.contextmanager
def sharded_output(out: Path, force: bool, shards: list[tuple[str, list[Entry]]], metadata: dict[str, str], *,
                   stop: threading.Event, src: Path, small_files: Sequence[str] = ()) -> Iterator[ShardedOutput]:
    with atomic_dir(out, force) as tmp:
        so = ShardedOutput(tmp, shards, metadata, stop)
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
