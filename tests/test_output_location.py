"""Issue 16: OUT and the files beside the shards. Each case failed on main before (a traceback after the
whole conversion, a 0700 OUT, a parent directory left behind, a misleading message); now one line, a
documented exit code, and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cliutil import leftovers, run, run_process
from rtnq import synthetic

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads files whatever their mode


@pytest.fixture
def src(tmp_path):
    return synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=1))


def _error_line(r) -> str:
    lines = [x for x in r.err.strip().splitlines() if x.strip()]
    assert lines and lines[-1].startswith("error: "), r.err
    assert "Traceback" not in r.err
    return lines[-1]


def test_a_dangling_symlink_out_is_refused_before_converting(src, tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    r = run("convert", src, out)
    assert r.code == 2
    assert "dangling symbolic link" in _error_line(r)
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    assert leftovers(tmp_path) == []


def test_force_with_the_current_directory_is_refused(src, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    r = run("convert", src, ".", "--force")
    assert r.code == 2
    assert "current directory" in _error_line(r)
    assert (work / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == [] and leftovers(work) == []


def test_out_gets_the_mode_mkdir_would_give_it(src, tmp_path):
    old = os.umask(0o022)
    try:
        r = run("convert", src, tmp_path / "out")
    finally:
        os.umask(old)
    assert r.code == 0, r.err
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # mkdtemp alone gives 0700


def _poison(src: Path) -> None:
    shard = src / "model.safetensors"
    t = load_file(shard)
    w = t["model.layers.1.mlp.down_proj.weight"].clone()
    w[0, 0] = float("nan")
    t["model.layers.1.mlp.down_proj.weight"] = w
    save_file(t, shard)


def test_a_failed_run_removes_the_parent_directories_it_created(src, tmp_path):
    _poison(src)
    r = run("convert", src, tmp_path / "a" / "b" / "out")
    assert r.code == 5, r.err
    assert not (tmp_path / "a").exists()


def test_an_unreadable_tokenizer_stops_the_run_before_any_weight(src, tmp_path, monkeypatch):
    """Opened first, not copied after the whole conversion. (Simulated: root, as in CI, reads any mode.)"""
    from rtnq.checkpoint import shards
    from rtnq.commands.convert import execute

    converted = []
    monkeypatch.setattr(execute, "quantize_item", lambda *a, **k: converted.append(1))

    def refuse(path, *a, **k):
        if Path(path).name == "tokenizer_config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(shards, "open", refuse, raising=False)
    r = run("convert", src, tmp_path / "out")
    assert r.code == 4
    line = _error_line(r)
    assert "tokenizer_config.json" in line and "Permission denied" in line
    assert converted == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(ROOT, reason="root reads files whatever their mode")
def test_an_unreadable_tokenizer_file_for_real(src, tmp_path):
    (src / "tokenizer_config.json").chmod(0)
    r = run("convert", src, tmp_path / "out")
    assert r.code == 4 and "tokenizer_config.json" in _error_line(r)


def test_disk_full_while_copying_the_tokenizer(src, tmp_path, monkeypatch):
    from rtnq.checkpoint import shards

    def full(fin, fout, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.shutil, "copyfileobj", full)
    for cmd in (("convert", src, tmp_path / "out"),):
        r = run(*cmd)
        assert r.code == 8, r.err
        assert "disk full" in _error_line(r)
        assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("victim", ["rtnq_manifest.json", "config.json"])
def test_disk_full_while_writing_the_manifest_or_config(src, tmp_path, monkeypatch, victim):
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == victim:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    r = run("convert", src, tmp_path / "out")
    assert r.code == 8, r.err
    line = _error_line(r)
    assert "disk full" in line and victim in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_disk_full_in_dequantize(src, tmp_path, monkeypatch):
    assert run("convert", src, tmp_path / "q").code == 0
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    r = run("dequantize", tmp_path / "q", tmp_path / "dense")
    assert r.code == 8, r.err
    assert "disk full" in _error_line(r)
    assert not (tmp_path / "dense").exists() and leftovers(tmp_path) == []


def test_a_missing_config_json_is_warned_about(src, tmp_path):
    (src / "config.json").unlink()
    r = run("convert", src, tmp_path / "out")
    assert r.code == 0, r.err
    assert "has no config.json" in r.err
    assert "has no config.json" not in r.out  # a warning, not a result


def test_an_fp32_value_that_overflows_the_16bit_cast_is_named_as_such(tmp_path):
    spec = synthetic.SampleSpec(shards=1, dtype="fp32")
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][3, 5] = 1e5  # finite in fp32, inf in fp16
    save_file(t, src / "model.safetensors")
    r = run("convert", src, tmp_path / "out", "--dtype", "fp16")
    assert r.code == 5
    line = _error_line(r)
    assert "model.layers.0.mlp.up_proj.weight" in line and "overflows" in line and "NaN" not in line


def test_rich_markup_in_paths_and_names_is_printed_literally(tmp_path):
    """`[/x]` once crashed dry-run, verify and inspect; `run[v2]` was printed as `run`."""
    src = synthetic.write_checkpoint(tmp_path / "run[v2]", synthetic.SampleSpec(shards=1))
    t = load_file(src / "model.safetensors")
    t["extra.[/x].weight"] = torch.ones(8, 8, dtype=torch.bfloat16)
    t["model.layers.0.mlp.[red]up[/red].weight"] = torch.ones(128, 128, dtype=torch.bfloat16)
    save_file(t, src / "model.safetensors")
    out = tmp_path / "o[b]"
    r = run("convert", src, out, "--dry-run")
    assert r.code == 0, r.err
    assert "run[v2]" in r.out and "[/x]" in r.out and "[red]up[/red]" in r.out
    r = run("convert", src, out)
    assert r.code == 0, r.err
    assert "o[b]" in r.out
    for args in (("inspect", out), ("verify", out, "--against", src, "--all")):
        r = run(*args)
        assert r.code == 0, r.err
        assert "[/x]" in r.out and "[red]up[/red]" in r.out


@pytest.mark.parametrize("shape", [(64, 0), (0, 128)])
def test_zero_size_linear_weights_pass_through(tmp_path, shape):
    """(64, 0) divided by zero in chunk_ranges; (0, 128) converted but verify crashed."""
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=1))
    t = load_file(src / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"] = torch.ones(*shape, dtype=torch.bfloat16)
    save_file(t, src / "model.safetensors")
    for fmt in ("marlin", "gptq", "compressed-tensors"):
        out = tmp_path / f"out-{fmt}"
        r = run("convert", src, out, "--format", fmt)
        assert r.code == 0, r.err
        m = json.loads((out / "rtnq_manifest.json").read_text())
        entry = m["tensors"]["model.layers.0.mlp.up_proj.weight"]
        assert entry["kind"] == "passthrough" and "no elements" in entry["reason"]
        r = run("verify", out, "--against", src)
        assert r.code == 0, r.err


def test_a_fifo_named_like_a_shard_is_refused_not_waited_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.mkfifo(src / "model.safetensors")
    r = run_process("convert", src, tmp_path / "out", timeout=20)  # hung forever before
    assert r.returncode == 4
    assert "model.safetensors" in r.stderr.strip().splitlines()[-1]
