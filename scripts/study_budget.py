"""Which data-free per-tensor score best picks the linears kept in INT8 (rest INT4) under a bits-per-weight
budget? A research script for `rtnq convert --budget BPW`, run on a real checkpoint (SmolLM2-135M).

Usage:
    .venv/bin/python scripts/study_budget.py                  # scores (cached), then every eval (resumable)
    .venv/bin/python scripts/study_budget.py --only-scores    # scores, selections and their bpw; no eval
    .venv/bin/python scripts/study_budget.py --budgets 4.75,5.0 --extra   # + the exploratory combined score

Method (all of it data-free except the final measurement):

* Units. Linears an engine fuses must share a precision, so the unit of promotion is: q/k/v of one layer
  ("qkv"), gate/up of one layer ("gate_up"), o_proj ("o") and down_proj ("down") alone: 4 units a layer.
* Scores: rtnq.numerics.sensitivity.scores(w, group_for(k, 128), gamma) per tensor, gamma the RMSNorm weight
  that precedes it (input_layernorm for q/k/v, post_attention_layernorm for gate/up, none for o/down).
  A unit's score: the SUM of its members' for the additive scores (error, norm_error: squared errors add
  over the fused output); the PARAMETER-WEIGHTED MEAN of its members' for the intensive ones (relative,
  kurtosis, max_over_rms: a ratio of the whole weight, so size should not inflate it).
* Cost of promoting a unit: INT8 stores 4 more bits per stored code than INT4 and the same scales. Codes are
  stored at the Marlin-padded shape (k=576 -> 640), so cost = 4 * sum(padded n*k) / linear_parameters bpw,
  linear_parameters the unpadded count the dry-run divides by. Checked against `rtnq convert --dry-run`.
* Greedy: units sorted by score / cost, descending; each unit is promoted if the running bpw stays <= B,
  otherwise skipped and the next one tried (fill, not stop-at-first-misfit).
* Baselines: RTN-4 everywhere; llama.cpp Q4_K_M's use_more_bits position rule (qkv + down of layers
  i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, integer n/8 as in llama.cpp), as is and trimmed to B; the
  paper's `layers.0`, `layers.-1`, `layers.0,layers.-1`.
* Measurement: `rtnq eval SRC --bits 4 --keep-int8 ... --json` (what-if, nothing written) on GPL-3,
  6144 tokens, windows of 2048; the bpw is the dry-run's `linear_bits_per_weight` of the same selection.

Outputs (bench-cache/study/): scores.json (per tensor and per unit), results.json (per setting; reruns
skip settings whose selection was already evaluated), and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from rtnq.numerics import rtn
from rtnq.numerics.sensitivity import SCORES, scores
from rtnq.numerics.shape_rule import group_for, padded

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "bench-cache" / "smollm2-135m"
OUT = ROOT / "bench-cache" / "study"
RTNQ = str(ROOT / ".venv" / "bin" / "rtnq")
TEXT = "/usr/share/common-licenses/GPL-3"
EVAL_ARGS = ["--text", TEXT, "--tokens", "6144", "--window", "2048", "--bits", "4", "--json"]
GROUP = 128

FAMILIES = {  # unit family -> (member projections, the norm whose weight scales their input)
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "o": (("self_attn.o_proj",), None),
    "gate_up": (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "down": (("mlp.down_proj",), None),
}
ADDITIVE = ("error", "norm_error")


# ---------------------------------------------------------------------------------------------- scores
def _n_layers() -> int:
    return json.loads((SRC / "config.json").read_text())["num_hidden_layers"]


def _extra_scores(f, i: int, w: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """EXPLORATORY "prop_error": expected squared output error of every member under an isotropic unit-
    Gaussian normalised input x_hat ~ N(0, I), propagated data-free to o/down's inputs:
      q/k/v, gate/up  sum_j gain_j * gamma_j^2                       (= norm_error)
      o_proj          sum_j gain_j * E[a_j^2], a = attention output; E[a_j^2] <= ||(W_v diag gamma1)[r(j)]||^2,
                      r(j) the v row feeding channel j (GQA); the bound (attention = one token) is used
      down_proj       sum_j gain_j * E[(silu(g_j) u_j)^2], (g_j, u_j) jointly Gaussian with the covariance
                      of rows j of W_gate diag gamma2 and W_up diag gamma2 (fixed-seed Monte Carlo, 65536 draws)
    gain_j = per-input-channel squared error removed by INT8 (as in sensitivity.scores)."""
    p = f"model.layers.{i}."
    g1 = f.get_tensor(p + "input_layernorm.weight").double()
    g2 = f.get_tensor(p + "post_attention_layernorm.weight").double()
    cfg = json.loads((SRC / "config.json").read_text())
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rep = cfg["num_attention_heads"] // cfg["num_key_value_heads"]

    def gain(t: torch.Tensor) -> torch.Tensor:
        gs = group_for(t.shape[-1], GROUP)
        col = []
        for bits in (4, 8):
            codes, s = rtn.quantize(t, bits, gs)
            d = t.double() - rtn.dequantize(codes, s, bits, gs).double()
            col.append((d * d).sum(0))
        return col[0] - col[1]

    out = {}
    for name, t in w.items():
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            ex2 = g1 ** 2
        elif name.endswith(("gate_proj", "up_proj")):
            ex2 = g2 ** 2
        elif name.endswith("o_proj"):
            wv = w["self_attn.v_proj"].double() * g1  # (kv*hd, hidden)
            vrow = (wv * wv).sum(1)  # E[v_r^2] for x_hat ~ N(0, I)
            j = torch.arange(t.shape[1])
            ex2 = vrow[(j // hd) // rep * hd + j % hd]
        else:  # down_proj
            wg = w["mlp.gate_proj"].double() * g2
            wu = w["mlp.up_proj"].double() * g2
            sg, su = (wg * wg).sum(1).sqrt(), (wu * wu).sum(1).sqrt()
            rho = (wg * wu).sum(1) / (sg * su).clamp_min(1e-300)
            z = torch.randn(2, 65536, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            gg = sg[:, None] * z[0]
            uu = su[:, None] * (rho[:, None] * z[0] + (1 - rho[:, None] ** 2).clamp_min(0).sqrt() * z[1])
            ex2 = ((torch.nn.functional.silu(gg) * uu) ** 2).mean(1)
        out[name] = {"prop_error": float((gain(t) * ex2).sum())}
    return out


def compute_scores(extra: bool) -> dict:
    path = OUT / "scores.json"
    cached = json.loads(path.read_text()) if path.exists() else None
    if cached and (not extra or cached.get("extra")):
        return cached
    n = _n_layers()
    tensors, units = {}, {}
    t0 = time.time()
    with safe_open(str(SRC / "model.safetensors"), framework="pt") as f:
        for i in range(n):
            p = f"model.layers.{i}."
            w = {m: f.get_tensor(p + m + ".weight") for fam in FAMILIES.values() for m in fam[0]}
            ext = _extra_scores(f, i, w) if extra else {}
            for fam, (members, norm) in FAMILIES.items():
                gamma = f.get_tensor(p + norm + ".weight") if norm else None
                mem = []
                for m in members:
                    t = w[m]
                    nk, kk = t.shape
                    sc = scores(t, group_for(kk, GROUP), gamma)
                    sc.update(ext.get(m, {}))
                    pn, pk = padded(nk, kk)
                    tensors[p + m] = {"shape": [nk, kk], "group": group_for(kk, GROUP), "padded": [pn, pk],
                                      "params": nk * kk, "stored": pn * pk, **sc}
                    mem.append(tensors[p + m])
                params = sum(t["params"] for t in mem)
                agg = {}
                for s in mem[0]:
                    if s in ("shape", "group", "padded", "params", "stored"):
                        continue
                    if s in ADDITIVE or s == "prop_error":
                        agg[s] = sum(t[s] for t in mem)
                    else:
                        agg[s] = sum(t[s] * t["params"] for t in mem) / params
                units[f"layers.{i}+{fam}"] = {"layer": i, "family": fam, "params": params,
                                              "stored": sum(t["stored"] for t in mem), **agg}
    data = {"model": str(SRC), "group_size": GROUP, "extra": extra, "seconds": round(time.time() - t0, 1),
            "linear_parameters": sum(t["params"] for t in tensors.values()), "tensors": tensors, "units": units}
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


# ----------------------------------------------------------------------------------------- selections
def dry_run(sel: list[str]) -> dict:
    cmd = [RTNQ, "convert", str(SRC), str(OUT / "x"), "--dry-run", "--json", "--bits", "4"]
    if sel:
        cmd += ["--keep-int8", ",".join(sel)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def base_bpw() -> float:
    return dry_run([])["totals"]["linear_bits_per_weight"]


def greedy(units: dict, score: str, budget: float, base: float, lin: int) -> list[str]:
    order = sorted(units, key=lambda u: units[u][score] / units[u]["stored"], reverse=True)
    bpw, sel = base, []
    for u in order:
        c = 4 * units[u]["stored"] / lin
        if bpw + c <= budget + 1e-12:
            sel.append(u)
            bpw += c
    return sel


def position_rule(n: int) -> list[int]:
    """llama.cpp's use_more_bits(i_layer, n_layers) with its integer arithmetic."""
    return [i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2]


def settings(data: dict, budgets: list[float], base: float, extra: bool) -> list[dict]:
    units, lin, n = data["units"], data["linear_parameters"], _n_layers()
    cost = lambda sel: sum(4 * units[u]["stored"] / lin for u in sel if u in units)  # noqa: E731
    out = [{"name": "rtn4", "score": "baseline", "budget": None, "sel": []}]
    names = list(SCORES) + (["prop_error"] if extra else [])
    layers = position_rule(n)
    pos = [f"layers.{i}+{fam}" for i in layers for fam in ("qkv", "down")]
    # order = eval priority: the first budget's scores, the fixed baselines, then the other budgets
    for k, b in enumerate(budgets):
        for s in names:
            out.append({"name": f"{s}@{b}", "score": s, "budget": b, "sel": greedy(units, s, b, base, lin)})
        if k == 0:
            out.append({"name": "position", "score": "position(Q4_K_M)", "budget": None, "sel": pos})
            for p in (["layers.0"], ["layers.-1"], ["layers.0", "layers.-1"]):
                out.append({"name": ",".join(p), "score": "paper", "budget": None, "sel": p})
    # trimmed: llama.cpp's layers in priority order (first 1/8, last 1/8, then every third), qkv+down each
    prio = [i for i in layers if i < n // 8 or i >= 7 * n // 8] + [i for i in layers if n // 8 <= i < 7 * n // 8]
    for b in budgets:
        sel, bpw = [], base
        for i in prio:
            for fam in ("down", "qkv"):
                u = f"layers.{i}+{fam}"
                if bpw + cost([u]) <= b + 1e-12:
                    sel.append(u)
                    bpw += cost([u])
        if sel != pos:
            out.append({"name": f"position@{b}", "score": "position(Q4_K_M) trimmed", "budget": b, "sel": sel})
    for s in out:
        s["analytic_bpw"] = round(base + cost(_units_of(s["sel"], n)), 6)
    return out


def _units_of(sel: list[str], n: int) -> list[str]:
    """Units a selection covers (whole-layer selectors expand to their 4 units)."""
    res = []
    for x in sel:
        if "+" in x:
            res.append(x)
        else:
            i = int(x.split(".")[1]) % n
            res += [f"layers.{i}+{fam}" for fam in FAMILIES]
    return res


def describe(sel: list[str], n: int) -> str:
    us = _units_of(sel, n)
    if not us:
        return "-"
    fam = {f: sum(u.endswith("+" + f) for u in us) for f in FAMILIES}
    layers = sorted({int(u.split(".")[1].split("+")[0]) for u in us})
    return f"{len(us)}u (" + " ".join(f"{k}:{v}" for k, v in fam.items() if v) + f"); L{','.join(map(str, layers))}"


# ---------------------------------------------------------------------------------------------- eval
def run_eval(sel: list[str]) -> dict:
    cmd = [RTNQ, "eval", str(SRC)] + EVAL_ARGS + (["--keep-int8", ",".join(sel)] if sel else [])
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}\n{r.stderr}")
    d = json.loads(r.stdout)
    d["_wall"] = round(time.time() - t0, 1)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only-scores", action="store_true", help="scores, selections and bpw; no eval")
    ap.add_argument("--budgets", default="4.5,5.0", help="comma list of linear bits-per-weight budgets")
    ap.add_argument("--extra", action="store_true", help="also the exploratory prop_error score")
    ap.add_argument("--no-eval", nargs="*", default=[], help="setting names not to evaluate")
    a = ap.parse_args()
    budgets = [float(b) for b in a.budgets.split(",")]
    data = compute_scores(a.extra)
    units, lin, n = data["units"], data["linear_parameters"], _n_layers()

    # the analytic cost against one dry-run
    base = base_bpw()
    probe = ["layers.3+qkv", "layers.7+down"]
    got = dry_run(probe)["totals"]
    want = base + sum(4 * units[u]["stored"] / lin for u in probe)
    assert got["linear_parameters"] == lin, (got["linear_parameters"], lin)
    assert abs(got["linear_bits_per_weight"] - want) < 2e-4, (got["linear_bits_per_weight"], want)
    print(f"RTN-4 linear bpw {base}; cost check {probe}: dry-run {got['linear_bits_per_weight']} vs analytic "
          f"{want:.5f}", file=sys.stderr)
    for b in budgets:
        if b < base:
            print(f"note: budget {b} is below RTN-4's own {base}: nothing can be promoted", file=sys.stderr)

    res_path = OUT / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {"by_selection": {}, "settings": []}
    cache = results["by_selection"]
    todo = settings(data, budgets, base, a.extra)
    for s in todo:
        key = ",".join(s["sel"])
        if key not in cache:
            cache[key] = {}
        c = cache[key]
        if "bpw" not in c:
            c["bpw"] = dry_run(s["sel"])["totals"]["linear_bits_per_weight"]
        s["bpw"] = c["bpw"]
        if a.only_scores or s["name"] in a.no_eval:
            continue
        if "kl" not in c:
            print(f"eval {s['name']}: {describe(s['sel'], n)}", file=sys.stderr, flush=True)
            d = run_eval(s["sel"])
            c.update({"kl": d["kl"], "ppl": d["candidate"]["perplexity"], "src_ppl": d["source"]["perplexity"],
                      "top1_agreement": d["top1_agreement"], "top1_accuracy": d["candidate"]["top1_accuracy"],
                      "wall": d["_wall"]})
            print(f"  kl {c['kl']:.5f} ppl {c['ppl']:.3f} ({c['wall']} s)", file=sys.stderr, flush=True)
            results["settings"] = _merge(results["settings"], todo)
            res_path.write_text(json.dumps(results, indent=1))
    results["settings"] = _merge(results["settings"], todo)
    results["base_bpw"] = base
    res_path.write_text(json.dumps(results, indent=1))

    print("| setting | score | budget | bpw | units promoted | KL | ppl | top-1 agr |")
    print("|---|---|---|---|---|---|---|---|")
    for s in todo:
        c = cache[",".join(s["sel"])]
        kl = f"{c['kl']:.5f}" if "kl" in c else "-"
        ppl = f"{c['ppl']:.3f}" if "ppl" in c else "-"
        t1 = f"{c['top1_agreement']:.4f}" if "top1_agreement" in c else "-"
        print(f"| {s['name']} | {s['score']} | {s['budget'] or '-'} | {s['bpw']:.4f} | {describe(s['sel'], n)} "
              f"| {kl} | {ppl} | {t1} |")


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    by = {s["name"]: s for s in old}
    by.update({s["name"]: s for s in new})
    return list(by.values())


if __name__ == "__main__":
    main()
