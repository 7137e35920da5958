"""Issue 14 item 4: sources rtnq cannot convert correctly are refused with one line, exit 4 and nothing
left behind. Before, re-converting rtnq's own output (or its exports) exited 0 with a config claiming a
4-bit quantization and zero tensors quantized, and an int32 tensor named like a linear weight passed
through silently."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cliutil import leftovers, run
from rtnq import synthetic


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("refusals") / "src", synthetic.SampleSpec(shards=1))


def _refused(source, tmp_path, *needles):
    out = tmp_path / "out"
    r = run("convert", source, out)
    assert r.code == 4, (r.code, r.err)
    lines = [x for x in r.err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and leftovers(tmp_path) == []
    return lines[0]


def _with_quantization_config(src, other, qcfg):
    """A copy of `src` whose config.json claims the quantization `qcfg`."""
    other.mkdir()
    for f in src.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (other / "config.json").write_text(json.dumps(cfg))
    return other


@pytest.mark.parametrize("fmt,method", [("marlin", "rtnq"), ("gptq", "gptq"), ("compressed-tensors", "compressed-tensors")])
def test_reconverting_rtnq_output_is_refused_pointing_to_dequantize(src, tmp_path, fmt, method):
    q = tmp_path / "q"
    assert run("convert", src, q, "--format", fmt).code == 0
    _refused(q, tmp_path, "already quantized", repr(method), "rtnq dequantize")


def test_a_quantized_checkpoint_without_its_config_is_recognised_by_its_tensors(src, tmp_path):
    q = tmp_path / "q"
    assert run("convert", src, q).code == 0
    (q / "config.json").unlink()
    _refused(q, tmp_path, ".qweight", "quantized checkpoint")


@pytest.mark.parametrize("qcfg,needles", [
    ({"quant_method": "awq", "bits": 4}, ("'awq'", "original 16-bit")),
    # block-scaled "fp8" and compressed-tensors float-quantized FP8 convert now (tests/test_fp8.py); others do not
    ({"quant_method": "fbgemm_fp8"}, ("'fbgemm_fp8'", "FP8 variant is not supported")),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}, ("'compressed-tensors'", "rtnq dequantize")),
    ({"load_in_4bit": True}, ("'bitsandbytes'",)),
])
def test_other_quantization_configs_are_named(src, tmp_path, qcfg, needles):
    other = _with_quantization_config(src, tmp_path / "other", qcfg)
    _refused(other, tmp_path, "already quantized", *needles)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8])
def test_an_integer_tensor_where_a_linear_weight_belongs(src, tmp_path, dtype):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(512, 256, dtype=dtype)
    save_file(t, bad / "model.safetensors")
    _refused(bad, tmp_path, "model.layers.0.mlp.up_proj.weight", "where a linear weight belongs")


def _gpt2(path, linear_layout: bool):
    """GPT-2 names; Conv1D stores (in, out), GPT-BigCode the same names as nn.Linear (out, in)."""
    h = 128
    t = {"transformer.wte.weight": torch.randn(512, h), "transformer.ln_f.weight": torch.ones(h)}
    for i in range(2):
        p = f"transformer.h.{i}"
        for name, (k, n) in {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, 4 * h),
                             "mlp.c_proj": (4 * h, h)}.items():
            t[f"{p}.{name}.weight"] = torch.randn((n, k) if linear_layout else (k, n))
        t[f"{p}.ln_1.weight"] = torch.ones(h)
    path.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in t.items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2" if not linear_layout else "gpt_bigcode"}))
    return path


def test_gpt2_conv1d_weights_are_refused_with_the_reason(tmp_path):
    _refused(_gpt2(tmp_path / "gpt2", False), tmp_path, "Conv1D", "(in, out)", "transformer.h.0.attn.c_attn.weight")


def test_bigcode_linears_with_the_same_names_still_convert(tmp_path):
    r = run("convert", _gpt2(tmp_path / "bigcode", True), tmp_path / "out")
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "out" / "rtnq_manifest.json").read_text())
    assert m["totals"]["tensors"]["int4"] == 8


def test_an_fp8_config_over_16_bit_weights_converts_them(src, tmp_path):
    """DeepSeek's fp8_cast_bf16.py writes bf16 weights but keeps the FP8 config.json: nothing is FP8, so the
    weights convert as they are, with a note; the FP8 config does not reach OUT."""
    other = _with_quantization_config(src, tmp_path / "other", {"quant_method": "fp8", "weight_block_size": [128, 128]})
    r = run("convert", other, tmp_path / "out")
    assert r.code == 0, r.err
    assert "no weight is stored as F8_E4M3" in r.err
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["quantization_config"]["quant_method"] == "rtnq"


def test_fp8_config_with_a_stray_scale_is_refused(src, tmp_path):
    other = _with_quantization_config(src, tmp_path / "other", {"quant_method": "fp8", "weight_block_size": [128, 128]})
    t = load_file(other / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(4, 2)
    save_file(t, other / "model.safetensors")
    _refused(other, tmp_path, "model.layers.0.mlp.up_proj.weight_scale_inv", "not an F8_E4M3 weight")
