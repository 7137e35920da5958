"""`rtnq dequantize`: a quantized checkpoint back to a dense one that any loader can run or compare.

Reads an rtnq marlin output, or any symmetric GPTQ (`quant_method: "gptq"`) or compressed-tensors
`pack-quantized` checkpoint, rtnq's exports included. Every quantized module becomes `P.weight` =
(code - bias) x scale, computed in the scales' dtype with one rounding (rtn.dequantize's rule), so a
dense weight is bit-identical across the three formats of one conversion. Every other tensor is
copied byte for byte; config.json loses its quantization_config.

What each module is, is read off the tensors, not trusted from a manifest:
  GPTQ               qweight (k/pf, n), scales (groups, n), g_idx (k,): k from g_idx, pf = k / qweight
                     rows, bits = 32 / pf; scale row of input i = g_idx[i] (act-order included).
                     Without g_idx, bits come from the config (its `dynamic` overrides included).
                     qzeros must hold the symmetric constants (v1 or v2); asymmetric GPTQ is refused.
  compressed-tensors weight_shape [n, k]; bits = 32 * weight_packed columns / k; groups from the scales.
                     A weight_zero_point (asymmetric) is refused.
  marlin (rtnq)      bits, group size and logical shape from rtnq_manifest.json (the scales must agree),
                     unpacked with rtnq.numerics.marlin at the padded shape where the kernels needed one.
Streaming like convert: a few modules in memory at a time (IN_FLIGHT), writes behind on a writer
thread; output shards mirror the input shards; the
output is built in a temporary directory and renamed into place at the end.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rtnq import formats, params
from rtnq.checkpoint import layout, pipeline
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.outdir import check_output_location
from rtnq.checkpoint.shards import check_readable, sharded_output
from rtnq.checkpoint.source import Reader, TensorSpec, scan
from rtnq.checkpoint.writer import Entry, write_json
from rtnq.errors import CheckpointError
from rtnq.numerics import rtn
from rtnq.selection import names

METHODS = tuple(formats.BY_QUANT_METHOD)
CHUNK_BYTES = 8 * 1024 * 1024  # passthrough tensors are copied in pieces of this size
IN_FLIGHT = 4  # dense tensors or pieces waiting for the writer thread
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Module:
    """One quantized module and where its tensors are."""

    prefix: str
    inputs: dict[str, TensorSpec]  # role -> spec
    bits: int
    n: int
    k: int
    out: Entry  # the dense P.weight
    group_size: int | None = None  # marlin: the manifest's; GPTQ/compressed-tensors: read off the scales


@dataclass
class DequantizePlan:
    src: Path
    out: Path
    method: str  # one of METHODS
    modules: list[Module]
    passthrough: list[TensorSpec]
    shards: list[tuple[str, list[Entry]]]
    config: dict  # the dense config.json
    small_files: list[str]
    force: bool = False


@dataclass(frozen=True)
class DequantizeResult:
    plan: DequantizePlan
    seconds: float
    modules: int
    bits: dict[int, int]  # bits -> modules


def _config(src: Path) -> dict:
    path = src / layout.CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; cannot tell how the checkpoint is quantized")
    return layout.read_json_object(path)


def _qconfig(cfg: dict, src: Path) -> dict:
    q = cfg.get("quantization_config") or cfg.get("compression_config")
    if q is None and (src / layout.GPTQ_CONFIG_NAME).is_file():  # AutoGPTQ-era GPTQ checkpoints
        q = layout.read_json_object(src / layout.GPTQ_CONFIG_NAME)
        q.setdefault("quant_method", "gptq")
    if not isinstance(q, dict):
        raise CheckpointError(f"{src}: config.json has no quantization_config; the checkpoint is not quantized")
    method = q.get("quant_method")
    if method not in METHODS:
        raise CheckpointError(
            f"{src}: quant_method {method!r} is not supported (rtnq dequantizes gptq, compressed-tensors and rtnq)"
        )
    return q


def make_plan(src: str | Path, out: str | Path, force: bool = False) -> DequantizePlan:
    """Everything about the dense output, from headers and configs (plus GPTQ/CT's tiny shape tensors)."""
    src_dir = layout.resolve(src)
    out_dir = Path(out)
    check_output_location(src_dir, out_dir, force)
    cfg, method, specs, modules = read_modules(src_dir)
    consumed = {s.name for m in modules for s in m.inputs.values()}
    passthrough = [s for s in specs if s.name not in consumed]
    taken = {s.name for s in passthrough}
    for m in modules:
        if m.out.name in taken:
            raise CheckpointError(f"{m.out.name} exists beside the quantized tensors of {m.prefix}")
    # Output shards: each dense weight goes where its packed codes were; tensors keep their shards.
    shard_of_output: dict[str, list[Entry]] = {}
    first_role = {m.prefix: next(iter(m.inputs.values())).name for m in modules}
    module_at = {first_role[m.prefix]: m for m in modules}
    for s in specs:
        if s.name in module_at:
            shard_of_output.setdefault(s.shard, []).append(module_at[s.name].out)
        elif s.name not in consumed:
            shard_of_output.setdefault(s.shard, []).append(Entry(s.name, s.dtype, s.shape))
    dense_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "compression_config")}
    small = layout.small_files(src_dir)
    check_readable(src_dir, small)  # before any tensor is written, not after
    return DequantizePlan(src_dir, out_dir, method, modules, passthrough, list(shard_of_output.items()), dense_cfg,
                          small, force)


def read_modules(src_dir: Path) -> tuple[dict, str, list[TensorSpec], list[Module]]:
    """config.json, quant_method, every tensor and the quantized modules of a checkpoint; no output
    involved (make_plan, and rtnq eval, which dequantizes a candidate in memory)."""
    cfg = _config(src_dir)
    q = _qconfig(cfg, src_dir)
    method = q["quant_method"]
    specs = scan(src_dir)
    by_name = {s.name: s for s in specs}
    with Reader(src_dir) as reader:
        if method == "gptq":
            modules = _gptq_modules(q, by_name, reader)
        elif method == "compressed-tensors":
            modules = _ct_modules(q, by_name, reader)
        else:
            manifest = mf.read(src_dir)
            if manifest.format != formats.MARLIN.manifest_name:
                raise CheckpointError(f"{src_dir}: manifest format {manifest.format} but quant_method rtnq")
            modules = _marlin_modules(manifest, by_name)
    if not modules:
        raise CheckpointError(f"{src_dir}: {method} config but no quantized module found in the tensors")
    return cfg, method, specs, modules


def _need(by_name: dict[str, TensorSpec], name: str, why: str) -> TensorSpec:
    spec = by_name.get(name)
    if spec is None:
        raise CheckpointError(f"{name} is missing; {why}")
    return spec


def _dense_entry(prefix: str, shape: tuple[int, ...], scales: TensorSpec) -> Entry:
    if scales.torch_dtype not in _FLOATS:
        raise CheckpointError(f"{scales.name}: scales of dtype {scales.dtype} are not floats")
    return Entry(f"{prefix}.weight", scales.dtype, shape)


def _dynamic_bits(q: dict, prefix: str) -> int | None:
    """GPTQ `dynamic`: the first pattern that matches the module decides (None: skipped by a -: rule)."""
    dynamic = q.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise CheckpointError("GPTQ config: `dynamic` must be an object of pattern -> overrides")
    for pattern, override in dynamic.items():
        negative = pattern.startswith("-:")
        body = pattern[2:] if pattern[:2] in ("-:", "+:") else pattern
        try:
            hit = re.match(body, prefix)
        except re.error as e:
            raise CheckpointError(f"GPTQ config: `dynamic` pattern {pattern!r} is not a valid regex ({e})") from None
        if hit:
            return None if negative else _int(override.get("bits", q.get("bits")) if isinstance(override, dict)
                                               else None, f"`dynamic` {pattern!r} bits")
    return _int(q.get("bits"), "bits")


def _int(value, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"GPTQ config: {what} is {value!r}, not an integer")
    return value


def _gptq_modules(q: dict, by_name: dict[str, TensorSpec], reader: Reader) -> list[Module]:
    if q.get("sym") is not True:
        raise CheckpointError("asymmetric GPTQ (sym: false) is not supported; rtnq dequantizes symmetric weights")
    v2 = q.get("checkpoint_format") == "gptq_v2"
    modules = []
    for name, qw in by_name.items():
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        sc = _need(by_name, f"{prefix}.scales", "a GPTQ module needs scales")
        if len(qw.shape) != 2 or qw.dtype != "I32" or len(sc.shape) != 2 or sc.shape[1] != qw.shape[1]:
            raise CheckpointError(f"{prefix}: qweight {qw.dtype} {list(qw.shape)} and scales {list(sc.shape)} "
                                  "are not a GPTQ module")
        n = qw.shape[1]
        inputs = {"qweight": qw, "scales": sc}
        gi = by_name.get(f"{prefix}.g_idx")
        if gi is not None:
            k = gi.shape[0]
            if k % qw.shape[0] or 32 // (k // qw.shape[0]) not in params.BITS:
                raise CheckpointError(f"{prefix}: g_idx has {k} entries for {qw.shape[0]} qweight rows")
            bits = 32 // (k // qw.shape[0])
            inputs["g_idx"] = gi
        else:
            bits = _dynamic_bits(q, prefix)
            if bits is None or bits not in params.BITS:
                raise CheckpointError(f"{prefix}: cannot tell its bits (no g_idx, config gives {bits})")
            k = qw.shape[0] * (32 // bits)
        if k % sc.shape[0]:
            raise CheckpointError(f"{prefix}: {sc.shape[0]} scale rows do not divide k={k}")
        qz = by_name.get(f"{prefix}.qzeros")
        if qz is not None:
            _check_sym_zeros(reader, qz, bits, v2, prefix)
            inputs["qzeros"] = qz
        modules.append(Module(prefix, inputs, bits, n, k, _dense_entry(prefix, (n, k), sc)))
    return modules


def _check_sym_zeros(reader: Reader, qz: TensorSpec, bits: int, v2: bool, prefix: str) -> None:
    pf = 32 // bits
    field_ = rtn.bias(bits) - (0 if v2 else 1)
    want = sum(field_ << (bits * s) for s in range(pf))
    want -= (want >> 31) << 32  # as a signed int32
    zeros = reader.read(qz)
    if not bool((zeros == want).all()):
        raise CheckpointError(f"{prefix}.qzeros are not the symmetric constants; asymmetric GPTQ is not supported")


def _ct_modules(q: dict, by_name: dict[str, TensorSpec], reader: Reader) -> list[Module]:
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError("compressed-tensors config: `config_groups` must map names to scheme objects")
    for gname, g in groups.items():
        w = g.get("weights") or {}
        if not isinstance(w, dict):
            raise CheckpointError(f"compressed-tensors group {gname}: `weights` is not an object")
        fmt = g.get("format") or q.get("format")
        if fmt != "pack-quantized":
            raise CheckpointError(f"compressed-tensors group {gname}: format {fmt!r}; rtnq reads pack-quantized")
        if w.get("type", "int") != "int" or w.get("symmetric") is not True:
            raise CheckpointError(f"compressed-tensors group {gname}: only symmetric int weights are supported")
    modules = []
    for name, wp in by_name.items():
        if not name.endswith(".weight_packed"):
            continue
        prefix = name[: -len(".weight_packed")]
        sc = _need(by_name, f"{prefix}.weight_scale", "a pack-quantized module needs weight_scale")
        ws = _need(by_name, f"{prefix}.weight_shape", "a pack-quantized module needs weight_shape")
        if f"{prefix}.weight_zero_point" in by_name:
            raise CheckpointError(f"{prefix}: has a weight_zero_point (asymmetric); not supported")
        shape = tuple(int(x) for x in reader.read(ws).reshape(-1).tolist())
        if len(shape) != 2 or len(wp.shape) != 2 or wp.dtype != "I32" or wp.shape[0] != shape[0]:
            raise CheckpointError(f"{prefix}: weight_packed {list(wp.shape)} does not fit weight_shape {list(shape)}")
        n, k = shape
        if k <= 0 or (32 * wp.shape[1]) % k or (32 * wp.shape[1]) // k not in params.BITS:
            raise CheckpointError(f"{prefix}: {wp.shape[1]} packed words per row for k={k} is not 4 or 8 bits")
        bits = 32 * wp.shape[1] // k
        if len(sc.shape) != 2 or sc.shape[0] != n or k % sc.shape[1]:
            raise CheckpointError(f"{prefix}: weight_scale {list(sc.shape)} does not fit ({n}, {k})")
        inputs = {"weight_packed": wp, "weight_scale": sc, "weight_shape": ws}
        modules.append(Module(prefix, inputs, bits, n, k, _dense_entry(prefix, (n, k), sc)))
    return modules


def _marlin_modules(manifest: mf.Manifest, by_name: dict[str, TensorSpec]) -> list[Module]:
    modules = []
    for name, e in manifest.quantized().items():
        qw = _need(by_name, e.outputs["qweight"], f"the manifest names it for {name}")
        sc = _need(by_name, e.outputs["scales"], f"the manifest names it for {name}")
        *_, n, k = e.shape
        prefix = names.module_name(name)
        # The manifest's shape, bits and group size fix the stored tensors' shapes: a disagreement is a
        # corrupt or edited output (exit 4), not a shape rtnq cannot hold (exit 6, which unpack would raise).
        want = {n_: (dt, tuple(sh)) for n_, dt, sh in formats.MARLIN.entries(prefix, tuple(e.shape), e.bits,
                                                                            e.group_size, sc.dtype)}
        for spec in (qw, sc):
            if want.get(spec.name) != (spec.dtype, tuple(spec.shape)):
                dt, sh = want.get(spec.name, ("?", ()))
                raise CheckpointError(f"{spec.name} is {spec.dtype} {list(spec.shape)}, but the manifest's entry for "
                                      f"{name} (shape {list(e.shape)}, {e.bits}-bit, group {e.group_size}) means "
                                      f"{dt} {list(sh)}; the output is corrupt or its manifest was edited")
        modules.append(Module(prefix, {"qweight": qw, "scales": sc}, e.bits, n, k,
                              Entry(name, sc.dtype, tuple(e.shape)), e.group_size))
    return modules


def dense_weight(m: Module, method: str, reader: Reader) -> torch.Tensor:
    """(code - bias) * scale in the scales' dtype, one module."""
    fmt = formats.BY_QUANT_METHOD[method]
    packed, scales = (reader.read(m.inputs[role]) for role in fmt.roles[:2])
    codes, scales = fmt.unpack(packed, scales, m.bits, m.n, m.k)  # (..., n, k), (..., n, groups)
    group = m.k // scales.shape[-1]
    if m.group_size is not None and params.effective_group(m.k, m.group_size) != group:
        raise CheckpointError(f"{m.prefix}: {scales.shape[-1]} scale groups per row, but the manifest says group "
                              f"size {m.group_size} for k={m.k}")
    if "g_idx" in m.inputs:
        rows = reader.read(m.inputs["g_idx"]).to(torch.int64)
        if rows.min() < 0 or rows.max() >= scales.shape[-1]:
            raise CheckpointError(f"{m.prefix}.g_idx points outside the {scales.shape[-1]} scale rows")
        if not torch.equal(rows, torch.arange(m.k) // group):  # act-order: one scale per input
            signed = (codes.to(torch.int16) - rtn.bias(m.bits)).to(scales.dtype)
            return signed * scales[:, rows]  # one rounding per product, like rtn.dequantize
    return rtn.dequantize(codes, scales, m.bits, group if group != m.k else -1)


def run(plan: DequantizePlan, progress: Callable[[int, int], None] | None = None) -> DequantizeResult:
    """Write the dense checkpoint into a temporary directory, then rename it to OUT.

    The main thread reads and dequantizes; a writer thread writes behind it and an fsync thread
    starts the disk early (rtnq.checkpoint.shards, as in convert). At most IN_FLIGHT tensors or 8 MB
    pieces wait for the writer, so memory stays a few tensors whatever the model size.
    """
    t0 = time.perf_counter()
    dense_by_name = {m.out.name: m for m in plan.modules}
    spec_by_name = {s.name: s for s in plan.passthrough}
    total = sum(len(entries) for _, entries in plan.shards)
    done = 0
    stop = threading.Event()
    with Reader(plan.src) as reader, sharded_output(plan.out, plan.force, plan.shards, {"format": "pt"}, stop=stop,
                                                    src=plan.src, small_files=plan.small_files) as so:
        slots = pipeline.Slots(IN_FLIGHT, stop)
        for _, writer in so.shards():
            for e in writer.entries:
                m = dense_by_name.get(e.name)
                if m is not None:
                    slots.acquire()
                    w = dense_weight(m, plan.method, reader).reshape(e.shape).contiguous()
                    so.behind.submit(writer.write, e.name, w, release=slots.release)
                else:  # in pieces: an embedding may be GBs
                    spec = spec_by_name[e.name]
                    for start in range(0, max(spec.nbytes, 1), CHUNK_BYTES):
                        slots.acquire()
                        buf = torch.empty(min(CHUNK_BYTES, spec.nbytes - start), dtype=torch.uint8)
                        reader.read_into(spec, buf, start)
                        so.behind.submit(writer.write_part, e.name, buf, release=slots.release)
                done += 1
                if progress:
                    progress(done, total)
        write_json(so.tmp / layout.CONFIG_NAME, plan.config)
    bits: dict[int, int] = {}
    for m in plan.modules:
        bits[m.bits] = bits.get(m.bits, 0) + 1
    return DequantizeResult(plan, time.perf_counter() - t0, len(plan.modules), bits)
