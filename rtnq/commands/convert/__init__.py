"""`rtnq convert`: plan (headers only) -> run (stream, quantize, pack, write) -> outputs (manifest, config).

    plan.py     ConvertOptions -> ConvertPlan: decisions, output names, shapes, shards, warnings
    execute.py  ConvertPlan -> ConvertResult: the overlapped read / quantize / write pipeline
    outputs.py  the manifest (with totals) and config.json's quantization_config
"""

from rtnq.commands.convert.outputs import build_manifest, quantization_config, totals
from rtnq.commands.convert.plan import VERSION, ConvertOptions, ConvertPlan, Item, make_plan, output_entries
from rtnq.commands.convert.execute import ConvertResult, Progress, quantize_item, run

__all__ = ["VERSION", "ConvertOptions", "ConvertPlan", "ConvertResult", "Item", "Progress", "build_manifest",
           "make_plan", "output_entries", "quantization_config", "quantize_item", "run", "totals"]
