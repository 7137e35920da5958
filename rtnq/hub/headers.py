"""Plan a hub conversion from the shards' headers alone: two small ranged reads per shard, no weights.

A safetensors file starts with 8 bytes (the header's length n, little-endian) and n bytes of JSON. One
speculative GET of the first `first_read` bytes (64 KiB: the whole header of most shards) and, only when the header
is longer, a second GET of the rest; a 5 GB shard costs ~64 KiB, far under 1% of the download. A shard already
in the client's cache is read from there (no request). The bytes are validated by exactly the local code
(`source.scan` over a header-only replica, rtnq.hub.replica), so a hub model is refused for the same reasons,
with the same messages, as the same files on disk.

`fetch_small_files` copies the files convert copies or reads (config.json, the index, tokenizer files, ...)
into a directory, through the client's cache, so the local planner's directory functions work on it unchanged.
"""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from rtnq.checkpoint import layout, source
from rtnq.checkpoint.source import TensorSpec
from rtnq.errors import CheckpointError
from rtnq.hub.client import (
    DEFAULT_RETRY,
    Retry,
    hub_errors,
    offline_error,
    with_retries,
)
from rtnq.hub.replica import Replica
from rtnq.hub.repo import HubRepo

FIRST_READ = 64 * 1024


@dataclass
class ReadStats:
    """What planning cost on the network: requests made and body bytes received."""

    requests: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class RemoteScan:
    specs: list[TensorSpec]  # as source.scan gives them: shard by shard, in file order
    stats: ReadStats = field(default_factory=ReadStats)

    @property
    def bytes_read(self) -> int:
        return self.stats.bytes


def read_range(repo: HubRepo, path: str, start: int, length: int, stats: ReadStats) -> tuple[bytes, int | None]:
    """Bytes [start, start + length) of a file (fewer at its end) and the file's size where the answer says it.
    A server that ignores Range is read only as far as needed, then the connection is dropped."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    cfg = repo.config
    headers = {**cfg.headers(), "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", repo.url(path), headers=headers, timeout=cfg.timeout) as r:
        stats.requests += 1
        if r.status_code >= 400:
            r.read()  # the error's body (small) for the client's message
            hf_raise_for_status(r)
        total = None
        if r.status_code == 206:
            unit, _, rest = r.headers.get("Content-Range", "").partition(" ")
            first, size = rest.partition("-")[0], rest.rpartition("/")[2]
            if unit != "bytes" or not first.isdigit() or int(first) != start:
                raise CheckpointError(f"{repo.label}/{path}: the hub answered bytes {rest or '?'} to a request for "
                                      f"bytes {start}-; is HF_ENDPOINT a hub?")
            total = int(size) if size.isdigit() else None
        elif r.status_code == 200:
            if start:
                raise CheckpointError(f"{repo.label}/{path}: the hub ignores ranged requests; is HF_ENDPOINT a hub?")
        else:
            raise CheckpointError(f"{repo.label}/{path}: the hub answered HTTP {r.status_code} to a ranged request")
        buf = bytearray()
        for chunk in r.iter_bytes():
            buf += chunk
            if len(buf) >= length:
                break
        stats.bytes += len(buf)
        return bytes(buf[:length]), total


def shard_head(repo: HubRepo, shard: str, stats: ReadStats, first_read: int = FIRST_READ,
               retry: Retry = DEFAULT_RETRY) -> tuple[bytes, int]:
    """The first 8 + n bytes of a shard (its whole header; fewer if the file is shorter or the length absurd,
    which the local validation then reports) and the shard's size."""
    cached = repo.cached(shard)
    if cached is not None:
        with open(cached, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            return head + f.read(min(n, source.MAX_HEADER_BYTES)), cached.stat().st_size
    if repo.config.offline:
        raise offline_error(repo.config, f"{repo.repo_id}@{repo.revision}", shard)

    def get(start: int, length: int) -> tuple[bytes, int | None]:
        return with_retries(lambda: read_range(repo, shard, start, length, stats), retry)

    with hub_errors(repo.config, repo.repo_id, repo.revision, shard):
        head, total = get(0, max(8, first_read))
        size = repo.files[shard].size if shard in repo.files and repo.files[shard].size is not None else total
        if size is None:
            raise CheckpointError(f"{repo.label}/{shard}: the hub gives no size for it")
        if total is not None and total != size:
            raise CheckpointError(f"{repo.label}/{shard}: the hub lists {size} bytes but serves {total}; "
                                  "the repo is inconsistent")
        if len(head) >= 8:
            n = struct.unpack("<Q", head[:8])[0]
            want = 8 + n
            if n <= source.MAX_HEADER_BYTES and want <= size and len(head) < want:
                rest, _ = get(len(head), want - len(head))
                head += rest
            head = head[:want]
    return head, size


def remote_specs(repo: HubRepo, first_read: int = FIRST_READ, retry: Retry = DEFAULT_RETRY) -> RemoteScan:
    """Every tensor of the repo, as `source.scan` would give it for the downloaded files, from the headers only."""
    stats = ReadStats()
    with Replica(repo.label) as rep:
        rep.placeholders(n for n in repo.files if n != layout.INDEX_NAME)
        if layout.INDEX_NAME in repo.files:
            rep.copy(layout.INDEX_NAME, repo.download(layout.INDEX_NAME))
        for shard in repo.shards:
            head, size = shard_head(repo, shard, stats, first_read, retry)
            rep.shard(shard, head, size)
        with rep.errors():
            specs = source.scan(rep.dir)
    return RemoteScan(specs, stats)


def small_file_names(repo: HubRepo) -> list[str]:
    """The top-level files a conversion reads or copies: config.json, the index, quantize_config.json and what
    `layout.small_files` would copy (no weights, nothing over MAX_COPY_BYTES)."""
    keep = []
    for name, f in sorted(repo.files.items()):
        if "/" in name or name in repo.shards:
            continue
        if Path(name).suffix in layout.WEIGHT_SUFFIXES or (f.size or 0) > layout.MAX_COPY_BYTES:
            continue
        keep.append(name)
    return keep


def fetch_small_files(repo: HubRepo, dest: Path) -> list[str]:
    """Copy the small files into `dest` (created), downloading through the client's cache what is not there."""
    dest.mkdir(parents=True, exist_ok=True)
    names = small_file_names(repo)
    for name in names:
        shutil.copyfile(repo.download(name), dest / name)
    return names
