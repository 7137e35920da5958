"""The inspect view: grouping a manifest into layers x modules, and the optional plot."""

import importlib.util

from cliutil import run
from rtnq.checkpoint import manifest as mf
from rtnq.commands import precision_map


def _entry(kind, bits=None, shape=(64, 128), dtype="bfloat16"):
    outputs = {"qweight": "x.qweight", "scales": "x.scales"} if kind == "quantized" else {"tensor": "x"}
    return mf.TensorEntry(kind=kind, shape=list(shape), dtype=dtype, outputs=outputs, shard="s", bits=bits)


def test_grid_rows_columns_and_outside_tensors():
    m = mf.Manifest(defaults={}, tensors={
        "model.layers.10.mlp.down_proj.weight": _entry("quantized", 4),
        "model.layers.2.self_attn.q_proj.weight": _entry("quantized", 8),
        "model.layers.2.mlp.down_proj.weight": _entry("passthrough", dtype="float16"),
        "model.layers.2.input_layernorm.weight": _entry("passthrough", shape=(64,)),
        "lm_head.weight": _entry("passthrough"),
    })
    pm = precision_map.build(m)
    assert pm.layers == [2, 10]  # numeric order, not string order
    assert pm.modules == ["self_attn.q_proj", "mlp.down_proj"]  # attention before MLP
    assert precision_map.short_names(pm.modules) == ["q", "down"]
    assert pm.cells[(2, "self_attn.q_proj")] == "int8"
    assert pm.cells[(10, "mlp.down_proj")] == "int4"
    assert pm.cells[(2, "mlp.down_proj")] == "fp16"
    assert pm.other == {"lm_head.weight": "bf16"}  # 1-D norms are left out of the map
    assert "model.layers.2.input_layernorm" not in str(pm.cells)


def test_ambiguous_short_names_fall_back_to_paths():
    assert precision_map.short_names(["attn.dense", "mlp.dense"]) == ["attn.dense", "mlp.dense"]


def test_plot_writes_png_or_says_what_is_missing(tmp_path):
    from rtnq import synthetic

    src = synthetic.write_checkpoint(tmp_path / "src")
    assert run("convert", src, tmp_path / "out").code == 0
    png = tmp_path / "map.png"
    r = run("inspect", tmp_path / "out", "--plot", png)
    if importlib.util.find_spec("matplotlib") is None:
        assert r.code == 2 and "rtnq[plot]" in r.err and not png.exists()  # brackets survive rich
    else:
        assert r.code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_blocks_are_what_selection_calls_blocks():
    """inspect and --keep-int8 share one notion of a block (rtnq.selection.names): CLIP's resblocks.N
    is a block for both, and an nn.Sequential index (mm_projector.0) is a block for neither."""
    m = mf.Manifest(defaults={}, tensors={
        "visual.transformer.resblocks.3.attn.out_proj.weight": _entry("quantized", 4),
        "model.mm_projector.0.weight": _entry("passthrough"),
    })
    pm = precision_map.build(m)
    assert pm.cells == {(3, "attn.out_proj"): "int4"}
    assert pm.other == {"model.mm_projector.0.weight": "bf16"}


def _error_manifest():
    """One cell of each kind the error panel draws: int4, int8, a shape-gated and a --skip'ped 16-bit weight."""
    def q(bits, error):
        e = _entry("quantized", bits)
        e.error = error
        return e

    def p(reason):
        e = _entry("passthrough")
        e.reason = reason
        return e

    return mf.Manifest(defaults={}, tensors={
        "model.layers.0.self_attn.q_proj.weight": q(4, 0.05),
        "model.layers.0.mlp.down_proj.weight": q(8, 0.004),
        "model.layers.1.mlp.down_proj.weight": p("shape: k=576 (in_features) is not a multiple of 128"),
        "model.layers.2.self_attn.q_proj.weight": p("skipped by --skip layers.2"),
    })


def test_build_reports_rtn_errors_and_why_16_bit():
    pm = precision_map.build(_error_manifest())
    assert pm.errors[(0, "self_attn.q_proj")] == 0.05 and pm.errors[(0, "mlp.down_proj")] == 0.004
    assert pm.errors[(1, "mlp.down_proj")] is None and pm.errors[(2, "self_attn.q_proj")] is None
    # Whys only for the 16-bit cells: short for the picture, the full reason kept alongside.
    assert pm.whys == {(1, "mlp.down_proj"): "shape", (2, "self_attn.q_proj"): "skip"}
    assert pm.reasons[(1, "mlp.down_proj")].startswith("shape: k=576")
    assert pm.reasons[(2, "self_attn.q_proj")] == "skipped by --skip layers.2"
    assert pm.cells[(1, "mlp.down_proj")] == "bf16"  # the precision grid itself is unchanged


def test_short_why_keeps_a_cell_sized_word():
    assert precision_map.short_why("GPT-2 Conv1D weight stored (in, out); not supported") == "Conv1D"
    assert precision_map.short_why("skipped by --skip layers.0 (fused with x)") == "skip"
    assert precision_map.short_why("lm_head") == "lm_head"
    assert precision_map.short_why("3-D tensor is not a linear weight") == "3-D"
    assert precision_map.short_why(None) == "16-bit"


def test_hand_built_map_without_the_new_fields_still_works():
    pm = precision_map.PrecisionMap([0], ["q"], {(0, "q"): "int4"}, {})
    assert pm.errors == {} and pm.whys == {} and pm.reasons == {}


def _needs_matplotlib():
    import pytest

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (the [plot] extra)")


def test_plot_figure_has_precision_and_error_panels():
    _needs_matplotlib()
    from rtnq.commands import plotting

    fig = plotting.precision_map_figure(precision_map.build(_error_manifest()))
    try:
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:2] == ["precision", "RTN error (relative Frobenius)"]
        assert len(fig.axes) == 3  # the two panels and the error colorbar
        left, right = fig.axes[:2]
        assert left.get_position().x1 <= right.get_position().x0  # side by side, precision first
        # Same row/column order in both panels.
        assert [t.get_text() for t in left.get_xticklabels()] == [t.get_text() for t in right.get_xticklabels()]
        assert [t.get_text() for t in left.get_yticklabels()] == [t.get_text() for t in right.get_yticklabels()]
        assert sorted(t.get_text() for t in right.texts) == ["shape", "skip"]  # 16-bit cells say why
        assert "log" in fig.axes[2].get_ylabel()  # 0.004 .. 0.05 spans > 10x
    finally:
        plotting.pyplot().close(fig)


def test_plot_png_is_two_panels_wide(tmp_path):
    _needs_matplotlib()
    import matplotlib.image

    from rtnq.commands import plotting

    pm = precision_map.build(_error_manifest())
    plotting.precision_map_png(pm, str(tmp_path / "map.png"))
    height, width = matplotlib.image.imread(tmp_path / "map.png").shape[:2]
    # The old single-panel figure was (1.2 + 0.9 * columns) inches wide at 120 dpi; two panels are wider.
    assert width > height and width > 120 * (1.2 + 0.9 * len(pm.modules))


def test_plot_on_a_converted_model_with_a_shape_gated_layer(tmp_path):
    from rtnq import synthetic
    from rtnq.synthetic import SampleSpec

    src = synthetic.write_checkpoint(tmp_path / "src", SampleSpec(odd_linear=True))
    assert run("convert", src, tmp_path / "out").code == 0
    pm = precision_map.build(mf.read(tmp_path / "out"))
    assert pm.whys.get((0, "mlp.odd_proj")) == "shape"  # n=96, k=200 fails the Marlin gate
    assert all(e is not None and e > 0 for k, e in pm.errors.items() if pm.cells[k].startswith("int"))
    png = tmp_path / "map.png"
    r = run("inspect", tmp_path / "out", "--plot", png)
    if importlib.util.find_spec("matplotlib") is None:
        assert r.code == 2 and not png.exists()
    else:
        assert r.code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
