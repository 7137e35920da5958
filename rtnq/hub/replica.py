"""A header-only stand-in of a hub model, in RAM, so the local checkpoint code validates it unchanged.

`layout.shard_files` and `source.scan` take a directory. Rather than restate their rules (index vs single file,
numbered sets, pickle-only repos, header limits, offsets, gaps, the index matching the shards) for bytes that came
over the network, the hub code builds a directory they can read: every top-level file of the repo as an empty
placeholder, the index as itself, and each shard as its real header followed by a hole up to the shard's real
size (a sparse file: no bytes are written or stored for the hole). The directory lives on /dev/shm where there is
one (RAM, nothing reaches the disk), else in the temporary directory, and is removed when done.

Errors name the replica's path; `Replica.errors` rewrites it to the repo's name so the line a user sees names
ORG/NAME@commit. Once source.py parses header bytes directly (a `parse_header_bytes(raw, size, shard)` split out
of `_parse_header`) and layout picks shards from a list of names, this module can go.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from rtnq.errors import RtnqError

RAM_DIR = "/dev/shm"


class Replica:
    def __init__(self, label: str):
        self.label = label
        base = RAM_DIR if os.path.isdir(RAM_DIR) and os.access(RAM_DIR, os.W_OK) else None
        self.dir = Path(tempfile.mkdtemp(prefix="rtnq-hub-", dir=base))

    def placeholders(self, names: Iterable[str]) -> None:
        """Empty files for the repo's top-level names (what `shard_files` lists and globs)."""
        for name in names:
            if "/" not in name and name not in ("", ".", ".."):
                (self.dir / name).touch()

    def copy(self, name: str, source: Path) -> None:
        shutil.copyfile(source, self.dir / name)

    def shard(self, name: str, head: bytes, size: int) -> None:
        """`head` (the first bytes of the shard) then a hole up to `size`."""
        with open(self.dir / name, "wb") as f:
            f.write(head[:size])
            f.truncate(size)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        """Re-raise rtnq's errors with the replica's path replaced by the repo's label."""
        try:
            yield
        except RtnqError as e:
            text = str(e).replace(str(self.dir), self.label)
            if text == str(e):
                raise
            raise type(e)(text) from None

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
