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
