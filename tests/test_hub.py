"""The hub source (rtnq.hub) with the real huggingface_hub client against a local hub (tests/hubserver.py).

No test touches the network: HF_ENDPOINT is the local server, HF_HOME a temporary directory, and no token from
the machine is used. The client reads its settings at import, so the fixture sets them on
`huggingface_hub.constants`, which is what rtnq.hub.client.HubConfig.from_env reads too.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from hubfixtures import FAST, _bounded, hub, model_dir, single_dir  # noqa: F401 (fixtures)
from hubserver import TOKEN
from huggingface_hub import constants

from rtnq.checkpoint import layout
from rtnq.checkpoint.source import scan
from rtnq.errors import CheckpointError, RtnqError, UsageError
from rtnq.hub.client import HubConfig
from rtnq.hub.headers import fetch_small_files, remote_specs
from rtnq.hub.repo import HubId, parse_hub_id, resolve_repo
from rtnq.hub.staging import Staging

def offline(monkeypatch) -> HubConfig:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return HubConfig.from_env()


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def warm_cache(hub, repo_id: str = "org/tiny") -> None:
    """What `hf download ORG/NAME` leaves in HF_HOME: the whole snapshot in the client's cache."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, cache_dir=constants.HF_HUB_CACHE, endpoint=hub.endpoint)


def small_names(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir() if p.suffix != ".safetensors")


def stage_all(repo, directory: Path, **kw) -> tuple[Staging, dict[str, bytes]]:
    got = {}
    with Staging(repo, None, directory, retry=FAST, **kw) as st:
        for shard in repo.shards:
            got[shard] = st.wait(shard).read_bytes()
            st.release(shard)
    return st, got


# -- names ----------------------------------------------------------------------------------------------------------

def test_parse_hub_id():
    assert parse_hub_id("org/name") == HubId("org/name", None)
    assert parse_hub_id("org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == HubId("org/name", "refs/pr/3")
    assert parse_hub_id("./some/dir") is None and parse_hub_id("a/b/c") is None and parse_hub_id("model") is None
    with pytest.raises(UsageError):
        parse_hub_id("org/name@")
    with pytest.raises(UsageError):
        parse_hub_id("org/name@has space")


# -- resolve --------------------------------------------------------------------------------------------------------

def test_resolve_names_the_commit_files_and_shards(hub, model_dir):
    served = hub.repos["org/tiny"]
    repo = resolve_repo("org/tiny")
    assert repo.commit == served.commit and repo.revision == "main" and not repo.from_cache
    assert repo.shards == layout.shard_files(model_dir)
    for name, f in served.files.items():
        assert repo.files[name].size == f.size
        assert repo.files[name].sha256 == (f.sha256 if f.lfs else None)
    assert repo.source_record == {"hub": "org/tiny", "revision": "main", "commit": served.commit}
    assert resolve_repo("org/tiny@v1").commit == served.commit
    assert resolve_repo(f"org/tiny@{served.commit}").commit == served.commit


def test_single_file_and_pickle_only_repos_follow_the_local_rules(hub, single_dir, tmp_path):
    hub.add_repo("org/one", single_dir)
    assert resolve_repo("org/one").shards == [layout.SINGLE_NAME]
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"\0" * 16)
    (pickles / "config.json").write_text("{}")
    served = hub.add_repo("org/pickles", pickles)
    with pytest.raises(CheckpointError) as e:
        resolve_repo("org/pickles")
    text = one_line(e)
    assert "only pickle weights" in text and f"org/pickles@{served.commit[:12]}" in text and "/dev/shm" not in text


def test_unknown_repo_revision_and_missing_shard_are_typed(hub, model_dir, tmp_path):
    with pytest.raises(UsageError) as e:
        resolve_repo("org/nothing")
    assert "org/nothing" in one_line(e) and "no such model" in str(e.value) and e.value.exit_code == 2
    with pytest.raises(UsageError) as e:
        resolve_repo("org/tiny@nope")
    assert "no revision 'nope'" in one_line(e)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model-00002-of-00003.safetensors").unlink()
    hub.add_repo("org/broken", broken)
    with pytest.raises(CheckpointError) as e:
        resolve_repo("org/broken")
    assert "model-00002-of-00003.safetensors" in one_line(e) and e.value.exit_code == 4


def test_file_vanishing_from_the_hub_is_one_line(hub, tmp_path):
    repo = resolve_repo("org/tiny")
    del hub.repos["org/tiny"].files[repo.shards[0]]
    with pytest.raises(CheckpointError) as e:
        stage_all(repo, tmp_path / "stage")
    assert repo.shards[0] in one_line(e) and "no such file" in str(e.value)
    assert not any((tmp_path / "stage").iterdir())


def test_unreachable_hub_is_one_line(hub, monkeypatch):
    cfg = HubConfig.from_env(endpoint="http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(CheckpointError) as e:
        resolve_repo("org/tiny", cfg)
    assert "cannot reach http://127.0.0.1:9" in one_line(e) and "HF_HUB_OFFLINE" in str(e.value)


def test_gated_repo_says_to_accept_the_licence_and_set_hf_token(hub, monkeypatch):
    with pytest.raises(CheckpointError) as e:  # no token: 401
        resolve_repo("org/gated")
    assert "HF_TOKEN" in one_line(e) and "licence" in str(e.value) and f"{hub.endpoint}/org/gated" in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")  # a token without access: 403
    with pytest.raises(CheckpointError) as e:
        resolve_repo("org/gated")
    assert "HF_TOKEN" in one_line(e)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert resolve_repo("org/gated").shards


# -- headers --------------------------------------------------------------------------------------------------------

def test_remote_headers_give_the_local_specs_reading_under_one_percent(hub, model_dir):
    repo = resolve_repo("org/tiny")
    local = scan(model_dir)
    header_bytes = 0
    for shard in repo.shards:
        with open(model_dir / shard, "rb") as f:
            header_bytes += 8 + int.from_bytes(f.read(8), "little")
    got = remote_specs(repo, first_read=256, retry=FAST)  # headers longer than 256 bytes: two GETs per shard
    assert got.specs == local
    assert got.stats.requests == 2 * len(repo.shards)
    assert got.bytes_read == header_bytes
    assert got.bytes_read < 0.01 * repo.total_bytes
    one = remote_specs(repo)  # the default speculative read holds the whole header: one GET per shard
    assert one.specs == local and one.stats.requests == len(repo.shards)
    assert one.bytes_read <= len(repo.shards) * 64 * 1024


def test_remote_headers_refuse_a_corrupt_header_as_local_scan_does(hub, model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    shard = bad / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = (200 * 1024 * 1024).to_bytes(8, "little")  # a header length past the limit
    shard.write_bytes(bytes(data))
    hub.add_repo("org/bad", bad)
    with pytest.raises(CheckpointError) as local:
        scan(bad)
    with pytest.raises(CheckpointError) as remote:
        remote_specs(resolve_repo("org/bad"), retry=FAST)
    assert one_line(remote) == str(local.value)


def test_small_files_come_through_the_cache(hub, model_dir, tmp_path):
    repo = resolve_repo("org/tiny")
    names = fetch_small_files(repo, tmp_path / "view")
    assert names == small_names(model_dir) and layout.CONFIG_NAME in names and layout.INDEX_NAME in names
    for name in names:
        assert (tmp_path / "view" / name).read_bytes() == (model_dir / name).read_bytes()
    assert layout.kv_heads(tmp_path / "view") == layout.kv_heads(model_dir)


# -- staging --------------------------------------------------------------------------------------------------------

def _until(cond, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_staging_keeps_two_shards_at_most_and_they_are_the_originals(hub, model_dir, tmp_path):
    repo = resolve_repo("org/tiny")
    sizes = sorted((model_dir / s).stat().st_size for s in repo.shards)
    stage = tmp_path / "stage"
    with Staging(repo, None, stage, retry=FAST) as st:
        for i, shard in enumerate(repo.shards):
            path = st.wait(shard)
            assert path == stage / shard and path.read_bytes() == (model_dir / shard).read_bytes()
            if i + 1 < len(repo.shards):  # the next one downloads while this one is "converted" ...
                assert _until(lambda nxt=stage / repo.shards[i + 1]: nxt.exists())
                time.sleep(0.05)  # ... and the one after it does not start before this release
                assert all(not (stage / s).exists() for s in repo.shards[i + 2:])
                assert len([p for p in stage.iterdir()]) <= 2
            st.release(shard)
            assert not path.exists()
    assert st.peak_shards == 2
    assert sizes[-1] < st.peak_bytes <= sizes[-1] + sizes[-2]
    assert st.downloaded_bytes == sum(sizes)
    assert not any(stage.iterdir())


def test_closing_early_deletes_what_is_staged(hub, tmp_path):
    repo = resolve_repo("org/tiny")
    with Staging(repo, None, tmp_path / "stage", retry=FAST) as st:
        st.wait(repo.shards[0])
        with pytest.raises(RuntimeError):  # two staged, none released: waiting for the third would never end
            _until(lambda: (tmp_path / "stage" / repo.shards[1]).exists())
            st.wait(repo.shards[2])
    assert not any((tmp_path / "stage").iterdir())


def test_dropped_connection_resumes(hub, model_dir, tmp_path):
    repo = resolve_repo("org/tiny")
    shard = repo.shards[1]
    hub.faults.drop[shard] = 1
    st, got = stage_all(repo, tmp_path / "stage")
    assert got == {s: (model_dir / s).read_bytes() for s in repo.shards}
    assert st.tries[shard] == 2
    resumed = [r for o, m, p, r in hub.requests if o == "cdn" and m == "GET" and r and r.endswith("-")]
    assert len(resumed) == 1 and resumed[0] != "bytes=0-"
    assert st.downloaded_bytes == sum(len(b) for b in got.values())  # resumed, not downloaded again


def test_server_error_is_retried(hub, model_dir, tmp_path):
    repo = resolve_repo("org/tiny")
    hub.faults.status[repo.shards[0]] = [500, 503]
    st, got = stage_all(repo, tmp_path / "stage")
    assert got[repo.shards[0]] == (model_dir / repo.shards[0]).read_bytes() and st.tries[repo.shards[0]] == 3


def test_server_error_that_persists_is_one_line(hub, tmp_path):
    repo = resolve_repo("org/tiny")
    hub.faults.status[repo.shards[0]] = [500] * 3
    with pytest.raises(CheckpointError) as e:
        stage_all(repo, tmp_path / "stage")
    assert "HTTP 500" in one_line(e) and repo.shards[0] in str(e.value)
    assert not any((tmp_path / "stage").iterdir())


def test_corrupt_download_is_retried_then_refused(hub, model_dir, tmp_path):
    repo = resolve_repo("org/tiny")
    shard = repo.shards[2]
    hub.faults.corrupt[shard] = 1
    st, got = stage_all(repo, tmp_path / "stage")
    assert got[shard] == (model_dir / shard).read_bytes() and st.tries[shard] == 2
    hub.faults.corrupt[shard] = 3
    with pytest.raises(CheckpointError) as e:
        stage_all(repo, tmp_path / "stage2")
    text = one_line(e)
    assert shard in text and "sha256" in text and e.value.exit_code == 4
    assert not any((tmp_path / "stage2").iterdir())


# -- the client's cache and offline mode ----------------------------------------------------------------------------

def test_warm_cache_downloads_no_shard(hub, model_dir, tmp_path):
    warm_cache(hub)
    before = len(hub.requests)
    repo = resolve_repo("org/tiny")
    specs = remote_specs(repo)
    assert specs.specs == scan(model_dir) and specs.bytes_read == 0
    st, got = stage_all(repo, tmp_path / "stage")
    assert got == {s: (model_dir / s).read_bytes() for s in repo.shards}
    assert st.downloaded_bytes == 0 and st.peak_bytes == 0
    assert [r[2] for r in hub.requests[before:]] == ["/api/models/org/tiny/revision/main"]
    assert all(repo.cached(s).exists() for s in repo.shards)  # release removed the links, not the cache


def test_offline_with_a_warm_cache_makes_no_request(hub, model_dir, tmp_path, monkeypatch):
    warm_cache(hub)
    commit = hub.repos["org/tiny"].commit
    before = len(hub.requests)
    # rtnq itself must not ask: offline in its config only, the client's own guard left off
    cfg = HubConfig.from_env(offline=True)
    for i, src in enumerate(("org/tiny", f"org/tiny@{commit}")):
        repo = resolve_repo(src, cfg)
        assert repo.from_cache and repo.commit == commit
        assert repo.shards == layout.shard_files(model_dir)
        assert remote_specs(repo).specs == scan(model_dir)
        assert fetch_small_files(repo, tmp_path / f"view{i}") == small_names(model_dir)
        _, got = stage_all(repo, tmp_path / f"stage{i}")
        assert got == {s: (model_dir / s).read_bytes() for s in repo.shards}
    with pytest.raises(CheckpointError) as e:  # a tag the cache never saw resolved
        resolve_repo("org/tiny@v1", cfg)
    assert "HF_HUB_OFFLINE" in one_line(e)
    assert len(hub.requests) == before
    assert offline(monkeypatch).offline  # HF_HUB_OFFLINE, as the client read it, is what from_env reports


def test_offline_with_a_cold_cache_is_one_line(hub, monkeypatch):
    cfg = offline(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        resolve_repo("org/tiny", cfg)
    text = one_line(e)
    assert "HF_HUB_OFFLINE" in text and "org/tiny" in text and str(cfg.cache_dir) in text
    assert hub.requests == []


def test_every_error_is_an_rtnq_error(hub, tmp_path):
    """No client exception escapes: each case above surfaces as an RtnqError (the CLI's one-line boundary)."""
    for src in ("org/nothing", "org/tiny@nope", "org/gated"):
        with pytest.raises(RtnqError):
            resolve_repo(src)
    assert os.environ.get("HF_ENDPOINT") == hub.endpoint
