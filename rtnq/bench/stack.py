"""The linear-stack figure: one forward of every linear of a model at batch M, rtnq vs dense.

Synthetic: every linear of every layer gets its own copy of its shape's packed weight (so the forward
streams all of them from memory), lm_head stays 16-bit unless the model says otherwise. Checkpoint: the
runtime's loader builds one QuantLinear per quantized linear; an lm_head the checkpoint kept in 16-bit is
timed dense in both stacks. When the weights do not fit in memory a part is timed and scaled up.
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F

from rtnq.bench import report
from rtnq.bench.device import Device
from rtnq.bench.harness import StackPlan
from rtnq.bench.shapes import Model, QuantConfig, ShapeGroup
from rtnq.bench.weights import Checkpoint
from rtnq.runtime import QuantLinear, load_checkpoint
from rtnq.runtime.weight import MarlinWeight

Layer = tuple[str, int, int, Any]  # ("dense" | "quant", n, k, weight tensor | QuantLinear)


class StackBuilder:
    """Builds StackPlans; `base` holds the packed weight of every (n, k) and config the sweep prepared."""

    def __init__(self, dev: Device, base: dict[tuple[int, int], dict[QuantConfig, MarlinWeight]],
                 model: Model | None, checkpoint: Checkpoint | None):
        self.dev = dev
        self.base = base
        self.model = model
        self.checkpoint = checkpoint

    def plans(self, groups: list[ShapeGroup], m: int, bits: list[int | None]) -> list[Callable[[], StackPlan]]:
        """Builders for one quantized stack per bit width in `bits` (None: the checkpoint's own mix), then
        the dense stack, at batch m. Built one at a time by harness.time_stack, so that the dense stack of
        a big model never shares the GPU with the quantized one."""
        plans: list[Callable[[], StackPlan]] = [lambda b=b: self._quant(groups, m, b) for b in bits]
        return plans + [lambda: self._dense(groups, m)]

    def _fraction(self, need: int) -> float:
        budget = int(0.8 * self.dev.free_bytes())
        return 1.0 if need <= budget else max(1e-9, budget / need)

    def _quant(self, groups: list[ShapeGroup], m: int, bits: int | None) -> StackPlan:
        label = f"rtnq W{bits}" if bits else "rtnq"
        self.dev.release()
        if self.checkpoint is not None:
            return self._checkpoint_quant(m, label)
        items: list[tuple] = []  # floor items
        layers: list[Layer] = []
        need = 0
        fams = []
        for g in groups:
            cfg = next((c for c in g.configs if bits is None or c.bits == bits), None)
            dense_head = g.name == "lm_head" and self.model is not None and not self.model.quantize_lm_head
            if cfg is None or dense_head:
                fams.append(("dense", g, None))
                need += g.count * 2 * g.n * g.k
            else:
                fams.append(("quant", g, cfg))
                need += g.count * report.weight_bytes("marlin", g.n, g.k, cfg.bits, cfg.group_size)
        f = self._fraction(need)
        timed_items: list[tuple] = []
        for kind, g, cfg in fams:
            cnt = g.count if f >= 1 else max(1, int(g.count * f))
            if kind == "dense":
                items.append(("dense16", g.count, m, g.n, g.k, 16, -1))
                timed_items.append(("dense16", cnt, m, g.n, g.k, 16, -1))
                for j in range(cnt):
                    layers.append(("dense", g.n, g.k, self.dev.randn((g.n, g.k), 5000 + j, std=0.02)))
            else:
                items.append(("marlin", g.count, m, g.n, g.k, cfg.bits, cfg.group_size))
                timed_items.append(("marlin", cnt, m, g.n, g.k, cfg.bits, cfg.group_size))
                w0 = self.base[(g.n, g.k)][cfg]
                for _ in range(cnt):
                    layers.append(("quant", g.n, g.k, QuantLinear(w0.clone())))
        return self._plan(label, layers, items, timed_items, m, f)

    def _checkpoint_quant(self, m: int, label: str) -> StackPlan:
        ck = load_checkpoint(self.checkpoint.out_dir, self.dev.type)
        layers: list[Layer] = []
        items: list[tuple] = []
        for ql in ck.linears.values():
            w = ql.packed
            layers.append(("quant", w.n, w.k, ql))
            items.append(("marlin", 1, m, w.n, w.k, w.bits, w.group_size))
        head = self.checkpoint.dense_lm_head()
        if head:
            n, k = head
            layers.append(("dense", n, k, self.dev.randn((n, k), 4242, std=0.02)))
            items.append(("dense16", 1, m, n, k, 16, -1))
        return self._plan(label, layers, items, items, m, 1.0, cleanup_obj=ck)

    def _dense(self, groups: list[ShapeGroup], m: int) -> StackPlan:
        self.dev.release()
        fams = [(g.n, g.k, g.count) for g in groups]
        if self.checkpoint is not None:
            head = self.checkpoint.dense_lm_head()
            if head:
                fams.append((head[0], head[1], 1))
        need = sum(2 * n * k * c for n, k, c in fams)
        f = self._fraction(need)
        layers: list[Layer] = []
        items, timed = [], []
        for n, k, c in fams:
            cnt = c if f >= 1 else max(1, int(c * f))
            items.append(("dense16", c, m, n, k, 16, -1))
            timed.append(("dense16", cnt, m, n, k, 16, -1))
            for j in range(cnt):
                layers.append(("dense", n, k, self.dev.randn((n, k), 6000 + j, std=0.02)))
        return self._plan(f"dense {self.dev.dtype_name}", layers, items, timed, m, f)

    def _plan(self, label: str, layers: list[Layer], items: list[tuple], timed_items: list[tuple], m: int,
              fraction: float, cleanup_obj: Any = None) -> StackPlan:
        xs = {k: self.dev.randn((m, k), 99 + k) for k in sorted({k for _, _, k, _ in layers})}
        calls = []
        for kind, n, k, payload in layers:
            x = xs[k]
            if kind == "dense":
                calls.append(lambda x=x, w=payload: F.linear(x, w))
            else:
                calls.append(lambda x=x, mod=payload: mod(x))

        def forward(_i: int) -> None:
            for c in calls:
                c()

        scale, note = 1.0, ""
        if fraction < 1.0:
            # Only part of the stack fits: time that part, scale by the ratio of the floors
            # (whole stack vs timed part), as GPU.md 4.3 suggests for 70B bf16 on an H100.
            ceil = report.Ceilings(1.0, 1.0, self.dev.type)  # ratio only: any positive ceilings work
            scale = report.stack_floor_us(items, ceil) / report.stack_floor_us(timed_items, ceil)
            note = f"only {fraction:.0%} of the weights fit: timed a subset, scaled x{scale:.2f}"
        holder: dict[str, Any] = {"layers": layers, "xs": xs, "obj": cleanup_obj}

        def cleanup() -> None:
            holder.clear()
            calls.clear()
            self.dev.release()

        return StackPlan(label, forward, items, scale=scale, note=note, cleanup=cleanup)

