// common.cuh: internal plumbing shared by the API and the kernel launchers (not part of the ABI).
#pragma once

#include <cstdarg>
#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../include/rtnq_cuda.h"
#include "layout.cuh"

namespace rtnq {

// ---- Errors ----------------------------------------------------------------------------------------
// Record a one-line detail for rtnq_last_error() and return `status`.
int fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();
// Map a CUDA runtime error to a status, recording `what` and the CUDA error string.
int cuda_fail(cudaError_t err, const char *what);
// After every launch: the launch-time error (bad configuration, missing image, ...) as a status.
int check_launch(const char *kernel);

// ---- Device ----------------------------------------------------------------------------------------
struct DeviceProps {
    int device;
    int major;
    int minor;
    int sm_count;
    int smem_optin;  // bytes of dynamic + static shared memory a block may use after opting in
};
// Properties of the current device (cached); RTNQ_ERR_NO_DEVICE / RTNQ_ERR_ARCH when unusable.
int current_device(DeviceProps *props);
// Raise a kernel's dynamic shared memory limit once per device; RTNQ_ERR_NO_KERNEL if the GPU has too little.
int ensure_smem(const void *func, size_t bytes, const DeviceProps &dev, const char *kernel);
// Resident blocks per SM for a kernel (cached per kernel and device); at least 1.
int blocks_per_sm(const void *func, int threads, size_t smem, const DeviceProps &dev);

// ---- Workspace -------------------------------------------------------------------------------------
// [counters: kCounterInts int32, zero between launches][partials: kPartialBytes of fp32 split-K sums]
constexpr int64_t kCounterInts = 4096;
constexpr size_t kCounterBytes = kCounterInts * 4;
constexpr size_t kPartialBytes = size_t(16) << 20;
constexpr size_t kWorkspaceBytes = kCounterBytes + kPartialBytes;

// Everything a GEMM launcher needs, validated by api.cu before the call.
struct GemmArgs {
    const void *x;
    const void *qweight;
    const void *scales;
    void *out;
    int64_t m, n, k;
    int bits;
    Groups groups;
    int dtype;  // rtnq_dtype
    int *counters;
    float *partials;
    cudaStream_t stream;
    DeviceProps dev;
    bool dry_run;     // plan only: report splits and rows per CTA, launch nothing
    int plan_splits;  // out (dry run)
    int plan_rows;    // out (dry run)
};

struct DequantArgs {
    const void *qweight;
    const void *scales;
    void *out;
    int64_t n, k;
    int bits;
    Groups groups;
    int dtype;
    int layout;  // rtnq_layout
    cudaStream_t stream;
};

int launch_dequantize(const DequantArgs &a);
int launch_small_m_w4(GemmArgs &a);
int launch_small_m_w8(GemmArgs &a);
int launch_tensor_core_w4(GemmArgs &a);
int launch_tensor_core_w8(GemmArgs &a);

// Split-K planning shared by launchers: how many k-splits make `tiles` CTAs fill `target` slots,
// given at most `max_splits`, `slot_bytes` of partials per tile and split, and the workspace limits.
inline int plan_splits(int64_t tiles, int64_t target, int64_t max_splits, int64_t slot_bytes) {
    if (tiles >= target || max_splits <= 1 || tiles > kCounterInts) return 1;
    int64_t s = (target + tiles - 1) / tiles;
    if (s > max_splits) s = max_splits;
    while (s > 1 && tiles * s * slot_bytes > static_cast<int64_t>(kPartialBytes)) --s;
    if (s > 65535) s = 65535;  // grid dimension limit
    return static_cast<int>(s);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace rtnq
