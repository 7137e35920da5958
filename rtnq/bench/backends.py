"""The torch backend of the sweep: per shape group, the rotation copies of every weight family and one
call per variant, on "cuda" (rtnq's kernels through rtnq.runtime.ops.gemm, cuBLAS, PyTorch's int4/int8
kernels) or "cpu" (rtnq.runtime.QuantLinear's reference path and torch's CPU GEMMs; plumbing, not speed).

The pieces live next to it: device.py (seeded tensors on the device), weights.py (the quantized and
dense weights of a shape), peers.py (PyTorch's kernels), stack.py (the linear-stack figure).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rtnq.bench import peers, report, weights
from rtnq.bench.device import SEED, Device
from rtnq.bench.harness import DENSE, DENSE_BF16, DENSE_KN, RTNQ_PATHS, Case, StackPlan
from rtnq.bench.shapes import Model, QuantConfig, ShapeGroup
from rtnq.bench.stack import StackBuilder
from rtnq.bench.weights import CHECK_LIMIT, Checkpoint, ConfigWeights
from rtnq.runtime import QuantLinear, ops
from rtnq.runtime.weight import MarlinWeight


@dataclass
class ShapeState:
    """What `setup` prepared for one shape group, used by `cases` at every M."""

    group: ShapeGroup
    cws: list[ConfigWeights]
    fam: dict[str, peers.Family]  # family -> (bytes per copy, make one copy)
    copies: dict[str, list[Any]]  # family -> the weight copies rotated through
    unavailable: dict[str, str] = field(default_factory=dict)  # peer family -> why it cannot run


class TorchBackend:
    """Builds cases for `harness.sweep` and stack plans for `harness.time_stack`."""

    def __init__(self, device: str, dtype_name: str, *, model: Model | None = None,
                 checkpoint: Checkpoint | None = None, seed: int = SEED, checks: bool = True,
                 peers: bool = True, log: Callable[[str], None] = lambda s: None):
        self.dev = Device(device, dtype_name, seed=seed, log=log)
        self.device = device  # harness.Backend reads these three
        self.dtype_name = dtype_name
        self.l2_bytes = self.dev.l2_bytes
        self.model = model
        self.checkpoint = checkpoint
        self.checks = checks
        self.peers = peers
        self.base: dict[tuple[int, int], dict[QuantConfig, MarlinWeight]] = {}
        # Time rtnq's kernel paths through ops.gemm (GPU), or the QuantLinear reference forward (CPU).
        # Tests flip this on a CPU with a stand-in ops.gemm to check the call plumbing without a GPU.
        self.kernel_paths = device == "cuda"

    # ------------------------------------------------------------------ sweep

    def setup(self, group: ShapeGroup) -> ShapeState:
        cws = weights.build(self.dev, group, self.checkpoint)
        self.base[(group.n, group.k)] = {cw.config: cw.weight for cw in cws}
        n, k = group.n, group.k
        dense = cws[0].dense  # baseline weight = the first configuration's dequantized weight
        fam: dict[str, peers.Family] = {}
        fam["dense"] = (2 * n * k, lambda: dense.clone())
        fam["dense:kn"] = (2 * n * k, lambda: dense.t().contiguous())
        if self.dev.dtype_name == "fp16":
            fam["dense:bf16"] = (2 * n * k, lambda: dense.to(torch.bfloat16))
        state = ShapeState(group, cws, fam, {})
        for cw in cws:
            cfg = cw.config
            fam[f"marlin:{cfg}"] = (report.weight_bytes("marlin", n, k, cfg.bits, cfg.group_size),
                                    lambda cw=cw: cw.weight.clone())
            if self.peers:
                peers.add_families(self.dev, cw, fam, state.unavailable)
        budget = int(0.4 * self.dev.free_bytes())
        wanted = {name: report.rotation_copies(b, self.l2_bytes) for name, (b, _) in fam.items()}
        total = sum(wanted[name] * b for name, (b, _) in fam.items())
        if total > budget:  # shrink every family's copies by the same factor, at least one each
            f = budget / total
            wanted = {name: max(1, int(c * f)) for name, c in wanted.items()}
        for name, (b, make) in fam.items():
            if name in state.unavailable:
                continue  # peer unavailable: nothing to copy
            first = make()
            state.copies[name] = [first] + [_clone(first) for _ in range(wanted[name] - 1)]
        return state

    def cases(self, state: ShapeState, m: int) -> list[Case]:
        n, k = state.group.n, state.group.k
        copies = state.copies
        max_c = max((len(v) for v in copies.values()), default=1)
        x_bytes = 2 * m * k
        cx = max(1, min(max_c, (256 << 20) // max(1, x_bytes)))
        xs = [self.dev.randn((m, k), 7 * m + i) for i in range(cx)]
        xs_bf16 = [x.to(torch.bfloat16) for x in xs] if self.dev.dtype_name == "fp16" else xs
        limit = CHECK_LIMIT[self.dev.dtype_name]

        def ref_out(w: torch.Tensor) -> torch.Tensor:
            return xs[0].float() @ w.float().t()

        check = ref_out if self.checks else None
        out: list[Case] = []

        def add(case: Case, ref: torch.Tensor | None, fam_name: str) -> None:
            """Try one call: it fills the check column, and a variant that fails is reported unavailable."""
            if case.unavailable is None and case.fn is not None:
                case.copies = len(copies.get(fam_name, [None]))
                case.weight_bytes = state.fam[fam_name][0]
                try:
                    y = case.fn(0)
                    self.dev.sync()
                    if ref is not None:
                        case.rel_err = weights.rel_err(y, ref)
                        case.check_limit = case.check_limit or limit
                except Exception as e:  # noqa: BLE001 - reported as unavailable, sweep continues
                    self.dev.sync()
                    case.unavailable = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    case.fn = None
            out.append(case)

        # dense baselines (cuBLAS on a GPU)
        dense_ref = check(state.cws[0].dense) if check else None
        dn, dkn = copies["dense"], copies["dense:kn"]
        add(Case(DENSE, "baseline", "dense16", None,
                 fn=lambda i: F.linear(xs[i % cx], dn[i % len(dn)])), dense_ref, "dense")
        add(Case(DENSE_KN, "baseline", "dense16", None,
                 fn=lambda i: torch.mm(xs[i % cx], dkn[i % len(dkn)])), dense_ref, "dense:kn")
        if "dense:bf16" in copies:
            db = copies["dense:bf16"]
            add(Case(DENSE_BF16, "baseline", "dense16", None,
                     fn=lambda i: F.linear(xs_bf16[i % cx], db[i % len(db)]),
                     check_limit=CHECK_LIMIT["bf16"]), dense_ref, "dense:bf16")

        for cw in state.cws:
            cfg = cw.config
            ref = check(cw.dense) if check else None
            mq: list[MarlinWeight] = copies[f"marlin:{cfg}"]
            if self.kernel_paths:
                outbuf = torch.empty(m, n, device=self.dev.type, dtype=self.dev.dtype)
                for path in RTNQ_PATHS:
                    add(Case(f"rtnq:{path}", "rtnq", "marlin", cfg, fn=_gemm_fn(xs, mq, path, outbuf)),
                        ref, f"marlin:{cfg}")
            else:
                mods = [QuantLinear(w) for w in mq]
                add(Case("rtnq:reference", "rtnq", "marlin", cfg,
                         fn=lambda i, mods=mods: mods[i % len(mods)](xs[i % cx]),
                         note="rtnq.runtime.QuantLinear (CPU reference)"), ref, f"marlin:{cfg}")
            if self.peers:
                for case, peer_ref, fam_name in peers.cases(self.dev, cfg, state.fam, state.unavailable, copies,
                                                            xs, xs_bf16, ref, check):
                    add(case, peer_ref, fam_name)
        return out

    def teardown(self, state: ShapeState) -> None:
        state.copies.clear()
        state.cws.clear()
        state.fam.clear()
        self.dev.release()

    # ------------------------------------------------------------------ linear stack

    def stack_plans(self, groups: list[ShapeGroup], m: int, bits: list[int | None]) -> list[Callable[[], StackPlan]]:
        """See stack.StackBuilder.plans; uses the packed weights `setup` prepared per shape."""
        return StackBuilder(self.dev, self.base, self.model, self.checkpoint).plans(groups, m, bits)


def _gemm_fn(xs: list[torch.Tensor], mq: list[MarlinWeight], path: str, outbuf: torch.Tensor) -> Callable[[int], Any]:
    gemm = ops.gemm
    cx, cq = len(xs), len(mq)

    def fn(i: int) -> torch.Tensor:
        return gemm(xs[i % cx], mq[i % cq], path=path, out=outbuf)

    return fn


def _clone(obj: Any) -> Any:
    """Another copy of one weight family's weight: a tensor, a MarlinWeight or a peer's tensor tuple."""
    if isinstance(obj, tuple):
        return tuple(t.clone() for t in obj)
    return obj.clone()
