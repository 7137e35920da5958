"""End to end: `rtnq convert`, `inspect` and `verify` through the real entry point on synthetic checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cliutil import load_tensors, leftovers, run, run_process
from rtnq.checkpoint import manifest as mf
from rtnq.numerics import marlin, rtn
from rtnq import dtypes, synthetic


def _load_dir(path):
    """Every tensor of a converted directory, via the safetensors library (an independent reader)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors, meta = {}, {}
    for shard in sorted(set(index.values())):
        with safe_open(str(path / shard), "pt") as f:
            meta[shard] = f.metadata()
            for name in f.keys():
                assert index[name] == shard
                tensors[name] = f.get_tensor(name)
    assert set(index) == set(tensors)
    return tensors, meta


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    src = tmp_path_factory.mktemp("src") / "llama"
    synthetic.write_checkpoint(src, synthetic.SampleSpec(layers=3, shards=3, odd_linear=True,
                                                     extra_files={"tokenizer.json": '{"v": 1}'}))
    return src


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "llama-rtnq"
    r = run("convert", llama, out, "--bits", "4", "--keep-int8", "layers.0,mlp")
    assert r.code == 0, r.err
    return out


def test_every_tensor_matches_rtn_and_marlin_directly(llama, converted):
    src = load_tensors(llama)
    out, meta = _load_dir(converted)
    m = mf.read(converted)
    assert set(m.tensors) == set(src)
    for shard_meta in meta.values():
        assert shard_meta["format"] == "rtnq" and shard_meta["manifest_version"] == str(mf.VERSION) == "4"
    for name, w in src.items():
        e = m.tensors[name]
        if e.kind == "passthrough":
            assert torch.equal(out[name], w) and out[name].dtype == w.dtype, name
            continue
        in_layer0 = name.startswith("model.layers.0.")
        expect_bits = 8 if (in_layer0 or ".mlp." in name) else 4
        assert (e.bits, e.group_size) == (expect_bits, 128), name
        codes, scales = rtn.quantize(w, e.bits, 128)
        qweight, mscales = marlin.pack(codes, scales, e.bits)
        assert torch.equal(out[e.outputs["qweight"]], qweight), name
        assert torch.equal(out[e.outputs["scales"]], mscales), name
        assert e.error == pytest.approx(rtn.relative_error(w, rtn.dequantize(codes, scales, e.bits, 128)))
        assert name.removesuffix(".weight") + ".qweight" == e.outputs["qweight"]
        assert name not in out  # the 16-bit weight is replaced, not kept


def test_manifest_agrees_with_the_files(converted):
    m = mf.read(converted)
    out, _ = _load_dir(converted)
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    described = set()
    for name, e in m.tensors.items():
        for role, tensor_name in e.outputs.items():
            assert index[tensor_name] == e.shard
            described.add(tensor_name)
        if e.kind == "quantized":
            n, k = e.shape
            assert tuple(out[e.outputs["qweight"]].shape) == (k // 16, n * 16 * e.bits // 32)
            assert tuple(out[e.outputs["scales"]].shape) == (k // 128, n)
            assert e.rule
        else:
            assert e.reason
    assert described == set(out)
    t = m.totals
    assert t["tensors"]["int4"] == 4 * 2  # attention of layers 1 and 2
    assert t["tensors"]["int8"] == 7 + 3 * 2  # layer 0 all, plus mlp of layers 1-2
    assert t["bytes_out"] == sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    assert m.tensors["model.layers.0.mlp.odd_proj.weight"].reason.startswith("shape")
    assert [r["selector"] for r in m.rules if r["option"] == "keep-int8"] == ["layers.0", "mlp"]
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rtnq" and cfg["model_type"] == "llama"
    assert (converted / "tokenizer.json").read_text() == '{"v": 1}'
    raw = (converted / mf.FILENAME).read_text()
    assert json.loads(raw) == m.to_json() and list(json.loads(raw)) == sorted(json.loads(raw))


def test_verify_passes_then_fails_on_a_flipped_byte(llama, converted, tmp_path):
    ok = run("verify", converted, "--against", llama)
    assert ok.code == 0, ok.err
    assert f"all {len(mf.read(converted).tensors)} tensors match" in ok.out
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(converted, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    bad = run("verify", broken, "--against", llama, "--json")
    assert bad.code == 7
    report = json.loads(bad.out)
    assert report["mismatches"] == 1 and not report["ok"]
    assert "differ" in bad.err.strip().splitlines()[-1]


def test_inspect_table_and_json(converted):
    r = run("inspect", converted)
    assert r.code == 0
    assert "int8" in r.out and "int4" in r.out and "bits per weight" in r.out
    j = run("inspect", converted, "--json")
    assert json.loads(j.out)["version"] == 4 and j.err == ""


def test_inspect_refuses_unknown_manifest_version(converted, tmp_path):
    import shutil

    d = tmp_path / "future"
    shutil.copytree(converted, d)
    data = json.loads((d / mf.FILENAME).read_text())
    data["version"] = 5
    (d / mf.FILENAME).write_text(json.dumps(data))
    r = run("inspect", d)
    assert r.code == 4 and "version 5 is not supported" in r.err


def test_version_1_manifests_still_read_as_marlin(converted, llama, tmp_path):
    """rtnq 0.1 wrote version 1 (Marlin only, no other format); those outputs stay readable."""
    import shutil

    d = tmp_path / "v1"
    shutil.copytree(converted, d)
    data = json.loads((d / mf.FILENAME).read_text())
    data["version"] = 1
    data["format"] = "gptq"  # ignored: version 1 can only be Marlin
    (d / mf.FILENAME).write_text(json.dumps(data))
    assert mf.read(d).format == "rtnq-marlin"
    j = run("inspect", d, "--json")
    assert j.code == 0 and json.loads(j.out)["format"] == "rtnq-marlin"
    assert run("verify", d, "--against", llama).code == 0


def test_version_2_manifests_read_with_kind_quantized(converted, llama, tmp_path):
    """Versions 1-2 said kind "marlin" and totals "marlin4"/"marlin8"; they read as "quantized"/"int4"/"int8"."""
    import shutil

    d = tmp_path / "v2"
    shutil.copytree(converted, d)
    data = json.loads((d / mf.FILENAME).read_text())
    want = json.loads(json.dumps(data))
    data["version"] = 2
    for e in data["tensors"].values():
        if e["kind"] == "quantized":
            e["kind"] = "marlin"
    data["totals"]["tensors"] = {"marlin4": want["totals"]["tensors"]["int4"],
                                 "marlin8": want["totals"]["tensors"]["int8"],
                                 "passthrough": want["totals"]["tensors"]["passthrough"]}
    (d / mf.FILENAME).write_text(json.dumps(data))
    m = mf.read(d)
    assert m.version == 2 and m.totals["tensors"] == want["totals"]["tensors"]
    assert {n: e.kind for n, e in m.tensors.items()} == {n: e["kind"] for n, e in want["tensors"].items()}
    assert len(m.quantized()) == want["totals"]["tensors"]["int4"] + want["totals"]["tensors"]["int8"] > 0
    assert run("verify", d, "--against", llama).code == 0
    assert run("dequantize", d, tmp_path / "dense").code == 0


def test_dry_run_writes_nothing_and_predicts_the_size(llama, converted, tmp_path):
    out = tmp_path / "never"
    r = run("convert", llama, out, "--keep-int8", "layers.0,mlp", "--dry-run", "--json")
    assert r.code == 0, r.err
    assert not out.exists() and leftovers(tmp_path) == []
    plan = json.loads(r.out)
    assert plan["totals"]["bytes_out"] == sum(p.stat().st_size for p in converted.glob("*.safetensors"))
    human = run("convert", llama, out, "--dry-run")
    assert "dry run" in human.out and not out.exists()


def test_convert_json_summary(llama, tmp_path):
    r = run("convert", llama, tmp_path / "o", "--bits", "8", "--json")
    assert r.code == 0, r.err
    s = json.loads(r.out)
    assert s["tensors"]["int4"] == 0 and s["tensors"]["int8"] == 21
    assert 8.0 < s["bits_per_weight"] < 8.3


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_fp16_and_fp32_sources(tmp_path, dtype):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(dtype=dtype, tied=True))
    r = run("convert", src, tmp_path / "out")
    assert r.code == 0, r.err
    m = mf.read(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        scales = f.get_tensor("model.layers.0.mlp.up_proj.scales")
        norm = f.get_tensor("model.norm.weight")
        assert "lm_head.weight" not in f.keys()  # tied: there is none, and none is invented
        emb = f.get_tensor("model.embed_tokens.weight")
    expect = torch.float16 if dtype == "fp16" else torch.bfloat16  # fp32 is quantized in bf16
    assert scales.dtype == expect
    assert norm.dtype == dtypes.BY_SHORT[dtype].torch  # passthrough keeps the source dtype and bytes
    assert emb.dtype == dtypes.BY_SHORT[dtype].torch
    assert m.tensors["model.embed_tokens.weight"].kind == "passthrough"
    assert run("verify", tmp_path / "out", "--against", src).code == 0


def test_fp32_source_with_explicit_fp16(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(dtype="fp32"))
    assert run("convert", src, tmp_path / "out", "--dtype", "fp16").code == 0
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.q_proj.scales").dtype == torch.float16
    assert run("verify", tmp_path / "out", "--against", src).code == 0


def test_force_replaces_and_group_sizes(llama, tmp_path):
    out = tmp_path / "o"
    assert run("convert", llama, out, "--group-size", "-1").code == 0
    assert run("convert", llama, out, "--group-size", "64").code == 2  # exists
    assert mf.read(out).defaults["group_size"] == -1
    assert run("convert", llama, out, "--group-size", "64", "--force").code == 0
    assert mf.read(out).defaults["group_size"] == 64
    assert leftovers(tmp_path) == []
    assert run("verify", out, "--against", llama).code == 0


def test_console_script_module_runs_as_a_process(llama, tmp_path):
    p = run_process("convert", llama, tmp_path / "o", "--keep-int8", "layer.0")
    assert p.returncode == 2
    assert "layer.0" in p.stderr and "layers.0" in p.stderr  # the close candidate
    assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_linear_bits_per_weight_counts_the_linears_left_in_16_bit(tmp_path):
    """The summary's headline: a linear the shape rule keeps in 16-bit costs 16 bits per weight there, which
    bits_per_weight (quantized linears only) would hide; norms and embeddings are not linears."""
    from rtnq.commands import convert

    src = synthetic.write_checkpoint(tmp_path / "src", synthetic.SampleSpec(odd_linear=True))
    t = convert.totals(convert.make_plan(src, tmp_path / "out", convert.ConvertOptions(dry_run=True)))
    odd = 96 * 200  # model.layers.0.mlp.odd_proj: n=96 fails n % 64, stays bf16
    quantized_bits = t["bits_per_weight"] * t["quantized_parameters"]
    assert t["linear_parameters"] == t["quantized_parameters"] + odd
    assert t["linear_bits_per_weight"] == pytest.approx((quantized_bits + 16 * odd) / (t["quantized_parameters"] + odd),
                                                        abs=1e-3)
    assert t["bits_per_weight"] < t["linear_bits_per_weight"] < 16
    r = run("convert", src, tmp_path / "out", "--dry-run")
    assert "all linears in the blocks, 16-bit ones included" in r.out
