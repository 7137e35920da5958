"""rtnq.selection.precision: selectors, defaults, fused groups, precedence, the shape gate and --tp checks.

The checkpoints here are lists of TensorSpecs named the way each architecture names its tensors in
Hugging Face safetensors files; no weights are involved (the planner reads headers only).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtnq.selection import names, precision
from rtnq.errors import ShapeError, UsageError
from rtnq.selection.precision import parse_selectors, select
from rtnq.checkpoint.source import TensorSpec

H, I, KV = 256, 512, 128  # hidden, intermediate, k/v width: all pass the Marlin gate (n % 64, k % 128)


def S(name: str, shape: tuple[int, ...], dtype: str = "BF16") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), "model.safetensors", 0, 0)


# ---- checkpoints, named as each architecture names its tensors -------------------------------------


def llama(layers: int = 4, h: int = H, i: int = I, kv: int = KV, lm_head: bool = True, dtype: str = "BF16"):
    out = [S("model.embed_tokens.weight", (1000, h), dtype)]
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [
            S(f"{p}.input_layernorm.weight", (h,), dtype),
            S(f"{p}.self_attn.q_proj.weight", (h, h), dtype),
            S(f"{p}.self_attn.k_proj.weight", (kv, h), dtype),
            S(f"{p}.self_attn.v_proj.weight", (kv, h), dtype),
            S(f"{p}.self_attn.o_proj.weight", (h, h), dtype),
            S(f"{p}.post_attention_layernorm.weight", (h,), dtype),
            S(f"{p}.mlp.gate_proj.weight", (i, h), dtype),
            S(f"{p}.mlp.up_proj.weight", (i, h), dtype),
            S(f"{p}.mlp.down_proj.weight", (h, i), dtype),
        ]
    out.append(S("model.norm.weight", (h,), dtype))
    if lm_head:
        out.append(S("lm_head.weight", (1000, h), dtype))
    return out


def qwen2_moe(layers: int = 2, experts: int = 4):
    out = [S("model.embed_tokens.weight", (1000, H))]
    for n in range(layers):
        p = f"model.layers.{n}"
        for m, rows in (("q", H), ("k", KV), ("v", KV)):
            out += [S(f"{p}.self_attn.{m}_proj.weight", (rows, H)), S(f"{p}.self_attn.{m}_proj.bias", (rows,))]
        out += [S(f"{p}.self_attn.o_proj.weight", (H, H)), S(f"{p}.mlp.gate.weight", (experts, H))]
        for e in range(experts):
            out += [
                S(f"{p}.mlp.experts.{e}.gate_proj.weight", (128, H)),
                S(f"{p}.mlp.experts.{e}.up_proj.weight", (128, H)),
                S(f"{p}.mlp.experts.{e}.down_proj.weight", (H, 128)),
            ]
        out += [
            S(f"{p}.mlp.shared_expert.gate_proj.weight", (I, H)),
            S(f"{p}.mlp.shared_expert.up_proj.weight", (I, H)),
            S(f"{p}.mlp.shared_expert.down_proj.weight", (H, I)),
            S(f"{p}.mlp.shared_expert_gate.weight", (1, H)),
        ]
    return out + [S("model.norm.weight", (H,)), S("lm_head.weight", (1000, H))]


def mixtral(layers: int = 2, experts: int = 4):
    out = [S("model.embed_tokens.weight", (1000, H))]
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [S(f"{p}.self_attn.{m}_proj.weight", (H, H)) for m in "qkvo"]
        out.append(S(f"{p}.block_sparse_moe.gate.weight", (experts, H)))
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            out += [S(f"{q}.w1.weight", (I, H)), S(f"{q}.w3.weight", (I, H)), S(f"{q}.w2.weight", (H, I))]
    return out + [S("lm_head.weight", (1000, H))]


def gpt2(layers: int = 2, linear_layout: bool = False):
    """GPT-2 stores Conv1D weights (in, out); GPT-BigCode uses the same names with nn.Linear (out, in)."""

    def w(k: int, n: int) -> tuple[int, int]:
        return (n, k) if linear_layout else (k, n)

    out = [S("transformer.wte.weight", (1000, H)), S("transformer.wpe.weight", (1024, H))]
    for n in range(layers):
        p = f"transformer.h.{n}"
        out += [
            S(f"{p}.ln_1.weight", (H,)),
            S(f"{p}.attn.bias", (1, 1, 1024, 1024), "U8"),  # the causal-mask buffer of old GPT-2 files
            S(f"{p}.attn.c_attn.weight", w(H, 3 * H)),
            S(f"{p}.attn.c_attn.bias", (3 * H,)),
            S(f"{p}.attn.c_proj.weight", w(H, H)),
            S(f"{p}.ln_2.weight", (H,)),
            S(f"{p}.mlp.c_fc.weight", w(H, 4 * H)),
            S(f"{p}.mlp.c_proj.weight", w(4 * H, H)),
        ]
    return out + [S("transformer.ln_f.weight", (H,))]


def neox(layers: int = 2):
    out = [S("gpt_neox.embed_in.weight", (1000, H))]
    for n in range(layers):
        p = f"gpt_neox.layers.{n}"
        out += [
            S(f"{p}.input_layernorm.weight", (H,)),
            S(f"{p}.attention.rotary_emb.inv_freq", (32,), "F32"),
            S(f"{p}.attention.query_key_value.weight", (3 * H, H)),
            S(f"{p}.attention.dense.weight", (H, H)),
            S(f"{p}.mlp.dense_h_to_4h.weight", (4 * H, H)),
            S(f"{p}.mlp.dense_4h_to_h.weight", (H, 4 * H)),
        ]
    return out + [S("gpt_neox.final_layer_norm.weight", (H,)), S("embed_out.weight", (1000, H))]


def falcon(layers: int = 2):
    out = [S("transformer.word_embeddings.weight", (1000, H))]
    for n in range(layers):
        p = f"transformer.h.{n}"
        out += [
            S(f"{p}.ln_attn.weight", (H,)),
            S(f"{p}.self_attention.query_key_value.weight", (H + 2 * 64, H)),
            S(f"{p}.self_attention.dense.weight", (H, H)),
            S(f"{p}.mlp.dense_h_to_4h.weight", (4 * H, H)),
            S(f"{p}.mlp.dense_4h_to_h.weight", (H, 4 * H)),
        ]
    return out + [S("transformer.ln_f.weight", (H,)), S("lm_head.weight", (1000, H))]


def phi3(layers: int = 2):
    out = [S("model.embed_tokens.weight", (1000, H))]
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [
            S(f"{p}.self_attn.qkv_proj.weight", (3 * H, H)),
            S(f"{p}.self_attn.o_proj.weight", (H, H)),
            S(f"{p}.mlp.gate_up_proj.weight", (2 * I, H)),
            S(f"{p}.mlp.down_proj.weight", (H, I)),
        ]
    return out + [S("model.norm.weight", (H,)), S("lm_head.weight", (1000, H))]


def phi2(layers: int = 2):
    out = [S("model.embed_tokens.weight", (1000, H))]
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [S(f"{p}.self_attn.{m}_proj.weight", (H, H)) for m in "qkv"]
        out += [
            S(f"{p}.self_attn.dense.weight", (H, H)),
            S(f"{p}.mlp.fc1.weight", (4 * H, H)),
            S(f"{p}.mlp.fc2.weight", (H, 4 * H)),
            S(f"{p}.mlp.fc2.bias", (H,)),
        ]
    return out + [S("model.final_layernorm.weight", (H,)), S("lm_head.weight", (1000, H))]


def bert(layers: int = 2):
    out = [S("bert.embeddings.word_embeddings.weight", (1000, H)), S("bert.embeddings.LayerNorm.weight", (H,))]
    for n in range(layers):
        p = f"bert.encoder.layer.{n}"
        for m in ("query", "key", "value"):
            out += [S(f"{p}.attention.self.{m}.weight", (H, H)), S(f"{p}.attention.self.{m}.bias", (H,))]
        out += [
            S(f"{p}.attention.output.dense.weight", (H, H)),
            S(f"{p}.attention.output.LayerNorm.weight", (H,)),
            S(f"{p}.intermediate.dense.weight", (4 * H, H)),
            S(f"{p}.output.dense.weight", (H, 4 * H)),
            S(f"{p}.output.LayerNorm.weight", (H,)),
        ]
    return out + [S("bert.pooler.dense.weight", (H, H))]


def t5(enc: int = 2, dec: int = 3):
    out = [S("shared.weight", (1000, H))]
    for stack, count in (("encoder", enc), ("decoder", dec)):
        for n in range(count):
            p = f"{stack}.block.{n}.layer"
            attn = [f"{p}.0.SelfAttention"] + ([f"{p}.1.EncDecAttention"] if stack == "decoder" else [])
            for a in attn:
                out += [S(f"{a}.{m}.weight", (H, H)) for m in "qkvo"]
            if n == 0:
                out.append(S(f"{p}.0.SelfAttention.relative_attention_bias.weight", (32, 8)))
            ff = f"{p}.{len(attn)}"
            out += [
                S(f"{p}.0.layer_norm.weight", (H,)),
                S(f"{ff}.DenseReluDense.wi_0.weight", (I, H)),
                S(f"{ff}.DenseReluDense.wi_1.weight", (I, H)),
                S(f"{ff}.DenseReluDense.wo.weight", (H, I)),
            ]
        out.append(S(f"{stack}.final_layer_norm.weight", (H,)))
    return out


def quantized(p: precision.Selection) -> dict[str, int]:
    return {n: d.bits for n, d in p.decisions.items() if d.kind == "quantized"}


def int8(p: precision.Selection) -> set[str]:
    return {n for n, d in p.decisions.items() if d.kind == "quantized" and d.bits == 8}


def leaves(names, strip: str = "") -> set[str]:
    """`model.layers.0.self_attn.q_proj.weight` -> `self_attn.q_proj` (block prefix `strip` removed)."""
    return {n.removeprefix(strip).removesuffix(".weight") for n in names}


def matching(specs, selector: str) -> set[str]:
    """Every tensor a selector matches, whatever happens to it (via --skip: passthrough or not)."""
    infos = names.analyse([s.name for s in specs])
    (sel,) = parse_selectors(selector)
    return {i.name for i in infos if sel.matches(i)}


# ---- purity and the gate's constants ------------------------------------------------------------------


def test_import_does_not_load_torch():
    code = "import sys, rtnq.selection.precision; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_planner_and_packer_share_one_shape_rule():
    from rtnq.numerics import shape_rule, marlin

    assert precision.check_shape is shape_rule.check_shape is marlin.check_shape


# ---- defaults ---------------------------------------------------------------------------------------------


def test_llama_default_quantizes_block_linears_only():
    specs = llama(layers=2)
    p = select(specs)
    assert list(p.decisions) == [s.name for s in specs]  # every spec, input order
    assert set(quantized(p).values()) == {4}
    assert leaves(quantized(p), "model.layers.0.") >= {"self_attn.q_proj", "mlp.down_proj"}
    assert len(quantized(p)) == 2 * 7
    d = p.decisions["model.layers.1.mlp.up_proj.weight"]
    assert (d.kind, d.bits, d.group_size, d.rule, d.reason) == ("quantized", 4, 128, "default", None)
    reasons = {n: d.reason for n, d in p.decisions.items() if d.kind == "passthrough"}
    assert reasons == {
        "model.embed_tokens.weight": "embedding",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.layers.1.input_layernorm.weight": "norm",
        "model.layers.1.post_attention_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "lm_head.weight": "lm_head",
    }
    assert p.rules == [] and p.warnings == []


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_group_size_and_bits_are_recorded(group_size):
    d = select(llama(layers=1), bits=8, group_size=group_size).decisions["model.layers.0.self_attn.o_proj.weight"]
    assert (d.bits, d.group_size) == (8, group_size)


@pytest.mark.parametrize(
    "specs, reason",
    [
        ([S("model.layers.0.mlp.up_proj.weight", (I, H), "I32")], "dtype I32 is not a float"),
        ([S("model.layers.0.mlp.up_proj.weight", (I, H), "F64")],
         "dtype F64 is not quantized (only F16, BF16 and F32 are)"),
        ([S("model.layers.0.mlp.up_proj.bias", (I,))], "bias"),
        ([S("model.layers.0.self_attn.rotary_emb.inv_freq", (32,), "F32")],
         "not a weight (the name does not end in .weight)"),
        ([S("model.layers.0.mixer.conv1d.weight", (H, 1, 4))], "3-D tensor is not a linear weight"),
        ([S("model.layers.0.attn.scale.weight", (H,))], "1-D tensor is not a linear weight"),
        ([S("multi_modal_projector.linear_1.weight", (H, H))], "not a linear weight inside a block"),
        ([S("output.weight", (1000, H))], "lm_head"),  # Meta-format Llama
        ([S("model.layers.0.self_attn.q_norm.weight", (128,))], "norm"),
        ([S("model.mm_projector.0.weight", (H, H))], "not a linear weight inside a block"),  # Sequential, not a block
    ],
)
def test_passthrough_reasons(specs, reason):
    (d,) = select(specs).decisions.values()
    assert (d.kind, d.reason, d.bits) == ("passthrough", reason, None)


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_float_dtypes_are_quantized(dtype):
    assert select(llama(layers=1, dtype=dtype)).decisions["model.layers.0.mlp.up_proj.weight"].kind == "quantized"


def test_tied_embeddings_pass_through_whether_lm_head_is_stored_or_not():
    untied = select(llama(layers=1, lm_head=True)).decisions
    tied = select(llama(layers=1, lm_head=False)).decisions
    assert "lm_head.weight" not in tied
    assert untied["lm_head.weight"].reason == "lm_head"
    assert tied["model.embed_tokens.weight"].kind == untied["model.embed_tokens.weight"].kind == "passthrough"
    # rules never force the embedding or the head into Marlin, so a tied pair cannot be split
    p = select(llama(layers=1), keep_int8="lm_head,embed_tokens")
    assert p.decisions["lm_head.weight"].kind == p.decisions["model.embed_tokens.weight"].kind == "passthrough"
    assert [r["matched"] for r in p.rules] == [0, 0]
    assert any("lm_head: matches only tensors that pass through anyway" in w for w in p.warnings)


def test_skip_lm_head_is_allowed_and_changes_nothing():
    p = select(llama(layers=1), skip="lm_head")
    assert p.decisions["lm_head.weight"].reason == "lm_head"
    assert p.rules == [{"option": "skip", "selector": "lm_head", "matched": 0}]
    assert any("--skip lm_head" in w and "changes nothing" in w for w in p.warnings)


def test_moe_routers_pass_through_and_experts_are_quantized():
    d = select(qwen2_moe()).decisions
    assert d["model.layers.0.mlp.gate.weight"].reason == "router gate"
    assert d["model.layers.0.mlp.shared_expert_gate.weight"].reason == "router gate"
    assert d["model.layers.0.self_attn.q_proj.bias"].reason == "bias"
    assert d["model.layers.1.mlp.experts.3.down_proj.weight"].kind == "quantized"
    assert d["model.layers.1.mlp.shared_expert.up_proj.weight"].kind == "quantized"
    m = select(mixtral()).decisions
    assert m["model.layers.0.block_sparse_moe.gate.weight"].reason == "router gate"
    assert m["model.layers.0.block_sparse_moe.experts.2.w2.weight"].kind == "quantized"
    dbrx = select([S("transformer.blocks.0.ffn.router.layer.weight", (16, H))]).decisions
    assert dbrx["transformer.blocks.0.ffn.router.layer.weight"].reason == "router gate"


def test_stacked_3d_experts_are_gated_on_n_and_k():
    specs = [
        S("model.layers.0.mlp.experts.gate_up_proj.weight", (8, 2 * I, H)),
        S("model.layers.0.mlp.experts.down_proj.weight", (8, H, I)),
        S("model.layers.1.mlp.experts.gate_up_proj.weight", (8, 2 * I, H)),
        S("model.layers.1.mlp.experts.down_proj.weight", (8, H, 100)),  # k=100: no group size divides it
        S("model.layers.2.mlp.experts.down_proj.weight", (8, H, 96)),  # k=96: group size 32
        S("model.layers.0.mlp.experts.gate_up_proj", (8, H, 2 * I)),  # GPT-OSS: no .weight, (E, k, n)
    ]
    d = select(specs).decisions
    assert d["model.layers.0.mlp.experts.gate_up_proj.weight"].kind == "quantized"
    assert d["model.layers.0.mlp.experts.down_proj.weight"].kind == "quantized"
    assert d["model.layers.1.mlp.experts.down_proj.weight"].reason == (
        "shape: k=100 (in_features) is not a multiple of any group size <= 128 (128, 64, 32)")
    assert d["model.layers.2.mlp.experts.down_proj.weight"].group_size == 32
    # all experts of one MoE layer are one fused layer in vLLM: the partner passes through too
    assert d["model.layers.1.mlp.experts.gate_up_proj.weight"].reason.startswith("shape: fused with")
    assert d["model.layers.0.mlp.experts.gate_up_proj"].kind == "passthrough"


def test_gpt2_conv1d_weights_pass_through_but_bigcode_linears_are_quantized():
    p = select(gpt2())
    assert quantized(p) == {}
    d = p.decisions
    assert d["transformer.h.0.attn.c_attn.weight"].reason == "GPT-2 Conv1D weight stored (in, out); not supported"
    assert d["transformer.h.1.mlp.c_proj.weight"].reason == "GPT-2 Conv1D weight stored (in, out); not supported"
    assert d["transformer.h.0.attn.bias"].reason == "bias"  # the mask buffer
    assert d["transformer.wte.weight"].reason == d["transformer.wpe.weight"].reason == "embedding"
    assert d["transformer.ln_f.weight"].reason == "norm"
    assert any("8 GPT-2 Conv1D weights" in w for w in p.warnings)
    assert any(w.startswith("no tensor is quantized") for w in p.warnings)
    big = select(gpt2(linear_layout=True))
    assert leaves(quantized(big)) == {f"transformer.h.{n}.{m}" for n in (0, 1)
                                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


@pytest.mark.parametrize(
    "build, quantized_leaves, prefix",
    [
        (neox, {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
         "gpt_neox.layers.0."),
        (falcon, {"self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                  "mlp.dense_4h_to_h"}, "transformer.h.0."),
        (phi3, {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}, "model.layers.0."),
        (bert, {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense"}, "bert.encoder.layer.0."),
    ],
)
def test_block_linears_across_architectures(build, quantized_leaves, prefix):
    p = select(build())
    assert leaves((n for n in quantized(p) if n.startswith(prefix)), prefix) == quantized_leaves
    assert all(n.startswith(prefix.rsplit(".", 2)[0]) for n in quantized(p))  # nothing outside the blocks


def test_t5_blocks_and_relative_attention_bias():
    p = select(t5())
    d = p.decisions
    assert d["shared.weight"].reason == "embedding"
    assert d["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].reason == "embedding"
    assert d["decoder.block.2.layer.1.EncDecAttention.k.weight"].kind == "quantized"
    assert d["encoder.block.1.layer.1.DenseReluDense.wo.weight"].kind == "quantized"


# ---- plain selectors, ranges, negative indices, regexes ---------------------------------------------------


def test_layers_1_never_matches_layers_10():
    p = select(llama(layers=12), keep_int8="layers.1")
    assert leaves(int8(p)) == {f"model.layers.1.{m}" for m in
                               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert p.rules == [{"option": "keep-int8", "selector": "layers.1", "matched": 7}]
    assert all(p.decisions[n].rule == "keep-int8:layers.1" for n in int8(p))
    assert p.decisions["model.layers.10.mlp.up_proj.weight"].bits == 4


def test_component_selector_matches_whole_components_only():
    specs = llama(layers=1) + [S("model.layers.0.mlp_extra.proj.weight", (H, H))]
    assert "model.layers.0.mlp_extra.proj.weight" not in matching(specs, "mlp")
    assert matching(specs, "mlp.up_proj") == {"model.layers.0.mlp.up_proj.weight"}
    assert matching(specs, "up_proj.weight") == {"model.layers.0.mlp.up_proj.weight"}


def test_index_ranges_and_negative_indices():
    specs = llama(layers=6)
    layer_of = lambda names: {int(n.split(".")[2]) for n in names}  # noqa: E731
    assert layer_of(int8(select(specs, keep_int8="layers.1-3"))) == {1, 2, 3}
    assert layer_of(int8(select(specs, keep_int8="layers.-1"))) == {5}
    assert layer_of(int8(select(specs, keep_int8="layers.-2--1"))) == {4, 5}
    assert layer_of(int8(select(specs, keep_int8="layers.0,layers.-1"))) == {0, 5}
    assert layer_of(int8(select(specs, keep_int8="layers.4-10"))) == {4, 5}  # clipped to what exists


def test_negative_indices_in_other_containers_and_per_stack():
    assert {n.split(".")[2] for n in int8(select(gpt2(3, linear_layout=True), keep_int8="h.-1"))} == {"2"}
    # T5: encoder has 2 blocks, decoder 3; block.-1 is the last of each stack
    p = select(t5(), keep_int8="block.-1")
    assert {".".join(n.split(".")[:3]) for n in int8(p)} == {"encoder.block.1", "decoder.block.2"}
    p = select(t5(), keep_int8="decoder.block.-1")
    assert {".".join(n.split(".")[:3]) for n in int8(p)} == {"decoder.block.2"}
    # experts.-1: the last expert of each layer (here extended to all experts of the layer, see fused tests)
    assert matching(mixtral(experts=4), "experts.-1") == {
        f"model.layers.{n}.block_sparse_moe.experts.3.{w}.weight" for n in (0, 1) for w in ("w1", "w2", "w3")
    }


@given(layers=st.integers(1, 40), data=st.data())
def test_layer_index_selects_exactly_that_layer(layers, data):
    specs = llama(layers=layers)
    n = data.draw(st.integers(0, layers - 1))
    want = {s.name for s in specs if s.name.startswith(f"model.layers.{n}.")}
    assert matching(specs, f"layers.{n}") == want
    assert matching(specs, f"layers.{n - layers}") == want  # the same layer counted from the end


def test_regex_full_match_on_name_or_module():
    specs = llama(layers=3)
    assert matching(specs, r"re:.*layers\.[12]\.mlp\.down_proj") == {
        "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}  # module name
    assert matching(specs, r"re:model\.layers\.0\..*\.weight") == {
        s.name for s in specs if s.name.startswith("model.layers.0.")}
    with pytest.raises(UsageError, match=r"did you mean re:\.\*down_proj\.\*\?"):
        select(specs, keep_int8="re:down_proj")  # a partial match is not a match


def test_regex_with_commas_stays_one_selector():
    sels = parse_selectors(r"re:model\.layers\.[0-9]{1,2}\.mlp\.up_proj,o")
    assert [s.text for s in sels] == [r"re:model\.layers\.[0-9]{1,2}\.mlp\.up_proj", "o"]


# ---- aliases ------------------------------------------------------------------------------------------------

ALIAS_CASES = [
    # build, block prefix, alias, expected leaves in that block
    (llama, "model.layers.0.", "qkv", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
    (llama, "model.layers.0.", "o", {"self_attn.o_proj"}),
    (llama, "model.layers.0.", "gate_up", {"mlp.gate_proj", "mlp.up_proj"}),
    (llama, "model.layers.0.", "down", {"mlp.down_proj"}),
    (llama, "model.layers.0.", "attn", {f"self_attn.{m}_proj" for m in "qkvo"}),
    (llama, "model.layers.0.", "ffn", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    (neox, "gpt_neox.layers.0.", "qkv", {"attention.query_key_value"}),
    (neox, "gpt_neox.layers.0.", "o", {"attention.dense"}),
    (neox, "gpt_neox.layers.0.", "gate_up", {"mlp.dense_h_to_4h"}),
    (neox, "gpt_neox.layers.0.", "down", {"mlp.dense_4h_to_h"}),
    (falcon, "transformer.h.0.", "o", {"self_attention.dense"}),
    (falcon, "transformer.h.0.", "attn", {"self_attention.query_key_value", "self_attention.dense"}),
    (phi3, "model.layers.0.", "qkv", {"self_attn.qkv_proj"}),
    (phi3, "model.layers.0.", "gate_up", {"mlp.gate_up_proj"}),
    (phi2, "model.layers.0.", "o", {"self_attn.dense"}),
    (phi2, "model.layers.0.", "gate_up", {"mlp.fc1"}),
    (phi2, "model.layers.0.", "down", {"mlp.fc2"}),
    (bert, "bert.encoder.layer.0.", "qkv", {"attention.self.query", "attention.self.key", "attention.self.value"}),
    (bert, "bert.encoder.layer.0.", "o", {"attention.output.dense"}),
    (bert, "bert.encoder.layer.0.", "gate_up", {"intermediate.dense"}),
    (bert, "bert.encoder.layer.0.", "down", {"output.dense"}),
    (bert, "bert.encoder.layer.0.", "mlp", {"intermediate.dense", "output.dense"}),
    (t5, "decoder.block.0.", "qkv",
     {f"layer.{j}.{a}.{m}" for j, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for m in "qkv"}),
    (t5, "decoder.block.0.", "o", {"layer.0.SelfAttention.o", "layer.1.EncDecAttention.o"}),
    (t5, "encoder.block.0.", "gate_up", {"layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1"}),
    (t5, "encoder.block.0.", "down", {"layer.1.DenseReluDense.wo"}),
    (lambda: gpt2(linear_layout=True), "transformer.h.0.", "qkv", {"attn.c_attn"}),
    (lambda: gpt2(linear_layout=True), "transformer.h.0.", "o", {"attn.c_proj"}),
    (lambda: gpt2(linear_layout=True), "transformer.h.0.", "down", {"mlp.c_proj"}),
    (lambda: gpt2(linear_layout=True), "transformer.h.0.", "gate_up", {"mlp.c_fc"}),
    (mixtral, "model.layers.0.", "gate_up", {f"block_sparse_moe.experts.{e}.w{w}" for e in range(4) for w in (1, 3)}),
    (mixtral, "model.layers.0.", "down", {f"block_sparse_moe.experts.{e}.w2" for e in range(4)}),
    (qwen2_moe, "model.layers.0.", "experts",
     {f"mlp.experts.{e}.{m}_proj" for e in range(4) for m in ("gate", "up", "down")}),
]


@pytest.mark.parametrize("build, prefix, alias, want", ALIAS_CASES)
def test_alias_selects_the_module_family(build, prefix, alias, want):
    specs = build()
    weights = {n for n in matching(specs, alias) if n.startswith(prefix) and n.endswith(".weight")}
    assert leaves(weights, prefix) == want  # (biases of those modules match too, and pass through)
    p = select(specs, keep_int8=alias)
    assert p.rules[0]["matched"] == len(int8(p)) > 0
    assert int8(p) >= {n for n in matching(specs, alias) if p.decisions[n].kind == "quantized"}


def test_mlp_alias_covers_moe_and_router_stays_16bit():
    p = select(qwen2_moe(), keep_int8="mlp")
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in int8(p)
    assert "model.layers.0.mlp.experts.1.up_proj.weight" in int8(p)
    assert p.decisions["model.layers.0.mlp.gate.weight"].kind == "passthrough"
    assert not any(".self_attn." in n for n in int8(p))
    assert not any("shared_expert" in n for n in matching(qwen2_moe(), "experts"))


def test_plus_intersects_terms():
    p = select(llama(layers=4), keep_int8="layers.0-1+down,layers.-1+qkv")
    assert leaves(int8(p)) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                               "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj",
                               "model.layers.3.self_attn.v_proj"}
    assert [r["matched"] for r in p.rules] == [2, 3]


def test_qwen1_w1_w2_are_the_fused_gate_up_pair():
    specs = [S(f"transformer.h.0.mlp.{m}.weight", (I, H)) for m in ("w1", "w2")]
    specs.append(S("transformer.h.0.mlp.c_proj.weight", (H, I)))
    specs.append(S("transformer.h.0.attn.c_attn.weight", (3 * H, H)))
    p = select(specs, keep_int8="w1")
    assert int8(p) == {"transformer.h.0.mlp.w1.weight", "transformer.h.0.mlp.w2.weight"}
    assert matching(specs, "down") == {"transformer.h.0.mlp.c_proj.weight"}


# ---- unmatched selectors and syntax errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "build, selector, hint",
    [
        (llama, "layer.0", "did you mean layers.0?"),
        (llama, "mpl", "did you mean mlp?"),
        (llama, "self_atn.q_proj", "did you mean self_attn.q_proj?"),
        (llama, "layers.7", "layers has indices 0-3"),
        (llama, "layers.0.q_proj", "did you mean layers.0+q_proj"),
        (llama, "experts", "no tensor belongs to the alias experts"),
        (llama, "layers.0+layers.1", "never the same one"),
        (llama, "re:q_proj", "did you mean re:.*q_proj.*?"),
        (bert, "layers.0", "did you mean layer.0?"),
        (gpt2, "layers.-1", "did you mean h.-1?"),
        (neox, "layers.0.attn", "did you mean layers.0+attn?"),
        (qwen2_moe, "layers.0.expert", "no tensor name has a component 'expert' (closest: experts)"),
        (t5, "layers.0", "did you mean block.0?"),
    ],
)
def test_unmatched_selector_is_a_usage_error_with_a_candidate(build, selector, hint):
    with pytest.raises(UsageError) as e:
        select(build(), keep_int8=selector)
    assert str(e.value).startswith(f"--keep-int8 {selector}: matches no tensor")
    assert hint in str(e.value)
    assert e.value.exit_code == 2


def test_unmatched_skip_selector_is_an_error_too():
    with pytest.raises(UsageError, match=r"^--skip lm_haed: matches no tensor; did you mean lm_head\?"):
        select(llama(layers=1), skip="lm_haed")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty selector"),
        ("layers.0,,mlp", "empty selector"),
        ("mlp,", "empty selector"),
        ("layers..0", "empty component"),
        ("layers.0+", "empty component"),
        ("re:", "empty regex"),
        ("re:(unclosed", "invalid regex"),
        ("layers.*.mlp", "not wildcards"),
        ("layers.5-2", "runs backwards; write 2-5"),
        ("layers.0 mlp", "whitespace"),
    ],
)
def test_bad_selector_syntax(text, fragment):
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.")):
        parse_selectors(text)


def test_parse_selectors_accepts_none_lists_and_parts():
    assert parse_selectors(None) == [] and parse_selectors([]) == []
    sels = parse_selectors(["layers.0-3, mlp", "re:.*o_proj"])
    assert [s.text for s in sels] == ["layers.0-3", "mlp", "re:.*o_proj"]
    assert sels[0].terms == (("layers", (0, 3)),)  # one run: a literal and an inclusive range
    assert sels[1].terms == ("mlp",)  # an alias term
    assert parse_selectors("layers.-4--1")[0].terms == (("layers", (-4, -1)),)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"bits": 3}, "--bits"), ({"group_size": 100}, "--group-size"), ({"tp": [0]}, "--tp"), ({"tp": ["2"]}, "--tp")],
)
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        select(llama(layers=1), **kwargs)


# ---- fused groups and precedence -----------------------------------------------------------------------


def test_keep_int8_on_one_of_qkv_extends_to_the_group():
    p = select(llama(layers=2), keep_int8="layers.0.self_attn.k_proj")
    assert leaves(int8(p)) == {f"model.layers.0.self_attn.{m}_proj" for m in "qkv"}
    anchor = "model.layers.0.self_attn.k_proj.weight"
    assert p.decisions[anchor].rule == "keep-int8:layers.0.self_attn.k_proj"
    assert p.decisions["model.layers.0.self_attn.q_proj.weight"].rule == (
        f"fused-with:{anchor} (keep-int8:layers.0.self_attn.k_proj)")
    assert p.rules[0]["matched"] == 3
    assert any("extended to 2 fused partners" in w for w in p.warnings)
    assert p.decisions["model.layers.0.self_attn.o_proj.weight"].bits == 4  # o is not fused with q/k/v


def test_keep_int8_on_up_extends_to_gate_per_layer():
    p = select(llama(layers=3), keep_int8="up_proj")
    assert leaves(int8(p)) == {f"model.layers.{n}.mlp.{m}_proj" for n in range(3) for m in ("gate", "up")}
    assert p.decisions["model.layers.2.mlp.gate_proj.weight"].rule == (
        "fused-with:model.layers.2.mlp.up_proj.weight (keep-int8:up_proj)")


def test_experts_of_one_moe_layer_share_a_precision():
    p = select(mixtral(layers=2, experts=4), keep_int8="layers.1+experts.0.w2")
    assert int8(p) == {s.name for s in mixtral(2, 4) if ".layers.1.block_sparse_moe.experts." in s.name}
    assert p.rules[0]["matched"] == 12
    assert p.decisions["model.layers.1.self_attn.q_proj.weight"].bits == 4


def test_skip_extends_to_fused_partners():
    p = select(llama(layers=2), skip="layers.1.mlp.gate_proj")
    d = p.decisions["model.layers.1.mlp.up_proj.weight"]
    assert d.kind == "passthrough"
    assert d.reason == "skipped by --skip layers.1.mlp.gate_proj (fused with model.layers.1.mlp.gate_proj.weight)"
    assert p.decisions["model.layers.1.mlp.gate_proj.weight"].reason == "skipped by --skip layers.1.mlp.gate_proj"
    assert p.decisions["model.layers.1.mlp.gate_proj.weight"].rule == "skip:layers.1.mlp.gate_proj"
    assert d.rule == "fused-with:model.layers.1.mlp.gate_proj.weight (skip:layers.1.mlp.gate_proj)"
    assert p.decisions["model.layers.1.mlp.down_proj.weight"].kind == "quantized"
    assert p.rules == [{"option": "skip", "selector": "layers.1.mlp.gate_proj", "matched": 2}]


def test_skip_wins_over_keep_int8_whatever_the_order():
    p = select(llama(layers=2), keep_int8="layers.0", skip="layers.0+mlp")
    assert leaves(int8(p)) == {f"model.layers.0.self_attn.{m}_proj" for m in "qkvo"}
    assert {p.decisions[f"model.layers.0.mlp.{m}_proj.weight"].kind for m in ("gate", "up", "down")} == {"passthrough"}
    assert p.rules == [
        {"option": "keep-int8", "selector": "layers.0", "matched": 4},
        {"option": "skip", "selector": "layers.0+mlp", "matched": 3},
    ]
    shadowed = select(llama(layers=2), keep_int8="mlp", skip="mlp")
    assert int8(shadowed) == set()
    assert shadowed.rules[0]["matched"] == 0
    assert any("--keep-int8 mlp: every tensor it matches was already decided" in w for w in shadowed.warnings)


def test_first_keep_selector_is_the_recorded_rule_and_counts_add_up():
    p = select(llama(layers=4), keep_int8="layers.0,mlp")
    assert p.decisions["model.layers.0.mlp.up_proj.weight"].rule == "keep-int8:layers.0"
    assert p.decisions["model.layers.2.mlp.up_proj.weight"].rule == "keep-int8:mlp"
    assert [r["matched"] for r in p.rules] == [7, 9]
    assert sum(r["matched"] for r in p.rules) == len(int8(p))


def test_bits_8_keep_int8_is_a_noop_that_must_still_match():
    p = select(llama(layers=1), bits=8, keep_int8="mlp")
    assert set(quantized(p).values()) == {8}
    assert any("--keep-int8 changes nothing with --bits 8" in w for w in p.warnings)
    with pytest.raises(UsageError, match="matches no tensor"):
        select(llama(layers=1), bits=8, keep_int8="mlpp")


# ---- shape gate, --strict, --tp ---------------------------------------------------------------------------


def test_shape_failure_passes_the_whole_fused_group_through():
    specs = llama(layers=2, kv=100)  # k_proj/v_proj: n=100 is not a multiple of 8, which GPTQ's qzeros need
    p = select(specs, layout="cols")
    d = p.decisions
    assert d["model.layers.0.self_attn.k_proj.weight"].reason == (
        "shape: n=100 (out_features) is not a multiple of 8 (GPTQ packs its qzeros along n)")
    assert d["model.layers.0.self_attn.q_proj.weight"].reason == (
        "shape: fused with model.layers.0.self_attn.k_proj.weight, whose shape the format cannot hold")
    assert d["model.layers.0.self_attn.o_proj.weight"].kind == "quantized"
    assert any(w.startswith("4 tensors have shapes the format cannot hold") for w in p.warnings)
    assert any(w.startswith("2 tensors pass through in 16-bit because a fused partner's shape") for w in p.warnings)
    # the marlin format pads n=100 to 128 and compressed-tensors stores it as is: both quantize it
    for layout in ("marlin", "rows"):
        assert select(specs, layout=layout).decisions["model.layers.0.self_attn.k_proj.weight"].kind == "quantized"
    padded = select(specs).warnings
    assert any(w.startswith("4 tensors are stored padded to the Marlin kernels' tiles") and "100x256 -> 128x256" in w
               for w in padded), padded
    assert not any("padded" in w for w in select(specs, layout="rows").warnings)
    kept = select(specs, keep_int8="layers.0+qkv", layout="cols")  # a rule cannot push a failing group in
    assert int8(kept) == set() and kept.rules[0]["matched"] == 0
    assert any("matches only tensors that pass through anyway" in w for w in kept.warnings)


def test_strict_raises_a_shape_error_naming_tensor_sizes_and_fix():
    specs = llama(layers=2, i=200)  # down_proj: k=200 is a multiple of 8 but of no group size
    with pytest.raises(ShapeError) as e:
        select(specs, strict=True)
    msg = str(e.value)
    assert msg.startswith("model.layers.0.mlp.down_proj.weight: k=200 (in_features) is not a multiple of any group "
                          "size <= 128 (128, 64, 32) (1 more tensors fail too).")
    assert msg.endswith("Drop --strict to keep it in 16-bit, or --skip model.layers.0.mlp.down_proj")
    assert e.value.exit_code == 6
    select(specs, strict=True, skip="down")  # skipped tensors are not gated
    assert quantized(select(llama(layers=2), strict=True))  # and nothing to fail: no error
    d = select(specs, group_size=-1, strict=True).decisions  # channelwise: any k that packs
    assert d["model.layers.1.mlp.down_proj.weight"].group_size == -1
    assert select(llama(layers=1, i=196)).decisions["model.layers.0.mlp.down_proj.weight"].reason == (
        "shape: k=196 (in_features) is not a multiple of any group size <= 128 (128, 64, 32)")
    assert select(llama(layers=1, i=196), group_size=-1).decisions["model.layers.0.mlp.down_proj.weight"].reason == (
        "shape: k=196 (in_features) is not a multiple of 8 (the codes are packed 8 to an int32 word along k)")


def test_group_size_falls_back_per_tensor_where_k_needs_it():
    """SmolLM2-135M: hidden 576 (= 4.5 x 128), intermediate 1536. Every linear is quantized; those reading
    the hidden state use groups of 64, down_proj keeps 128, in every format alike."""
    specs = llama(layers=2, h=576, i=1536, kv=192)
    for layout in ("marlin", "rows", "cols"):
        p = select(specs, layout=layout)
        d = p.decisions
        assert {n: x.group_size for n, x in d.items() if x.kind == "quantized"} == {
            f"model.layers.{b}.{m}.weight": 128 if m == "mlp.down_proj" else 64
            for b in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        assert ("12 tensors use group size 64 instead of 128: their k is not a multiple of 128, e.g. "
                "model.layers.0.self_attn.q_proj.weight (k=576)") in p.warnings
    assert select(specs, group_size=32, layout="rows").warnings == []  # 32 divides every k
    # k = 576 is off Marlin's tiles before any split: the TP preflight lists what splitting breaks only
    assert select(specs, tp=[2]).tp_failures[2] == []
    assert select(specs, group_size=64, keep_int8="layers.0").decisions[
        "model.layers.0.self_attn.q_proj.weight"].group_size == 64


def test_tp_reports_per_rank_failures_for_column_and_row_splits():
    p = select(llama(layers=1), tp=[2, 4, 2])
    assert p.tp_failures[2] == []
    fails = dict(p.tp_failures[4])
    # k and v get 32 columns each per rank, but the engine holds q/k/v as one fused tensor of 64 + 32 + 32
    assert fails == {
        "model.layers.0.self_attn.o_proj.weight": "row-parallel, k/4: k=64 (in_features) is not a multiple of 128",
    }
    assert list(p.tp_failures) == [2, 4, 8]  # 2, 4 and 8 always, for the summary line of every run
    assert len([w for w in p.warnings if w.startswith("--tp")]) == 1  # only the degrees asked for warn
    assert not any(w.startswith("--tp") for w in select(llama(layers=1)).warnings)
    assert "--tp 4: 1 quantized tensors would miss the Marlin kernels' shape rule per rank" in p.warnings[0]
    assert "model.layers.0.self_attn.q_proj.weight" not in dict(select(llama(layers=1), tp=[8]).tp_failures[8])


def test_tp_checks_fused_qkv_as_one_tensor_per_rank():
    fails = dict(select(llama(layers=1, kv=64), tp=[8]).tp_failures[8])  # q/k/v per rank: 32 + 8 + 8 = 48
    for m in ("q", "k", "v"):
        assert fails[f"model.layers.0.self_attn.{m}_proj.weight"] == (
            "column-parallel, n/8: fused q/k/v per rank (32 + 8 + 8): n=48 (out_features) is not a multiple of 64")
    assert "model.layers.0.mlp.gate_proj.weight" not in fails  # gate/up: 64 + 64


def test_tp_replicates_kv_heads_beyond_their_count():
    """One key-value head (MQA) of width 64 at TP 8: engines give every rank the whole head."""
    specs = llama(layers=1, h=512, kv=64)
    assert "model.layers.0.self_attn.k_proj.weight" in dict(select(specs, tp=[8]).tp_failures[8])  # 64 + 8 + 8
    assert "model.layers.0.self_attn.k_proj.weight" not in dict(select(specs, tp=[8], kv_heads=1).tp_failures[8])


def test_tp_moe_experts_follow_the_marlin_moe_rule():
    """Experts' intermediate size per rank must be a multiple of max(64, g): 128 / 2 = 64 fails at g = 128."""
    p = select(qwen2_moe(layers=1), tp=[2])
    experts = [n for n, d in p.decisions.items() if ".experts." in n and d.kind == "quantized"]
    fails = dict(p.tp_failures[2])
    assert fails["model.layers.0.mlp.experts.0.down_proj.weight"] == (
        "MoE experts, split 128/2: intermediate size per rank 64 is not a multiple of 128")
    assert all(n in fails for n in experts)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" not in fails  # a plain MLP: 512 / 2 = 256
    p64 = select(qwen2_moe(layers=1), tp=[2], group_size=64)
    assert not any(n in dict(p64.tp_failures[2]) for n in experts)  # max(64, 64) = 64
    p3 = select(llama(layers=1), tp=[3])
    assert ("model.layers.0.mlp.up_proj.weight", "column-parallel, n/3: n=512 of gate_proj is not divisible by 3") in (
        p3.tp_failures[3])


def test_tp_ignores_passthrough_and_reports_unknown_layouts():
    specs = llama(layers=1, kv=96) + [S("model.layers.0.mixer.in_proj.weight", (H, H))]
    p = select(specs, tp=[4])
    assert all(p.decisions[n].kind == "quantized" for n, _ in p.tp_failures[4])
    unknown = [w for w in p.warnings if "1 quantized tensors have no known tensor-parallel split" in w]
    assert len(unknown) == 1 and "mixer.in_proj" in unknown[0]


def test_deepseek_mla_low_rank_projections_are_fused_and_replicated():
    p = "model.layers.0.self_attn"
    specs = [
        S(f"{p}.q_a_proj.weight", (1536, 7168)),
        S(f"{p}.q_a_layernorm.weight", (1536,)),
        S(f"{p}.q_b_proj.weight", (24576, 1536)),
        S(f"{p}.kv_a_proj_with_mqa.weight", (576, 7168)),
        S(f"{p}.kv_b_proj.weight", (32768, 512)),
        S(f"{p}.o_proj.weight", (7168, 16384)),
    ]
    pl = select(specs, keep_int8="q_a_proj", tp=[8])
    assert int8(pl) == {f"{p}.q_a_proj.weight", f"{p}.kv_a_proj_with_mqa.weight"}
    assert matching(specs, "qkv") == {s.name for s in specs if "proj" in s.name and "o_proj" not in s.name}
    assert pl.tp_failures[8] == [] and not any("no known tensor-parallel split" in w for w in pl.warnings)


POOL = ["layers.0", "layers.-1", "layers.1-2", "q_proj", "k_proj", "up_proj", "gate_proj", "down", "o", "qkv",
        "gate_up", "mlp", "attn", "layers.2+down", r"re:.*\.v_proj", "lm_head"]


@given(keep=st.lists(st.sampled_from(POOL), max_size=4), skip=st.lists(st.sampled_from(POOL), max_size=2))
def test_invariants_for_any_rules(keep, skip):
    specs = llama(layers=4, kv=96 if "lm_head" in keep else KV)  # sometimes a failing k/v too
    p = select(specs, keep_int8=keep, skip=skip)
    d = p.decisions
    assert list(d) == [s.name for s in specs]
    for n in range(4):  # fused groups always end with one kind and one precision
        for group in (("q", "k", "v"), ("gate", "up")):
            members = [d[f"model.layers.{n}.{'self_attn' if 'q' in group else 'mlp'}.{m}_proj.weight"] for m in group]
            assert len({(m.kind, m.bits) for m in members}) == 1
    assert sum(r["matched"] for r in p.rules if r["option"] == "keep-int8") == len(int8(p))
    assert sum(r["matched"] for r in p.rules if r["option"] == "skip") == sum(
        1 for x in d.values() if (x.reason or "").startswith("skipped by --skip"))
    skipped = set().union(*(matching(specs, s) for s in skip)) if skip else set()
    assert not (int8(p) & skipped)  # --skip always wins
    assert all(x.kind == "passthrough" for n, x in d.items() if "norm" in n or "embed" in n or "lm_head" in n)
