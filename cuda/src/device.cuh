// device.cuh: device-only helpers (PTX wrappers, split-K reduction). Each says why it exists.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "layout.cuh"

#ifdef RTNQ_EMULATE
// Host emulation (cuda/emu): the same kernel source runs on CPU fibers; the wrappers below come from there.
#include "../emu/simt.h"
#define RTNQ_DYNAMIC_SMEM(type, name) type *name = ::rtnq_emu::dynamic_smem<type>()
#else
#define RTNQ_DYNAMIC_SMEM(type, name) extern __shared__ type name[]
#endif

namespace rtnq {

#ifndef RTNQ_EMULATE
// Shared-memory address as the 32-bit offset the cp.async / ldmatrix instructions take.
__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Weights are streamed exactly once: an L2 evict-first policy keeps them from pushing out the
// activations and the split-K partials, which are re-read (Marlin does the same).
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// 16-byte global->shared copy that bypasses L1 (.cg) and does not occupy registers while in flight,
// so a CTA keeps several stages of loads outstanding (the memory-latency hiding the kernel relies on).
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem));
}
// Same with an L2 cache policy (for the once-read weights).
__device__ __forceinline__ void cp_async16_policy(void *smem, const void *gmem, uint64_t policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)),
                 "l"(gmem), "l"(policy));
}
// Predicated copy: src-size 0 reads nothing and zero-fills the 16 bytes (rows of x beyond m).
__device__ __forceinline__ void cp_async16_zfill(void *smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes));
}
// Close the current group of cp.async copies so it can be waited on as one pipeline stage.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N groups are pending: stage i is ready while N later stages are still loading.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix.x4: four 8x8 b16 tiles from shared memory straight into the m16n8k16 A-fragment registers
// (lanes 8j..8j+7 give the row addresses of tile j; thread l receives row l/4, columns 2(l%4)+{0,1}).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem)));
}

// One m16n8k16 tensor-core MMA with fp32 accumulation (the only 16-bit mma shape with k = 16 on sm_80+).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half *) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16 *) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // !RTNQ_EMULATE

// Streaming 16-byte load of weights that are read once (evict-first in L1/L2).
__device__ __forceinline__ int4 load_stream(const int4 *p) { return __ldcs(p); }

// Split-K, deterministic: every CTA of a tile writes its fp32 partial to its own slot, then counts
// itself in; the CTA that arrives last sums the slots in split order 0..S-1 (so the result does not
// depend on arrival order) and resets the counter, leaving the workspace zeroed for the next launch
// and for CUDA graph replays. Returns true in the CTA that must do the final sum. All threads call it.
__device__ __forceinline__ bool splitk_arrive(int *counter, int splits) {
    __shared__ int is_last;
    __threadfence();  // publish this thread's partial stores device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0) {
        const int prev = atomicAdd(counter, 1);
        is_last = prev == splits - 1;
        if (is_last) *counter = 0;  // every split has arrived: nobody else touches it in this launch
    }
    __syncthreads();
    if (is_last) __threadfence();  // order the reads of the other CTAs' partials after the count
    return is_last;
}

// Read a partial written by another CTA: through L2 (.cg), never a possibly stale L1 line.
__device__ __forceinline__ float4 load_partial(const float *p) { return __ldcg(reinterpret_cast<const float4 *>(p)); }

}  // namespace rtnq
