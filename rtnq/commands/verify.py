"""`rtnq verify`: is OUT loadable, and is it what `rtnq convert` writes from SRC?

Before any byte is read, the source's tensor names and shapes (from its headers) must equal the
manifest's: a wrong --against is then one error, not a report of every tensor differing.

Then, from headers and JSON only (rtnq.commands.verify_layout): config.json is re-derived as convert
writes it; every output tensor is stored once, in the shard the manifest and the index name; each
shard's metadata is convert's. Only then the bytes, one tensor at a time: a quantized tensor is
re-quantized from the source weight with the bits/group size the manifest records, in the 16-bit
dtype convert quantizes in, laid out in the manifest's format by the readable reference packers
(rtnq.formats; not the converter's fused kernel), and every stored output (codes, scales and the
format's constants) must have the name, dtype and shape the format writes and the same bytes; a
passthrough tensor must be the source tensor, header and bytes. Every output tensor must be accounted
for by the manifest.

Outcomes: a failing row per problem, then VerifyMismatch (exit 7) from the CLI; an output that cannot be
read as one checkpoint (corrupt JSON or header, a tensor stored twice) is CheckpointError (exit 4).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from rtnq import dtypes, formats
from rtnq.checkpoint import fp8
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.layout import resolve
from rtnq.checkpoint.source import Reader, TensorSpec, open_reader, scan
from rtnq.commands import verify_layout as vl
from rtnq.commands.verify_layout import FILE_KINDS, Check  # noqa: F401 (Check, FILE_KINDS: the CLI's)
from rtnq.errors import ShapeError, UsageError, VerifyMismatch
from rtnq.numerics import rtn


def verify(out: str | Path, src: str | Path, progress: Callable[[int, int], None] | None = None) -> list[Check]:
    out_dir = resolve(out)
    src_dir = resolve(src)
    m = mf.read(out_dir)
    scale = mf.scale_of(m)
    fmt = formats.BY_MANIFEST_NAME[m.format]
    src_order = scan(src_dir)
    # An FP8 source: its scale tensors are consumed by convert (no manifest entry, no output), its FP8
    # weights re-derived from their dequantized values, as convert quantizes them.
    source_fp8 = fp8.for_source(src_dir, src_order)
    fp8_weights = source_fp8.weights if source_fp8 else {}
    if source_fp8:
        src_order = [s for s in src_order if s.name not in source_fp8.consumed]
    # --rotate: the source is read through the rotation the manifest records (its seed and spared channels),
    # and has the tensors it adds (an un-tied head).
    rotation = _rotation(m.defaults.get("rotate"), src_dir, src_order, src, out)
    if rotation is not None:
        src_order = src_order + rotation.extra_specs()
    src_specs = {s.name: s for s in src_order}
    differ = _name_shape_differences(m, src_specs)
    if differ:
        # VerifyMismatch (exit 7), not CheckpointError (exit 4): the source reads fine; what fails is
        # verify's claim that OUT was derived from SRC, so a script gating on `rtnq verify` gets the
        # same code for a wrong source as for differing bytes, and 4 keeps meaning "unreadable".
        raise VerifyMismatch(f"{src} does not match the manifest of {out}: {len(differ)} tensors differ in "
                             f"name/shape (first: {differ[0]})")
    output = vl.read_output(out_dir)
    # --dtype as the manifest records it ("bf16"/"fp16"; otherwise each tensor's own 16-bit dtype)
    option = m.defaults.get("dtype") if m.defaults.get("dtype") in dtypes.SIXTEEN_BIT else None
    # What makes the output unloadable comes first: it is what the one-line error names.
    checks = vl.config_checks(m, fmt, src_dir, src_order, out_dir, scale, rotation)
    checks += vl.layout_checks(m, fmt, src_specs, output)
    accounted = {o for e in m.tensors.values() for o in e.outputs.values()}
    with open_reader(src_dir, rotation) as src_reader, Reader(out_dir) as out_reader:
        for i, (name, entry) in enumerate(m.tensors.items()):
            try:
                checks.append(_check_one(name, entry, src_specs[name], output.specs, src_reader, out_reader, fmt,
                                         scale, option, fp8_weights.get(name)))
            except (UsageError, ShapeError) as e:
                # verify's only arguments are two directories, already resolved: a usage or shape error
                # here comes from the manifest's numbers, i.e. OUT is not what convert writes (exit 7).
                checks.append(Check(name, entry.kind, False, f"cannot be re-derived: {e}", None))
            if progress:
                progress(i + 1, len(m.tensors))
    for name in sorted(set(output.specs) - accounted):
        checks.append(Check(name, "unknown", False, "output tensor not described by the manifest", None))
    if m.defaults.get("budget") is not None:  # --budget: its scores and choice are re-derived too
        from rtnq.commands.convert import budget

        for name, why in budget.rederive(m, src_dir, src_order, scale, rotation):
            checks.append(Check(name, "budget", False, why, None))
    return checks


def _rotation(record, src_dir: Path, src_order: list[TensorSpec], src, out):
    """The commands.rotate.Rotation a manifest's defaults.rotate describes, rebuilt from SRC (None without one).

    Its seed and spared channels are taken from the record; kind, order and construction must then come out
    as recorded. Anything else is VerifyMismatch: OUT does not say how to re-derive it from this SRC."""
    if record is None:
        return None
    from rtnq.commands import rotate
    from rtnq.checkpoint import layout

    seed, spare = (record.get("seed"), record.get("spare")) if isinstance(record, dict) else (None, None)
    if (not isinstance(seed, int) or isinstance(seed, bool) or not isinstance(spare, list)
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in spare)):
        raise VerifyMismatch(f"{out}: the manifest's defaults.rotate {record!r} has no integer seed and list of "
                             "spared channels; it cannot be re-derived")
    cfg_path = src_dir / layout.CONFIG_NAME
    try:
        rotation = rotate.for_source(src_dir, src_order, layout.read_json_object(cfg_path) if cfg_path.is_file()
                                     else None, seed, ",".join(map(str, spare)) or "none")
    except UsageError as e:
        raise VerifyMismatch(f"{out} was rotated, but {src} cannot be: {e}") from None
    if rotation.manifest() != record:
        raise VerifyMismatch(f"{out}: the manifest's rotation {record} is not the one seed {seed} gives for {src} "
                             f"({rotation.manifest()})")
    return rotation


def _name_shape_differences(m: mf.Manifest, src_specs: dict[str, TensorSpec]) -> list[str]:
    """One description per tensor whose name or shape differs between the manifest and the source."""
    def dims(shape) -> str:
        return "x".join(map(str, shape))

    differ = []
    for name, entry in m.tensors.items():
        spec = src_specs.get(name)
        if spec is None:
            differ.append(f"{name} is not in the source")
        elif list(entry.shape) != list(spec.shape):
            differ.append(f"{name} is {dims(spec.shape)} in the source, {dims(entry.shape)} in the manifest")
    differ += [f"{name} is not in the manifest" for name in sorted(set(src_specs) - set(m.tensors))]
    return differ


def _check_one(name, entry, spec, out_specs, src_reader: Reader, out_reader: Reader, fmt: formats.Format,
               scale: str = "absmax", option: str | None = None, w8: fp8.Fp8Weight | None = None) -> Check:
    """One manifest entry's row: its outputs' names, dtypes, shapes (headers), then their bytes."""
    want = vl.expected_outputs(name, entry, spec, fmt, option, fp8=w8 is not None)
    if isinstance(want, str):
        return Check(name, entry.kind, False, want, None)
    for role, (oname, _, _) in want.items():
        if entry.outputs[role] != oname:  # engines find the tensor by this name
            return Check(name, entry.kind, False, f"the manifest's {role} output is {entry.outputs[role]}, "
                         f"the {fmt.name} format names it {oname}", None)
        if oname not in out_specs:
            return Check(name, entry.kind, False, f"output tensor {oname} is missing", None)
    headers = [p for role, w in want.items() if (p := vl.header_problem(w, out_specs[w[0]]))]
    if headers:  # before the bytes: a reinterpreted header can hold the same bytes and still load wrong
        return Check(name, entry.kind, False, headers[0], None)
    qdt = dtypes.quantized_in(spec.dtype, option).torch  # an FP8 weight's dense dtype too
    if entry.kind != "quantized":
        src_bytes = (src_reader.read_bytes(spec) if w8 is None
                     else fp8.read_dense(src_reader, w8, qdt).reshape(-1).view(torch.uint8))
        same = torch.equal(src_bytes, out_reader.read_bytes(out_specs[name]))
        return Check(name, entry.kind, same, "identical" if same else "bytes differ from the source", None)
    stored = list(fmt.stored_shape(tuple(entry.shape)))
    if (entry.padded_shape or list(entry.shape)) != stored:
        return Check(name, entry.kind, False, f"the manifest's padded_shape {entry.padded_shape} is not the "
                     f"{fmt.name} format's {stored} for shape {list(entry.shape)}", None)
    w16 = src_reader.read(spec).to(qdt) if w8 is None else fp8.read_dense(src_reader, w8, qdt)
    codes, scales = rtn.quantize(w16, entry.bits, entry.group_size, name=name, scale=scale)
    error = rtn.relative_error(w16, rtn.dequantize(codes, scales, entry.bits, entry.group_size))
    expected = fmt.reference(codes, scales, entry.bits, entry.group_size)
    problems = []
    for role, ref in zip(fmt.roles, expected, strict=True):
        got = out_specs[want[role][0]]
        if dtypes.st_of_torch(ref.dtype) != got.dtype or tuple(ref.shape) != got.shape or not torch.equal(
            ref.contiguous().view(torch.uint8).reshape(-1), out_reader.read_bytes(got)
        ):
            problems.append(f"{role} bytes differ")
    ok = not problems
    return Check(name, entry.kind, ok, "identical" if ok else ", ".join(problems), error)
