"""`--scale mse` end to end: recorded in the manifest and config, re-derived by verify, in every format."""

from __future__ import annotations

import json
import shutil

import pytest

from cliutil import run
from rtnq import formats, synthetic


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return synthetic.write_checkpoint(tmp_path_factory.mktemp("scale") / "src", synthetic.SampleSpec())


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_mse_scales_verify_in_every_format_and_lower_the_error(src, tmp_path, fmt):
    outs = {}
    for scale in ("absmax", "mse"):
        outs[scale] = tmp_path / scale
        r = run("convert", src, outs[scale], "--format", fmt, "--scale", scale)
        assert r.code == 0, r.err
        assert run("verify", outs[scale], "--against", src).code == 0
    m = {s: json.loads((o / "rtnq_manifest.json").read_text()) for s, o in outs.items()}
    assert m["mse"]["defaults"]["scale_rule"] == "rtn-mse" and m["absmax"]["defaults"]["scale_rule"] == "rtn-absmax"
    errors = {s: [e["error"] for e in mm["tensors"].values() if e["kind"] == "quantized"] for s, mm in m.items()}
    assert all(a >= b for a, b in zip(errors["absmax"], errors["mse"])) and sum(errors["mse"]) < sum(errors["absmax"])
    qcfg = json.loads((outs["mse"] / "config.json").read_text())["quantization_config"]
    if fmt == "compressed-tensors":
        assert {g["weights"]["observer"] for g in qcfg["config_groups"].values()} == {"mse"}
    elif fmt == "marlin":
        assert qcfg["scale_rule"] == "rtn-mse"
    # the rule is part of what verify re-derives: the mse output does not pass as absmax
    bad = tmp_path / "bad"
    shutil.copytree(outs["mse"], bad)
    mm = m["mse"]
    mm["defaults"]["scale_rule"] = "rtn-absmax"
    (bad / "rtnq_manifest.json").write_text(json.dumps(mm))
    assert run("verify", bad, "--against", src).code == 7
    mm["defaults"]["scale_rule"] = "rtn-magic"
    (bad / "rtnq_manifest.json").write_text(json.dumps(mm))
    r = run("verify", bad, "--against", src)
    assert r.code == 4 and "scale_rule 'rtn-magic'" in r.err


def test_bad_scale_is_a_usage_error(src, tmp_path):
    r = run("convert", src, tmp_path / "o", "--scale", "best")
    assert r.code == 2 and "--scale" in r.err and "absmax or mse" in r.err
