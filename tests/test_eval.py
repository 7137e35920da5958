"""`rtnq eval`: its figures equal a plain full-model transformers evaluation of the same windows, what-if
equals the written checkpoint in every format, bad inputs are one line, and memory does not grow with depth.

The models are tiny synthetic Llamas with a word-level tokenizer built here over the test's own text
(one with a BOS that every window must start with, one without and with tied embeddings)."""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch
from cliutil import run, run_process

from rtnq import synthetic

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = [f"w{i}" for i in range(300)]
FLAGS = ("--tokens", "256", "--window", "64")  # 4 windows of 64 tokens
WINDOWS, WINDOW = 4, 64


def _text(n_words: int = 1200, seed: int = 0) -> str:
    # Zipf-like: a few frequent words, so the models' predictions are not all alike.
    rng = random.Random(seed)
    return " ".join(WORDS[min(int(rng.paretovariate(0.8)) - 1, len(WORDS) - 1)] for _ in range(n_words))


def _add_tokenizer(model_dir, bos: bool):
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(model_dir)


def _ok(*args) -> dict:
    r = run("eval", *args, "--json")
    assert r.code == 0, r.err
    return json.loads(r.out)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    text = root / "text.txt"
    text.write_text(_text())
    src = synthetic.write_checkpoint(root / "src", synthetic.SampleSpec(layers=2, hidden=256, intermediate=512,
                                                                       vocab=512))
    _add_tokenizer(src, bos=True)
    outs = {}
    for name, flags in {"marlin8": ("--bits", "8"), "ct8": ("--bits", "8", "--format", "compressed-tensors"),
                        "gptq8": ("--bits", "8", "--format", "gptq"),
                        "mixed4": ("--bits", "4", "--group-size", "64", "--keep-int8", "layers.0")}.items():
        r = run("convert", src, root / name, *flags)
        assert r.code == 0, r.err
        outs[name] = root / name
    r = run("dequantize", outs["mixed4"], root / "mixed4-dense")
    assert r.code == 0, r.err
    outs["mixed4-dense"] = root / "mixed4-dense"
    return root, src, text, outs


def _reference_log_probs(model_dir, ids: torch.Tensor) -> torch.Tensor:
    """What anyone would do: the whole model in float32, one forward over the windows."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)[:, :-1]


def _windows(src, text) -> torch.Tensor:
    from rtnq.commands.evaluate import windows

    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    return windows.make_windows(tok, text.read_text(), WINDOWS * WINDOW, WINDOW).ids


def test_windows_start_with_bos_and_do_not_overlap(env):
    _, src, text, _ = env
    ids = _windows(src, text)
    assert ids.shape == (WINDOWS, WINDOW)
    assert (ids[:, 0] == 1).all()  # the tokenizer's BOS
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    plain = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert ids[:, 1:].reshape(-1).tolist() == plain[:WINDOWS * (WINDOW - 1)]


def test_figures_equal_a_full_model_transformers_evaluation(env):
    _, src, text, outs = env
    got = _ok(outs["mixed4"], "--against", src, "--text", text, *FLAGS)
    ids = _windows(src, text)
    lp_s = _reference_log_probs(src, ids)
    lp_c = _reference_log_probs(outs["mixed4-dense"], ids)  # rtnq dequantize's dense copy of the candidate
    targets = ids[:, 1:].unsqueeze(-1)
    nll_s = -lp_s.gather(-1, targets).double().mean().item()
    nll_c = -lp_c.gather(-1, targets).double().mean().item()
    kl = (lp_s.exp() * (lp_s - lp_c)).sum(-1).double().mean().item()
    assert got["tokens_scored"] == WINDOWS * (WINDOW - 1) and got["windows"] == WINDOWS and got["bos"] is True
    assert got["source"]["perplexity"] == pytest.approx(math.exp(nll_s), rel=1e-4)
    assert got["candidate"]["perplexity"] == pytest.approx(math.exp(nll_c), rel=1e-4)
    assert got["kl"] == pytest.approx(kl, rel=1e-4)
    assert got["kl"] > 1e-3  # INT4: far from the source, so the comparison above means something
    agree = (lp_s.argmax(-1) == lp_c.argmax(-1)).double().mean().item()
    acc = (lp_c.argmax(-1) == ids[:, 1:]).double().mean().item()
    assert got["top1_agreement"] == pytest.approx(agree, abs=1.5 / got["tokens_scored"])
    assert got["candidate"]["top1_accuracy"] == pytest.approx(acc, abs=1.5 / got["tokens_scored"])
    # The dense copy is the same candidate: same figures, read without rtnq's unpacking.
    dense = _ok(outs["mixed4-dense"], "--against", src, "--text", text, *FLAGS)
    assert dense["mode"] == "dense" and got["mode"] == "converted"
    assert dense["kl"] == pytest.approx(got["kl"], rel=1e-6)
    assert got["hidden_state_bytes"] == 2 * WINDOWS * WINDOW * 256 * 4


def test_source_against_itself_is_zero(env):
    _, src, text, _ = env
    got = _ok(src, "--against", src, "--text", text, *FLAGS)
    assert got["kl"] == 0.0 and got["top1_agreement"] == 1.0
    assert got["source"] == got["candidate"]


def test_what_if_equals_the_written_checkpoint_in_every_format(env):
    root, src, text, outs = env
    marlin = _ok(outs["marlin8"], "--against", src, "--text", text, *FLAGS)
    ct = _ok(outs["ct8"], "--against", src, "--text", text, *FLAGS)
    gptq = _ok(outs["gptq8"], "--against", src, "--text", text, *FLAGS)
    before = sorted(p.name for p in root.iterdir())
    what_if = _ok(src, "--bits", "8", "--text", text, *FLAGS)
    assert sorted(p.name for p in root.iterdir()) == before  # what-if writes nothing
    assert 0 < marlin["kl"] < 0.01  # INT8: close, not equal
    assert ct["kl"] == pytest.approx(marlin["kl"], rel=1e-6)
    assert gptq["kl"] == pytest.approx(marlin["kl"], rel=1e-6)
    assert what_if["kl"] == pytest.approx(marlin["kl"], rel=1e-6)
    assert what_if["mode"] == "what-if"
    mixed = _ok(src, "--bits", "4", "--group-size", "64", "--keep-int8", "layers.0", "--text", text, *FLAGS)
    written = _ok(outs["mixed4"], "--against", src, "--text", text, *FLAGS)
    assert mixed["kl"] == pytest.approx(written["kl"], rel=1e-6)
    assert mixed["kl"] > marlin["kl"]  # INT4 moves the model more than INT8


def test_tied_embeddings_without_bos(tmp_path):
    src = synthetic.write_checkpoint(tmp_path / "tied", synthetic.SampleSpec(layers=1, tied=True))
    _add_tokenizer(src, bos=False)
    text = tmp_path / "t.txt"
    text.write_text(_text(seed=1))
    got = _ok(src, "--bits", "4", "--text", text, *FLAGS)
    assert got["bos"] is False
    ids = _windows(src, text)
    assert not (ids[:, 0] == 1).all()
    lp = _reference_log_probs(src, ids)
    nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).double().mean().item()
    assert got["source"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_table_on_stdout_and_threads(env):
    _, src, text, _ = env
    before = torch.get_num_threads()
    try:
        r = run("eval", src, "--bits", "8", "--text", text, *FLAGS, "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert r.code == 0, r.err
    assert "perplexity" in r.out and "KL" in r.out and "252 positions scored in 4 windows" in r.out
    assert r.err == ""


def _bad_cases(root, src, text, outs):
    no_tok = root / "no-tokenizer"
    if not no_tok.exists():
        shutil.copytree(src, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
    other = root / "other"
    if not other.exists():
        synthetic.write_checkpoint(other, synthetic.SampleSpec(layers=3))
        _add_tokenizer(other, bos=True)
    gpt2 = root / "gpt2"
    if not gpt2.exists():
        shutil.copytree(src, gpt2)
        (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 256, "n_layer": 2,
                                                      "n_head": 4, "vocab_size": 512}))
    short = root / "short.txt"
    short.write_text("w1 w2 w3")
    return [
        ((src, "--bits", "4", "--text", root / "missing.txt"), 2, "--text"),
        ((src, "--bits", "4", "--text", text, "--tokens", "32", "--window", "64"), 2, "smaller than one window"),
        ((src, "--bits", "4", "--text", short, *FLAGS), 2, "text tokens"),
        ((no_tok, "--bits", "4", "--text", text, *FLAGS), 4, "no tokenizer"),
        ((outs["marlin8"], "--against", other, "--text", text, *FLAGS), 2, "does not match"),
        ((src, "--text", text), 2, "--against SRC"),
        ((src, "--against", outs["marlin8"], "--text", text, *FLAGS), 2, "is a quantized checkpoint"),
        ((outs["marlin8"], "--bits", "4", "--text", text, *FLAGS), 2, "is a quantized checkpoint"),
        ((outs["marlin8"], "--against", src, "--bits", "4", "--text", text), 2, "--bits"),
        ((src, "--bits", "4", "--text", text, "--threads", "0"), 2, "--threads"),
        ((gpt2, "--bits", "4", "--text", text, *FLAGS), 4, "has no model"),
    ]


def test_bad_inputs_are_one_line(env):
    root, src, text, outs = env
    for args, code, words in _bad_cases(root, src, text, outs):
        r = run("eval", *args)
        assert (r.code, r.out) == (code, ""), (args, r.code, r.err)
        assert r.err.startswith("error:") and len(r.err.strip().splitlines()) == 1 and words in r.err, (args, r.err)


def test_metric_arithmetic():
    from rtnq.commands.evaluate.metrics import Sums, kl_sum, log_probs

    p = torch.tensor([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]).log()
    q = torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]]).log()
    # Row 1: 0.5 ln2 + 0.5 ln2 (the zero-probability term counts 0, not NaN); row 2 equal: 0.
    assert kl_sum(p, q) == pytest.approx(math.log(2))
    s = Sums()
    s.add(p, q, torch.tensor([0, 2]))
    f = s.figures()
    assert f["kl"] == pytest.approx(math.log(2) / 2)
    assert f["source"]["perplexity"] == pytest.approx(math.exp((math.log(2) + math.log(2)) / 2))
    assert f["candidate"]["perplexity"] == pytest.approx(math.exp((math.log(4) + math.log(2)) / 2))
    assert f["top1_agreement"] == 0.5 and f["candidate"]["top1_accuracy"] == 0.5
    assert f["source"]["top1_accuracy"] == 1.0
    capped = log_probs(torch.tensor([[100.0, 0.0]]), softcap=1.0)
    assert capped.exp()[0, 0] == pytest.approx(math.e / (math.e + 1), rel=1e-5)


def _eval_json(*args) -> dict:
    """`rtnq eval ARGS --json` in its own process, so the peak RSS it reports is eval's alone."""
    p = run_process("eval", *args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_depth(tmp_path):
    """2 vs 16 layers: peak RSS within +10% plus the hidden-state buffers' difference. Each depth runs
    twice and keeps its lower peak: a peak is only ever pushed up by noise (allocator, threads), by
    tens of MB at this scale, while holding the extra layers would add 14 x 12.6 MB."""
    sizes = {"hidden": 512, "intermediate": 1536, "vocab": 512, "heads": 4, "kv_heads": 2}
    text = tmp_path / "t.txt"
    text.write_text(_text())
    runs = {}
    for layers in (2, 16):
        src = synthetic.write_checkpoint(tmp_path / f"l{layers}", synthetic.SampleSpec(layers=layers, **sizes))
        _add_tokenizer(src, bos=True)
        args = (src, "--bits", "4", "--text", text, "--tokens", "128", "--window", "128")
        runs[layers] = min((_eval_json(*args) for _ in range(2)), key=lambda r: r["peak_rss_bytes"])
    small, big = runs[2], runs[16]
    per_layer_fp32 = 4 * (2 * 512 * 512 + 2 * 256 * 512 + 3 * 512 * 1536)
    allowance = 0.10 * small["peak_rss_bytes"] + big["hidden_state_bytes"] - small["hidden_state_bytes"]
    # Holding the 14 extra layers (even once, in float32) would exceed the allowance: the check can fail.
    assert 14 * per_layer_fp32 > allowance
    assert big["peak_rss_bytes"] - small["peak_rss_bytes"] < allowance, (small["peak_rss_bytes"],
                                                                        big["peak_rss_bytes"])


def test_what_if_budget_groups_equals_its_written_checkpoint(env, tmp_path):
    """--budget-groups plans the same in eval's what-if mode as in convert (the scores read SRC alike)."""
    root, src, text, outs = env
    flags = ("--bits", "4", "--budget", "4.4", "--budget-groups", "--format", "compressed-tensors")
    r = run("convert", src, tmp_path / "ct", *flags)
    assert r.code == 0, r.err
    m = json.loads((tmp_path / "ct" / "rtnq_manifest.json").read_text())
    assert any(e.get("group_size") == 32 for e in m["tensors"].values())  # the groups were used
    written = _ok(tmp_path / "ct", "--against", src, "--text", text, *FLAGS)
    what_if = _ok(src, *flags, "--text", text, *FLAGS)
    assert what_if["kl"] == pytest.approx(written["kl"], rel=1e-6) and written["kl"] > 0


def test_rotated_export_what_if_written_and_transformers_agree(tmp_path):
    """--rotate of a tied model: the what-if, `eval --against` of the written compressed-tensors export and
    transformers' own full forward of that export (its compressed-tensors decompression, the un-tied head
    from config.json) give the same KL; the rotated model before quantization is the source's function."""
    src = synthetic.write_checkpoint(tmp_path / "tied", synthetic.SampleSpec(layers=2, tied=True))
    _add_tokenizer(src, bos=True)
    text = tmp_path / "t.txt"
    text.write_text(_text(seed=2))
    flags = ("--bits", "4", "--rotate", "--format", "compressed-tensors")
    r = run("convert", src, tmp_path / "ct", *flags)
    assert r.code == 0, r.err
    written = _ok(tmp_path / "ct", "--against", src, "--text", text, *FLAGS)
    what_if = _ok(src, *flags, "--text", text, *FLAGS)
    assert what_if["kl"] == pytest.approx(written["kl"], rel=1e-6) and written["kl"] > 1e-3
    ids = _windows(src, text)
    lp_s, lp_c = _reference_log_probs(src, ids), _reference_log_probs(tmp_path / "ct", ids)
    kl = (lp_s.exp() * (lp_s - lp_c)).sum(-1).double().mean().item()
    # transformers multiplies codes by scales in float32, rtnq rounds that product to bf16 (as kernels do)
    assert written["kl"] == pytest.approx(kl, rel=1e-2)
    unquantized = _ok(src, "--bits", "4", "--rotate", "--skip", "attn,mlp", "--text", text, *FLAGS)
    assert 0 < unquantized["kl"] < 1e-4  # bf16 rounding of the rotated weights only


def test_a_pad_token_outside_the_text_changes_nothing(env, tmp_path):
    """Qwen2's config names a pad token (nn.Embedding's padding_idx) that the windows never use: eval loads only
    the rows the windows use, and the pad id must not be checked against that small table."""
    _, src, text, _ = env
    padded = tmp_path / "padded"
    shutil.copytree(src, padded)
    cfg = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**cfg, "pad_token_id": cfg["vocab_size"] - 1}))
    flags = ("--bits", "4", "--text", text, *FLAGS)
    assert _ok(padded, *flags)["kl"] == _ok(src, *flags)["kl"]
