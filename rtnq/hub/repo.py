"""ORG/NAME[@REVISION] -> the commit it names, its files and its safetensors shards.

Online, one API call (`HfApi.model_info(files_metadata=True)`) gives the commit sha and every file with its size
and, for LFS files, its sha256; the index (if any) comes through the client's cache. Offline (HF_HUB_OFFLINE=1),
or when the hub cannot be reached at all, the same facts come from the client's cache: refs/REVISION names the
commit, snapshots/COMMIT holds the files, and a blob's name is its sha256 for LFS files. Everything after this
uses the commit, never the branch, so a push during a conversion cannot mix two versions of a model.

The shard list follows the local rules exactly (`layout.shard_files`, run on a replica of the file names): the
index's shards if there is an index, else model.safetensors, else one numbered set; pickle-only repos refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rtnq.checkpoint import layout
from rtnq.errors import CheckpointError, UsageError
from rtnq.hub.client import HubConfig, hub_errors, offline_error
from rtnq.hub.replica import Replica

COMMIT = re.compile(r"[0-9a-f]{40}")
SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class HubId:
    repo_id: str
    revision: str | None  # None: the default branch

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id


def parse_hub_id(src: str) -> HubId | None:
    """ORG/NAME[@REVISION] as a HubId, None if `src` does not look like one (then it is a path). A revision is a
    branch, a tag, a commit or refs/pr/N; the first '@' splits it off (repo names cannot hold one)."""
    repo_id, at, revision = str(src).partition("@")
    if not layout.HUB_ID.match(repo_id):
        return None
    if at and (not revision or not revision.isprintable() or any(c.isspace() for c in revision)):
        raise UsageError(f"{src}: the revision after '@' must be a branch, tag or commit name")
    return HubId(repo_id, revision or None)


@dataclass(frozen=True)
class HubFile:
    path: str  # relative to the repo root, '/'-separated
    size: int | None  # bytes (the LFS object's size for LFS files)
    sha256: str | None  # the LFS object's sha256; None for files kept in git (small ones)


@dataclass
class HubRepo:
    """One commit of a model on the hub. `revision` is what the user asked for, `commit` what it meant then."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, HubFile]
    shards: list[str]
    config: HubConfig = field(repr=False)
    from_cache: bool = False  # resolved from the cache alone (offline, or the hub unreachable)

    @property
    def label(self) -> str:
        """How errors name it: ORG/NAME@ and the commit's first 12 digits."""
        return f"{self.repo_id}@{self.commit[:12]}"

    @property
    def source_record(self) -> dict[str, str]:
        """What the manifest should record about the source: enough to fetch exactly these bytes again."""
        return {"hub": self.repo_id, "revision": self.revision, "commit": self.commit}

    @property
    def shard_bytes(self) -> int:
        return sum(self.files[s].size or 0 for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files.values())

    def url(self, path: str) -> str:
        """The file's /resolve/ URL at the commit (immutable: a branch moving later changes nothing)."""
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, path, revision=self.commit, endpoint=self.config.endpoint)

    def cached(self, path: str) -> Path | None:
        """The file in the client's cache at this commit, if it is there (nothing is requested)."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.repo_id, path, cache_dir=self.config.cache_dir, revision=self.commit)
        return Path(found) if isinstance(found, str) else None

    def download(self, path: str) -> Path:
        """A small file through the client's cache (hf_hub_download: used as is when cached)."""
        from huggingface_hub import hf_hub_download

        found = self.cached(path)
        if found is not None:
            return found
        if self.config.offline:
            raise offline_error(self.config, f"{self.repo_id}@{self.revision}", path)
        with hub_errors(self.config, self.repo_id, self.revision, path):
            return Path(hf_hub_download(self.repo_id, path, revision=self.commit, cache_dir=self.config.cache_dir,
                                        endpoint=self.config.endpoint, token=self.config.token,
                                        etag_timeout=self.config.timeout))


def resolve_repo(src: str | HubId, config: HubConfig | None = None) -> HubRepo:
    """The commit, files and shards of ORG/NAME[@REVISION]; typed one-line errors otherwise (rtnq.hub.client)."""
    import httpx2

    hid = src if isinstance(src, HubId) else parse_hub_id(src)
    if hid is None:
        raise UsageError(f"{src}: not a hub model id (ORG/NAME or ORG/NAME@REVISION)")
    cfg = config or HubConfig.from_env()
    revision = hid.revision or DEFAULT_REVISION
    if cfg.offline:
        return _from_cache(hid.repo_id, revision, cfg)
    from huggingface_hub import HfApi

    with hub_errors(cfg, hid.repo_id, revision):
        try:
            info = HfApi(endpoint=cfg.endpoint, token=cfg.token).model_info(
                hid.repo_id, revision=revision, files_metadata=True, timeout=cfg.timeout)
        except (httpx2.TransportError, ConnectionError):  # no hub at all: the cache, as hf_hub_download does
            try:
                return _from_cache(hid.repo_id, revision, cfg)
            except CheckpointError:
                pass
            raise
    commit = info.sha
    if not isinstance(commit, str) or not COMMIT.fullmatch(commit):
        raise CheckpointError(f"{hid}: the hub's answer names no commit (sha {commit!r}); is HF_ENDPOINT a hub?")
    files = {}
    for s in info.siblings or []:
        lfs = s.lfs
        files[s.rfilename] = HubFile(s.rfilename, lfs.size if lfs else s.size, lfs.sha256 if lfs else None)
    repo = HubRepo(hid.repo_id, revision, commit, files, [], cfg)
    index = repo.download(layout.INDEX_NAME) if layout.INDEX_NAME in files else None
    repo.shards = pick_shards(repo, index)
    return repo


def pick_shards(repo: HubRepo, index: Path | None) -> list[str]:
    """`layout.shard_files` on a replica of the repo's top-level names (and its index)."""
    with Replica(repo.label) as rep, rep.errors():
        rep.placeholders(n for n in repo.files if n != layout.INDEX_NAME)
        if index is not None:
            rep.copy(layout.INDEX_NAME, index)
        return layout.shard_files(rep.dir)


def _from_cache(repo_id: str, revision: str, cfg: HubConfig) -> HubRepo:
    """The repo as the client's cache holds it; every shard must be there (there is nothing to download them with)."""
    from huggingface_hub.file_download import repo_folder_name

    what = f"{repo_id}@{revision}"
    storage = cfg.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    commit = revision if COMMIT.fullmatch(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = storage / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise offline_error(cfg, what)
    files = {}
    for root, _, names in os.walk(snapshot):
        for name in names:
            p = Path(root) / name
            rel = p.relative_to(snapshot).as_posix()
            try:
                size = p.stat().st_size
            except OSError:  # a dangling link: an interrupted download, as good as absent
                continue
            blob = Path(os.path.realpath(p)).name
            files[rel] = HubFile(rel, size, blob if SHA256.fullmatch(blob) else None)
    index = snapshot / layout.INDEX_NAME
    if index.is_file():
        for shard in sorted(set(layout.index_map(snapshot).values())):
            if shard not in files:
                raise offline_error(cfg, what, shard)
    repo = HubRepo(repo_id, revision, commit, files, [], cfg, from_cache=True)
    repo.shards = layout.shard_files(snapshot)
    return repo
