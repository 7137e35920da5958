#!/usr/bin/env bash
# Install rtnq with its test extras into ./.venv (CPU torch pinned so no CUDA build is ever
# downloaded), build the CUDA library when nvcc is present, and run the whole test suite.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
if command -v nvcc >/dev/null 2>&1 && [ -f cuda/Makefile ]; then
    make -s -C cuda -j"$(nproc)"
fi
exec .venv/bin/python -m pytest -q "$@"
