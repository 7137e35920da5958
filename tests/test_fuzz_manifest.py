"""A tampered rtnq_manifest.json: every command says one typed line, never a traceback (issue 16).

A small checkpoint is converted once per module (marlin with --budget, so entries carry score, rank and
padded_shape, and a GPTQ export); hypothesis then rewrites its manifest (a hostile value anywhere, a key
deleted, renamed or added, a value copied from elsewhere in the file) and runs `inspect`, `inspect --json`,
`verify --against SRC` and `dequantize` on it. A mutation may still be a valid manifest (a warning's text
edited): then the command may pass. What it may never do is crash, exit with a code outside the README's
table, or print anything but one `error:` line when it fails.

RTNQ_FUZZ_EXAMPLES raises the number of examples (default 150, ~20 s); scripts/fuzz_manifest.py runs the
same fuzz for a time budget.
"""

from __future__ import annotations

import copy
import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cliutil import Run, run
from rtnq import synthetic
from rtnq.checkpoint import manifest as mf

EXAMPLES = int(os.environ.get("RTNQ_FUZZ_EXAMPLES", "150"))
EXIT_CODES = set(range(10))  # README "Exit codes": 0-9 (130/143/129 are signals, not a file's fault)
# The commands run on every mutated manifest; OUT, SRC and DEST are filled in per case.
COMMANDS = (("inspect", "{out}"), ("inspect", "{out}", "--json"), ("verify", "{out}", "--against", "{src}"),
            ("dequantize", "{out}", "{dest}", "--force"))


@dataclass
class Case:
    """One converted checkpoint: its source, a working copy of OUT whose manifest the fuzz rewrites."""

    name: str
    src: Path
    out: Path
    dest: Path
    manifest: dict
    pieces: list = field(default_factory=list)  # every value in the manifest, to copy one elsewhere

    def write(self, doc) -> None:
        (self.out / mf.FILENAME).write_text(json.dumps(doc))


def build_cases(root: Path) -> list[Case]:
    """Convert a small synthetic model to marlin (with --budget: padded shapes, scores, ranks, a promoted
    tensor) and to GPTQ. Hidden 96 puts the attention off the Marlin tiles; odd_linear adds a shape
    passthrough and its warning."""
    src = synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(
        layers=2, hidden=96, heads=4, kv_heads=2, intermediate=256, vocab=256, odd_linear=True))
    cases = []
    for name, extra in (("marlin", ("--budget", "4.6")), ("gptq", ("--format", "gptq"))):
        out = root / name
        r = run("convert", src, out, *extra)
        assert r.code == 0, r.err
        doc = json.loads((out / mf.FILENAME).read_text())
        cases.append(Case(name, src, out, root / f"{name}-dense", doc, list(_values(doc))))
    return cases


def _values(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _values(child)


# Hostile values: the wrong type, out of range, near a valid value, markup and paths.
NAMES = ["", ".", "..", "../x", "/etc/passwd", "a/b", "a\\b", ".hidden", "x\x00y", "[/x]", "[bold]x[/bold]",
         "[red]", "\n", "line\nbreak", "é", "model.safetensors", "model.layers.0.mlp.up_proj.weight",
         "quantized", "passthrough", "marlin", "rtnq-marlin", "gptq", "compressed-tensors", "int4", "int8",
         "qweight", "scales", "qzeros", "g_idx", "tensor", "rtn-absmax", "rtn-mse", "bfloat16", "float16",
         "position", "budget:position #1", "x" * 300]
NUMBERS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 48, 64, 96, 100, 127, 128, 200, 255, 256, 2**31, 2**32,
           2**63 - 1, 2**63, 10**19, -(2**63), 0.0, -0.0, 0.5, 1.5, 4.0, 128.0, 1e-300, 1e300, -1e300]
scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(NUMBERS), st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(NAMES), st.text(max_size=12),
)
hostile = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=6)), inner, max_size=4)),
    max_leaves=8,
)
shapes = st.one_of(st.lists(st.sampled_from(NUMBERS), max_size=4), st.lists(st.integers(-3, 300), max_size=4))


def _near(value):
    """Values next to a valid one: off by one, negated, doubled, as a float, as a string, as a list."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [value, [value], str(value)]
    return [value + 1, value - 1, -value, value * 2, float(value), str(value), [value], 0]


@st.composite
def mutated(draw, case: Case):
    """A copy of the case's manifest with one to three mutations at random places."""
    doc = copy.deepcopy(case.manifest)
    for _ in range(draw(st.integers(1, 3))):
        _mutate_once(draw, doc, case)
    return doc


def _mutate_once(draw, node, case: Case) -> None:
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:  # an empty container: put something in it
            if isinstance(node, dict):
                node[draw(st.sampled_from(NAMES))] = draw(hostile)
            else:
                node.append(draw(hostile))
            return
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.integers(0, 3)) > 0:
            node = child  # go deeper three times in four
            continue
        op = draw(st.sampled_from(["replace", "replace", "near", "shape", "copy", "delete", "add", "rename"]))
        if op == "replace":
            node[key] = draw(hostile)
        elif op == "near":
            node[key] = draw(st.sampled_from(_near(child)))
        elif op == "shape":
            node[key] = draw(shapes)
        elif op == "copy":  # a value valid somewhere else: another tensor's outputs, a totals count...
            node[key] = copy.deepcopy(draw(st.sampled_from(case.pieces)))
        elif op == "delete":
            del node[key]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)))] = draw(hostile)
        elif op == "add":
            node.insert(draw(st.integers(0, len(node))), draw(hostile))
        elif isinstance(node, dict):  # rename: the same value under another key (a tensor name with markup)
            node[draw(st.sampled_from(NAMES))] = node.pop(key)
        else:
            node[key] = draw(hostile)
        return


def run_safely(*args) -> Run:
    """The in-process CLI; an exception that escapes rtnq.cli.main (a bug) becomes a Run with its traceback."""
    try:
        return run(*args)
    except BaseException:  # noqa: BLE001 - anything escaping main is the bug being hunted
        return Run(-1, "", traceback.format_exc())


def problem(r: Run) -> str | None:
    """What is wrong with one command's outcome, or None."""
    if "Traceback" in r.err or r.code == -1:
        return "a traceback"
    if r.code not in EXIT_CODES:
        return f"exit code {r.code}, not one of the README's"
    errors = [line for line in r.err.splitlines() if line.startswith("error:")]
    if r.code == 0:
        return "exit 0 with an error line" if errors else None
    # Exit 1 is rtnq's base RtnqError; click also exits 1 silently (a closed pipe): the error line tells them apart.
    if len(errors) != 1:
        return f"exit {r.code} with {len(errors)} error lines"
    return None


def check_manifest(case: Case, doc, counts: Counter | None = None, save: Path | None = None) -> None:
    """Write `doc` as the case's manifest and run every command; AssertionError (after saving the manifest
    to `save`) on a traceback, an undocumented exit code or other than one error line."""
    case.write(doc)
    for template in COMMANDS:
        args = [a.format(out=case.out, src=case.src, dest=case.dest) for a in template]
        r = run_safely(*args)
        if counts is not None:
            counts[("inspect --json" if "--json" in template else template[0], r.code)] += 1
        why = problem(r)
        if why:
            if save is not None:
                save.write_text(json.dumps(doc, indent=1))
            raise AssertionError(f"rtnq {' '.join(map(str, args))}: {why}\n{r.err[-3000:]}")


def fuzz(cases: list[Case], examples: int, counts: Counter | None = None, save: Path | None = None):
    """The hypothesis test over `cases`, `examples` examples; call the result to run it."""

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.data())
    def run_fuzz(data):
        case = data.draw(st.sampled_from(cases), label="case")
        check_manifest(case, data.draw(mutated(case), label="manifest"), counts, save)

    return run_fuzz


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return build_cases(tmp_path_factory.mktemp("fuzz_manifest"))


def test_fuzzed_manifests_never_crash(cases):
    counts: Counter = Counter()
    fuzz(cases, EXAMPLES, counts)()
    assert sum(counts.values()) >= len(COMMANDS) * min(EXAMPLES, 50)


def test_the_unmutated_manifests_pass(cases):
    for case in cases:
        case.write(case.manifest)
        for template in COMMANDS:
            r = run(*[a.format(out=case.out, src=case.src, dest=case.dest) for a in template])
            assert r.code == 0, (case.name, template, r.err)


# Tamperings of the marlin case's manifest, each now one exit-4 line naming the file, the tensor (where there
# is one), the field and what it must be. Before the schema check the first twelve crashed a command with a
# traceback (the command named here); the rest passed unnoticed (an unknown kind dequantized as if nothing
# were wrong, version true read as 1) or failed later with another code (dequantize's exit 6 on shape [1.5]).
Q = "model.layers.0.self_attn.o_proj.weight"  # quantized (promoted to INT8 by the budget, padded)
P = "model.norm.weight"  # passthrough
_DELETE = object()


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split("/")
        node = doc
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    return edit


TAMPERED = {
    # id: (edit, command, what the one line must say)
    "outputs-string": (_set(f"tensors/{Q}/outputs", "qweight"), "verify",
                       f"tensor {Q}: outputs must be a non-empty object of role -> tensor name, got \"qweight\""),
    "outputs-role-missing": (_set(f"tensors/{Q}/outputs", {"qweight": "model.layers.0.self_attn.o_proj.qweight"}),
                             "dequantize", f"tensor {Q}: outputs must name the roles qweight, scales"),
    "rank-string": (_set(f"tensors/{Q}/rank", "1"), "inspect", f"tensor {Q}: rank must be an integer >= 1, got \"1\""),
    "rank-on-passthrough": (_set(f"tensors/{P}/rank", 1), "verify", f"tensor {P}: rank is not a field of a passthrough entry"),
    "shape-rank-1": (_set(f"tensors/{Q}/shape", [96]), "dequantize",
                     f"tensor {Q}: shape must be [n, k] or [E, n, k] with sizes >= 1 for a quantized tensor, got [96]"),
    "defaults-list": (_set("defaults", [4, 128]), "verify", "defaults must be an object, got [4, 128]"),
    "totals-no-bytes": (_set("totals/bytes_in", _DELETE), "inspect", "totals.bytes_in is missing"),
    "totals-counts-missing": (_set("totals/tensors", {"int4": 1}), "inspect", "totals.tensors.int8 is missing"),
    "tp-degree-word": (_set("totals/tp_failures", {"two": 1}), "inspect", "totals.tp_failures must be an object of degree -> count"),
    "tp-count-huge": (_set("totals/tp_failures", {"2": 10**18}), "inspect", "totals.tp_failures must count at most"),
    "linear-params-zero": (_set("totals/linear_parameters", 0), "inspect",
                           "totals.linear_parameters must be an integer >= 1 where linear_bits_per_weight is given"),
    "warnings-ints": (_set("warnings", [1, 2]), "inspect", "warnings must be a list of strings, got [1, 2]"),
    # Not a traceback before, but wrong: passed, or another code.
    "kind-unknown": (_set(f"tensors/{Q}/kind", "marlin8"), "dequantize",
                     f"tensor {Q}: kind must be quantized or passthrough, got \"marlin8\""),
    "shape-float": (_set(f"tensors/{Q}/shape", [1.5, 96]), "dequantize",
                    f"tensor {Q}: shape must be a list of integers >= 0, got [1.5, 96]"),
    "bits-5": (_set(f"tensors/{Q}/bits", 5), "dequantize", f"tensor {Q}: bits must be 4 or 8, got 5"),
    "passthrough-role": (_set(f"tensors/{P}/outputs", {"weight": P}), "dequantize",
                         f"tensor {P}: outputs must name the roles tensor of a passthrough entry"),
    "group-not-dividing": (_set(f"tensors/{Q}/group_size", 64), "verify",
                           f"tensor {Q}: group_size must divide k=96 (or be -1, channelwise), got 64"),
    "budget-score-list": (_set("defaults/budget/score", ["position"]), "verify",
                          "defaults.budget.score must be a string, got [\"position\"]"),
    "shard-traversal": (_set(f"tensors/{P}/shard", "../model.safetensors"), "inspect",
                        f"tensor {P}: shard must be a plain file name (no directory part, not hidden), got \"../model.safetensors\""),
    "version-true": (_set("version", True), "inspect", "manifest version true is not supported"),
    "unknown-entry-key": (_set(f"tensors/{Q}/bitz", 8), "inspect", f"tensor {Q}: bitz is not a field of a quantized entry"),
    "format-edited": (_set("format", "gptq"), "inspect",
                      "outputs must name the roles qweight, scales, qzeros, g_idx of a quantized entry (gptq format)"),
    "padded-smaller": (_set(f"tensors/{Q}/padded_shape", [64, 128]), "dequantize",
                       f"tensor {Q}: padded_shape must have the rank of shape [96, 96] and no smaller sizes"),
}


@pytest.mark.parametrize("tampering", list(TAMPERED))
def test_tampered_manifest_is_one_exit_4_line(cases, tampering):
    edit, command, needle = TAMPERED[tampering]
    case = cases[0]
    doc = copy.deepcopy(case.manifest)
    edit(doc)
    case.write(doc)
    args = {"inspect": ("inspect", case.out), "verify": ("verify", case.out, "--against", case.src),
            "dequantize": ("dequantize", case.out, case.dest, "--force")}[command]
    r = run(*args)
    assert r.code == 4, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {case.out / mf.FILENAME}: "), r.err
    assert needle in lines[0], lines[0]


def test_stacked_experts_in_an_export_are_refused(cases):
    """GPTQ and compressed-tensors store one module per expert: a 3-D shape cannot be theirs."""
    case = cases[1]
    doc = copy.deepcopy(case.manifest)
    doc["tensors"][Q]["shape"] = [2, 96, 96]
    case.write(doc)
    r = run("verify", case.out, "--against", case.src)
    assert r.code == 4 and r.err.count("\n") == 1, r.err
    assert f"tensor {Q}: shape must be [n, k] in the gptq format (it stores no stacked experts)" in r.err


def test_a_tensor_name_with_markup_prints(cases):
    """A tensor named like rich markup ("[/x]") is a valid name: inspect prints it verbatim."""
    case = cases[0]
    doc = copy.deepcopy(case.manifest)
    doc["tensors"]["[/x].weight"] = doc["tensors"].pop("lm_head.weight")  # a row of "outside the blocks"
    doc["tensors"]["model.layers.1.[bold]up[/bold].weight"] = doc["tensors"].pop("model.layers.1.mlp.up_proj.weight")
    case.write(doc)
    r = run("inspect", case.out)
    assert r.code == 0 and "[/x].weight" in r.out and "[bold]up[/bold]" in r.out, r.err


def test_old_and_hand_made_manifests_stay_readable(cases):
    """Totals may be empty (hand-made manifests, the runtime's tests) or lack the keys later rtnq added."""
    case = cases[0]
    doc = copy.deepcopy(case.manifest)
    for key in ("passthrough_reasons", "model_bits_per_weight", "linear_bits_per_weight", "linear_parameters",
                "tp_failures", "bits_per_weight"):
        del doc["totals"][key]
    case.write(doc)
    r = run("inspect", case.out)
    assert r.code == 0 and "quantized INT4 / INT8" in r.out, r.err
    doc["totals"] = {}
    doc["rules"] = doc["warnings"] = None
    del doc["rtnq_version"]
    case.write(doc)
    for args in (("inspect", case.out), ("verify", case.out, "--against", case.src)):
        r = run(*args)
        assert r.code == 0, r.err


def test_a_manifest_shape_that_disagrees_with_the_stored_tensors_is_exit_4_in_dequantize(cases):
    """Was exit 6 (a shape rtnq cannot hold, README) from marlin.unpack; it is a corrupt output (4)."""
    case = cases[0]
    doc = copy.deepcopy(case.manifest)
    doc["tensors"][Q]["shape"] = [32, 96]
    doc["tensors"][Q].pop("padded_shape", None)
    case.write(doc)
    r = run("dequantize", case.out, case.dest, "--force")
    assert r.code == 4, r.err
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and "the output is corrupt or its manifest was edited" in lines[0], r.err
