"""A model on the Hugging Face hub as `rtnq convert`'s source (`rtnq convert ORG/NAME[@REVISION] OUT`).

The plan needs no weight: the repo is resolved to one commit, its small files (config.json, the index,
the tokenizer) are fetched into a hidden directory beside OUT (`.OUT.rtnq-src-XXXX`, on OUT's disk), and
the tensors come from ranged reads of each shard's header (rtnq.hub.headers), so `--dry-run` on any
model reads kilobytes. The run then stages the shards into that same directory, one being converted and
one downloading ahead (rtnq.hub.staging), and deletes each as soon as its last tensor has been read:
staged disk stays at two shards whatever the model's size. Everything else in the converter sees an
ordinary model directory.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from rtnq.checkpoint.source import Reader, TensorSpec
from rtnq.errors import CheckpointError, RtnqError


@dataclass
class HubSource:
    repo: object  # rtnq.hub.repo.HubRepo
    view: Path  # the small files now, the staged shards during the run
    specs: list[TensorSpec]
    header_bytes: int  # bytes the plan read from the shards: their headers only
    stats: dict = field(default_factory=dict)  # after the run: downloaded and peak staged bytes

    @property
    def shard_bytes(self) -> int:
        return self.repo.shard_bytes

    def close(self) -> None:
        shutil.rmtree(self.view, ignore_errors=True)

    def plan_line(self) -> str:
        """What the plan read of the repo (a result line under --dry-run)."""
        total = max(self.shard_bytes, 1)
        return (f"source {self.repo.label} ({len(self.repo.shards)} shards, {self.shard_bytes / 1e9:.3f} GB): "
                f"planned from {self.header_bytes} bytes of shard headers ({self.header_bytes / total:.4%})")

    def run_line(self) -> str:
        """What the run downloaded and the most it held on disk at once (a result line)."""
        s = self.stats
        two = sum(sorted((self.repo.files[n].size or 0 for n in self.repo.shards), reverse=True)[:2])
        return (f"source {self.repo.label}: downloaded {s.get('downloaded', 0) / 1e9:.3f} GB of shards; at most "
                f"{s.get('peak_shards', 0)} staged at once, {s.get('peak_bytes', 0) / 1e9:.3f} GB "
                f"(the two largest shards: {two / 1e9:.3f} GB), each deleted once converted")

    @contextlib.contextmanager
    def staged(self, reader: Reader, jobs: list, touches: list[list[str]]) -> Iterator[list]:
        """Stage the shards for `jobs` (the converter's reader-thread fetches, in order; `touches[i]` the
        shards job i reads) and yield the jobs wrapped so each waits for its shards and releases a shard
        after its last read. Refused up front if the order would need more than two shards at once."""
        from rtnq.hub.staging import Staging

        last = {s: i for i, shards in enumerate(touches) for s in shards}
        first: dict[str, int] = {}
        for i, shards in enumerate(touches):
            for s in shards:
                first.setdefault(s, i)
        for i in range(len(touches)):
            live = [s for s in first if first[s] <= i <= last[s]]
            if len(live) > 2:
                raise CheckpointError(f"{self.repo.label}: converting needs {', '.join(live[:3])} on disk at once (a "
                                      "weight and its scale in different shards?); download the model first "
                                      "(`hf download`) and convert the directory")
        order = sorted(first, key=first.get)
        with Staging(self.repo, order, self.view) as st:
            yield [(self._fetch(fetch, i, len(ranges), touches[i], last, st, reader), ranges)
                   for i, (fetch, ranges) in enumerate(jobs)]
            self.stats = {"downloaded": st.downloaded_bytes, "peak_bytes": st.peak_bytes,
                          "peak_shards": st.peak_shards}

    @staticmethod
    def _fetch(fetch: Callable, index: int, n_chunks: int, shards: list[str], last: dict[str, int], st,
               reader: Reader) -> Callable:
        done = [0]

        def staged_fetch(start: int, nbytes: int):
            if done[0] == 0:
                for s in shards:
                    st.wait(s)  # returns at once when staged already
            chunk = fetch(start, nbytes)
            done[0] += 1
            if done[0] == n_chunks:
                # The chunk maps its pages: unlinking the file now frees them when the chunk goes (Linux).
                for s in shards:
                    if last[s] == index:
                        reader.close_shard(s)  # an open descriptor would keep the deleted file's blocks
                        st.release(s)
            return chunk

        return staged_fetch


def open_source(src: str, out: Path) -> HubSource | None:
    """The hub source for `src`, or None when `src` is a local path (or not a hub id at all)."""
    if Path(src).exists():
        return None
    from rtnq.hub.repo import parse_hub_id

    if parse_hub_id(str(src)) is None:
        return None
    from huggingface_hub.utils import disable_progress_bars

    from rtnq.hub import headers
    from rtnq.hub.repo import resolve_repo

    disable_progress_bars()  # rtnq reports on its own lines; tqdm bars would interleave with them on stderr
    try:
        repo = resolve_repo(str(src))
    except RtnqError as e:  # a mistyped local path reads like ORG/NAME too: say both
        raise type(e)(f"{src} is no local directory; as a hub id: {e}") from None
    view = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.rtnq-src-", dir=_existing_ancestor(Path(out))))
    try:
        headers.fetch_small_files(repo, view)
        scan = headers.remote_specs(repo)
    except BaseException:
        shutil.rmtree(view, ignore_errors=True)
        raise
    return HubSource(repo, view, scan.specs, scan.stats.bytes)


def _existing_ancestor(out: Path) -> Path:
    """OUT's parent, or its nearest ancestor that exists: staged shards belong on the disk OUT goes to."""
    p = out.absolute().parent
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p
