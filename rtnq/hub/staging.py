"""Shards of a hub model on local disk one at a time: at most two staged, one being converted, one downloading.

    with Staging(repo, repo.shards, directory) as st:
        for shard in repo.shards:
            path = st.wait(shard)   # directory/shard: downloaded and verified (or a link into the client's cache)
            ...convert it...
            st.release(shard)       # deletes it; the download after the next one may start

A background thread downloads shards in order while the converter works on the previous one, so the network
and the CPU overlap, and disk use stays at two shards whatever the model's size (`peak_bytes` measures it; the
client's cache is not used for shards, since a 140 GB model would stay there after the conversion). A shard the
cache already holds is linked, not downloaded, and release removes only the link.

The client verifies sizes, not contents, so every byte is hashed as it arrives and checked against the hub's LFS
sha256. A dropped connection resumes where it stopped (Range), a 5xx or a hash mismatch retries (the mismatch from
the start), `retry` bounding the attempts and the backoff; what still fails is one typed line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from rtnq.errors import CheckpointError, OutputError
from rtnq.hub.client import (
    DEFAULT_RETRY,
    Retry,
    Transient,
    hub_errors,
    offline_error,
    with_retries,
)
from rtnq.hub.repo import HubRepo

_RELEASED = "released"


class _Stopped(Exception):
    """The staging was closed while a download ran (the converter failed or was interrupted)."""


class _Part:
    """The shard being downloaded: the file, the sha256 of its bytes so far, and their count."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.size += len(data)

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.hash = hashlib.sha256()
        self.size = 0

    def close(self) -> None:
        self.file.close()


class Staging:
    """Download `shards` of `repo` into `directory`, `ahead` beyond the one in use (1: two on disk at most)."""

    def __init__(self, repo: HubRepo, shards: list[str] | None, directory: str | Path, *, ahead: int = 1,
                 retry: Retry = DEFAULT_RETRY):
        self.repo = repo
        self.shards = list(repo.shards if shards is None else shards)
        unknown = [s for s in self.shards if s not in repo.shards]
        if unknown:
            raise ValueError(f"{unknown[0]} is not a shard of {repo.label}")
        self.dir = Path(directory)
        self.capacity = 1 + ahead
        self.retry = retry
        self.peak_bytes = 0  # most bytes staged at once (finished shards not yet released + the one downloading)
        self.peak_shards = 0  # most shards staged at once
        self.downloaded_bytes = 0  # bytes received, retries included
        self.tries: dict[str, int] = {}  # download attempts per shard
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._state: dict[str, object] = {}  # shard -> Path (ready) | _RELEASED | the exception that stopped it
        self._staged: dict[str, int] = {}  # shards on disk (ready or downloading) -> their bytes there
        self._staged_bytes = 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- the converter's side -------------------------------------------------------------------------------------

    def __enter__(self) -> Staging:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="rtnq-hub-staging", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self, shard: str) -> Path:
        """The staged shard's path, once downloaded and verified; its download's error otherwise."""
        if shard not in self.shards:
            raise ValueError(f"{shard} is not staged by this Staging")
        with self._cond:
            while True:
                st = self._state.get(shard)
                if isinstance(st, Path):
                    return st
                if st == _RELEASED:
                    raise ValueError(f"{shard} was released already")
                if isinstance(st, BaseException):
                    raise st
                if self._error is not None:
                    raise self._error
                if shard not in self._staged and len(self._staged) >= self.capacity and all(
                        isinstance(self._state.get(s), Path) for s in self._staged):
                    raise RuntimeError(f"waiting for {shard} while {', '.join(self._staged)} are staged and unreleased:"
                                       " release them first (shards are staged in order)")
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("Staging is not running (use it as a context manager)")
                self._cond.wait(0.5)

    def release(self, shard: str) -> None:
        """Delete a staged shard (its link, for a cached one): the next download may start."""
        with self._cond:
            path = self._state.get(shard)
            if not isinstance(path, Path):
                raise ValueError(f"{shard} is not staged")
            path.unlink(missing_ok=True)
            self._state[shard] = _RELEASED
            self._staged_bytes -= self._staged.pop(shard)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop downloading and delete whatever is still staged."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.repo.config.timeout + 5)
        with self._cond:
            for shard, st in list(self._state.items()):
                if isinstance(st, Path):
                    st.unlink(missing_ok=True)
                    self._state[shard] = _RELEASED
            self._staged.clear()
            self._staged_bytes = 0

    # -- the download thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        for shard in self.shards:
            with self._cond:
                while len(self._staged) >= self.capacity and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                self._staged[shard] = 0
                self.peak_shards = max(self.peak_shards, len(self._staged))
            try:
                path = self._stage(shard)
            except BaseException as e:  # handed to whoever waits for this shard or a later one
                with self._cond:
                    self._staged_bytes -= self._staged.pop(shard, 0)
                    if not isinstance(e, _Stopped):
                        self._state[shard] = e
                        self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._state[shard] = path
                self._cond.notify_all()

    def _grow(self, shard: str, n: int) -> None:
        with self._cond:
            self._staged[shard] += n
            self._staged_bytes += n
            if n > 0:
                self.downloaded_bytes += n
            self.peak_bytes = max(self.peak_bytes, self._staged_bytes)

    def _stage(self, shard: str) -> Path:
        repo, cfg = self.repo, self.repo.config
        dest = self.dir / shard
        cached = repo.cached(shard)
        if cached is not None:
            dest.unlink(missing_ok=True)
            os.symlink(os.path.realpath(cached), dest)
            return dest
        if cfg.offline:
            raise offline_error(cfg, f"{repo.repo_id}@{repo.revision}", shard)
        part_path = self.dir / f".{shard}.rtnq-part"
        try:
            part = _Part(part_path)
        except OSError as e:
            raise OutputError(f"{part_path}: cannot write the staged shard ({e.strerror or e})") from None
        try:
            with hub_errors(cfg, repo.repo_id, repo.revision, shard):
                try:
                    with_retries(lambda: self._attempt(shard, part), self.retry, wait=self._stop.wait)
                except Transient as e:
                    raise CheckpointError(f"{e}, {self.tries[shard]} times; the download is corrupt (or the hub's "
                                          "record is): try again later") from None
            part.close()
            os.replace(part_path, dest)
            return dest
        finally:
            part.close()
            part_path.unlink(missing_ok=True)

    def _attempt(self, shard: str, part: _Part) -> None:
        """One GET of the shard into `part`, from where the last attempt stopped; Transient if the bytes are wrong."""
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if self._stop.is_set():
            raise _Stopped()
        self.tries[shard] = self.tries.get(shard, 0) + 1
        info = self.repo.files.get(shard)
        size, sha256 = (info.size, info.sha256) if info else (None, None)
        headers = {**self.repo.config.headers(), "Accept-Encoding": "identity"}
        if part.size:
            headers["Range"] = f"bytes={part.size}-"
        with get_session().stream("GET", self.repo.url(shard), headers=headers, timeout=self.repo.config.timeout) as r:
            if r.status_code >= 400:
                r.read()
                hf_raise_for_status(r)
            resumed = r.status_code == 206 and r.headers.get("Content-Range", "").startswith(f"bytes {part.size}-")
            if part.size and not resumed:  # the server sent the whole file: start over
                self._grow(shard, -part.size)
                part.restart()
            for chunk in r.iter_bytes():  # as it arrives: a drop loses nothing already received
                if self._stop.is_set():
                    raise _Stopped()
                try:
                    part.write(chunk)
                except OSError as e:
                    raise OutputError(f"{part.path}: cannot write the staged shard ({e.strerror or e}); staging "
                                      f"needs room for {self.capacity} shards") from None
                self._grow(shard, len(chunk))
        where = f"{self.repo.label}/{shard}"
        if size is not None and part.size != size:
            got = part.size
            self._grow(shard, -part.size)
            part.restart()
            raise Transient(f"{where}: received {got} bytes, the hub lists {size}")
        if sha256 is not None:
            digest = part.hash.hexdigest()
            if digest != sha256:
                self._grow(shard, -part.size)
                part.restart()
                raise Transient(f"{where}: the downloaded bytes hash to sha256 {digest[:12]}..., the hub lists "
                                f"{sha256[:12]}...")
