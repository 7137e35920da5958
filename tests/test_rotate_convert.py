"""`rtnq convert --rotate`: the output is exactly `rtnq convert` of the rotated model (commands.rotate.Rotation
applied first), in every format, however the reader chunks a tensor; verify re-derives it and catches a
manifest or config that does not; inspect says so; what cannot be rotated is refused with one line.

The rotation's numerics (exactness against transformers, Hadamard orders, spared channels) are in
tests/test_rotate.py; eval's what-if and transformers loading a rotated export are in tests/test_eval.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cliutil import leftovers, load_tensors, run

from rtnq import synthetic
from rtnq.commands.convert import execute
from test_rotate import rotate_dir

SPEC = synthetic.SampleSpec(layers=2, hidden=256, intermediate=512, vocab=512, tied=True, shards=2)
FORMATS = ("marlin", "gptq", "compressed-tensors")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("rotconv") / "src", SPEC)


def _convert(*args) -> None:
    r = run("convert", *args)
    assert r.code == 0, r.err


@pytest.mark.parametrize("fmt", FORMATS)
def test_rotate_is_convert_of_the_rotated_model(src, tmp_path, monkeypatch, fmt):
    # Small reads: every rotated tensor reaches the quantizer and the writer in several chunks.
    monkeypatch.setattr(execute, "CHUNK_BYTES", 64 * 1024)
    flags = ("--format", fmt, "--group-size", "64")
    _convert(src, tmp_path / "out", "--rotate", "--rotate-seed", "5", "--rotate-spare", "17,3", *flags)
    rotate_dir(src, tmp_path / "rotated", seed=5, spare=(3, 17))
    _convert(tmp_path / "rotated", tmp_path / "plain", *flags)
    got, want = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "plain")
    assert got.keys() == want.keys() and "lm_head.weight" in got  # the tied head, now its own tensor
    for name in want:
        assert torch.equal(got[name], want[name]), name
    m = json.loads((tmp_path / "out" / "rtnq_manifest.json").read_text())
    assert m["defaults"]["rotate"] == {"kind": "random", "seed": 5, "order": 254, "construction": "qr-of-gaussian",
                                       "spare": [3, 17]}
    assert m["tensors"]["lm_head.weight"]["kind"] == "passthrough"
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    assert cfg == {**json.loads((tmp_path / "plain" / "config.json").read_text())}
    r = run("verify", tmp_path / "out", "--against", src)
    assert r.code == 0, r.out + r.err
    assert leftovers(tmp_path) == []


def test_default_spare_is_auto_and_inspect_says_rotated(src, tmp_path):
    _convert(src, tmp_path / "out", "--rotate")
    m = json.loads((tmp_path / "out" / "rtnq_manifest.json").read_text())
    # the synthetic norms damp no channel: nothing spared, the full order-256 Hadamard
    assert m["defaults"]["rotate"] == {"kind": "hadamard", "seed": 0, "order": 256, "construction": "2^8",
                                       "spare": []}
    r = run("inspect", tmp_path / "out")
    assert r.code == 0 and "rotated: hadamard of order 256 (2^8), seed 0, channels left out: none" in r.out


def test_rotate_with_budget_groups_scores_the_rotated_weights(src, tmp_path):
    """The budget reads the weights it will quantize: the rotated ones. verify plans it again the same way."""
    flags = ("--budget", "4.6", "--budget-groups", "--budget-score", "error", "--format", "compressed-tensors")
    _convert(src, tmp_path / "out", "--rotate", *flags)
    rotate_dir(src, tmp_path / "rotated")
    _convert(tmp_path / "rotated", tmp_path / "plain", *flags)
    got = json.loads((tmp_path / "out" / "rtnq_manifest.json").read_text())["tensors"]
    want = json.loads((tmp_path / "plain" / "rtnq_manifest.json").read_text())["tensors"]
    assert {n: (e.get("bits"), e.get("group_size"), e.get("score")) for n, e in got.items()} == \
           {n: (e.get("bits"), e.get("group_size"), e.get("score")) for n, e in want.items()}
    assert any((e.get("rule") or "").startswith("budget:") for e in got.values())  # the budget did move something
    r = run("verify", tmp_path / "out", "--against", src)
    assert r.code == 0, r.out + r.err


@pytest.fixture(scope="module")
def rotated_out(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rotated") / "out"
    _convert(src, out, "--rotate", "--format", "compressed-tensors")
    return out


def _edited(out: Path, tmp_path: Path, name: str, edit) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    path = copy / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["defaults"]["rotate"].update(seed=1), "bytes differ"),
    (lambda m: m["defaults"]["rotate"].update(spare=[7]), "is not the one seed 0 gives"),
    (lambda m: m["defaults"]["rotate"].update(order=128), "is not the one seed 0 gives"),
    (lambda m: m["defaults"]["rotate"].pop("seed"), "no integer seed"),
    (lambda m: m["defaults"].pop("rotate"), "lm_head.weight is not in the source"),
])
def test_verify_catches_a_manifest_that_misstates_the_rotation(src, rotated_out, tmp_path, edit, words):
    copy = _edited(rotated_out, tmp_path, "rtnq_manifest.json", edit)
    r = run("verify", copy, "--against", src)
    assert r.code == 7, r.out + r.err
    assert words in r.out + r.err


def test_verify_catches_a_config_tied_again(src, rotated_out, tmp_path):
    copy = _edited(rotated_out, tmp_path, "config.json", lambda c: c.update(tie_word_embeddings=True))
    r = run("verify", copy, "--against", src)
    assert r.code == 7 and "config.json" in r.out + r.err


def test_verify_of_a_rotated_output_against_a_source_that_cannot_be_rotated(src, rotated_out, tmp_path):
    other = tmp_path / "gemma"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3_text"}))
    r = run("verify", rotated_out, "--against", other)
    assert r.code == 7 and "cannot be" in r.err and len(r.err.strip().splitlines()) == 1


@pytest.mark.parametrize("cfg_edit,flags,words", [
    ({"model_type": "gemma3_text"}, ("--rotate",), "post-sublayer norms"),
    ({"model_type": "gpt2"}, ("--rotate",), "LayerNorm"),
    ({"num_local_experts": 8}, ("--rotate",), "mixture-of-experts"),
    (None, ("--rotate",), "needs"),  # no config.json
    ({}, ("--rotate-seed", "3"), "add --rotate"),
    ({}, ("--rotate-spare", "none"), "add --rotate"),
    ({}, ("--rotate", "--rotate-spare", "x"), "--rotate-spare takes"),
    ({}, ("--rotate", "--rotate-spare", "256"), "--rotate-spare: channels"),
])
def test_refusals_are_one_line_and_write_nothing(src, tmp_path, cfg_edit, flags, words):
    model = tmp_path / "m"
    shutil.copytree(src, model)
    cfg = json.loads((model / "config.json").read_text())
    if cfg_edit is None:
        (model / "config.json").unlink()
    else:
        (model / "config.json").write_text(json.dumps({**cfg, **cfg_edit}))
    r = run("convert", model, tmp_path / "out", *flags)
    assert r.code == 2, r.err
    assert words in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
