"""`--budget BPW`: promote whole units from INT4 to INT8 by a data-free score per extra bit, within the budget."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from cliutil import run
from rtnq import formats, synthetic
from rtnq.errors import UsageError
from rtnq.numerics import sensitivity
from rtnq.selection.budget import Unit, choose


def U(key, score, extra, members=("a",)):
    return Unit((key, ""), tuple(members), score, extra)


def test_greedy_takes_the_best_score_per_bit_and_skips_what_does_not_fit():
    units = [U("big", 10.0, 100), U("small", 3.0, 10), U("mid", 4.0, 50), U("useless", 0.0, 10)]
    c = choose(units, base_bits=400, params=100, budget=5.2)  # 520 bits allowed: 120 to spend
    # score per bit: small 0.3, big 0.1, mid 0.08, useless 0: small fits, big fits (110), mid does not
    assert c.promoted == {("small", ""): 1, ("big", ""): 2}
    assert c.ranks[("small", "")] == 1 and c.ranks[("mid", "")] == 3
    assert c.bits_per_weight == pytest.approx(5.1) and c.floor == 4.0
    assert choose(units, 400, 100, 4.0).promoted == {}  # the floor itself: nothing to spend
    with pytest.raises(UsageError, match="below the 4.0000 bits per weight"):
        choose(units, 400, 100, 3.9)


def test_ties_keep_source_order():
    c = choose([U("x", 1.0, 10), U("y", 1.0, 10)], 400, 100, 4.1)
    assert c.promoted == {("x", ""): 1}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    return synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(layers=4, hidden=256, intermediate=512))


def _convert(src, out, *flags) -> dict:
    r = run("convert", src, out, *flags, "--json")
    assert r.code == 0, r.err
    return json.loads((out / "rtnq_manifest.json").read_text())


def _dry(src, out, *flags) -> dict:
    r = run("convert", src, out, *flags, "--dry-run", "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


def _bpw(m: dict) -> float:
    """Codes and scales of the quantized linears per parameter, at the logical shape."""
    bits = params = 0
    for e in m["tensors"].values():
        if e["kind"] == "quantized":
            n, k = e["shape"]
            g = k if e["group_size"] == -1 else e["group_size"]
            bits += n * k * e["bits"] + n * (k // g) * 16
            params += n * k
    return bits / params


def test_budget_promotes_whole_units_within_the_budget(src, tmp_path):
    m = _convert(src, tmp_path / "out", "--budget", "5")
    b = m["defaults"]["budget"]
    assert b["score"] == "position" and b["before"] == pytest.approx(4.125)
    assert _bpw(m) == pytest.approx(b["after"], abs=1e-4) and 4.5 < b["after"] <= 5.0
    promoted = {n for n, e in m["tensors"].items() if (e.get("rule") or "").startswith("budget:position #")}
    assert promoted and all(m["tensors"][n]["bits"] == 8 for n in promoted)
    # fused partners share a precision: q/k/v and gate/up are promoted together or not at all
    for layer in range(4):
        for group in (("q", "k", "v"), ("gate", "up")):
            bits = {m["tensors"][f"model.layers.{layer}.{'self_attn' if group[0] == 'q' else 'mlp'}.{x}_proj.weight"]
                    ["bits"] for x in group}
            assert len(bits) == 1
    ranked = [e for e in m["tensors"].values() if e.get("rank") is not None]
    assert len(ranked) == 4 * 7 and all(isinstance(e["score"], float) for e in ranked)
    assert m["rules"][-1] == {"option": "budget", "selector": "5 bpw by position", "matched": len(promoted)}
    assert run("verify", tmp_path / "out", "--against", src).code == 0
    r = run("inspect", tmp_path / "out")
    assert r.code == 0 and "budget 5.0 bits per weight by position" in r.out


def test_scores_are_the_sensitivity_module_s_with_the_input_norm(src, tmp_path):
    flags = ("--budget", "4.5", "--budget-score", "norm_error")
    plan = _dry(src, tmp_path / "out", *flags)  # --dry-run scores too, and writes nothing
    assert not (tmp_path / "out").exists()
    m = _convert(src, tmp_path / "out", *flags)
    assert sorted(plan["budget"]["promoted"]) == sorted(
        n for n, e in m["tensors"].items() if (e.get("rule") or "").startswith("budget:"))
    t = load_file(str(src / "model.safetensors"))
    name = "model.layers.2.self_attn.q_proj.weight"
    want = sensitivity.scores(t[name], 128, t["model.layers.2.input_layernorm.weight"].float())["norm_error"]
    assert m["tensors"][name]["score"] == pytest.approx(want, rel=1e-5)
    down = "model.layers.2.mlp.down_proj.weight"  # no norm precedes down_proj: the plain error
    assert m["tensors"][down]["score"] == pytest.approx(sensitivity.scores(t[down], 128)["norm_error"], rel=1e-5)
    assert sensitivity.scores(t[down], 128)["norm_error"] == sensitivity.scores(t[down], 128)["error"]


def test_explicit_rules_win_and_every_format_makes_the_same_choice(src, tmp_path):
    ms = {fmt: _convert(src, tmp_path / fmt, "--budget", "5", "--format", fmt, "--keep-int8", "layers.3+down",
                        "--skip", "layers.0+o") for fmt in formats.FORMATS}
    for m in ms.values():
        assert m["tensors"]["model.layers.3.mlp.down_proj.weight"]["rule"] == "keep-int8:layers.3+down"
        assert m["tensors"]["model.layers.0.self_attn.o_proj.weight"]["kind"] == "passthrough"
        assert "rank" not in m["tensors"]["model.layers.3.mlp.down_proj.weight"]
    bits = {fmt: {n: e.get("bits") for n, e in m["tensors"].items()} for fmt, m in ms.items()}
    assert bits["marlin"] == bits["gptq"] == bits["compressed-tensors"]


@pytest.mark.parametrize("flags,message", [
    (("--budget", "3"), "--budget 3 is below the 4.1250 bits per weight"),
    (("--budget", "4.5", "--bits", "8"), "--budget promotes INT4 tensors to INT8, so it needs --bits 4"),
    (("--budget", "-1"), "must be a positive number of bits per weight"),
    (("--budget", "4.5", "--budget-score", "luck"), "--budget-score: must be position, norm_error, error"),
])
def test_bad_budgets_are_one_line_usage_errors(src, tmp_path, flags, message):
    r = run("convert", src, tmp_path / "out", *flags)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("score", __import__("rtnq.params").params.BUDGET_SCORES)
def test_every_score_chooses_within_the_budget(src, tmp_path, score):
    plan = _dry(src, tmp_path / "x", "--budget", "4.6", "--budget-score", score)
    assert plan["budget"]["score"] == score and 4.125 < plan["budget"]["after"] <= 4.6
    assert plan["budget"]["promoted"]


@pytest.mark.parametrize("kind", sensitivity.SCORES)
def test_the_fast_score_equals_the_float64_reference(kind):
    w = synthetic.make_tensor("model.layers.0.mlp.up_proj.weight", (192, 576), __import__("torch").bfloat16)
    gamma = synthetic.make_tensor("model.layers.0.post_attention_layernorm.weight", (576,), __import__("torch").float32)
    want = sensitivity.scores(w, 64, gamma)[kind]
    assert sensitivity.score(kind, w, 64, gamma) == pytest.approx(want, rel=1e-6)


def test_verify_rederives_the_scores_and_the_choice(src, tmp_path):
    import shutil

    out = tmp_path / "out"
    m = _convert(src, out, "--budget", "4.8", "--format", "compressed-tensors", "--budget-score", "error")
    r = run("verify", out, "--against", src)
    assert r.code == 0, r.out + r.err
    promoted = [n for n, e in m["tensors"].items() if (e.get("rule") or "").startswith("budget:")]
    loser = next(n for n, e in m["tensors"].items() if e.get("rank") and n not in promoted)
    for edit, expect in (("score", "budget score"), ("choice", "not by re-running the budget")):
        bad = tmp_path / edit
        shutil.copytree(out, bad)
        mm = json.loads((bad / "rtnq_manifest.json").read_text())
        if edit == "score":
            mm["tensors"][loser]["score"] *= 1.5
        else:  # swap the rules of a promoted and a passed-over tensor: bytes would differ too, so keep them
            mm["tensors"][promoted[0]]["rule"] = "default"
        (bad / "rtnq_manifest.json").write_text(json.dumps(mm))
        r = run("verify", bad, "--against", src)
        assert r.code == 7 and expect in r.out + r.err, r.out + r.err


def test_position_prior_ranks_the_ends_first_and_reads_no_weight(src, tmp_path):
    from rtnq.selection import budget, names

    infos = {i.name: i for i in names.analyse([f"model.layers.{b}.{m}.weight" for b in range(4)
                                                for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                                          "mlp.down_proj")])}
    p = {n: budget.position_priority(i) for n, i in infos.items()}
    assert p["model.layers.0.self_attn.q_proj.weight"] == p["model.layers.3.mlp.down_proj.weight"] == 1.0
    assert p["model.layers.1.mlp.down_proj.weight"] == 0.5 == p["model.layers.0.self_attn.o_proj.weight"]
    assert p["model.layers.0.mlp.up_proj.weight"] == 0.25
    m = _convert(src, tmp_path / "out", "--budget", "4.6")
    first = sorted((e["rank"], n) for n, e in m["tensors"].items() if e.get("rank"))[:3]
    assert {n for _, n in first} == {f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"}
    assert run("verify", tmp_path / "out", "--against", src).code == 0
