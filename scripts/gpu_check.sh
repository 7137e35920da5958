#!/usr/bin/env bash
# The one command to run on a bare GPU machine (CUDA image: nvcc, python3 with a CUDA torch; no internet;
# rtnq not installed). Records the environment, builds librtnq_cuda.so with the -Xptxas -v resource report,
# runs the GPU tests (plus the library and runtime tests), a compute-sanitizer memcheck and racecheck pass on
# small shapes, and a short timing table against torch bf16. Every log goes to LOGDIR; a summary is printed
# last. Stays inside RTNQ_GPU_CHECK_BUDGET seconds (default 500) by giving each step what is left.
#
#   scripts/gpu_check.sh LOGDIR            exit status 0 only if the build, the tests and both sanitizer passes pass
#
# Needs: nvcc, a C++ host compiler, python3 with torch (CUDA), pytest. make is used when present.
set -u -o pipefail

LOG=${1:?usage: scripts/gpu_check.sh LOGDIR}
mkdir -p "$LOG" && LOG=$(cd "$LOG" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export RTNQ_DISPATCH_FILE="$LOG/dispatch.json"   # never read or write the user's measured thresholds
unset RTNQ_CUDA_LIB RTNQ_FORCE_PATH
BUDGET=${RTNQ_GPU_CHECK_BUDGET:-500}
START=$(date +%s)
SUMMARY="$LOG/summary.txt"
: >"$SUMMARY"
FAILED=0

# step NAME CAP_SECONDS LOGFILE REQUIRED CMD...: run CMD with stdout+stderr in LOGFILE under min(CAP, time left).
step() {
    local name=$1 cap=$2 logfile=$3 required=$4
    shift 4
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        printf '%-10s skipped (out of time budget)\n' "$name" | tee -a "$SUMMARY"
        [ "$required" = 1 ] && FAILED=1
        return 1
    fi
    echo "== $name (limit ${limit}s) -> $logfile"
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" >"$logfile" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0)) verdict=ok
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="TIMEOUT after ${limit}s"
    [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
    printf '%-10s %-28s %4ds  %s\n' "$name" "$verdict" "$dt" "$(basename "$logfile")" | tee -a "$SUMMARY"
    if [ $rc -ne 0 ]; then
        tail -n 15 "$logfile" | sed 's/^/    | /'
        [ "$required" = 1 ] && FAILED=1
    fi
    return $rc
}

# ---- 1. environment ------------------------------------------------------------------------------------------------
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    uname -a
    nvidia-smi || true
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,memory.used --format=csv || true
    nvcc --version || true
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" || true
    "$PY" -m pytest --version || true
    command -v compute-sanitizer || echo "compute-sanitizer not on PATH"
    (git -C "$ROOT" rev-parse HEAD && git -C "$ROOT" status --short) 2>/dev/null || true
} >"$LOG/env.txt" 2>&1
echo "== environment -> env.txt"

# ---- 2. build (always fresh, with the resource report) ----------------------------------------------------------------
build() {
    local jobs
    jobs=$(nproc 2>/dev/null || echo 8)
    if command -v make >/dev/null 2>&1; then
        make -C cuda clean && make -C cuda -j"$jobs" PTXAS_VERBOSE=1
    else
        # No make: the same commands as cuda/Makefile (keep in sync).
        local gencode="-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=[sm_90,compute_90]"
        rm -rf cuda/build && mkdir -p cuda/build
        ls cuda/src/*.cu | xargs -P "$jobs" -I{} sh -c \
            "nvcc -O3 -std=c++17 -lineinfo $gencode -Xcompiler -fPIC,-fvisibility=hidden,-Wall -Icuda/include -Xptxas -v -c {} -o cuda/build/\$(basename {} .cu).o" &&
            nvcc -shared $gencode -cudart static -Xlinker --version-script=cuda/rtnq_cuda.map -Xlinker -z,defs \
                -o cuda/build/librtnq_cuda.so cuda/build/*.o
    fi
}
export -f build
step build 240 "$LOG/build.log" 1 bash -c build
BUILD_OK=$?
if [ $BUILD_OK -eq 0 ]; then
    "$PY" scripts/gpu_check.py ptxas "$LOG/build.log" "$LOG/ptxas.txt" | sed 's/^/    /'
    step env 60 "$LOG/env-python.txt" 0 "$PY" scripts/gpu_check.py env "$LOG/env.json"
fi

# ---- 3. tests -------------------------------------------------------------------------------------------------------
if [ $BUILD_OK -eq 0 ]; then
    # The CPU-emulated kernel tests already run in CI; here the time goes to the real GPU.
    step tests 270 "$LOG/tests.log" 1 "$PY" -m pytest -v -rs -p no:cacheprovider --durations=15 \
        --junitxml="$LOG/tests.xml" -k "not emulated" tests/gpu tests/test_cuda_lib.py tests/test_runtime.py
    grep -E "passed|failed|error" "$LOG/tests.log" | tail -n 1 | sed 's/^/    /'
fi

# ---- 4. compute-sanitizer ---------------------------------------------------------------------------------------------
if [ $BUILD_OK -eq 0 ] && command -v compute-sanitizer >/dev/null 2>&1; then
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1   # one cudaMalloc per tensor, so out-of-bounds accesses are caught
    step memcheck 90 "$LOG/memcheck.log" 1 compute-sanitizer --tool memcheck --leak-check no --error-exitcode 3 \
        --print-limit 20 "$PY" scripts/gpu_check.py sanitize
    step racecheck 90 "$LOG/racecheck.log" 1 compute-sanitizer --tool racecheck --racecheck-report all \
        --error-exitcode 3 --print-limit 20 "$PY" scripts/gpu_check.py sanitize
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
elif [ $BUILD_OK -eq 0 ]; then
    printf '%-10s %s\n' sanitizer "skipped: compute-sanitizer not found" | tee -a "$SUMMARY"
    FAILED=1
fi

# ---- 5. timing --------------------------------------------------------------------------------------------------------
if [ $BUILD_OK -eq 0 ]; then
    step timing 120 "$LOG/timing.txt" 0 "$PY" scripts/gpu_check.py timing "$LOG/timing.json"
fi

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv >>"$LOG/env.txt" 2>&1 || true
echo
echo "== summary ($(($(date +%s) - START))s total; logs in $LOG)"
cat "$SUMMARY"
if [ -f "$LOG/timing.txt" ]; then
    echo
    sed -n '/^shape /,$p' "$LOG/timing.txt"
fi
exit $FAILED
