"""`rtnq convert`, step 3: the files beside the shards: manifest (with totals) and config.json.

Pure except `write_config`: built from the plan and the per-tensor errors the run measured.
"""

from __future__ import annotations

from pathlib import Path

from rtnq import dtypes, formats
from rtnq.checkpoint import layout
from rtnq.checkpoint import manifest as mf
from rtnq.checkpoint.writer import write_json
from rtnq.commands.convert.plan import VERSION, ConvertPlan, Item
from rtnq.formats import engine_config
from rtnq.selection import names


def manifest_entry(item: Item, error: float | None, scored=None) -> mf.TensorEntry:
    d, spec = item.decision, item.spec
    q = item.quantized
    outputs = {e.name.rpartition(".")[2]: e.name for e in item.outputs} if q else {"tensor": item.outputs[0].name}
    stored = list(item.stored_shape) if q and tuple(item.stored_shape) != tuple(spec.shape) else None
    return mf.TensorEntry(
        kind=d.kind,
        shape=list(spec.shape),
        dtype=dtypes.BY_ST[spec.dtype].name,
        outputs=outputs,
        shard=item.out_shard,
        bits=d.bits if q else None,
        group_size=d.group_size if q else None,
        rule=d.rule if q else None,
        reason=None if q else d.reason,
        error=error,
        padded_shape=stored,
        score=None if scored is None else scored.scores.get(spec.name),  # unrounded: verify re-runs the choice on it
        rank=None if scored is None else scored.ranks.get(spec.name),
    )



def totals(plan: ConvertPlan) -> dict:
    """Counts, bytes and effective bits per weight (scales included) of the planned output."""
    counts = {"int4": 0, "int8": 0, "passthrough": 0}
    reasons: dict[str, int] = {}
    n_params = q_params = q_bits = 0
    lin_params = lin_bits = 0  # every linear inside the blocks, quantized or left in 16-bit
    for item in plan.items:
        n_params += item.spec.numel
        d = item.decision
        if item.quantized or engine_config.unquantized_linear(d):
            lin_params += item.spec.numel
            lin_bits += 8 * sum(e.nbytes for e in item.outputs)
        if item.quantized:
            counts[f"int{d.bits}"] += 1
            q_params += item.spec.numel
            q_bits += 8 * sum(e.nbytes for e in item.outputs)
        else:
            counts["passthrough"] += 1
            key = (d.reason or "passthrough").split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    weight_bits = 8 * sum(e.nbytes for _, entries in plan.shards for e in entries)
    return {
        "tensors": counts,
        "passthrough_reasons": reasons,
        "parameters": n_params,
        "quantized_parameters": q_params,
        "bytes_in": plan.bytes_in,
        "bytes_out": plan.bytes_out,
        "bits_per_weight": round(q_bits / q_params, 4) if q_params else None,
        # The headline: what the linears cost, including those rtnq had to leave in 16-bit (a shape
        # Marlin cannot hold, --skip), which bits_per_weight alone would hide.
        "linear_bits_per_weight": round(lin_bits / lin_params, 4) if lin_params else None,
        "linear_parameters": lin_params,
        "model_bits_per_weight": round(weight_bits / n_params, 4) if n_params else None,
        "tp_failures": {str(t): len(f) for t, f in plan.selection.tp_failures.items()},
    }


def build_manifest(plan: ConvertPlan, errors: dict[str, float]) -> mf.Manifest:
    o = plan.options
    return mf.Manifest(
        defaults={
            "bits": o.bits,
            "group_size": o.group_size,
            "scale_rule": mf.scale_rule(o.scale),
            "dtype": o.dtype or "source (fp32 -> bf16)",
            **({} if plan.budget is None else {"budget": {
                "bits_per_weight": o.budget, "score": plan.budget.score_name,
                **({"groups": True} if plan.budget.groups else {}),  # absent otherwise: older manifests match
                "before": round(plan.budget.floor, 4), "after": round(plan.budget.bits_per_weight, 4),
                "seconds": round(plan.budget.seconds, 3)}}),
            **({} if plan.rotation is None else {"rotate": plan.rotation.manifest()}),
        },
        tensors={i.spec.name: manifest_entry(i, errors.get(i.spec.name), plan.budget) for i in plan.items},
        rules=plan.selection.rules,
        totals=totals(plan),
        warnings=list(plan.manifest_warnings),
        rtnq_version=VERSION,
        format=plan.format.manifest_name,
        source=None if plan.hub is None else plan.hub.repo.source_record,
    )


def quantization_config(plan: ConvertPlan) -> dict:
    """config.json's quantization_config: rtnq's own for marlin, the engines' for gptq and compressed-tensors."""
    o = plan.options
    if plan.format is not formats.MARLIN:
        decisions = [i.decision for i in plan.items]
        ndim = {i.spec.name: len(i.spec.shape) for i in plan.items}
        return engine_config.for_format(plan.format, decisions, plan.selection.infos, ndim,
                                        bits=o.bits, group_size=o.group_size, scale=o.scale)
    int8 = sorted(names.module_name(i.spec.name) for i in plan.items if i.quantized and i.decision.bits == 8)
    return {
        "quant_method": plan.format.quant_method,
        "format": "marlin",
        "bits": o.bits,
        "group_size": o.group_size,
        "sym": True,
        "scale_rule": mf.scale_rule(o.scale),
        "manifest": mf.FILENAME,
        "manifest_version": mf.VERSION,
        "int8_modules": int8,
    }


def config_changes(rotation) -> dict:
    """What convert sets in config.json besides quantization_config: --rotate un-ties a tied head."""
    return {} if rotation is None else rotation.config_changes()


def write_config(plan: ConvertPlan, tmp: Path) -> None:
    """The source's config.json with the quantization_config added (and GPTQ's quantize_config.json)."""
    cfg_path = plan.src / layout.CONFIG_NAME
    cfg = layout.read_json_object(cfg_path) if cfg_path.is_file() else {}
    qcfg = quantization_config(plan)
    cfg.update(config_changes(plan.rotation))
    cfg["quantization_config"] = qcfg
    write_json(tmp / layout.CONFIG_NAME, cfg)
    if plan.format is formats.GPTQ:  # what AutoGPTQ-era loaders read when config.json has no quantization_config
        write_json(tmp / layout.GPTQ_CONFIG_NAME, qcfg)
