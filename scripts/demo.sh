#!/usr/bin/env bash
# Install rtnq into ./.venv (CPU torch pinned), write the built-in sample checkpoint, convert it to
# Marlin INT4 with layer 0 and every MLP kept in INT8, show the precision manifest, then export the
# same model for vLLM/SGLang (GPTQ) and dequantize that export.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e .
work=${RTNQ_DEMO_DIR:-demo-out}
rm -rf "$work" && mkdir -p "$work"
.venv/bin/rtnq sample "$work/tiny-llama"
.venv/bin/rtnq convert "$work/tiny-llama" "$work/tiny-llama-rtnq" --bits 4 --keep-int8 layers.0,mlp
.venv/bin/rtnq inspect "$work/tiny-llama-rtnq"
.venv/bin/rtnq verify "$work/tiny-llama-rtnq" --against "$work/tiny-llama"
# The same rules as a GPTQ export that vLLM and SGLang load (docs/SERVING.md), and back to dense.
.venv/bin/rtnq convert "$work/tiny-llama" "$work/tiny-llama-gptq" --bits 4 --keep-int8 layers.0,mlp --format gptq
.venv/bin/rtnq verify "$work/tiny-llama-gptq" --against "$work/tiny-llama" --json > "$work/verify-gptq.json"
echo "gptq export: every tensor verified ($work/verify-gptq.json)"
.venv/bin/rtnq dequantize "$work/tiny-llama-gptq" "$work/tiny-llama-dense"
