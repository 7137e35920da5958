/*
 * rtnq_cuda.h: the C ABI of librtnq_cuda.so, rtnq's torch-free CUDA runtime (DESIGN.md section 7).
 *
 * The library runs GEMMs and dequantization on weights in the Marlin layout that `rtnq convert`
 * writes (FORMATS.md sections 3-4): symmetric 4- or 8-bit codes stored as q + 8 / q + 128,
 * qweight int32 (k/16, 2n) or (k/16, 4n), scales (k/g, n) Marlin-permuted in the activation dtype.
 *
 * Conventions
 *   - k = in_features (reduction dim), n = out_features, m = rows of the activation x.
 *   - Every pointer is a device pointer on the *current* CUDA device and must be 16-byte aligned;
 *     every dense matrix is row-major and contiguous.
 *   - Shapes: n % 64 == 0, k % 128 == 0, and k % group_size == 0 for grouped scales.
 *     group_size is 32, 64, 128 or -1 (channelwise, one scale row). A layer with group_size == k has
 *     one scale row and is treated as channelwise, as the Marlin scale layout requires.
 *   - `stream` is a cudaStream_t (NULL = the legacy default stream). Work is enqueued, not awaited:
 *     a fault inside a kernel surfaces at the next synchronisation, as for any CUDA launch.
 *   - Every entry point returns an rtnq_status. Arguments are checked before the device is touched,
 *     so shape and argument errors are reported the same way with or without a GPU. After a failure,
 *     rtnq_last_error() gives a one-line detail (thread-local).
 *   - The GEMM entries need a caller-owned workspace of rtnq_workspace_size() bytes that is zero-filled
 *     once when allocated; kernels leave it zeroed again (safe for CUDA graphs). One workspace must
 *     not be used by two streams at the same time.
 */
#ifndef RTNQ_CUDA_H
#define RTNQ_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define RTNQ_API __declspec(dllexport)
#else
#define RTNQ_API __attribute__((visibility("default")))
#endif

/* Bumped on any change of a signature, struct, enum value or workspace contract below, and on any function
 * added to or removed from the exported set (2: the rtnq_host_* test references moved to the test-only
 * build/librtnq_emu.so, see cuda/emu/host_ref.h). */
#define RTNQ_ABI_VERSION 2

typedef enum rtnq_status {
    RTNQ_OK = 0,
    RTNQ_ERR_INVALID_VALUE = 1, /* null pointer, bits not 4/8, unknown dtype/layout, bad group size, m < 0 */
    RTNQ_ERR_SHAPE = 2,         /* n % 64, k % 128 or k % group_size is not 0, or a dimension too large */
    RTNQ_ERR_ALIGNMENT = 3,     /* a pointer is not 16-byte aligned */
    RTNQ_ERR_WORKSPACE = 4,     /* workspace missing or smaller than rtnq_workspace_size() */
    RTNQ_ERR_NO_DEVICE = 5,     /* no CUDA driver or no visible GPU */
    RTNQ_ERR_ARCH = 6,          /* the GPU's compute capability is below 8.0 */
    RTNQ_ERR_NO_KERNEL = 7,     /* no kernel image for this GPU, or it needs more shared memory than the GPU has */
    RTNQ_ERR_LAUNCH = 8,        /* a kernel launch failed */
    RTNQ_ERR_CUDA = 9           /* another CUDA runtime error (see rtnq_last_error) */
} rtnq_status;

typedef enum rtnq_dtype {
    RTNQ_FLOAT16 = 0,
    RTNQ_BFLOAT16 = 1
} rtnq_dtype;

typedef enum rtnq_layout {
    RTNQ_LAYOUT_KN = 0, /* dense (k, n): B = W^T, what x @ B consumes */
    RTNQ_LAYOUT_NK = 1  /* dense (n, k): the nn.Linear weight W */
} rtnq_layout;

typedef enum rtnq_path {
    RTNQ_PATH_SMALL_M = 1,     /* CUDA-core decode kernel: reads the weights once per 8 rows of x */
    RTNQ_PATH_TENSOR_CORE = 2, /* mma.sync kernel over the fragment-ordered layout */
    RTNQ_PATH_DEQUANT = 3      /* caller: rtnq_dequantize into (k, n) then a dense GEMM (cuBLAS) */
} rtnq_path;

typedef struct rtnq_device_info {
    int32_t device;                     /* device ordinal */
    int32_t major;                      /* compute capability */
    int32_t minor;
    int32_t sm_count;                   /* multiprocessors */
    int32_t driver_version;             /* cudaDriverGetVersion, e.g. 13000 */
    int32_t runtime_version;            /* the CUDA runtime linked into this library */
    int64_t total_memory;               /* bytes */
    int32_t l2_cache_bytes;
    int32_t max_shared_per_block_optin; /* bytes a block may use after opting in */
    char name[256];                     /* cudaDeviceProp.name, NUL-terminated */
} rtnq_device_info;

/* RTNQ_ABI_VERSION of the compiled library; the binding refuses a library whose value differs. */
RTNQ_API int rtnq_abi_version(void);

/* Static, never NULL: "ok", "invalid value", ... ("unknown status" for values outside the enum). */
RTNQ_API const char *rtnq_status_string(int status);

/* One-line detail of the last failure on this thread ("" after a success). Valid until the next call. */
RTNQ_API const char *rtnq_last_error(void);

/* "nvcc 13.0; archs sm_80 sm_90 compute_90" style description of how the library was built. */
RTNQ_API const char *rtnq_build_info(void);

/* Driver version (0 when no driver is installed) and the linked runtime version. Never needs a GPU. */
RTNQ_API int rtnq_driver_version(int32_t *version);
RTNQ_API int rtnq_runtime_version(int32_t *version);

/* Number of visible GPUs; RTNQ_ERR_NO_DEVICE (count 0) when there is no driver or no GPU. */
RTNQ_API int rtnq_device_count(int32_t *count);

/* Properties of GPU `device` (-1 = the current device). */
RTNQ_API int rtnq_device_info_get(int32_t device, rtnq_device_info *info);

/* Bytes of workspace every GEMM entry needs; the same on every GPU, never needs a GPU. */
RTNQ_API int rtnq_workspace_size(size_t *bytes);

/* Which path a GEMM with m rows takes: m <= small_m_max -> RTNQ_PATH_SMALL_M,
 * m <= tensor_core_max -> RTNQ_PATH_TENSOR_CORE, else RTNQ_PATH_DEQUANT (returned in *path).
 * The thresholds are measured per GPU by `rtnq bench`; this function holds none of its own. */
RTNQ_API int rtnq_choose_path(int64_t m, int64_t small_m_max, int64_t tensor_core_max, int32_t *path);

/* Dense dequantization: out[(k, n) or (n, k)] = (code - bias) * scale, rounded once to `dtype`;
 * bit-identical to rtnq.rtn.dequantize(marlin.unpack(...)).
 * qweight: int32 (k/16, 2n) 4-bit / (k/16, 4n) 8-bit.  scales: dtype (groups, n), Marlin-permuted.
 * out: dtype, k*n elements in `layout`. */
RTNQ_API int rtnq_dequantize(const void *qweight, const void *scales, void *out, int64_t n, int64_t k,
                             int32_t bits, int32_t group_size, int32_t dtype, int32_t layout, void *stream);

/* out (m, n) = x (m, k) @ dequant(W)^T, fp32 accumulation, result rounded to `dtype`.
 * x, scales, out: `dtype`.  Any m >= 0 is accepted by both paths; which one is faster is measured. */
RTNQ_API int rtnq_gemm_small_m(const void *x, const void *qweight, const void *scales, void *out, int64_t m,
                               int64_t n, int64_t k, int32_t bits, int32_t group_size, int32_t dtype,
                               void *workspace, size_t workspace_bytes, void *stream);
RTNQ_API int rtnq_gemm_tensor_core(const void *x, const void *qweight, const void *scales, void *out, int64_t m,
                                   int64_t n, int64_t k, int32_t bits, int32_t group_size, int32_t dtype,
                                   void *workspace, size_t workspace_bytes, void *stream);

/* How the kernel for `path` (RTNQ_PATH_SMALL_M or RTNQ_PATH_TENSOR_CORE) would run this problem on the current
 * GPU: the split-K count it picks (from the GPU's SM count and occupancy) and the rows of x per CTA.
 * Launches nothing; needs a GPU. */
RTNQ_API int rtnq_gemm_plan(int32_t path, int64_t m, int64_t n, int64_t k, int32_t bits, int32_t group_size,
                            int32_t dtype, int32_t *splits, int32_t *rows_per_cta);

#ifdef __cplusplus
}
#endif

#endif /* RTNQ_CUDA_H */
