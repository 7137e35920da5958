"""`rtnq convert ORG/NAME[@REV] OUT` end to end: the real huggingface_hub client against the local hub
(hubfixtures), through the CLI. Issue 14 items 1 and 5: the output equals converting a local copy (but
for the recorded source), a dry run reads a fraction of a percent of the repo, at most two shards are staged,
injected faults are survived or refused cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

from cliutil import leftovers, run
from hubfixtures import _bounded, hub, model_dir  # noqa: F401 (fixtures)

from rtnq import synthetic
from rtnq.commands import convert as conv


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _same_but_source(hub_out: Path, local_out: Path, commit: str, revision: str = "main") -> None:
    a, b = _files(hub_out), _files(local_out)
    assert sorted(a) == sorted(b)
    for name in a:
        if name != "rtnq_manifest.json":
            assert a[name] == b[name], name
    ma, mb = json.loads(a["rtnq_manifest.json"]), json.loads(b["rtnq_manifest.json"])
    assert ma.pop("source") == {"hub": "org/tiny", "revision": revision, "commit": commit}
    assert "source" not in mb and ma == mb


def _commit(hub, repo_id="org/tiny") -> str:
    from rtnq.hub.repo import resolve_repo

    return resolve_repo(repo_id).commit


@pytest.mark.parametrize("fmt", ["marlin", "gptq"])
def test_hub_conversion_equals_the_local_one(hub, model_dir, tmp_path, fmt):
    r = run("convert", "org/tiny", tmp_path / "from-hub", "--format", fmt)
    assert r.code == 0, r.err
    assert "downloaded" in r.out and "at most 2 staged at once" in r.out
    assert run("convert", model_dir, tmp_path / "local", "--format", fmt).code == 0
    _same_but_source(tmp_path / "from-hub", tmp_path / "local", _commit(hub))
    assert leftovers(tmp_path) == [] and not list(tmp_path.glob(".*rtnq-src-*"))  # the staging directory is gone
    assert run("verify", tmp_path / "from-hub", "--against", model_dir).code == 0


def test_a_revision_is_resolved_to_its_commit(hub, model_dir, tmp_path):
    r = run("convert", "org/tiny@v1", tmp_path / "out")
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "out" / "rtnq_manifest.json").read_text())
    assert m["source"]["revision"] == "v1" and m["source"]["commit"] == _commit(hub)


def test_staging_holds_two_shards_at_most_and_deletes_them(hub, model_dir, tmp_path):
    plan = conv.make_plan("org/tiny", tmp_path / "out", conv.ConvertOptions())
    try:
        view = plan.hub.view
        assert view.parent == tmp_path and view.name.startswith(".out.rtnq-src-")
        assert not [p for p in view.iterdir() if p.suffix == ".safetensors"]  # the plan downloads no shard
        conv.run(plan)
        sizes = sorted((p.stat().st_size for p in model_dir.glob("*.safetensors")), reverse=True)
        stats = plan.hub.stats
        assert stats["peak_shards"] <= 2 and 0 < stats["peak_bytes"] <= sizes[0] + sizes[1]
        assert stats["downloaded"] == sum(sizes)
        assert not [p for p in view.iterdir() if p.suffix == ".safetensors"]  # each deleted once converted
    finally:
        plan.close()
    assert not view.exists()


@pytest.fixture(scope="module")
def medium_dir(tmp_path_factory):
    spec = synthetic.SampleSpec(hidden=512, intermediate=1536, layers=4, vocab=4096, heads=8, kv_heads=4, shards=3)
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("hubmedium") / "medium", spec)


def test_dry_run_reads_under_one_percent_of_the_repo(hub, medium_dir, tmp_path):
    hub.add_repo("org/medium", medium_dir)
    repo_bytes = sum(p.stat().st_size for p in medium_dir.iterdir())
    before = len(hub.requests)
    r = run("convert", "org/medium", tmp_path / "out", "--dry-run")
    assert r.code == 0, r.err
    assert "planned from" in r.out and not (tmp_path / "out").exists()
    shard_gets = [q for q in hub.requests[before:] if q[1] == "GET" and q[2].endswith(".safetensors")]
    assert shard_gets and all(q[3] is not None for q in shard_gets)  # ranged reads only, no shard download
    read = sum(int(rng.split("-")[1]) - int(rng.split("=")[1].split("-")[0]) + 1 for *_, rng in shard_gets)
    assert read < 0.01 * repo_bytes, (read, repo_bytes)
    assert not list(tmp_path.glob(".*rtnq-src-*"))


def test_a_dropped_connection_and_server_errors_are_survived(hub, model_dir, tmp_path):
    shards = sorted(p.name for p in model_dir.glob("*.safetensors"))
    hub.faults.drop[shards[1]] = 1
    hub.faults.status[shards[2]] = [500]
    r = run("convert", "org/tiny", tmp_path / "out")
    assert r.code == 0, r.err
    assert hub.faults.drop[shards[1]] == 0 and hub.faults.status[shards[2]] == []  # both faults happened
    assert run("convert", model_dir, tmp_path / "local").code == 0
    _same_but_source(tmp_path / "out", tmp_path / "local", _commit(hub))


def test_a_shard_that_never_matches_its_sha256_is_refused(hub, model_dir, tmp_path):
    shard = sorted(p.name for p in model_dir.glob("*.safetensors"))[1]
    hub.faults.corrupt[shard] = 10  # every try
    r = run("convert", "org/tiny", tmp_path / "out")
    assert r.code == 4, r.err
    lines = [x for x in r.err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and shard in lines[0] and "sha256" in lines[0]
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert not list(tmp_path.glob(".*rtnq-src-*"))


def test_a_gated_repo_says_what_to_do(hub, tmp_path):
    r = run("convert", "org/gated", tmp_path / "out")
    assert r.code == 4
    assert "HF_TOKEN" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*rtnq-src-*"))


def test_an_unknown_repo_is_a_usage_error(hub, tmp_path):
    r = run("convert", "org/nothing", tmp_path / "out")
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "org/nothing" in r.err


def test_a_statistic_budget_score_is_refused_for_a_hub_source(hub, tmp_path):
    r = run("convert", "org/tiny", tmp_path / "out", "--budget", "4.5", "--budget-score", "error")
    assert r.code == 2 and "second download" in r.err
    r = run("convert", "org/tiny", tmp_path / "out", "--budget", "4.5", "--budget-groups")
    assert r.code == 2 and "--budget-groups reads every weight" in r.err and "second download" in r.err
    r = run("convert", "org/tiny", tmp_path / "out", "--rotate")
    assert r.code == 2 and "--rotate reads norm weights" in r.err and "download the model first" in r.err
    assert not list(tmp_path.glob(".*rtnq-src-*"))
