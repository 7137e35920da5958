"""`--budget BPW --budget-groups`: a unit may stay INT4 at its group size, take groups of 64 or 32, or go to
INT8, whichever removes the most modelled loss per extra bit (a multiple-choice knapsack)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from cliutil import run
from test_budget import _bpw, _convert  # the same helpers: convert with --json, bits per weight
from rtnq import formats, synthetic
from rtnq.errors import UsageError
from rtnq.numerics import sensitivity
from rtnq.selection import budget as knapsack
from rtnq.selection.budget import Choices, Option, choose_options


def C(key, base_loss, *options):
    return Choices((key, ""), ("a",), base_loss, tuple(Option(*o) for o in options))


def test_a_unit_climbs_its_convex_hull_and_dominated_options_are_never_taken():
    # g64 removes 4 for 10 bits (0.4/bit), g32 2 more for 20 more (0.1/bit), int8 the rest, 4 for 70 (0.057/bit);
    # "bad" costs more than g32 and removes less: never on the hull.
    u = C("u", 10.0, ("g64", 10, 6.0), ("g32", 30, 4.0), ("bad", 40, 5.0), ("int8", 100, 0.0))
    assert knapsack._hull(u) == [(0, 10.0, ""), (10, 6.0, "g64"), (30, 4.0, "g32"), (100, 0.0, "int8")]
    for budget, want in ((4.05, {}), (4.1, {("u", ""): "g64"}), (4.3, {("u", ""): "g32"}), (5.0, {("u", ""): "int8"})):
        c = choose_options([u], base_bits=400, params=100, budget=budget)
        assert c.taken == want, budget
    # a step that removes less per bit than going straight to a later option is skipped: g64 here
    v = C("v", 10.0, ("g64", 10, 9.5), ("g32", 30, 4.0))
    assert knapsack._hull(v) == [(0, 10.0, ""), (30, 4.0, "g32")]
    assert choose_options([v], 400, 100, 4.1).taken == {}  # g32 does not fit, g64 is not worth its bits


def test_steps_of_all_units_go_by_loss_removed_per_bit_and_a_step_that_does_not_fit_ends_its_unit():
    a = C("a", 10.0, ("g32", 30, 4.0), ("int8", 100, 0.0))  # 0.2/bit, then 4/70 = 0.057/bit
    b = C("b", 8.0, ("g32", 30, 5.0), ("int8", 100, 0.0))  # 0.1/bit, then 5/70 = 0.071/bit
    c = choose_options([a, b], base_bits=800, params=100, budget=8.6)  # 60 bits to spend
    assert c.taken == {("a", ""): "g32", ("b", ""): "g32"}
    assert c.ranks == {("a", ""): 1, ("b", ""): 2} and c.bits_per_weight == pytest.approx(8.6)
    c = choose_options([a, b], 800, 100, 9.3)  # 130: a g32 (30), b g32 (30), b int8 (+70) fits, a int8 does not
    assert c.taken == {("a", ""): "g32", ("b", ""): "int8"} and c.bits_per_weight == pytest.approx(9.3)
    with pytest.raises(UsageError, match="below the 8.0000 bits per weight"):
        choose_options([a, b], 800, 100, 7.9)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-groups")
    return synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(layers=4, hidden=256, intermediate=512))


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_groups_and_int8_within_the_budget_verified_in_every_format(src, tmp_path, fmt):
    out = tmp_path / "out"
    m = _convert(src, out, "--budget", "4.6", "--budget-groups", "--budget-score", "position", "--format", fmt)
    b = m["defaults"]["budget"]
    assert b["groups"] is True and b["score"] == "position"
    assert _bpw(m) == pytest.approx(b["after"], abs=1e-4) and 4.125 < b["after"] <= 4.6
    moved = {n: e for n, e in m["tensors"].items() if (e.get("rule") or "").startswith("budget:position ")}
    labels = {e["rule"].split()[1] for e in moved.values()}
    assert "g32" in labels and labels <= {"g64", "g32", "int8"}
    for e in moved.values():
        label = e["rule"].split()[1]
        assert (e["bits"], e["group_size"]) == ((8, 128) if label == "int8" else (4, int(label[1:])))
    for layer in range(4):  # fused partners share bits and group size
        for parent, group in (("self_attn", "qkv"), ("mlp", ("gate", "up"))):
            got = {(m["tensors"][f"model.layers.{layer}.{parent}.{x}_proj.weight"]["bits"],
                    m["tensors"][f"model.layers.{layer}.{parent}.{x}_proj.weight"]["group_size"]) for x in group}
            assert len(got) == 1
    r = run("verify", out, "--against", src)
    assert r.code == 0, r.out + r.err
    r = run("inspect", out)
    assert r.code == 0 and "units moved" in r.out and "int4 g32" in r.out


def test_the_loss_is_the_prior_times_the_squared_error_and_verify_rederives_it(src, tmp_path):
    out = tmp_path / "out"
    m = _convert(src, out, "--budget", "4.2", "--budget-groups", "--budget-score", "position",
                 "--format", "compressed-tensors")
    t = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"  # prior 1 / (1 + 1) for down_proj one block from the end
    want = 0.5 * sensitivity.option_errors(t[name], [(4, 128)])[0]
    assert m["tensors"][name]["score"] == pytest.approx(want, rel=1e-6)
    moved = [n for n, e in m["tensors"].items() if (e.get("rule") or "").startswith("budget:")]
    kept = next(n for n, e in m["tensors"].items() if e.get("rank") and n not in moved)
    for edit, expect in (("score", "budget score"), ("rule", "the budget re-run gives")):
        bad = tmp_path / edit
        shutil.copytree(out, bad)
        mm = json.loads((bad / "rtnq_manifest.json").read_text())
        if edit == "score":
            mm["tensors"][kept]["score"] *= 1.5
        else:  # claim a moved tensor was planned at its default: the re-run moves it
            mm["tensors"][moved[0]]["rule"] = "default"
        (bad / "rtnq_manifest.json").write_text(json.dumps(mm))
        r = run("verify", bad, "--against", src)
        assert r.code == 7 and expect in r.out + r.err, r.out + r.err


def test_relative_puts_every_unit_on_one_scale(src, tmp_path):
    """relative: each option's squared error over the weight's squared norm, times its parameters. On weights of
    one kind a group of 32 removes the same share of every unit's error for the same bits, so at the budget that
    uniform groups of 32 cost, relative picks exactly that, where the absolute error favours large weights."""
    out = tmp_path / "out"
    m = _convert(src, out, "--budget", "4.5", "--budget-groups", "--budget-score", "relative",
                 "--format", "compressed-tensors")
    quantized = {n: e for n, e in m["tensors"].items() if e["kind"] == "quantized"}
    assert {(e["bits"], e["group_size"]) for e in quantized.values()} == {(4, 32)}
    t = load_file(str(src / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    w = t[name]
    want = sensitivity.option_errors(w, [(4, 128)])[0] / float(w.float().pow(2).sum()) * w.numel()
    assert quantized[name]["score"] == pytest.approx(want, rel=1e-5)
    assert run("verify", out, "--against", src).code == 0


def test_the_default_score_is_relative_with_groups_and_position_without(src, tmp_path):
    with_groups = _convert(src, tmp_path / "g", "--budget", "4.4", "--budget-groups")
    without = _convert(src, tmp_path / "i", "--budget", "4.4")
    assert with_groups["defaults"]["budget"]["score"] == "relative"
    assert without["defaults"]["budget"]["score"] == "position"


def test_error_scores_and_a_scale_rule_work_too(src, tmp_path):
    for flags in (("--budget-score", "error"), ("--budget-score", "norm_error", "--scale", "mse")):
        out = tmp_path / flags[1]
        m = _convert(src, out, "--budget", "4.5", "--budget-groups", *flags)
        assert 4.125 < m["defaults"]["budget"]["after"] <= 4.5
        assert run("verify", out, "--against", src).code == 0


@pytest.mark.parametrize("flags,message", [
    (("--budget-groups",), "--budget-groups widens what --budget may choose; give --budget BPW too"),
    (("--budget", "4.5", "--budget-groups", "--budget-score", "kurtosis"),
     "--budget-groups weighs each option by the weight error it leaves"),
])
def test_bad_combinations_are_one_line_usage_errors(src, tmp_path, flags, message):
    r = run("convert", src, tmp_path / "out", *flags)
    assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (tmp_path / "out").exists()


def test_a_finer_group_the_shape_cannot_hold_is_not_offered():
    from rtnq.commands.convert.budget import _unit_settings
    from rtnq.selection.precision import Decision

    d = {"a": Decision("a", "quantized", 4, 64, "default"), "b": Decision("b", "quantized", 4, -1, "default")}
    shapes = {"a": (128, 576), "b": (128, 96)}  # k = 576 holds 64 and 32; channelwise k = 96 holds 32 only
    assert _unit_settings(["a"], d, shapes, "rows") == {"": {"a": (4, 64)}, "g32": {"a": (4, 32)}, "int8": {"a": (8, 64)}}
    assert _unit_settings(["b"], d, shapes, "rows") == {"": {"b": (4, -1)}, "g32": {"b": (4, 32)}, "int8": {"b": (8, -1)}}
