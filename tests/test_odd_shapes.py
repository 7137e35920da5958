"""Every linear of a real model's shapes is quantized, in every format (SmolLM2-135M: hidden 576 = 4.5 x 128,
k/v width 192, intermediate 1536).

k = 576 takes groups of 64 in every format; the marlin format stores those weights padded to k = 640 with
zero codes, GPTQ and compressed-tensors the logical shape. All three must verify, dequantize to the same
bytes (= rtn.dequantize(rtn.quantize(w)) of the logical weight), load in transformers (compressed-tensors,
mixed group sizes), and give the same eval figures.
"""

from __future__ import annotations

import json

import pytest
import torch

from cliutil import run
from rtnq import formats, synthetic
from rtnq.numerics import rtn
from safetensors.torch import load_file

FORMATS = formats.FORMATS
SMOL = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, layers=2, vocab=512, odd_linear=True)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def load_dir(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    src = synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(**SMOL))
    outs = {}
    for fmt in FORMATS:
        outs[fmt] = root / fmt
        r = run("convert", src, outs[fmt], "--format", fmt, "--keep-int8", "layers.0", "--json")
        assert r.code == 0, r.err
    return root, src, outs


def _manifest(out) -> dict:
    return json.loads((out / "rtnq_manifest.json").read_text())


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_block_linear_is_quantized_with_its_own_group_size(smol, fmt):
    _, _, outs = smol
    m = _manifest(outs[fmt])
    assert m["version"] == 4
    for layer in range(2):
        for module in LINEARS:
            e = m["tensors"][f"model.layers.{layer}.{module}.weight"]
            assert e["kind"] == "quantized", (module, e.get("reason"))
            assert e["bits"] == (8 if layer == 0 else 4)
            assert e["group_size"] == (128 if module == "mlp.down_proj" else 64)
            k = e["shape"][1]
            if fmt == "marlin" and k == 576:
                assert e["padded_shape"] == [e["shape"][0], 640]
            else:
                assert "padded_shape" not in e
    odd = m["tensors"]["model.layers.0.mlp.odd_proj.weight"]  # k = 200: no group size divides it
    assert odd["kind"] == "passthrough" and odd["reason"].startswith("shape: k=200")
    assert m["totals"]["linear_parameters"] > 0
    quantized = sum(e["shape"][0] * e["shape"][1] for e in m["tensors"].values() if e["kind"] == "quantized")
    assert quantized / m["totals"]["linear_parameters"] > 0.99
    assert any("use group size 64 instead of 128" in w for w in m["warnings"])
    assert any("stored padded" in w for w in m["warnings"]) == (fmt == "marlin")
    # which vLLM kernel serves a layer off Marlin's tiles depends on its version: the exports say so
    assert any("off the Marlin kernels' tiles" in w for w in m["warnings"]) == (fmt != "marlin")


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_passes_and_catches_a_padded_shape_edit(smol, fmt, tmp_path):
    import shutil

    root, src, outs = smol
    r = run("verify", outs[fmt], "--against", src)
    assert r.code == 0, r.err
    if fmt != "marlin":
        return
    bad = tmp_path / "bad"
    shutil.copytree(outs[fmt], bad)
    m = _manifest(bad)
    m["tensors"]["model.layers.1.self_attn.o_proj.weight"]["padded_shape"] = [576, 576]
    (bad / "rtnq_manifest.json").write_text(json.dumps(m))
    r = run("verify", bad, "--against", src)
    assert r.code == 7 and "padded_shape" in r.out + r.err


def test_all_formats_dequantize_to_the_rtn_weights(smol, tmp_path):
    _, src, outs = smol
    source = load_dir(src)
    dense = {}
    for fmt in FORMATS:
        r = run("dequantize", outs[fmt], tmp_path / fmt)
        assert r.code == 0, r.err
        dense[fmt] = load_dir(tmp_path / fmt)
    m = _manifest(outs["marlin"])
    for name, w in source.items():
        for fmt in FORMATS:
            assert dense[fmt][name].shape == w.shape and torch.equal(
                dense[fmt][name].view(torch.uint8), dense["marlin"][name].view(torch.uint8)), (fmt, name)
        e = m["tensors"][name]
        if e["kind"] == "quantized":
            codes, scales = rtn.quantize(w, e["bits"], e["group_size"])
            assert torch.equal(dense["marlin"][name], rtn.dequantize(codes, scales, e["bits"], e["group_size"])), name


def test_padded_marlin_codes_are_zero_outside_the_weight(smol):
    from rtnq.numerics import marlin

    _, _, outs = smol
    t = load_dir(outs["marlin"])
    qweight, scales = t["model.layers.1.self_attn.q_proj.qweight"], t["model.layers.1.self_attn.q_proj.scales"]
    assert qweight.shape == (640 // 16, 576 * 16 * 4 // 32) and scales.shape == (640 // 64, 576)
    codes, plain = marlin.unpack(qweight, scales, 4, 576, 640)
    assert (codes[:, 576:] == rtn.bias(4)).all() and (plain[:, 9:] == 0).all()


def test_transformers_loads_the_mixed_group_compressed_tensors_export(smol, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, _, outs = smol
    model = transformers.AutoModelForCausalLM.from_pretrained(str(outs["compressed-tensors"]), dtype=torch.bfloat16)
    logits = model(torch.tensor([[1, 2, 3]])).logits  # the first forward decompresses every module
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
    assert run("dequantize", outs["compressed-tensors"], tmp_path / "dense").code == 0
    dense = load_dir(tmp_path / "dense")
    theirs = model.state_dict()
    m = _manifest(outs["compressed-tensors"])
    checked = 0
    for name, e in m["tensors"].items():
        if e["kind"] == "quantized":
            assert torch.equal(theirs[name], dense[name]), name
            checked += 1
    assert checked == 14


def test_runtime_loads_padded_weights_on_the_cpu(smol):
    from rtnq.runtime.loader import load_checkpoint

    _, src, outs = smol
    source = load_dir(src)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    ys = {}
    for fmt in FORMATS:
        ck = load_checkpoint(outs[fmt], device="cpu")
        layer = ck.linears["model.layers.1.self_attn.o_proj"]
        assert (layer.in_features, layer.out_features) == (576, 576)
        ys[fmt] = layer(x)
    w = source["model.layers.1.self_attn.o_proj.weight"]
    want = torch.nn.functional.linear(x, rtn.dequantize(*rtn.quantize(w, 4, 64), 4, 64))
    for fmt in FORMATS:
        assert torch.equal(ys[fmt], want), fmt
