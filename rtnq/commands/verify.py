"""`rtnq verify`: re-derive every output tensor from the source and compare bytes.

For each manifest entry: a quantized tensor is re-quantized from the source weight with the bits/group
size the manifest records and the scale dtype the output file holds, laid out in the manifest's format
by the readable reference packers (rtnq.formats; not the converter's fused kernel), then compared byte
for byte with every stored output (codes, scales and the format's constants); a passthrough tensor must
be byte-identical to the source. Every output tensor must be accounted for by the manifest.

Before any byte is read, the source's tensor names and shapes (from its headers) must equal the
manifest's: a wrong --against is then one error, not a report of every tensor differing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rtnq.checkpoint import manifest as mf
from rtnq import formats
from rtnq.numerics import rtn
from rtnq.errors import VerifyMismatch
from rtnq.checkpoint.layout import resolve, shard_files
from rtnq.checkpoint.source import Reader, TensorSpec, scan, scan_shard


@dataclass(frozen=True)
class Check:
    name: str  # source tensor name
    kind: str
    ok: bool
    detail: str  # "identical", or what differs
    error: float | None  # relative error of the dequantized weight (quantized tensors)


def _output_specs(out_dir: Path) -> dict[str, TensorSpec]:
    specs: dict[str, TensorSpec] = {}
    for shard in shard_files(out_dir):
        for s in scan_shard(out_dir / shard):
            specs[s.name] = s
    return specs


def verify(out: str | Path, src: str | Path, progress: Callable[[int, int], None] | None = None) -> list[Check]:
    out_dir = resolve(out)
    m = mf.read(out_dir)
    scale = mf.scale_of(m)
    src_specs = {s.name: s for s in scan(src)}
    out_specs = _output_specs(out_dir)
    differ = _name_shape_differences(m, src_specs)
    if differ:
        # VerifyMismatch (exit 7), not CheckpointError (exit 4): the source reads fine; what fails is
        # verify's claim that OUT was derived from SRC, so a script gating on `rtnq verify` gets the
        # same code for a wrong source as for differing bytes, and 4 keeps meaning "unreadable".
        raise VerifyMismatch(f"{src} does not match the manifest of {out}: {len(differ)} tensors differ in "
                             f"name/shape (first: {differ[0]})")
    accounted = {o for e in m.tensors.values() for o in e.outputs.values()}
    extra = sorted(set(out_specs) - accounted)
    checks: list[Check] = []
    with Reader(resolve(src)) as src_reader, Reader(out_dir) as out_reader:
        for i, (name, entry) in enumerate(m.tensors.items()):
            absent = [o for o in entry.outputs.values() if o not in out_specs]
            if absent:
                checks.append(Check(name, entry.kind, False, f"output tensor {absent[0]} is missing", None))
                continue
            fmt = formats.BY_MANIFEST_NAME[m.format]
            checks.append(_check_one(name, entry, src_specs[name], out_specs, src_reader, out_reader, fmt, scale))
            if progress:
                progress(i + 1, len(m.tensors))
    for name in extra:
        checks.append(Check(name, "unknown", False, "output tensor not described by the manifest", None))
    if m.defaults.get("budget") is not None:  # --budget: its scores and choice are re-derived too
        from rtnq.commands.convert import budget

        for name, why in budget.rederive(m, resolve(src), list(src_specs.values()), scale):
            checks.append(Check(name, "budget", False, why, None))
    return checks


def _name_shape_differences(m: mf.Manifest, src_specs: dict[str, TensorSpec]) -> list[str]:
    """One description per tensor whose name or shape differs between the manifest and the source."""
    def dims(shape) -> str:
        return "x".join(map(str, shape))

    differ = []
    for name, entry in m.tensors.items():
        spec = src_specs.get(name)
        if spec is None:
            differ.append(f"{name} is not in the source")
        elif tuple(entry.shape) != tuple(spec.shape):
            differ.append(f"{name} is {dims(spec.shape)} in the source, {dims(entry.shape)} in the manifest")
    differ += [f"{name} is not in the manifest" for name in sorted(set(src_specs) - set(m.tensors))]
    return differ


def _check_one(name, entry, spec, out_specs, src_reader: Reader, out_reader: Reader, fmt: formats.Format,
               scale: str = "absmax") -> Check:
    if entry.kind != "quantized":
        same = torch.equal(src_reader.read_bytes(spec), out_reader.read_bytes(out_specs[entry.outputs["tensor"]]))
        return Check(name, entry.kind, same, "identical" if same else "bytes differ from the source", None)
    missing = [role for role in fmt.roles if role not in entry.outputs]
    if missing:
        return Check(name, entry.kind, False, f"the manifest names no {missing[0]} output ({fmt.name} format)", None)
    stored = list(fmt.stored_shape(tuple(entry.shape)))
    if (entry.padded_shape or list(entry.shape)) != stored:
        return Check(name, entry.kind, False, f"the manifest's padded_shape {entry.padded_shape} is not the "
                     f"{fmt.name} format's {stored} for shape {list(entry.shape)}", None)
    s_spec = out_specs[entry.outputs[fmt.roles[1]]]
    w16 = src_reader.read(spec).to(s_spec.torch_dtype)
    codes, scales = rtn.quantize(w16, entry.bits, entry.group_size, name=name, scale=scale)
    error = rtn.relative_error(w16, rtn.dequantize(codes, scales, entry.bits, entry.group_size))
    expected = fmt.reference(codes, scales, entry.bits, entry.group_size)
    problems = []
    for role, want in zip(fmt.roles, expected, strict=True):
        got = out_specs[entry.outputs[role]]
        if tuple(want.shape) != got.shape or not torch.equal(
            want.contiguous().view(torch.uint8).reshape(-1), out_reader.read_bytes(got)
        ):
            problems.append(f"{role} bytes differ")
    ok = not problems
    return Check(name, entry.kind, ok, "identical" if ok else ", ".join(problems), error)
