"""The torch backend of the sweep: builds weights (synthetic or from a converted checkpoint), their
rotation copies, and one call per variant, on "cuda" (rtnq's kernels, cuBLAS, PyTorch's int4/int8
kernels) or "cpu" (rtnq's CPU reference path and torch's CPU GEMMs; plumbing, not speed).

Runtime contract used (rtnq/runtime, written separately): `library.load()`, `library.abi_version()`,
`library.device_info()`, `ops.gemm(x, qweight, scales, *, bits, n, k, group_size, path, out)`,
`dispatch.load_thresholds / save_thresholds`, `QuantLinear(qweight, scales, *, bits, n, k,
group_size)` and `loader.load_checkpoint(out_dir, device)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rtnq.numerics import marlin, rtn
from rtnq.bench import report
from rtnq.bench.harness import (DENSE, DENSE_BF16, DENSE_KN, INT8PACK, RTNQ_PATHS, TINYGEMM, Case, StackPlan)
from rtnq.bench.shapes import Model, QuantConfig, ShapeGroup
from rtnq.errors import CheckpointError, KernelUnavailable

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECK_LIMIT = {"bf16": 8e-3, "fp16": 2e-3}  # ||out - ref|| / ||ref|| for a 16-bit output (GPU.md 4.2)
TINYGEMM_GROUPS = (32, 64, 128, 256)
SEED = 20250101


@dataclass
class Runtime:
    """rtnq.runtime's modules, or None where the runtime could not be imported (CPU runs only)."""

    ops: Any = None
    dispatch: Any = None
    library: Any = None
    loader: Any = None
    QuantLinear: Any = None
    abi_version: int | None = None
    device_info: dict = field(default_factory=dict)
    missing: str | None = None  # why the runtime is not there (CPU runs fall back to rtnq.numerics.marlin + rtn)


def load_runtime(device: str) -> Runtime:
    """cuda: the runtime and its CUDA library must load, else KernelUnavailable (one line).
    cpu: use the runtime's QuantLinear (its CPU reference path) when importable."""
    try:
        from rtnq.runtime import QuantLinear, dispatch, library, loader, ops
    except ImportError as e:
        if device == "cuda":
            raise KernelUnavailable(f"the rtnq runtime is not importable ({e})") from None
        return Runtime(missing=f"rtnq.runtime not importable ({e}); CPU reference = rtnq.numerics.marlin.unpack + "
                               "rtn.dequantize + F.linear")
    rt = Runtime(ops=ops, dispatch=dispatch, library=library, loader=loader, QuantLinear=QuantLinear)
    if device == "cuda":
        library.load()
        rt.abi_version = library.abi_version()
        rt.device_info = dict(library.device_info())
    else:
        try:
            rt.abi_version = library.abi_version()
        except Exception:  # noqa: BLE001 - no library on a CPU machine is fine for the reference path
            rt.abi_version = None
    return rt


# --------------------------------------------------------------------------------- weights


@dataclass
class ConfigWeights:
    """One quantized configuration of a shape: Marlin tensors, their codes and the dequantized weight."""

    config: QuantConfig
    qweight: torch.Tensor  # int32 (k/16, n*bits/2), Marlin layout
    scales: torch.Tensor  # (k/g, n) Marlin-permuted, run dtype
    codes: torch.Tensor  # uint8 (n, k), biased (q + 2**(bits-1))
    scales_ng: torch.Tensor  # (n, k/g) plain, run dtype
    dense: torch.Tensor  # (n, k) run dtype: exactly what the kernels must compute with


class _ReferenceLinear:
    """CPU reference forward when rtnq.runtime is missing: unpack + dequantize + matmul per call."""

    def __init__(self, qweight, scales, *, bits, n, k, group_size):
        self.qweight, self.scales, self.bits, self.n, self.k, self.group_size = qweight, scales, bits, n, k, group_size

    def __call__(self, x):
        codes, s = marlin.unpack(self.qweight, self.scales, self.bits, self.n, self.k)
        return F.linear(x, rtn.dequantize(codes, s, self.bits, self.group_size).to(x.dtype))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    num = torch.linalg.vector_norm(out.float() - ref)
    den = torch.linalg.vector_norm(ref)
    return float(num / den) if float(den) else float(num)


class TorchBackend:
    """Builds cases for `harness.sweep` and stack plans for `harness.time_stack`."""

    def __init__(self, device: str, dtype_name: str, runtime: Runtime, *, model: Model | None = None,
                 out_dir: Path | None = None, manifest: Any = None, seed: int = SEED, checks: bool = True,
                 peers: bool = True, log: Callable[[str], None] = lambda s: None):
        self.device = device
        self.dtype_name = dtype_name
        self.dtype = DTYPES[dtype_name]
        self.rt = runtime
        self.model = model
        self.out_dir = out_dir
        self.manifest = manifest
        self.seed = seed
        self.checks = checks
        self.peers = peers
        self.log = log
        self.base: dict[tuple[int, int], dict[QuantConfig, tuple[torch.Tensor, torch.Tensor]]] = {}
        # Time rtnq's kernel paths through ops.gemm (GPU), or the QuantLinear reference forward (CPU).
        # Tests flip this on a CPU with a stand-in `ops` to check the call plumbing without a GPU.
        self.kernel_paths = device == "cuda"
        if device == "cuda":
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or (64 << 20))
        else:
            self.l2_bytes = 0  # CPU: no rotation (plumbing only)

    # ------------------------------------------------------------------ helpers

    def _gen(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed + salt)
        return g

    def _randn(self, shape: tuple[int, ...], salt: int, std: float = 1.0, dtype: torch.dtype | None = None):
        t = torch.randn(shape, generator=self._gen(salt), device=self.device, dtype=dtype or self.dtype)
        return t.mul_(std) if std != 1.0 else t

    def _free_bytes(self) -> int:
        if self.device == "cuda":
            return int(torch.cuda.mem_get_info()[0])
        return 8 << 30  # CPU: the tiny shapes never come near this

    def _on_device_or_cpu(self, fn: Callable[..., Any], *tensors: torch.Tensor):
        """Run a pure-torch rtnq function (quantize, pack, unpack) on the device; if it fails there,
        run it on the CPU and move the results back."""
        try:
            return fn(*tensors)
        except (RuntimeError, NotImplementedError) as e:
            if self.device == "cpu":
                raise
            self.log(f"  {getattr(fn, '__name__', 'step')} failed on the GPU ({str(e).splitlines()[0][:80]}); using the CPU")
            res = fn(*(t.cpu() for t in tensors))
            return tuple(r.to(self.device) for r in res)

    def _weights(self, group: ShapeGroup, salt: int) -> list[ConfigWeights]:
        n, k = group.n, group.k
        out = []
        if self.manifest is None:  # synthetic: fixed-seed random weights through rtnq's own quantize + pack
            w = self._randn((n, k), salt, std=0.02)
            for cfg in group.configs:
                codes, s_ng = self._on_device_or_cpu(
                    lambda t: rtn.quantize(t, cfg.bits, cfg.group_size, dtype=self.dtype), w)
                q, s = self._on_device_or_cpu(lambda c, s: marlin.pack(c, s, cfg.bits), codes, s_ng)
                out.append(self._config_weights(cfg, q, s, codes, s_ng))
            del w
        else:
            for cfg in group.configs:
                q, s = self._read_representative(group.members[cfg][0])
                q, s = q.to(self.device), s.to(self.device)
                codes, s_ng = self._on_device_or_cpu(lambda a, b: marlin.unpack(a, b, cfg.bits, n, k), q, s)
                out.append(self._config_weights(cfg, q, s.to(self.dtype), codes, s_ng.to(self.dtype)))
        return out

    def _config_weights(self, cfg, q, s, codes, s_ng) -> ConfigWeights:
        dense = rtn.dequantize(codes, s_ng, cfg.bits, cfg.group_size).to(self.dtype)
        return ConfigWeights(cfg, q.contiguous(), s.contiguous(), codes, s_ng, dense)

    def _read_representative(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        from rtnq import formats
        from rtnq.runtime.loader import to_marlin

        entry = self.manifest.tensors[module]
        path = Path(self.out_dir) / entry.shard
        fmt = formats.BY_MANIFEST_NAME[self.manifest.format]
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                packed, scales = (f.get_tensor(entry.outputs[role]) for role in fmt.roles[:2])
            if fmt is not formats.MARLIN:  # an export: repack like the loader (and vLLM) do
                return to_marlin(fmt, packed, scales, entry, f"{path}: {module}")
            return packed, scales
        except (OSError, KeyError, RuntimeError) as e:  # safetensors raises SafetensorError (an Exception)
            raise CheckpointError(f"{path}: cannot read {module} ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot read {module} ({type(e).__name__}: {e})") from None

    # ------------------------------------------------------------------ sweep

    def setup(self, group: ShapeGroup) -> dict:
        salt = (group.n * 1_000_003 + group.k) % 1_000_000_007
        cws = self._weights(group, salt)
        self.base[(group.n, group.k)] = {cw.config: (cw.qweight, cw.scales) for cw in cws}
        n, k = group.n, group.k
        dense = cws[0].dense  # baseline weight = the first configuration's dequantized weight
        fam: dict[str, tuple[int, Callable[[], Any]]] = {}  # family -> (bytes per copy, make one copy)
        fam["dense"] = (2 * n * k, lambda: dense.clone())
        fam["dense:kn"] = (2 * n * k, lambda: dense.t().contiguous())
        if self.dtype_name == "fp16":
            fam["dense:bf16"] = (2 * n * k, lambda: dense.to(torch.bfloat16))
        peer_state: dict[str, Any] = {}
        for cw in cws:
            cfg = cw.config
            fam[f"marlin:{cfg}"] = (report.weight_bytes("marlin", n, k, cfg.bits, cfg.group_size),
                                    lambda cw=cw: (cw.qweight.clone(), cw.scales.clone()))
            if self.peers:
                self._add_peers(cw, n, k, fam, peer_state)
        budget = int(0.4 * self._free_bytes())
        wanted = {name: report.rotation_copies(b, self.l2_bytes) for name, (b, _) in fam.items()}
        total = sum(wanted[name] * b for name, (b, _) in fam.items())
        if total > budget:  # shrink every family's copies by the same factor, at least one each
            f = budget / total
            wanted = {name: max(1, int(c * f)) for name, c in wanted.items()}
        copies: dict[str, list[Any]] = {}
        for name, (b, make) in fam.items():
            if name in peer_state and isinstance(peer_state[name], str):
                continue  # peer unavailable: nothing to copy
            first = make()
            copies[name] = [first] + [_clone(first) for _ in range(wanted[name] - 1)]
        return {"group": group, "cws": cws, "fam": fam, "copies": copies, "peer": peer_state}

    def _add_peers(self, cw: ConfigWeights, n: int, k: int, fam: dict, peer_state: dict) -> None:
        cfg = cw.config
        if cfg.bits == 4:
            name = f"tinygemm:{cfg}"
            why = None
            if self.device == "cuda" and self.dtype_name != "bf16":
                why = "tinygemm (_weight_int4pack_mm) runs bf16 activations only"
            elif cfg.group_size not in TINYGEMM_GROUPS:
                why = f"tinygemm supports group sizes {TINYGEMM_GROUPS}, not {cfg.group_size}"
            if why is None:
                try:
                    packed, sz = self._tinygemm_pack(cw)
                except Exception as e:  # noqa: BLE001 - a missing or changed aten op is reported
                    why = f"cannot build the int4 pack: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            if why:
                peer_state[name] = why
                fam[name] = (0, lambda: None)
            else:
                fam[name] = (report.weight_bytes("tinygemm", n, k, 4, cfg.group_size),
                             lambda p=packed, z=sz: (p.clone(), z.clone()))
        if cfg.bits == 8:
            name = f"int8pack:{cfg}"
            try:
                w8 = (cw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
                s = cw.scales_ng.float().amax(dim=1).to(self.dtype).contiguous()  # one scale per channel
                if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
                    raise AttributeError("torch.ops.aten._weight_int8pack_mm is not in this torch")
                fam[name] = (report.weight_bytes("int8_channel", n, k), lambda w=w8, s=s: (w.clone(), s.clone()))
            except Exception as e:  # noqa: BLE001
                peer_state[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                fam[name] = (0, lambda: None)

    def _tinygemm_pack(self, cw: ConfigWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """rtnq's W4 codes in PyTorch's int4 layout. tinygemm dequantizes (q - 8) * scale + zero with
        q = the biased 4-bit code, so zero = 0 reproduces rtnq's symmetric numerics exactly.
        scales_and_zeros: (k/g, n, 2) bf16 = [scale, 0]. Weight: CUDA takes (n, k/2) uint8 with the
        even-k code in the high nibble, then `_convert_weight_to_int4pack(w, inner_k_tiles=8)`; the CPU
        op takes the unpacked (n, k) int32 codes (`_convert_weight_to_int4pack_for_cpu`)."""
        s = cw.scales_ng.to(torch.bfloat16)  # (n, g)
        sz = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).contiguous()  # (g, n, 2)
        if self.device == "cuda":
            c = cw.codes
            u8 = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(cw.codes.to(torch.int32).contiguous(), 2)
        return packed, sz

    def cases(self, state: dict, m: int) -> list[Case]:
        group: ShapeGroup = state["group"]
        n, k = group.n, group.k
        copies = state["copies"]
        cws: list[ConfigWeights] = state["cws"]
        max_c = max((len(v) for v in copies.values()), default=1)
        x_bytes = 2 * m * k
        cx = max(1, min(max_c, (256 << 20) // max(1, x_bytes)))
        xs = [self._randn((m, k), 7 * m + i) for i in range(cx)]
        xs_bf16 = [x.to(torch.bfloat16) for x in xs] if self.dtype_name == "fp16" else xs
        limit = CHECK_LIMIT[self.dtype_name]

        def ref_out(w: torch.Tensor) -> torch.Tensor:
            return xs[0].float() @ w.float().t()

        out: list[Case] = []
        dense_ref = ref_out(cws[0].dense) if self.checks else None

        def add(case: Case, ref: torch.Tensor | None, fam_name: str) -> None:
            if case.unavailable is None and case.fn is not None:
                case.copies = len(copies.get(fam_name, [None]))
                case.weight_bytes = state["fam"][fam_name][0]
                try:
                    y = case.fn(0)
                    if self.device == "cuda":
                        torch.cuda.synchronize()
                    if ref is not None:
                        case.rel_err = _rel_err(y, ref)
                        case.check_limit = case.check_limit or limit
                except Exception as e:  # noqa: BLE001 - reported as unavailable, sweep continues
                    if self.device == "cuda":
                        torch.cuda.synchronize()
                    case.unavailable = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                    case.fn = None
            out.append(case)

        # dense baselines (cuBLAS on a GPU)
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

        for cw in cws:
            cfg = cw.config
            ref = ref_out(cw.dense) if self.checks else None
            mq = copies[f"marlin:{cfg}"]
            if self.kernel_paths:
                outbuf = torch.empty(m, n, device=self.device, dtype=self.dtype)
                for path in RTNQ_PATHS:
                    add(Case(f"rtnq:{path}", "rtnq", "marlin", cfg,
                             fn=self._gemm_fn(xs, mq, cfg, n, k, path, outbuf)), ref, f"marlin:{cfg}")
            else:
                mods = [self._quant_linear(q, s, cfg, n, k) for q, s in mq]
                note = self.rt.missing and "fallback: rtnq.runtime missing" or "rtnq.runtime.QuantLinear (CPU reference)"
                add(Case("rtnq:reference", "rtnq", "marlin", cfg,
                         fn=lambda i, mods=mods: mods[i % len(mods)](xs[i % cx]), note=note), ref, f"marlin:{cfg}")
            if not self.peers:
                continue
            for peer, fmt in ((TINYGEMM, "tinygemm"), (INT8PACK, "int8_channel")):
                fam_name = f"{peer}:{cfg}"
                if fam_name not in state["fam"]:
                    continue
                why = state["peer"].get(fam_name)
                if why:
                    out.append(Case(peer, "peer", fmt, cfg, unavailable=why))
                    continue
                cp = copies[fam_name]
                if peer == TINYGEMM:
                    xb = xs_bf16
                    g = cfg.group_size
                    if self.device == "cuda":
                        fn = lambda i, cp=cp, g=g: torch.ops.aten._weight_int4pack_mm(xb[i % cx], cp[i % len(cp)][0], g,
                                                                                       cp[i % len(cp)][1])
                    else:
                        fn = lambda i, cp=cp, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(
                            xb[i % cx], cp[i % len(cp)][0], g, cp[i % len(cp)][1])
                    op = "_weight_int4pack_mm" if self.device == "cuda" else "_weight_int4pack_mm_for_cpu"
                    add(Case(TINYGEMM, "peer", fmt, cfg, fn=fn, check_limit=CHECK_LIMIT["bf16"],
                             note=f"torch.ops.aten.{op}, bf16, zero = 0"), ref, fam_name)
                else:
                    w8, s8 = cp[0]
                    ref8 = ref_out(w8.float() * s8.float()[:, None]) if self.checks else None
                    fn = lambda i, cp=cp: torch.ops.aten._weight_int8pack_mm(xs[i % cx], cp[i % len(cp)][0],
                                                                             cp[i % len(cp)][1])
                    note = "per-channel scales" + ("" if cfg.group_size == -1 else
                                                   " (rtnq uses groups: bytes and numerics differ)")
                    add(Case(INT8PACK, "peer", fmt, cfg, fn=fn, note=note), ref8, fam_name)
        return out

    def _gemm_fn(self, xs, mq, cfg: QuantConfig, n: int, k: int, path: str, outbuf: torch.Tensor):
        gemm = self.rt.ops.gemm
        cx, cq = len(xs), len(mq)
        bits, g = cfg.bits, cfg.group_size

        def fn(i: int):
            q, s = mq[i % cq]
            return gemm(xs[i % cx], q, s, bits=bits, n=n, k=k, group_size=g, path=path, out=outbuf)

        return fn

    def _quant_linear(self, q, s, cfg: QuantConfig, n: int, k: int):
        cls = self.rt.QuantLinear or _ReferenceLinear
        return cls(q, s, bits=cfg.bits, n=n, k=k, group_size=cfg.group_size)

    def teardown(self, state: dict) -> None:
        state.clear()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ linear stack

    def stack_plans(self, groups: list[ShapeGroup], m: int, bits: list[int | None]) -> list[Callable[[], StackPlan]]:
        """Builders for one quantized stack per bit width in `bits`, then the dense stack, at batch m.

        Synthetic: every linear of every layer gets its own copy of its shape's packed weight (so the
        forward streams all of them from memory), lm_head stays 16-bit unless the model says
        otherwise. Checkpoint: the runtime's loader builds one QuantLinear per quantized linear; an
        lm_head the checkpoint kept in 16-bit is timed dense in both stacks.
        """
        plans: list[Callable[[], StackPlan]] = [lambda b=b: self._quant_stack(groups, m, b) for b in bits]
        return plans + [lambda: self._dense_stack(groups, m)]

    def _stack_x(self, ks: set[int], m: int) -> dict[int, torch.Tensor]:
        return {k: self._randn((m, k), 99 + k) for k in sorted(ks)}

    def _fraction(self, need: int) -> float:
        budget = int(0.8 * self._free_bytes())
        return 1.0 if need <= budget else max(1e-9, budget / need)

    def _lm_head_dense(self) -> tuple[int, int] | None:
        """(n, k) of an lm_head kept in 16-bit: synthetic default, or a passthrough lm_head.weight."""
        if self.manifest is None:
            return None  # synthetic models list lm_head among groups; handled by the caller
        for name, e in self.manifest.tensors.items():
            if e.kind == "passthrough" and name.endswith("lm_head.weight") and len(e.shape) == 2:
                return tuple(e.shape)  # type: ignore[return-value]
        return None

    def _quant_stack(self, groups: list[ShapeGroup], m: int, bits: int | None) -> StackPlan:
        label = f"rtnq W{bits}" if bits else "rtnq"
        if self.device == "cuda":
            torch.cuda.empty_cache()
        if self.manifest is not None and self.rt.loader is not None:
            return self._checkpoint_quant_stack(m, label)
        items: list[tuple] = []  # floor items
        layers: list[tuple[str, int, int, Any]] = []  # (kind, n, k, payload)
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
                    layers.append(("dense", g.n, g.k, self._randn((g.n, g.k), 5000 + j, std=0.02)))
            else:
                items.append(("marlin", g.count, m, g.n, g.k, cfg.bits, cfg.group_size))
                timed_items.append(("marlin", cnt, m, g.n, g.k, cfg.bits, cfg.group_size))
                q0, s0 = self.base[(g.n, g.k)][cfg]
                for j in range(cnt):
                    layers.append(("quant", g.n, g.k, self._quant_linear(q0.clone(), s0.clone(), cfg, g.n, g.k)))
        head = self._lm_head_dense()
        if head:  # checkpoint without the runtime loader (CPU fallback): its 16-bit lm_head
            n, k = head
            items.append(("dense16", 1, m, n, k, 16, -1))
            timed_items.append(("dense16", 1, m, n, k, 16, -1))
            layers.append(("dense", n, k, self._randn((n, k), 4242, std=0.02)))
        return self._plan(label, layers, items, timed_items, m, f)

    def _checkpoint_quant_stack(self, m: int, label: str) -> StackPlan:
        ck = self.rt.loader.load_checkpoint(self.out_dir, self.device)
        layers: list[tuple[str, int, int, Any]] = []
        items: list[tuple] = []
        for name, ql in ck.linears.items():
            n, k, bits, g = self._linear_meta(name, ql)
            layers.append(("quant", n, k, ql))
            items.append(("marlin", 1, m, n, k, bits, g))
        head = self._lm_head_dense()
        if head:
            n, k = head
            layers.append(("dense", n, k, self._randn((n, k), 4242, std=0.02)))
            items.append(("dense16", 1, m, n, k, 16, -1))
        return self._plan(label, layers, items, items, m, 1.0, cleanup_obj=ck)

    def _linear_meta(self, name: str, ql: Any) -> tuple[int, int, int, int]:
        """(n, k, bits, group_size) of a loaded QuantLinear: its attributes, else its manifest entry."""
        n = getattr(ql, "out_features", getattr(ql, "n", None))
        k = getattr(ql, "in_features", getattr(ql, "k", None))
        vals = [n, k, getattr(ql, "bits", None), getattr(ql, "group_size", None)]
        if all(v is not None for v in vals):
            return tuple(int(v) for v in vals)  # type: ignore[return-value]
        e = self.manifest.tensors.get(name) or self.manifest.tensors.get(f"{name}.weight")
        if e is None:
            raise CheckpointError(f"{self.out_dir}: loaded linear {name} has no manifest entry")
        return int(e.shape[-2]), int(e.shape[-1]), int(e.bits), int(e.group_size)

    def _dense_stack(self, groups: list[ShapeGroup], m: int) -> StackPlan:
        if self.device == "cuda":
            torch.cuda.empty_cache()
        fams = [(g.n, g.k, g.count) for g in groups]
        if self.manifest is not None:
            head = self._lm_head_dense()
            if head:
                fams.append((head[0], head[1], 1))
        need = sum(2 * n * k * c for n, k, c in fams)
        f = self._fraction(need)
        layers, items, timed = [], [], []
        for n, k, c in fams:
            cnt = c if f >= 1 else max(1, int(c * f))
            items.append(("dense16", c, m, n, k, 16, -1))
            timed.append(("dense16", cnt, m, n, k, 16, -1))
            for j in range(cnt):
                layers.append(("dense", n, k, self._randn((n, k), 6000 + j, std=0.02)))
        return self._plan(f"dense {self.dtype_name}", layers, items, timed, m, f)

    def _plan(self, label, layers, items, timed_items, m, fraction, cleanup_obj=None) -> StackPlan:
        xs = self._stack_x({k for _, _, k, _ in layers}, m)
        calls = []
        for kind, n, k, payload in layers:
            x = xs[k]
            if kind == "dense":
                calls.append(lambda x=x, w=payload: F.linear(x, w))
            else:
                calls.append(lambda x=x, mod=payload: mod(x))

        def forward(_i: int):
            for c in calls:
                c()

        scale, note = 1.0, ""
        if fraction < 1.0:
            # Only part of the stack fits: time that part, scale by the ratio of the floors
            # (whole stack vs timed part), as GPU.md 4.3 suggests for 70B bf16 on an H100.
            ceil = report.Ceilings(1.0, 1.0, self.device)  # ratio only: any positive ceilings work
            scale = report.stack_floor_us(items, ceil) / report.stack_floor_us(timed_items, ceil)
            note = f"only {fraction:.0%} of the weights fit: timed a subset, scaled x{scale:.2f}"
        holder = {"layers": layers, "xs": xs, "obj": cleanup_obj}

        def cleanup():
            holder.clear()
            calls.clear()
            if self.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

        return StackPlan(label, forward, items, scale=scale, note=note, cleanup=cleanup)


def _clone(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return tuple(t.clone() for t in obj)
    return obj.clone()


def cuda_problem() -> str | None:
    """Why torch cannot use a CUDA GPU here (one line), or None if it can."""
    if not torch.cuda.is_available():
        built = torch.version.cuda
        why = "this torch build has no CUDA support" if not built else "no CUDA device is visible"
        return f"no CUDA GPU: {why} (torch {torch.__version__}); use --device cpu to check the plumbing on the CPU reference path"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; rtnq's kernels need 8.0 or newer"
    return None


