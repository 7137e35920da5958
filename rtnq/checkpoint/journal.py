"""The journal of a conversion: which output shards in its temporary directory are complete.

A run killed where no handler runs (SIGKILL, power loss, the OOM killer) leaves `.OUT.rtnq-tmp-*` behind;
`rtnq convert ... --resume` continues it from this file instead of starting over. `rtnq_journal.json`:

    {"journal": 1,
     "fingerprint": "<sha256 of the canonical JSON of plan>",
     "plan": {...},                      # what the output depends on (rtnq.commands.convert.resume)
     "shards": [{"file": "model-00001-of-00003.safetensors", "size": 123, "parts_crc32": "<of its bytes>",
                 ...notes, e.g. "errors": {tensor: the manifest's error}}, ...]}   # in completion order

`parts_crc32` (rtnq.checkpoint.writer.combine) is a sha256 of the CRC-32s of the shard's header and of each
tensor's bytes: the writer computes it as it writes, in whatever order the tensors come, so recording a
shard reads nothing back from the disk (issue 15: re-reading and hashing every shard cost a quarter of a
conversion's CPU; writer.Crc32 says why CRC-32 is enough). `--resume` recomputes it from the file
(`parts_digest`). Entries of older journals, with sha256 parts ("parts_digest") or a plain "sha256" of the
whole file, are checked as such.

A shard is recorded only after it was finished and fsynced, from the fsync thread, so a recorded shard
is on disk whatever happens next; the journal itself is replaced atomically (temporary name, fsync,
rename, fsync of the directory), so a crash leaves the old journal or the new one, never half of one.
The running process holds an flock on the directory: a second rtnq cannot resume a run still in
progress (the lock dies with the process, SIGKILL included). The journal is deleted just before the
directory is renamed to OUT: it is not part of the output.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

from rtnq.checkpoint import jsonfile
from rtnq.checkpoint.writer import DIGEST_KEY, PART_HASHES, combine, raise_os, start_writeback
from rtnq.errors import CheckpointError, UsageError

JOURNAL_NAME = "rtnq_journal.json"
VERSION = 1
_HASH_CHUNK = 8 * 1024 * 1024


def digest(obj: object) -> str:
    """sha256 of a canonical JSON encoding (sorted keys, no spaces): equal objects, equal digests."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True)
    return hashlib.sha256(raw.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, a chunk at a time; its pages are dropped after (the shards were written
    with the page cache kept clear, see writer.start_writeback, and reading them back should not undo it)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        start_writeback(f.fileno(), 0, 0)  # 0 length: the whole file
    return h.hexdigest()


class Journal:
    """The plan record and the completed shards; bound to a directory by `start` (or `load`)."""

    def __init__(self, plan: dict, shards: list[dict] | None = None, directory: Path | None = None):
        self.plan = plan
        self.fingerprint = digest(plan)
        self.shards = list(shards or [])
        self.directory = directory  # set: a directory to continue (load); None: a fresh one comes
        self._lock = threading.Lock()
        self._fd: int | None = None

    @property
    def completed(self) -> dict[str, dict]:
        return {e["file"]: e for e in self.shards}

    def start(self, tmp: Path) -> None:
        """Own `tmp`: lock it, delete everything in it but the completed shards (a partial shard, an earlier
        config or manifest: all written again, so the file set is the fresh run's), write the journal."""
        self.directory = Path(tmp)
        self._fd = _lock(self.directory)
        keep = set(self.completed) | {JOURNAL_NAME}
        try:
            for p in self.directory.iterdir():
                if p.name not in keep:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError as e:
            raise_os(self.directory, e)
        with self._lock:
            self._save()

    def record(self, fname: str, notes: dict, digest: str | None = None) -> None:
        """Shard `fname` is finished and fsynced: add it (called on the fsync thread, in completion order).
        digest: its DIGEST_KEY digest as the writer computed it; None: computed from the file."""
        path = self.directory / fname
        try:
            entry = {"file": fname, "size": path.stat().st_size,
                     DIGEST_KEY: digest if digest is not None else parts_digest(path), **notes}
        except OSError as e:
            raise_os(path, e)
        with self._lock:
            self.shards.append(entry)
            self._save()

    def _save(self) -> None:
        body = {"journal": VERSION, "fingerprint": self.fingerprint, "plan": self.plan, "shards": self.shards}
        path = self.directory / JOURNAL_NAME
        part = self.directory / f".{JOURNAL_NAME}.new"
        try:
            with open(part, "w") as f:
                json.dump(body, f, indent=1, sort_keys=True, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)
            os.fsync(self._fd)  # the rename itself must reach the disk before the shard counts as done
        except OSError as e:
            raise_os(path, e)

    def close(self, remove: bool) -> None:
        """Release the lock; remove the journal file first when the output is complete."""
        if remove and self.directory is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / JOURNAL_NAME).unlink()
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def load(tmp: Path) -> Journal:
    """The journal in `tmp`; a UsageError naming the file if it is not one rtnq wrote (what to do is the
    user's choice, as for any --resume refusal: remove the directory)."""
    path = Path(tmp) / JOURNAL_NAME
    data = jsonfile.read_object(path, error=UsageError)
    bad = f"{path}: not a journal this rtnq can resume from; remove {tmp} (rm -r '{tmp}') and convert again"
    shards = data.get("shards")
    if data.get("journal") != VERSION or not isinstance(data.get("plan"), dict) or not isinstance(shards, list):
        raise UsageError(bad)
    for e in shards:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("size"), int)
                and any(isinstance(e.get(key), str) for key in (*PART_HASHES, "sha256"))):
            raise UsageError(bad)
    j = Journal(data["plan"], shards, Path(tmp))
    if j.fingerprint != data.get("fingerprint"):  # the plan record was edited or damaged
        raise UsageError(bad)
    return j


def check(entry: dict, directory: Path) -> str | None:
    """Why a recorded shard cannot be trusted (missing, another size, other bytes), or None if it can."""
    path = Path(directory) / entry["file"]
    try:
        if not path.is_file() or path.is_symlink():
            return "missing"
        if path.stat().st_size != entry["size"]:
            return "size differs"
        key = next((k for k in PART_HASHES if isinstance(entry.get(k), str)), None)
        if (key is not None and parts_digest(path, key) != entry[key]) \
                or (key is None and file_sha256(path) != entry["sha256"]):
            return "content differs"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except CheckpointError:  # its header does not parse: not the file that was recorded
        return "content differs"
    return None


def parts_digest(path: Path, key: str = DIGEST_KEY) -> str:
    """The parts digest (writer.combine, with the part hash PART_HASHES[key]) of a safetensors file on disk, a
    chunk at a time; its pages are dropped after, as in `file_sha256`. CheckpointError when its header is not
    a valid one."""
    from rtnq.checkpoint.source import scan_shard

    specs = scan_shard(Path(path))  # file order; validated: the tensors cover the data exactly
    with open(path, "rb", buffering=0) as f:
        start = specs[0].offset if specs else os.fstat(f.fileno()).st_size
        part_hash = PART_HASHES[key]
        hashes = [part_hash(os.pread(f.fileno(), start, 0)).hexdigest()]
        for spec in specs:
            h = part_hash()
            for at in range(spec.offset, spec.offset + spec.nbytes, _HASH_CHUNK):
                h.update(os.pread(f.fileno(), min(_HASH_CHUNK, spec.offset + spec.nbytes - at), at))
            hashes.append(h.hexdigest())
        start_writeback(f.fileno(), 0, 0)
    return combine(hashes[0], hashes[1:])


def count(n: int, adjective: str = "") -> str:
    """"1 shard", "3 complete shards"."""
    return f"{n} {adjective}shard" + ("" if n == 1 else "s")


def has_journal(tmp: Path) -> bool:
    return (Path(tmp) / JOURNAL_NAME).is_file()


def completed_count(tmp: Path) -> int | None:
    """How many shards the journal in `tmp` records (for the stale-directory warning), None if unreadable."""
    try:
        shards = json.loads((Path(tmp) / JOURNAL_NAME).read_text()).get("shards")
    except (OSError, ValueError, AttributeError):
        return None
    return len(shards) if isinstance(shards, list) else None


def in_use(tmp: Path) -> bool:
    """A running rtnq holds `tmp`'s lock (it is converting into it right now)."""
    try:
        fd = _lock(Path(tmp))
    except UsageError:
        return True
    os.close(fd)
    return False


def _lock(directory: Path) -> int:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise_os(directory, e)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{directory} is in use by a running rtnq convert; wait for it or stop it first") from None
    return fd
