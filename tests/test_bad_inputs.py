"""Every bad input: one clear line naming the file or tensor, a documented exit code, nothing left behind."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from cliutil import fail_writes_with_enospc, leftovers, run
from rtnq import synthetic
from rtnq.errors import EXIT_CODES


@pytest.fixture
def src(tmp_path):
    return synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=2))


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ")
    return lines[0]


def _convert_fails(src, tmp_path, code, *needles, extra=()):
    out = tmp_path / "out"
    r = run("convert", src, out, *extra)
    assert r.code == code, r.err
    line = _one_line(r.err)
    for needle in needles:
        assert needle in line, line
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return line


def _shard(src, i=1):
    return sorted(src.glob("model-*.safetensors"))[i - 1]


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_exit_code_table_is_stable():
    assert EXIT_CODES == {
        "RtnqError": 1, "UsageError": 2, "KernelUnavailable": 3, "CheckpointError": 4,
        "InvalidWeightError": 5, "ShapeError": 6, "VerifyMismatch": 7, "OutputError": 8,
        "KernelError": 9, "Interrupted": 130,
    }


def test_truncated_shard(src, tmp_path):
    shard = _shard(src, 2)
    shard.write_bytes(shard.read_bytes()[:-1000])
    _convert_fails(src, tmp_path, 4, shard.name, "truncated")


def test_file_shorter_than_the_length_prefix(src, tmp_path):
    _shard(src).write_bytes(b"\x01\x02")
    _convert_fails(src, tmp_path, 4, _shard(src).name, "truncated")


def test_garbage_header(src, tmp_path):
    shard = _shard(src)
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\xff" * 32
    shard.write_bytes(bytes(data))
    _convert_fails(src, tmp_path, 4, shard.name, "not valid JSON")


def test_oversized_header(src, tmp_path):
    shard = _shard(src)
    shard.write_bytes(struct.pack("<Q", 2**40) + shard.read_bytes()[8:])
    _convert_fails(src, tmp_path, 4, shard.name, "header claims")


def test_offsets_past_the_end(src, tmp_path):
    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["data_offsets"][1] += 10**9

    _rewrite_header(_shard(src), edit)
    _convert_fails(src, tmp_path, 4, _shard(src).name)


def test_overlapping_offsets(src, tmp_path):
    def edit(h):
        names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
        a, b = h[names[0]], h[names[1]]
        size = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]

    _rewrite_header(_shard(src), edit)
    _convert_fails(src, tmp_path, 4, "overlap")


def test_missing_shard_listed_in_index(src, tmp_path):
    missing = _shard(src, 2)
    missing.unlink()
    _convert_fails(src, tmp_path, 4, missing.name, "missing")


def test_unsupported_dtype(src, tmp_path):
    def edit(h):
        name = next(k for k in h if k != "__metadata__")
        h[name]["dtype"] = "C64"

    _rewrite_header(_shard(src), edit)
    _convert_fails(src, tmp_path, 4, "dtype C64")


def test_nan_in_a_weight_names_the_tensor(tmp_path):
    spec = synthetic.SampleSpec(shards=1)
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    info = json.loads(data[8 : 8 + n])["model.layers.1.mlp.down_proj.weight"]
    at = 8 + n + info["data_offsets"][0] + 2 * 1000
    data[at : at + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(data))
    _convert_fails(src, tmp_path, 5, "model.layers.1.mlp.down_proj.weight", "NaN")


def test_unmatched_selector_suggests_candidates(src, tmp_path):
    line = _convert_fails(src, tmp_path, 2, "layer.0", "layers.0", extra=("--keep-int8", "layer.0"))
    assert line == "error: --keep-int8 layer.0: matches no tensor; did you mean layers.0?"


def test_strict_shape_gate(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(odd_linear=True))
    _convert_fails(src, tmp_path, 6, "model.layers.0.mlp.odd_proj.weight", "--strict", extra=("--strict",))


def test_out_exists(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run("convert", src, out)
    assert r.code == 2 and "--force" in _one_line(r.err)
    assert (out / "keep.txt").read_text() == "precious"


def test_out_inside_src(src, tmp_path):
    r = run("convert", src, src / "quantized")
    assert r.code == 2 and "inside the source" in _one_line(r.err)
    assert not (src / "quantized").exists()
    assert run("convert", src, src).code == 2


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path):
    d = tmp_path / "pickles"
    d.mkdir()
    # A file that would execute code if unpickled: the converter must never open it as a pickle.
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch pwned'\ntR.")
    r = run("convert", d, tmp_path / "out")
    assert r.code == 4
    line = _one_line(r.err)
    assert "pytorch_model.bin" in line and "safetensors" in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


def test_no_such_source_and_hub_id(tmp_path):
    assert "no such directory" in _one_line(run("convert", tmp_path / "nope", tmp_path / "o").err)
    # convert reads hub ids itself (tests/test_hub_convert.py, against a local hub); the commands that need
    # a directory say how to get one, without touching the network
    r = run("eval", "meta-llama/Llama-3.1-8B", "--text", __file__, "--bits", "4")
    assert r.code == 2 and "hub id" in _one_line(r.err) and "hf download" in r.err


def test_bad_option_values_are_usage_errors(src, tmp_path):
    for args in (["--bits", "3"], ["--group-size", "100"], ["--dtype", "fp8"], ["--tp", "two"]):
        r = run("convert", src, tmp_path / "o", *args)
        assert r.code == 2, args
        assert not (tmp_path / "o").exists()


def test_disk_full_leaves_nothing_behind(src, tmp_path, monkeypatch):
    """The 5th write to any output file fails with ENOSPC, as a full disk would."""
    fail_writes_with_enospc(monkeypatch)
    line = _convert_fails(src, tmp_path, 8, "disk full")
    assert "model-0000" in line


def test_interruption_leaves_nothing_behind(src, tmp_path, monkeypatch):
    from rtnq.commands.convert import execute

    real = execute.quantize_item
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(execute, "quantize_item", interrupt)
    line = _convert_fails(src, tmp_path, 130, "interrupted")
    assert "out" in line


def test_interrupted_force_keeps_the_previous_output(src, tmp_path, monkeypatch):
    from rtnq.commands.convert import execute

    out = tmp_path / "out"
    assert run("convert", src, out, "--bits", "8").code == 0
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    monkeypatch.setattr(execute, "quantize_item", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = run("convert", src, out, "--force")
    assert r.code == 130
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    assert leftovers(tmp_path) == []


def test_verify_against_wrong_source(src, tmp_path):
    assert run("convert", src, tmp_path / "out").code == 0
    other = synthetic.write_checkpoint(tmp_path / "other", synthetic.SampleSpec(shards=2, seed=7))
    r = run("verify", tmp_path / "out", "--against", other)
    assert r.code == 7 and "differ" in r.err.strip().splitlines()[-1]


def test_inspect_on_a_plain_model_dir(src):
    r = run("inspect", src)
    assert r.code == 4 and "rtnq_manifest.json" in _one_line(r.err)


@pytest.mark.parametrize("fmt", ["marlin", "gptq", "compressed-tensors"])
def test_a_scale_that_overflows_fp16_is_refused_naming_the_tensor(tmp_path, fmt):
    """2 * maxabs overflows fp16 from |w| ~ 32760: the scale would be inf and dequantize to NaN."""
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    w = torch.zeros(64, 128, dtype=torch.float16)
    w[3, 5] = 40000.0
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(src / "model.safetensors"))
    r = run("convert", src, tmp_path / "out", "--format", fmt)
    assert r.code == 5 and "model.layers.0.mlp.up_proj.weight" in r.err and "overflows" in r.err, r.err
    errors = [line for line in r.err.strip().splitlines() if not line.startswith("warning:")]  # no config.json
    assert len(errors) == 1 and not (tmp_path / "out").exists()
    assert run("convert", src, tmp_path / "bf", "--format", fmt, "--dtype", "bf16").code == 0


@pytest.mark.parametrize("edit,message", [
    (lambda wm: {}, "weight_map lists no tensor"),
    (lambda wm: {**wm, "model.layers.9.mlp.up_proj.weight": next(iter(wm.values()))}, "but no shard holds it"),
    (lambda wm: {k: v for k, v in wm.items() if v.startswith("model-00001")}, "lists 1 of the 2 shards"),
    (lambda wm: {k: ("model-00002-of-00002.safetensors" if v.startswith("model-00001") else
                     "model-00001-of-00002.safetensors") for k, v in wm.items()}, "but it is in"),
])
def test_an_index_that_disagrees_with_its_shards_is_refused(tmp_path, edit, message):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=2))
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"] = edit(index["weight_map"])
    path.write_text(json.dumps(index))
    r = run("convert", src, tmp_path / "out")
    assert r.code == 4 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path, sig):
    """What `timeout`, Slurm, `docker stop` and a closed ssh session send: the temporary output goes too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(layers=6, hidden=1024,
                                                                           intermediate=4096, vocab=256))
    out = tmp_path / "out"
    # a slow quantizer (the torch reference) keeps the run going long enough to be signalled mid-way
    p = subprocess.Popen([sys.executable, "-m", "rtnq.cli", "convert", str(src), str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RTNQ_FASTPATH": "0"})
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftovers(tmp_path), "the conversion finished before it could be signalled"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + getattr(signal, sig), err
    assert err.strip().splitlines()[-1] == f"error: terminated by {sig}; nothing partial was left behind"
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_stale_temporary_directory_is_reported(tmp_path):
    """SIGKILL or a power loss leave .OUT.rtnq-tmp-*: the next run says where and how big, and never reuses it."""
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec())
    stale = tmp_path / ".out.rtnq-tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    r = run("convert", src, tmp_path / "out")
    assert r.code == 0
    assert f"warning: {stale} (2.0 MB) is left from an interrupted run for out" in r.err.replace("\n", " ")
    assert stale.exists() and (tmp_path / "out" / "rtnq_manifest.json").exists()


def test_ambiguous_sources_are_refused_not_resolved_silently(tmp_path):
    import shutil

    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=2))
    index = src / "model.safetensors.index.json"
    # an index and a model.safetensors it does not list: two copies of the model?
    shutil.copy(src / "model-00001-of-00002.safetensors", src / "model.safetensors")
    r = run("convert", src, tmp_path / "a")
    assert r.code == 4 and "holds both model.safetensors and" in r.err, r.err
    (src / "model.safetensors").unlink()
    # no index: the two numbered shards alone are one model, a consolidated file beside them is not
    index.rename(tmp_path / "index.json")
    assert run("convert", src, tmp_path / "b").code == 0
    shutil.copy(src / "model-00002-of-00002.safetensors", src / "consolidated.safetensors")
    r = run("convert", src, tmp_path / "c")
    assert r.code == 4 and "cannot tell which form the model" in r.err and "consolidated.safetensors" in r.err
    assert not (tmp_path / "c").exists()
    (tmp_path / "index.json").rename(index)  # with the index, the extra file is simply not part of the model
    assert run("convert", src, tmp_path / "d").code == 0
