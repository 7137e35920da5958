#!/usr/bin/env bash
# Install rtnq with its test extras into ./.venv (CPU torch pinned so no CUDA build is ever
# downloaded), build the CUDA library when nvcc is present, and run the whole test suite.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# An editable install runs setup.py's build_ext every time, so the C fast path (rtnq/numerics/_cpu*.so) is
# rebuilt from csrc/ on each run; tests/test_fastpath.py fails if a C compiler exists but no library was built.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'
if command -v nvcc >/dev/null 2>&1; then
    make -s -C cuda -j"$(nproc)"
    # The library exists now: a CUDA-library test (marked nvcc) that skips is a failure (tests/conftest.py).
    export RTNQ_REQUIRE_CUDA_BUILD=1
fi
exec .venv/bin/python -m pytest -q "$@"
