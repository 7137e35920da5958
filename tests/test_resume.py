"""`rtnq convert ... --resume` (issue 14, item 2): a conversion SIGKILLed at any point (tests/kill_convert.py,
the process kills itself: no handler runs, as in a power loss) is continued from its journal, and the result is
byte-identical, file for file, to an uninterrupted run. A changed plan is refused with what changed, a damaged
completed shard is converted again, never trusted."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cliutil import run

from rtnq import synthetic
from rtnq.checkpoint.journal import JOURNAL_NAME

try:  # the hub case needs the client; everything else here does not
    import huggingface_hub  # noqa: F401
except ImportError:
    hub = model_dir = None
else:
    from hubfixtures import hub, model_dir  # noqa: F401 (fixtures)

KILL = Path(__file__).parent / "kill_convert.py"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("resume") / "src", synthetic.SampleSpec(shards=3))


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict[str, bytes]:
    """Every file of an uninterrupted conversion."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert run("convert", src, out).code == 0
    return _files(out)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def _killed(*point: str, args: list) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(KILL), *point, *map(str, args)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr)
    return p


def _temporaries(parent: Path) -> list[Path]:
    return sorted(parent.glob(".out.rtnq-tmp-*"))


def _journal(tmp: Path) -> dict:
    return json.loads((tmp / JOURNAL_NAME).read_text())


@pytest.fixture(scope="module")
def crashed(src, tmp_path_factory) -> Path:
    """The temporary directory of a run killed right after its first shard was journaled (copied per test)."""
    parent = tmp_path_factory.mktemp("crashed")
    _killed("journaled", "1", args=["convert", src, parent / "out"])
    (tmp,) = _temporaries(parent)
    return tmp


def _copy(crashed: Path, parent: Path) -> Path:
    tmp = parent / crashed.name
    shutil.copytree(crashed, tmp)
    return tmp


@pytest.mark.parametrize("point", [("journaled", "1"), ("written", "2", "3"), ("manifest",)],
                         ids=["after-shard-1", "inside-shard-2", "before-manifest"])
def test_a_killed_conversion_resumes_to_identical_bytes(src, reference, tmp_path, point):
    out = tmp_path / "out"
    _killed(*point, args=["convert", src, out])
    (tmp,) = _temporaries(tmp_path)
    assert not out.exists()
    done = [e["file"] for e in _journal(tmp)["shards"]]
    if point[0] == "journaled":
        assert len(done) == 1
    elif point[0] == "written":
        assert SHARDS[1] not in done and (tmp / SHARDS[1]).is_file()  # the partial shard is there, unrecorded
    else:
        assert sorted(done) == SHARDS

    r = run("convert", src, out, "--resume")
    assert r.code == 0, r.err
    shards = "1 complete shard" if len(done) == 1 else f"{len(done)} complete shards"
    assert f"reusing {shards}, converting {3 - len(done)} of 3" in r.err
    assert _files(out) == reference
    assert _temporaries(tmp_path) == []


def test_a_changed_plan_is_refused_with_what_changed(src, crashed, tmp_path):
    tmp = _copy(crashed, tmp_path)
    before = _files(tmp)
    r = run("convert", src, tmp_path / "out", "--resume", "--bits", "8")
    assert r.code == 2
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "the options differ (--bits 8 now, 4 in the interrupted run)" in lines[0], r.err
    assert _files(tmp) == before and not (tmp_path / "out").exists()
    r = run("convert", src, tmp_path / "out", "--resume", "--rotate")  # --rotate changes every byte too
    assert r.code == 2 and "--rotate" in r.err, r.err


def test_a_changed_source_shard_is_named(src, crashed, tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    _copy(crashed, tmp_path)
    os.utime(copy / SHARDS[2], ns=(1, 1))  # copytree kept the mtimes; now one differs
    r = run("convert", copy, tmp_path / "out", "--resume")
    assert r.code == 2 and f"the source differs ({SHARDS[2]} changed: mtime)" in r.err, r.err


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_a_damaged_completed_shard_is_converted_again(src, reference, crashed, tmp_path, damage):
    tmp = _copy(crashed, tmp_path)
    (done,) = [e["file"] for e in _journal(tmp)["shards"]]
    path = tmp / done
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    r = run("convert", src, tmp_path / "out", "--resume")
    assert r.code == 0, r.err
    why = "content differs" if damage == "flip" else "missing"
    assert f"reusing 0 complete shards, converting 3 of 3; {done} is converted again ({why})" in r.err
    assert _files(tmp_path / "out") == reference


def test_nothing_to_resume_is_a_one_line_usage_error(src, tmp_path):
    r = run("convert", src, tmp_path / "out", "--resume")
    assert r.code == 2
    assert r.err.strip().splitlines() == [
        (f"error: nothing to resume for {tmp_path / 'out'}: no {tmp_path / '.out.rtnq-tmp-'}* directory holding a "
         f"{JOURNAL_NAME}; convert without --resume")]


def test_without_resume_the_warning_says_resume_continues_it(src, reference, crashed, tmp_path):
    tmp = _copy(crashed, tmp_path)
    r = run("convert", src, tmp_path / "out")
    assert r.code == 0, r.err
    text = " ".join(r.err.split())
    assert f"warning: {tmp} (" in text and "`rtnq convert ... --resume` continues it (1 shard complete)" in text
    assert f"or remove it (rm -r '{tmp}')" in text
    assert tmp.is_dir() and _files(tmp_path / "out") == reference  # a fresh directory was used, this one kept


def test_dry_run_says_what_it_would_reuse_and_writes_nothing(src, crashed, tmp_path):
    tmp = _copy(crashed, tmp_path)
    before = _files(tmp)
    r = run("convert", src, tmp_path / "out", "--resume", "--dry-run")
    assert r.code == 0, r.err
    assert f"resume {tmp}: would reuse 1 complete shard, would convert 2 of 3" in r.out
    assert _files(tmp) == before and not (tmp_path / "out").exists()


def test_resume_with_force_replaces_out(src, reference, crashed, tmp_path):
    _copy(crashed, tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    assert run("convert", src, tmp_path / "out", "--resume").code == 2  # OUT exists: --force as always
    r = run("convert", src, tmp_path / "out", "--resume", "--force")
    assert r.code == 0, r.err
    assert _files(tmp_path / "out") == reference


def test_several_or_busy_temporaries_are_refused(src, crashed, tmp_path):
    a = _copy(crashed, tmp_path)
    r = run("convert", src, tmp_path / "out", "--resume")
    assert r.code == 0  # one: fine (and consumed)
    a = _copy(crashed, tmp_path)
    b = tmp_path / ".out.rtnq-tmp-second"
    shutil.copytree(a, b)
    r = run("convert", src, tmp_path / "out2", "--resume")  # another OUT: nothing of its own
    assert r.code == 2 and "nothing to resume" in r.err
    r = run("convert", src, tmp_path / "out", "--resume", "--force")
    assert r.code == 2 and f"several interrupted runs for {tmp_path / 'out'}" in r.err and str(b) in r.err
    shutil.rmtree(b)
    fd = os.open(a, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a conversion still running into it holds it
    try:
        r = run("convert", src, tmp_path / "out", "--resume", "--force")
        assert r.code == 2 and "is in use by a running rtnq convert" in r.err, r.err
    finally:
        os.close(fd)


@pytest.mark.skipif(hub is None, reason="needs huggingface_hub")
@pytest.mark.parametrize("point", [("journaled", "1"), ("manifest",)], ids=["after-shard-1", "before-manifest"])
def test_a_hub_conversion_resumes_without_downloading_completed_shards(hub, model_dir, tmp_path, point):
    assert run("convert", "org/tiny", tmp_path / "ref").code == 0
    _killed(*point, args=["convert", "org/tiny", tmp_path / "out"])
    (tmp,) = _temporaries(tmp_path)
    done = {e["file"] for e in _journal(tmp)["shards"]}
    before = len(hub.requests)
    r = run("convert", "org/tiny", tmp_path / "out", "--resume")
    assert r.code == 0, r.err
    downloads = [q[2].rsplit("/", 1)[1] for q in hub.requests[before:]
                 if q[1] == "GET" and q[2].endswith(".safetensors") and q[3] is None]
    assert sorted(downloads) == sorted(set(SHARDS) - done)  # the completed shards' sources: headers only
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")
