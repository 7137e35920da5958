"""`rtnq verify`: re-derive every output tensor from the source and compare bytes.

For each manifest entry: a quantized tensor is re-quantized from the source weight with the bits/group
size the manifest records and the scale dtype the output file holds, laid out in the manifest's format
by the readable reference packers (rtnq.formats; not the converter's fused kernel), then compared byte
for byte with every stored output (codes, scales and the format's constants); a passthrough tensor must
be byte-identical to the source. Every output tensor must be accounted for by the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rtnq.checkpoint import manifest as mf
from rtnq import formats
from rtnq.numerics import rtn
from rtnq.errors import CheckpointError
from rtnq.checkpoint.source import Reader, TensorSpec, resolve, scan, scan_shard, shard_files


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
    src_specs = {s.name: s for s in scan(src)}
    out_specs = _output_specs(out_dir)
    missing = sorted(set(src_specs) - set(m.tensors))
    if missing:
        raise CheckpointError(f"the manifest has no entry for source tensor {missing[0]} (and {len(missing) - 1} more)")
    accounted = {o for e in m.tensors.values() for o in e.outputs.values()}
    extra = sorted(set(out_specs) - accounted)
    checks: list[Check] = []
    with Reader(resolve(src)) as src_reader, Reader(out_dir) as out_reader:
        for i, (name, entry) in enumerate(m.tensors.items()):
            if name not in src_specs:
                checks.append(Check(name, entry.kind, False, "not in the source checkpoint", None))
                continue
            absent = [o for o in entry.outputs.values() if o not in out_specs]
            if absent:
                checks.append(Check(name, entry.kind, False, f"output tensor {absent[0]} is missing", None))
                continue
            fmt = formats.BY_MANIFEST_NAME[m.format]
            checks.append(_check_one(name, entry, src_specs[name], out_specs, src_reader, out_reader, fmt))
            if progress:
                progress(i + 1, len(m.tensors))
    for name in extra:
        checks.append(Check(name, "unknown", False, "output tensor not described by the manifest", None))
    return checks


def _check_one(name, entry, spec, out_specs, src_reader: Reader, out_reader: Reader, fmt: formats.Format) -> Check:
    if entry.kind != "quantized":
        same = torch.equal(src_reader.read_bytes(spec), out_reader.read_bytes(out_specs[entry.outputs["tensor"]]))
        return Check(name, entry.kind, same, "identical" if same else "bytes differ from the source", None)
    missing = [role for role in fmt.roles if role not in entry.outputs]
    if missing:
        return Check(name, entry.kind, False, f"the manifest names no {missing[0]} output ({fmt.name} format)", None)
    s_spec = out_specs[entry.outputs[fmt.roles[1]]]
    w16 = src_reader.read(spec).to(s_spec.torch_dtype)
    codes, scales = rtn.quantize(w16, entry.bits, entry.group_size, name=name)
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
