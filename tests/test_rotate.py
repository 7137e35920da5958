"""The rotation fold (rtnq.commands.rotate) and its Hadamard matrices (rtnq.numerics.hadamard).

The fold is exact in exact arithmetic: a float32 rotation of a float32 model gives the same logits to
~1e-5 in transformers' own LlamaForCausalLM (and Qwen2 with q/k/v biases, Qwen3 with q_norm/k_norm);
in bf16 output the next-token distributions stay within a tiny KL. Unsupported checkpoints are refused
with one UsageError line; tied embeddings come out un-tied; the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from rtnq import synthetic
from rtnq.checkpoint.source import Reader, TensorSpec, scan
from rtnq.commands.rotate import Rotation
from rtnq.errors import UsageError
from rtnq.numerics import hadamard

# ---------------------------------------------------------------------------------------------- hadamard


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 68, 72, 108, 192, 576, 768, 896, 960, 2048])
def test_hadamard_is_hadamard(n):
    h = hadamard.hadamard(n).double()
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n,expect", [(12, "paley1(11)"), (20, "paley1(19)"), (28, "paley2(13)"),
                                      (576, "2^4 x paley2(17)"), (192, "2^4 x paley1(11)"), (2048, "2^11"),
                                      (52, "none")])
def test_recipes(n, expect):
    assert hadamard.describe(n) == expect


@pytest.mark.parametrize("n", [12, 20, 192, 576, 2048, 52])
def test_rotation_is_orthogonal(n):
    q, kind = hadamard.rotation(n, seed=3)
    assert q.dtype == torch.float32
    assert kind == ("random" if n == 52 else "hadamard")  # 52: no Sylvester/Paley construction
    assert (q @ q.T - torch.eye(n)).abs().max() < 1e-5
    q2, _ = hadamard.rotation(n, seed=3)
    assert torch.equal(q, q2)
    assert not torch.equal(q, hadamard.rotation(n, seed=4)[0])


def test_no_hadamard_for_impossible_orders():
    for n in (3, 6, 10):
        assert not hadamard.has_hadamard(n)
        with pytest.raises(ValueError):
            hadamard.hadamard(n)


# ---------------------------------------------------------------------------------------------- helpers


def rotate_dir(src: Path, dst: Path, seed: int = 0, dtype: torch.dtype | None = None, spare=()) -> Rotation:
    """Rotate SRC into DST (one safetensors file, config updated); dtype: cast source tensors first."""
    from safetensors.torch import save_file

    specs = scan(src)
    cfg = json.loads((src / "config.json").read_text())
    rot = Rotation(specs, cfg, seed=seed, spare=spare)
    by = {s.name: s for s in specs}
    with Reader(src) as r:
        def fetch(name):
            t = r.read(by[name])
            return t.to(dtype) if dtype is not None else t

        out = {s.name: rot.transform(s.name, fetch(s.name), fetch).contiguous() for s in specs}
        for name, shape, _ in rot.extra_tensors():
            out[name] = rot.transform(name, None, fetch).contiguous()
            assert tuple(out[name].shape) == tuple(shape)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg.update(rot.config_changes())
    (dst / "config.json").write_text(json.dumps(cfg))
    return rot


def load(model_dir: Path, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()


def logits(model, vocab: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(p || q) over positions."""
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


SPECS = {
    "hidden256": synthetic.SampleSpec(hidden=256, heads=4, kv_heads=2, vocab=512),
    "hidden192": synthetic.SampleSpec(hidden=192, heads=3, kv_heads=1, vocab=512),
    "tied": synthetic.SampleSpec(hidden=256, heads=4, kv_heads=2, vocab=512, tied=True),
}


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", list(SPECS))
def test_fold_is_exact_in_float32(case, tmp_path):
    spec = SPECS[case]
    src = synthetic.write_checkpoint(tmp_path / "src", dataclasses.replace(spec, dtype="fp32"))
    rot = rotate_dir(src, tmp_path / "rot", dtype=torch.float32)
    assert rot.kind == "hadamard"
    a, b = logits(load(src), spec.vocab), logits(load(tmp_path / "rot"), spec.vocab)
    assert rel(b, a) < 1e-4, rel(b, a)
    # the rotation did change the weights
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "rot" / "model.safetensors"))
    assert torch.equal(w["model.norm.weight"], torch.ones(spec.hidden))
    assert not torch.allclose(w["model.layers.0.self_attn.q_proj.weight"],
                              load_file(str(src / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("case", ["hidden256", "tied"])
def test_bf16_output_kl_is_tiny(case, tmp_path):
    spec = SPECS[case]
    src = synthetic.write_checkpoint(tmp_path / "src", spec)  # bf16
    rotate_dir(src, tmp_path / "rot")  # bf16 output
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "rot" / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.bfloat16
    a, b = logits(load(src), spec.vocab), logits(load(tmp_path / "rot"), spec.vocab)
    k = kl(a, b)
    print(f"bf16 rotated vs source, {case}: KL {k:.3e}, relative logit error {rel(b, a):.3e}")
    assert k < 1e-4
    assert rel(b, a) < 2e-2


def _hf_model_dir(tmp_path: Path, kind: str) -> Path:
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=192, intermediate_size=320, num_hidden_layers=2, num_attention_heads=3,
                  num_key_value_heads=1, vocab_size=300, max_position_embeddings=128, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, head_dim=64, tie_word_embeddings=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so the fold has something to fold
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    out = tmp_path / kind
    model.to(torch.float32).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_fold_is_exact_for_qwen(kind, tmp_path):
    src = _hf_model_dir(tmp_path, kind)
    names = {s.name for s in scan(src)}
    if kind == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    else:
        assert "model.layers.0.self_attn.q_norm.weight" in names
    rot = rotate_dir(src, tmp_path / "rot", dtype=torch.float32)
    assert not rot.changes("model.layers.0.self_attn.q_proj.bias" if kind == "qwen2"
                           else "model.layers.0.self_attn.q_norm.weight")
    a, b = logits(load(src), 300), logits(load(tmp_path / "rot"), 300)
    assert rel(b, a) < 1e-4, rel(b, a)


# ---------------------------------------------------------------------------------------------- tied, seeds


def test_tied_embeddings_get_an_explicit_head(tmp_path):
    spec = SPECS["tied"]
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    specs = scan(src)
    assert "lm_head.weight" not in {s.name for s in specs}
    rot = Rotation(specs, synthetic.config(spec))
    assert rot.extra_tensors() == [("lm_head.weight", (spec.vocab, spec.hidden), "BF16")]
    assert rot.config_changes() == {"tie_word_embeddings": False}
    rotate_dir(src, tmp_path / "rot")
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "rot" / "model.safetensors"))
    assert w["lm_head.weight"].shape == w["model.embed_tokens.weight"].shape
    assert not torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])  # gamma_final folded in


def test_untied_has_no_extras(tmp_path):
    spec = SPECS["hidden256"]
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    rot = Rotation(scan(src), synthetic.config(spec))
    assert rot.extra_tensors() == [] and rot.config_changes() == {}
    assert rot.manifest() == {"kind": "hadamard", "seed": 0, "order": 256, "construction": "2^8", "spare": []}


def test_same_seed_same_bytes(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "src", SPECS["hidden192"])
    rotate_dir(src, tmp_path / "a", seed=7)
    rotate_dir(src, tmp_path / "b", seed=7)
    rotate_dir(src, tmp_path / "c", seed=8)
    a, b, c = ((tmp_path / d / "model.safetensors").read_bytes() for d in "abc")
    assert a == b
    assert a != c


# ---------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    spec = SPECS["hidden256"]
    src = synthetic.write_checkpoint(tmp_path_factory.mktemp("rot") / "m", spec)
    return scan(src), synthetic.config(spec)


def _refused(specs, cfg) -> str:
    with pytest.raises(UsageError) as e:
        Rotation.check(specs, cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("model_type,words", [
    ("gemma2", "post-sublayer norms"), ("gemma3", "post-sublayer norms"), ("olmo2", "post-sublayer norms"),
    ("gpt2", "LayerNorm"), ("gpt_neox", "LayerNorm"), ("phi", "LayerNorm"),
    ("mixtral", "mixture-of-experts"), ("qwen3_moe", "mixture-of-experts"), ("gemma", "(1 + weight)"),
    ("mamba", "supported model types are llama, mistral, qwen2, qwen3"),
])
def test_unsupported_model_types(base, model_type, words):
    specs, cfg = base
    cfg = dict(cfg, model_type=model_type)
    if model_type == "mixtral":
        cfg["num_local_experts"] = 8
    assert words in _refused(specs, cfg)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_supported_model_types(base, model_type):
    specs, cfg = base
    Rotation.check(specs, dict(cfg, model_type=model_type))


def test_moe_config_on_a_llama(base):
    specs, cfg = base
    assert "mixture-of-experts" in _refused(specs, dict(cfg, num_experts=4))


def test_missing_norm(base):
    specs, cfg = base
    gone = "model.layers.1.post_attention_layernorm.weight"
    msg = _refused([s for s in specs if s.name != gone], cfg)
    assert gone in msg
    msg = _refused([s for s in specs if s.name != "model.norm.weight"], cfg)
    assert "model.norm.weight" in msg


def test_norm_bias_and_unknown_and_expert_tensors(base):
    specs, cfg = base
    extra = lambda name, shape=(256,): specs + [TensorSpec(name, "BF16", shape, "model.safetensors", 0,
                                                         2 * math.prod(shape))]
    assert "LayerNorm" in _refused(extra("model.layers.0.input_layernorm.bias"), cfg)
    assert "model.layers.0.mlp.odd.weight" in _refused(extra("model.layers.0.mlp.odd.weight"), cfg)
    assert "mixture-of-experts" in _refused(extra("model.layers.0.mlp.experts.0.up_proj.weight", (8, 256)), cfg)


def test_shape_mismatch(base):
    specs, cfg = base
    assert "hidden_size 128" in _refused(specs, dict(cfg, hidden_size=128))


def test_chunking_does_not_change_the_result(tmp_path, monkeypatch):
    """Chunks along the dimension Q does not mix: the same values up to float32 summation order."""
    from safetensors.torch import load_file

    from rtnq.commands import rotate

    src = synthetic.write_checkpoint(tmp_path / "src", SPECS["hidden192"])
    rotate_dir(src, tmp_path / "a", dtype=torch.float32)
    monkeypatch.setattr(rotate, "CHUNK_BYTES", 4 * 192 * 7)  # 7 rows / columns at a time
    rotate_dir(src, tmp_path / "b", dtype=torch.float32)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- spared channels


def test_spared_channels_stay_exact_and_untouched(tmp_path):
    """Channels left out keep their norm weights and are not mixed; the other 254 are rotated by a random
    orthogonal matrix (254 has no Hadamard order); the model computes the same function."""
    from safetensors.torch import load_file

    spec = dataclasses.replace(SPECS["tied"], dtype="fp32")
    src = synthetic.write_checkpoint(tmp_path / "src", spec)
    rot = rotate_dir(src, tmp_path / "rot", dtype=torch.float32, spare=(17, 3))
    assert rot.manifest() == {"kind": "random", "seed": 0, "order": 254, "construction": "qr-of-gaussian",
                              "spare": [3, 17]}
    a, b = logits(load(src), spec.vocab), logits(load(tmp_path / "rot"), spec.vocab)
    assert rel(b, a) < 1e-4, rel(b, a)
    w, s = load_file(str(tmp_path / "rot" / "model.safetensors")), load_file(str(src / "model.safetensors"))
    norm = w["model.layers.1.post_attention_layernorm.weight"]
    assert torch.equal(norm[[3, 17]], s["model.layers.1.post_attention_layernorm.weight"][[3, 17]])
    assert torch.equal(norm[[0, 4, 255]], torch.ones(3))
    # the embedding's spared columns are the source's; the others are mixed
    assert torch.equal(w["model.embed_tokens.weight"][:, [3, 17]], s["model.embed_tokens.weight"][:, [3, 17]])
    assert not torch.allclose(w["model.embed_tokens.weight"][:, 4], s["model.embed_tokens.weight"][:, 4])


@pytest.mark.parametrize("spare", [(256,), (-1,), tuple(range(256))])
def test_spare_out_of_range(base, spare):
    specs, cfg = base
    with pytest.raises(UsageError, match="--rotate-spare"):
        Rotation(specs, cfg, spare=spare)


def test_massive_channels_are_the_ones_norms_damp():
    from rtnq.commands.rotate import massive_channels

    g = torch.Generator().manual_seed(0)
    norms = [torch.rand(64, generator=g) * 0.5 + 0.5 for _ in range(16)]
    for i in range(2):  # damped in 2 of 16 norms: exactly the 1/8 share
        norms[i][5] = 0.01
    norms[0][9] = 0.01  # damped in 1 of 16: not enough
    for i in range(10):  # small in 10 norms, but not below a tenth of the median
        norms[i][30] = 0.2
    assert massive_channels(norms) == [5]
    assert massive_channels([]) == []


@pytest.mark.parametrize("value,want", [("auto", "auto"), (" None", "none"), ("17, 3,3", "3,17")])
def test_parse_spare(value, want):
    from rtnq.commands.rotate import parse_spare

    assert parse_spare(value) == want


@pytest.mark.parametrize("value", ["", "x", "3,,y", "1.5"])
def test_parse_spare_refuses(value):
    from rtnq.commands.rotate import parse_spare

    with pytest.raises(UsageError, match="--rotate-spare takes"):
        parse_spare(value)


@pytest.mark.parametrize("n", [1, 2, 12, 48, 576, 2048])
def test_factor_by_factor_product_is_the_dense_one(n):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    want = x @ hadamard.hadamard(n).double()
    for limit in (2, 64):  # one butterfly per order-2 factor, or grouped into blocks of up to 64
        got = hadamard.times(x, [f.double() for f in hadamard.grouped(hadamard.factors(n), limit)])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


def test_rotation_multiplies_by_the_seeded_matrix(base):
    """Rotation never builds Q; what it applies is hadamard.rotation's matrix (dense, float64 here)."""
    specs, cfg = base
    rot = Rotation(specs, cfg, seed=3, compute_dtype=torch.float64)
    want, kind = hadamard.rotation(cfg["hidden_size"], 3, torch.float64)
    assert kind == rot.kind == "hadamard"
    torch.testing.assert_close(rot.q, want, rtol=0, atol=1e-12)
