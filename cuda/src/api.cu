// api.cu: the exported C entry points: argument checks, device checks, status strings, dispatch to launchers.
//
// Order inside every entry: arguments (no device needed) -> alignment -> workspace -> device -> launch.
// So a wrong shape reports RTNQ_ERR_SHAPE on any machine, and a correct call on a machine without a GPU
// reports RTNQ_ERR_NO_DEVICE without touching the (then meaningless) pointers.
#include <atomic>
#include <climits>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "common.cuh"

#define RTNQ_STR2(...) #__VA_ARGS__
#define RTNQ_STR(...) RTNQ_STR2(__VA_ARGS__)

namespace rtnq {

namespace {
thread_local char g_last_error[512] = "";
}

void clear_error() { g_last_error[0] = '\0'; }

int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
    va_end(ap);
    return status;
}

static bool is_no_device(cudaError_t e) {
    switch (e) {
        case cudaErrorNoDevice:
        case cudaErrorInsufficientDriver:
        case cudaErrorInitializationError:
        case cudaErrorSystemDriverMismatch:
        case cudaErrorCompatNotSupportedOnDevice:
        case cudaErrorStubLibrary:
        case cudaErrorDevicesUnavailable:
        case cudaErrorSystemNotReady:
            return true;
        default:
            return false;
    }
}

int cuda_fail(cudaError_t err, const char *what) {
    const char *name = cudaGetErrorName(err);
    const char *text = cudaGetErrorString(err);
    if (is_no_device(err)) {
        int driver = 0;
        if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
            return fail(RTNQ_ERR_NO_DEVICE, "%s: no NVIDIA driver found (%s)", what, name);
        return fail(RTNQ_ERR_NO_DEVICE, "%s: no usable CUDA GPU (%s: %s; driver %d.%d)", what, name, text,
                    driver / 1000, driver % 1000 / 10);
    }
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
        return fail(RTNQ_ERR_NO_KERNEL, "%s: this library has no kernel image for the GPU (%s: %s); it is built for "
                    "compute capability 8.0+ (archs " RTNQ_STR(__CUDA_ARCH_LIST__) ")", what, name, text);
    return fail(RTNQ_ERR_CUDA, "%s: %s: %s", what, name, text);
}

int check_launch(const char *kernel) {
    const cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) return RTNQ_OK;
    const int st = cuda_fail(e, kernel);
    return st == RTNQ_ERR_CUDA ? fail(RTNQ_ERR_LAUNCH, "%s launch failed: %s: %s", kernel, cudaGetErrorName(e),
                                      cudaGetErrorString(e))
                               : st;
}

// ---- Device cache --------------------------------------------------------------------------------------
namespace {
constexpr int kMaxDevices = 64;
std::atomic<bool> g_have[kMaxDevices];
DeviceProps g_props[kMaxDevices];
std::mutex g_props_mu;

struct FuncEntry {
    const void *func;
    int device;
    size_t smem_set;  // dynamic shared memory limit already raised to this many bytes
    int occupancy;    // blocks per SM, 0 = not computed
};
std::mutex g_func_mu;
FuncEntry g_funcs[256];
int g_nfuncs = 0;

FuncEntry *func_entry(const void *func, int device) {  // g_func_mu held
    for (int i = 0; i < g_nfuncs; ++i)
        if (g_funcs[i].func == func && g_funcs[i].device == device) return &g_funcs[i];
    if (g_nfuncs == 256) return nullptr;
    g_funcs[g_nfuncs] = FuncEntry{func, device, 0, 0};
    return &g_funcs[g_nfuncs++];
}
}  // namespace

int current_device(DeviceProps *props) {
    int dev = -1;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
    if (dev < 0 || dev >= kMaxDevices) return fail(RTNQ_ERR_NO_DEVICE, "device ordinal %d is out of range", dev);
    if (!g_have[dev].load(std::memory_order_acquire)) {
        std::lock_guard<std::mutex> lock(g_props_mu);
        if (!g_have[dev].load(std::memory_order_relaxed)) {
            DeviceProps p{};
            p.device = dev;
            if ((e = cudaDeviceGetAttribute(&p.major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess ||
                (e = cudaDeviceGetAttribute(&p.minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess ||
                (e = cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
                (e = cudaDeviceGetAttribute(&p.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) != cudaSuccess)
                return cuda_fail(e, "cudaDeviceGetAttribute");
            g_props[dev] = p;
            g_have[dev].store(true, std::memory_order_release);
        }
    }
    *props = g_props[dev];
    if (props->major < 8)
        return fail(RTNQ_ERR_ARCH, "GPU %d has compute capability %d.%d; rtnq's kernels need 8.0 or newer (Ampere, Ada, Hopper)",
                    dev, props->major, props->minor);
    return RTNQ_OK;
}

int ensure_smem(const void *func, size_t bytes, const DeviceProps &dev, const char *kernel) {
    if (bytes > static_cast<size_t>(dev.smem_optin))
        return fail(RTNQ_ERR_NO_KERNEL, "%s needs %zu bytes of shared memory per block; GPU %d allows %d", kernel, bytes,
                    dev.device, dev.smem_optin);
    if (bytes <= 48 * 1024) return RTNQ_OK;  // the default limit
    std::lock_guard<std::mutex> lock(g_func_mu);
    FuncEntry *f = func_entry(func, dev.device);
    if (f && f->smem_set >= bytes) return RTNQ_OK;
    const cudaError_t e = cudaFuncSetAttribute(func, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) return cuda_fail(e, "cudaFuncSetAttribute");
    if (f) f->smem_set = bytes;
    return RTNQ_OK;
}

int blocks_per_sm(const void *func, int threads, size_t smem, const DeviceProps &dev) {
    std::lock_guard<std::mutex> lock(g_func_mu);
    FuncEntry *f = func_entry(func, dev.device);
    if (f && f->occupancy > 0) return f->occupancy;
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, func, threads, smem) != cudaSuccess || n < 1) {
        cudaGetLastError();  // a failed query is not a launch error; plan for one block per SM
        n = 1;
    }
    if (f) f->occupancy = n;
    return n;
}

}  // namespace rtnq

using namespace rtnq;

// ---- Validation --------------------------------------------------------------------------------------------
namespace {

bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int check_weights(const void *qweight, const void *scales, int64_t n, int64_t k, int32_t bits, int32_t group_size,
                  int32_t dtype, Groups *groups) {
    if (!qweight || !scales) return fail(RTNQ_ERR_INVALID_VALUE, "qweight and scales must not be NULL");
    if (bits != 4 && bits != 8) return fail(RTNQ_ERR_INVALID_VALUE, "bits must be 4 or 8, got %d", bits);
    if (dtype != RTNQ_FLOAT16 && dtype != RTNQ_BFLOAT16)
        return fail(RTNQ_ERR_INVALID_VALUE, "dtype must be RTNQ_FLOAT16 (0) or RTNQ_BFLOAT16 (1), got %d", dtype);
    if (group_size != -1 && group_size != 32 && group_size != 64 && group_size != 128)
        return fail(RTNQ_ERR_INVALID_VALUE, "group_size must be 32, 64, 128 or -1 (channelwise), got %d", group_size);
    if (n <= 0 || k <= 0) return fail(RTNQ_ERR_SHAPE, "n and k must be positive, got n=%lld, k=%lld", (long long)n, (long long)k);
    if (n % kBlockN) return fail(RTNQ_ERR_SHAPE, "n=%lld (out_features) is not a multiple of 64", (long long)n);
    if (k % kMinK) return fail(RTNQ_ERR_SHAPE, "k=%lld (in_features) is not a multiple of 128", (long long)k);
    if (group_size > 0 && k % group_size)
        return fail(RTNQ_ERR_SHAPE, "k=%lld is not a multiple of group_size %d", (long long)k, group_size);
    if (n > INT32_MAX || k > INT32_MAX) return fail(RTNQ_ERR_SHAPE, "n=%lld, k=%lld: dimensions above 2^31-1 are not supported", (long long)n, (long long)k);
    *groups = make_groups(k, group_size);
    return RTNQ_OK;
}

int check_aligned(const void *p, const char *name) {
    if (p && !aligned16(p)) return fail(RTNQ_ERR_ALIGNMENT, "%s (%p) is not 16-byte aligned", name, p);
    return RTNQ_OK;
}

int gemm_entry(int path, const void *x, const void *qweight, const void *scales, void *out, int64_t m, int64_t n,
               int64_t k, int32_t bits, int32_t group_size, int32_t dtype, void *workspace, size_t workspace_bytes,
               void *stream) {
    clear_error();
    Groups groups;
    int st = check_weights(qweight, scales, n, k, bits, group_size, dtype, &groups);
    if (st != RTNQ_OK) return st;
    if (m < 0) return fail(RTNQ_ERR_INVALID_VALUE, "m must be >= 0, got %lld", (long long)m);
    if (m > INT32_MAX) return fail(RTNQ_ERR_SHAPE, "m=%lld is above 2^31-1", (long long)m);
    if (m > 0 && (!x || !out)) return fail(RTNQ_ERR_INVALID_VALUE, "x and out must not be NULL");
    if ((st = check_aligned(x, "x")) || (st = check_aligned(qweight, "qweight")) ||
        (st = check_aligned(scales, "scales")) || (st = check_aligned(out, "out")) ||
        (st = check_aligned(workspace, "workspace")))
        return st;
    if (!workspace || workspace_bytes < kWorkspaceBytes)
        return fail(RTNQ_ERR_WORKSPACE, "workspace of %zu bytes is smaller than rtnq_workspace_size() = %zu",
                    workspace ? workspace_bytes : size_t(0), kWorkspaceBytes);
    GemmArgs a;
    a.x = x;
    a.qweight = qweight;
    a.scales = scales;
    a.out = out;
    a.m = m;
    a.n = n;
    a.k = k;
    a.bits = bits;
    a.groups = groups;
    a.dtype = dtype;
    a.counters = static_cast<int *>(workspace);
    a.partials = reinterpret_cast<float *>(static_cast<char *>(workspace) + kCounterBytes);
    a.stream = static_cast<cudaStream_t>(stream);
    a.dry_run = false;
    a.plan_splits = 0;
    a.plan_rows = 0;
    if ((st = current_device(&a.dev)) != RTNQ_OK) return st;
    if (m == 0) return RTNQ_OK;
    if (path == RTNQ_PATH_SMALL_M) return bits == 4 ? launch_small_m_w4(a) : launch_small_m_w8(a);
    return bits == 4 ? launch_tensor_core_w4(a) : launch_tensor_core_w8(a);
}

}  // namespace

extern "C" {

RTNQ_API int rtnq_abi_version(void) { return RTNQ_ABI_VERSION; }

RTNQ_API const char *rtnq_status_string(int status) {
    switch (status) {
        case RTNQ_OK: return "ok";
        case RTNQ_ERR_INVALID_VALUE: return "invalid value";
        case RTNQ_ERR_SHAPE: return "unsupported shape";
        case RTNQ_ERR_ALIGNMENT: return "misaligned pointer";
        case RTNQ_ERR_WORKSPACE: return "workspace too small";
        case RTNQ_ERR_NO_DEVICE: return "no CUDA device";
        case RTNQ_ERR_ARCH: return "GPU architecture not supported";
        case RTNQ_ERR_NO_KERNEL: return "no kernel for this GPU";
        case RTNQ_ERR_LAUNCH: return "kernel launch failed";
        case RTNQ_ERR_CUDA: return "CUDA error";
        default: return "unknown status";
    }
}

RTNQ_API const char *rtnq_last_error(void) { return g_last_error; }

RTNQ_API const char *rtnq_build_info(void) {
    return "nvcc " RTNQ_STR(__CUDACC_VER_MAJOR__) "." RTNQ_STR(__CUDACC_VER_MINOR__) "." RTNQ_STR(
        __CUDACC_VER_BUILD__) "; archs " RTNQ_STR(__CUDA_ARCH_LIST__) "; cudart static";
}

RTNQ_API int rtnq_driver_version(int32_t *version) {
    clear_error();
    if (!version) return fail(RTNQ_ERR_INVALID_VALUE, "version must not be NULL");
    int v = 0;
    const cudaError_t e = cudaDriverGetVersion(&v);
    *version = e == cudaSuccess ? v : 0;
    return RTNQ_OK;
}

RTNQ_API int rtnq_runtime_version(int32_t *version) {
    clear_error();
    if (!version) return fail(RTNQ_ERR_INVALID_VALUE, "version must not be NULL");
    int v = 0;
    const cudaError_t e = cudaRuntimeGetVersion(&v);
    if (e != cudaSuccess) return cuda_fail(e, "cudaRuntimeGetVersion");
    *version = v;
    return RTNQ_OK;
}

RTNQ_API int rtnq_device_count(int32_t *count) {
    clear_error();
    if (!count) return fail(RTNQ_ERR_INVALID_VALUE, "count must not be NULL");
    *count = 0;
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) return cuda_fail(e, "cudaGetDeviceCount");
    if (n == 0) return fail(RTNQ_ERR_NO_DEVICE, "cudaGetDeviceCount: no CUDA GPU is visible");
    *count = n;
    return RTNQ_OK;
}

RTNQ_API int rtnq_device_info_get(int32_t device, rtnq_device_info *info) {
    clear_error();
    if (!info) return fail(RTNQ_ERR_INVALID_VALUE, "info must not be NULL");
    memset(info, 0, sizeof(*info));
    int dev = device;
    cudaError_t e;
    if (dev < 0 && (e = cudaGetDevice(&dev)) != cudaSuccess) return cuda_fail(e, "cudaGetDevice");
    cudaDeviceProp p;
    if ((e = cudaGetDeviceProperties(&p, dev)) != cudaSuccess) {
        if (e == cudaErrorInvalidDevice) return fail(RTNQ_ERR_INVALID_VALUE, "no GPU with ordinal %d", dev);
        return cuda_fail(e, "cudaGetDeviceProperties");
    }
    info->device = dev;
    info->major = p.major;
    info->minor = p.minor;
    info->sm_count = p.multiProcessorCount;
    int v = 0;
    info->driver_version = cudaDriverGetVersion(&v) == cudaSuccess ? v : 0;
    info->runtime_version = cudaRuntimeGetVersion(&v) == cudaSuccess ? v : 0;
    info->total_memory = static_cast<int64_t>(p.totalGlobalMem);
    info->l2_cache_bytes = p.l2CacheSize;
    info->max_shared_per_block_optin = static_cast<int32_t>(p.sharedMemPerBlockOptin);
    snprintf(info->name, sizeof(info->name), "%s", p.name);
    return RTNQ_OK;
}

RTNQ_API int rtnq_workspace_size(size_t *bytes) {
    clear_error();
    if (!bytes) return fail(RTNQ_ERR_INVALID_VALUE, "bytes must not be NULL");
    *bytes = kWorkspaceBytes;
    return RTNQ_OK;
}

RTNQ_API int rtnq_choose_path(int64_t m, int64_t small_m_max, int64_t tensor_core_max, int32_t *path) {
    clear_error();
    if (!path) return fail(RTNQ_ERR_INVALID_VALUE, "path must not be NULL");
    if (m < 0 || small_m_max < 0 || tensor_core_max < 0)
        return fail(RTNQ_ERR_INVALID_VALUE, "m and the thresholds must be >= 0, got m=%lld, small_m_max=%lld, tensor_core_max=%lld",
                    (long long)m, (long long)small_m_max, (long long)tensor_core_max);
    *path = m <= small_m_max ? RTNQ_PATH_SMALL_M : m <= tensor_core_max ? RTNQ_PATH_TENSOR_CORE : RTNQ_PATH_DEQUANT;
    return RTNQ_OK;
}

RTNQ_API int rtnq_gemm_plan(int32_t path, int64_t m, int64_t n, int64_t k, int32_t bits, int32_t group_size,
                            int32_t dtype, int32_t *splits, int32_t *rows_per_cta) {
    clear_error();
    if (!splits || !rows_per_cta) return fail(RTNQ_ERR_INVALID_VALUE, "splits and rows_per_cta must not be NULL");
    *splits = 0;
    *rows_per_cta = 0;
    if (path != RTNQ_PATH_SMALL_M && path != RTNQ_PATH_TENSOR_CORE)
        return fail(RTNQ_ERR_INVALID_VALUE, "path must be RTNQ_PATH_SMALL_M (1) or RTNQ_PATH_TENSOR_CORE (2), got %d", path);
    Groups groups;
    // Only the geometry matters: stand-in non-NULL pointers pass the argument checks.
    static const int4 dummy = {0, 0, 0, 0};
    int st = check_weights(&dummy, &dummy, n, k, bits, group_size, dtype, &groups);
    if (st != RTNQ_OK) return st;
    if (m <= 0 || m > INT32_MAX) return fail(RTNQ_ERR_INVALID_VALUE, "m must be in 1 .. 2^31-1, got %lld", (long long)m);
    GemmArgs a{};
    a.m = m;
    a.n = n;
    a.k = k;
    a.bits = bits;
    a.groups = groups;
    a.dtype = dtype;
    a.dry_run = true;
    if ((st = current_device(&a.dev)) != RTNQ_OK) return st;
    if (path == RTNQ_PATH_SMALL_M)
        st = bits == 4 ? launch_small_m_w4(a) : launch_small_m_w8(a);
    else
        st = bits == 4 ? launch_tensor_core_w4(a) : launch_tensor_core_w8(a);
    if (st != RTNQ_OK) return st;
    *splits = a.plan_splits;
    *rows_per_cta = a.plan_rows;
    return RTNQ_OK;
}

RTNQ_API int rtnq_dequantize(const void *qweight, const void *scales, void *out, int64_t n, int64_t k, int32_t bits,
                             int32_t group_size, int32_t dtype, int32_t layout, void *stream) {
    clear_error();
    Groups groups;
    int st = check_weights(qweight, scales, n, k, bits, group_size, dtype, &groups);
    if (st != RTNQ_OK) return st;
    if (!out) return fail(RTNQ_ERR_INVALID_VALUE, "out must not be NULL");
    if (layout != RTNQ_LAYOUT_KN && layout != RTNQ_LAYOUT_NK)
        return fail(RTNQ_ERR_INVALID_VALUE, "layout must be RTNQ_LAYOUT_KN (0) or RTNQ_LAYOUT_NK (1), got %d", layout);
    if ((st = check_aligned(qweight, "qweight")) || (st = check_aligned(scales, "scales")) ||
        (st = check_aligned(out, "out")))
        return st;
    DeviceProps dev;
    if ((st = current_device(&dev)) != RTNQ_OK) return st;
    DequantArgs a;
    a.qweight = qweight;
    a.scales = scales;
    a.out = out;
    a.n = n;
    a.k = k;
    a.bits = bits;
    a.groups = groups;
    a.dtype = dtype;
    a.layout = layout;
    a.stream = static_cast<cudaStream_t>(stream);
    return launch_dequantize(a);
}

RTNQ_API int rtnq_gemm_small_m(const void *x, const void *qweight, const void *scales, void *out, int64_t m, int64_t n,
                               int64_t k, int32_t bits, int32_t group_size, int32_t dtype, void *workspace,
                               size_t workspace_bytes, void *stream) {
    return gemm_entry(RTNQ_PATH_SMALL_M, x, qweight, scales, out, m, n, k, bits, group_size, dtype, workspace,
                      workspace_bytes, stream);
}

RTNQ_API int rtnq_gemm_tensor_core(const void *x, const void *qweight, const void *scales, void *out, int64_t m,
                                   int64_t n, int64_t k, int32_t bits, int32_t group_size, int32_t dtype,
                                   void *workspace, size_t workspace_bytes, void *stream) {
    return gemm_entry(RTNQ_PATH_TENSOR_CORE, x, qweight, scales, out, m, n, k, bits, group_size, dtype, workspace,
                      workspace_bytes, stream);
}

}  // extern "C"
