"""`rtnq verify OUT --against SRC` means "OUT loads, the way engines load it, as what convert writes from SRC".

Each edit below passed verify before it checked config.json, the index, the shard each tensor is in and
the output headers (the bytes still matched, found by name): now each is exit 7 (VerifyMismatch) with a
one-line error, or exit 4 (CheckpointError) where OUT cannot be read as one checkpoint at all.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cliutil import run
from safetensors import safe_open
from safetensors.torch import save_file

from rtnq import synthetic

FORMATS = ("marlin", "gptq", "compressed-tensors")
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
Q = "model.layers.0.self_attn.q_proj.weight"  # quantized (in the first shard)
NORM = "model.layers.0.input_layernorm.weight"  # passthrough


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """A 2-shard source and its output in every format (layer 0 kept INT8, so configs have overrides)."""
    root = tmp_path_factory.mktemp("loads")
    src = synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(shards=2))
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = root / fmt
        r = run("convert", src, outs[fmt], "--format", fmt, "--keep-int8", "layers.0")
        assert r.code == 0, r.err
    return src, outs


def _copy(two_shards, tmp_path, fmt="marlin", name="out"):
    src, outs = two_shards
    out = tmp_path / name
    shutil.copytree(outs[fmt], out)
    return src, out


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _fails(out, src, code=7):
    """verify's exit code and its one error line."""
    r = run("verify", out, "--against", src)
    assert r.code == code, (r.code, r.out, r.err)
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    return lines[0]


def _failing_rows(out, src):
    r = run("verify", out, "--against", src, "--json")
    return {(t["name"], t["detail"]) for t in json.loads(r.out)["tensors"] if not t["ok"]}


# ------------------------------------------------------------------------------------------------ clean outputs

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("flags", [(), ("--keep-int8", "mlp"), ("--budget", "4.5"), ("--group-size", "-1")])
def test_a_clean_output_in_every_format_verifies(tmp_path, fmt, flags):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(shards=2))
    assert run("convert", src, tmp_path / "out", "--format", fmt, *flags).code == 0
    r = run("verify", tmp_path / "out", "--against", src, "--json")
    assert r.code == 0, r.out + r.err
    report = json.loads(r.out)
    assert report["ok"] and report["checked"] == 21 and {t["kind"] for t in report["tensors"]} == {"quantized", "passthrough"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_source_without_config_json_verifies_and_its_output_config_is_still_checked(tmp_path, fmt):
    """convert then writes config.json holding only the quantization_config; verify expects just that."""
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec())
    (src / "config.json").unlink()
    out = tmp_path / "out"
    assert run("convert", src, out, "--format", fmt).code == 0
    assert run("verify", out, "--against", src).code == 0
    _edit_json(out / "config.json", lambda c: c.update(model_type="llama"))
    assert "config.json: model_type is \"llama\", convert writes no such key" in _fails(out, src)


# ------------------------------------------------------------------------------------------------ shards and index

def test_swapped_shards(two_shards, tmp_path):
    """Found by name, every byte matched; but the index and manifest send engines to the other file."""
    src, out = _copy(two_shards, tmp_path)
    a, b = (out / s for s in SHARDS)
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    line = _fails(out, src)
    assert ", the manifest says model-0000" in line and "(and 20 more problems)" in line  # one row per tensor
    r = run("verify", out, "--against", src, "--json")
    report = json.loads(r.out)
    assert not report["ok"] and {t["kind"] for t in report["tensors"] if not t["ok"]} == {"layout"}


def test_manifest_shard_edited(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][Q].update(shard=SHARDS[1]))
    line = _fails(out, src)
    assert line.startswith(f"error: {Q}: ") and f"is in {SHARDS[0]}, the manifest says {SHARDS[1]}" in line


def test_index_entry_pointing_at_the_other_shard(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "model.safetensors.index.json", lambda i: i["weight_map"].update({NORM: SHARDS[1]}))
    assert f"{NORM} is in {SHARDS[0]}, the index says {SHARDS[1]}" in _fails(out, src)


def test_tensor_missing_from_the_index(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "model.safetensors.index.json", lambda i: i["weight_map"].pop(NORM))
    assert "the index says nothing" in _fails(out, src)


def test_index_deleted(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    (out / "model.safetensors.index.json").unlink()
    assert "model.safetensors.index.json: missing: the output has 2 shards" in _fails(out, src)


def test_a_corrupted_duplicate_in_an_earlier_shard_is_refused(two_shards, tmp_path):
    """The same name in two shards: which copy loads depends on the loader. Exit 4, naming both shards."""
    src, out = _copy(two_shards, tmp_path)
    name = "model.norm.weight"  # in the second shard
    with safe_open(str(out / SHARDS[1]), "pt") as f:
        assert name in f.keys()
        bad = f.get_tensor(name).clone()
    bad[0] += 1
    with safe_open(str(out / SHARDS[0]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({**tensors, name: bad}, str(out / SHARDS[0]), metadata=meta)
    line = _fails(out, src, code=4)
    assert name in line and SHARDS[0] in line and SHARDS[1] in line


def test_a_name_twice_in_the_index_is_refused(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    path = out / "model.safetensors.index.json"
    text = path.read_text()
    entry = f'"{NORM}": "{SHARDS[0]}"'
    assert entry in text
    path.write_text(text.replace(entry, f'{entry},\n    "{NORM}": "{SHARDS[1]}"'))
    assert "appears twice" in _fails(out, src, code=4)


def test_a_passthrough_header_reinterpreted_with_the_same_bytes(two_shards, tmp_path):
    """bf16 bytes relabelled fp16 in the header: byte-identical, but an engine loads other numbers."""
    src, out = _copy(two_shards, tmp_path)
    with safe_open(str(out / SHARDS[0]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[NORM] = tensors[NORM].view(torch.float16)
    save_file(tensors, str(out / SHARDS[0]), metadata=meta)
    assert f"{NORM} is F16 [256] in its shard, convert writes BF16 [256]" in _fails(out, src)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_metadata_is_checked(two_shards, tmp_path, fmt):
    """transformers refuses a shard whose __metadata__ format is not "pt"; rtnq's loader wants its own."""
    src, out = _copy(two_shards, tmp_path, fmt)
    with safe_open(str(out / SHARDS[1]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out / SHARDS[1]), metadata={"format": "np"})
    assert _fails(out, src).startswith(f'error: {SHARDS[1]}: __metadata__ is {{"format": "np"}}, convert writes {{"')


# ------------------------------------------------------------------------------------------------ manifest fields

def test_manifest_shape_edited(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][NORM].update(shape=[128]))
    assert f"{NORM} is 256 in the source, 128 in the manifest" in _fails(out, src)


def test_manifest_dtype_edited(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][Q].update(dtype="float16"))
    assert f"{Q}: the manifest's dtype is float16, the source tensor's bfloat16" in _fails(out, src)


def _fails_4_or_7(out, src):
    """A manifest edit its schema check (rtnq.checkpoint.manifest) refuses is exit 4, one verify catches
    is exit 7; never 2 or 6 (a usage or shape error from re-quantizing with the edited numbers), never a
    traceback."""
    r = run("verify", out, "--against", src)
    assert r.code in (4, 7) and len(r.err.strip().splitlines()) == 1 and r.err.startswith("error: "), r
    return r.err.strip()


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_kind_quantized_to_passthrough(two_shards, tmp_path, fmt):
    src, out = _copy(two_shards, tmp_path, fmt)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][Q].update(kind="passthrough"))
    assert Q in _fails_4_or_7(out, src)

    def as_passthrough(m):  # a whole passthrough entry, as convert would write one
        e = m["tensors"][Q]
        for key in ("bits", "group_size", "rule", "error", "padded_shape", "score", "rank"):
            e.pop(key, None)
        e.update(kind="passthrough", reason="edited", outputs={"tensor": Q})

    src, out = _copy(two_shards, tmp_path, fmt, "whole")
    _edit_json(out / "rtnq_manifest.json", as_passthrough)
    _fails(out, src)
    failing = _failing_rows(out, src)
    assert (Q, f"output tensor {Q} is missing") in failing
    assert any(name == "config.json" for name, _ in failing)  # its precision is no longer what the config says


def test_manifest_kind_passthrough_to_quantized(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][NORM].update(kind="quantized", bits=4,
                                                                                 group_size=128))
    assert NORM in _fails_4_or_7(out, src)

    def as_quantized(m):
        e = m["tensors"]["lm_head.weight"]
        e.pop("reason")
        e.update(kind="quantized", bits=4, group_size=128, rule="default",
                 outputs={"qweight": "lm_head.qweight", "scales": "lm_head.scales"})

    src, out = _copy(two_shards, tmp_path, "marlin", "whole")
    _edit_json(out / "rtnq_manifest.json", as_quantized)
    assert _fails(out, src).endswith("first: lm_head.weight (output tensor lm_head.qweight is missing)")
    assert ("lm_head.weight", "output tensor not described by the manifest") in _failing_rows(out, src)


@pytest.mark.parametrize("field,value", [("bits", 3), ("group_size", 96), ("group_size", 100)])
def test_impossible_quantization_fields_are_4_or_7_never_2_or_6(two_shards, tmp_path, field, value):
    """Before: bits 3 was exit 2 (the quantizer's usage error), a group size k does not divide exit 6."""
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][Q].update({field: value}))
    assert Q in _fails_4_or_7(out, src)


def test_a_valid_group_size_convert_did_not_use(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    _edit_json(out / "rtnq_manifest.json", lambda m: m["tensors"][Q].update(group_size=32))
    assert "scales is BF16 [2, 256] in its shard, convert writes BF16 [8, 256]" in _fails(out, src)


# ------------------------------------------------------------------------------------------------ config.json

BITS_KEY = {"marlin": ("bits",), "gptq": ("bits",),
            "compressed-tensors": ("config_groups", "group_1", "weights", "num_bits")}
GROUP_KEY = {"marlin": ("group_size",), "gptq": ("group_size",),
             "compressed-tensors": ("config_groups", "group_1", "weights", "group_size")}


def _set(cfg, keys, value):
    for k in keys[:-1]:
        cfg = cfg[k]
    cfg[keys[-1]] = value


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_bits_changed(two_shards, tmp_path, fmt):
    src, out = _copy(two_shards, tmp_path, fmt)
    _edit_json(out / "config.json", lambda c: _set(c["quantization_config"], BITS_KEY[fmt], 8))
    path = ".".join(("quantization_config",) + BITS_KEY[fmt])
    assert _fails(out, src) == f"error: config.json: {path} is 8, convert writes 4"


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_group_size_changed(two_shards, tmp_path, fmt):
    src, out = _copy(two_shards, tmp_path, fmt)
    _edit_json(out / "config.json", lambda c: _set(c["quantization_config"], GROUP_KEY[fmt], 64))
    path = ".".join(("quantization_config",) + GROUP_KEY[fmt])
    assert _fails(out, src) == f"error: config.json: {path} is 64, convert writes 128"


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_quantization_config_removed(two_shards, tmp_path, fmt):
    src, out = _copy(two_shards, tmp_path, fmt)
    _edit_json(out / "config.json", lambda c: c.pop("quantization_config"))
    assert _fails(out, src).startswith("error: config.json: quantization_config is missing, convert writes {")


@pytest.mark.parametrize("fmt", FORMATS)
def test_config_json_deleted(two_shards, tmp_path, fmt):
    src, out = _copy(two_shards, tmp_path, fmt)
    (out / "config.json").unlink()
    assert _fails(out, src).startswith("error: config.json: missing; convert writes it")


def test_gptq_quantize_config_json_is_checked_too(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path, "gptq")
    _edit_json(out / "quantize_config.json", lambda c: c.update(bits=8))
    assert _fails(out, src) == "error: quantize_config.json: bits is 8, convert writes 4"


def test_a_corrupt_config_json_is_unreadable(two_shards, tmp_path):
    src, out = _copy(two_shards, tmp_path)
    (out / "config.json").write_text('{"quantization_config": ')
    assert "config.json" in _fails(out, src, code=4)
