// simt.h: a tiny SIMT emulator so the real kernel source (dequant_kernel.cuh, small_m_kernel.cuh,
// tc_kernel.cuh) runs on the CPU, where CI can check it. Included by device.cuh when RTNQ_EMULATE is set.
//
// Model: every CUDA thread of a block is a fiber (ucontext); fibers run one at a time until they block.
//   __syncthreads     all threads of the block must arrive (a barrier reached after some threads exited,
//                     or never reached by all, is reported as an error instead of hanging);
//   warp collectives  __shfl_xor_sync, ldmatrix.x4 and mma.sync wait for all 32 lanes of the warp, then compute
//                     every lane's result as the PTX ISA defines it (lanes at different collectives: error);
//   cp.async          copies are deferred until the issuing thread's cp.async.wait_group makes them complete,
//                     so a read of shared memory before the right wait + barrier sees stale bytes;
//   atomics, fences   trivially sequential.
// With a seed, thread order within a pass and block order within the grid are shuffled and each warp runs at its
// own random speed, so code whose result depends on an unsynchronised order shows up as a difference between
// seeds. Blocks run one after another: concurrency between blocks (the split-K hand-off) is only checked for
// independence of their order. emulate.cpp also places every buffer right before an inaccessible page, so an
// access past its end is reported as a fault.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

namespace rtnq_emu {

const uint3 &thread_idx();
const uint3 &block_idx();
const dim3 &block_dim();
const dim3 &grid_dim();
unsigned char *dynamic_smem_base();
template <class T>
T *dynamic_smem() {
    return reinterpret_cast<T *>(dynamic_smem_base());
}

void syncthreads();
float shfl_xor(float v, int lane_mask);
void ldmatrix_x4(uint32_t (&r)[4], const void *smem);
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
void cp_async(void *dst, const void *src);  // src == nullptr: zero-fill
void cp_async_commit();
void cp_async_wait(int pending);

inline int atomic_add(int *p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}

}  // namespace rtnq_emu

#define threadIdx (::rtnq_emu::thread_idx())
#define blockIdx (::rtnq_emu::block_idx())
#define blockDim (::rtnq_emu::block_dim())
#define gridDim (::rtnq_emu::grid_dim())
#define __syncthreads() ::rtnq_emu::syncthreads()
#define __threadfence() ((void)0)
#define __shfl_xor_sync(mask, v, lane_mask) ::rtnq_emu::shfl_xor((v), (lane_mask))
#define atomicAdd(p, v) ::rtnq_emu::atomic_add((p), (v))
#define __ldcs(p) (*(p))
#define __ldcg(p) (*(p))

namespace rtnq {

inline uint64_t evict_first_policy() { return 0; }
inline void cp_async16(void *smem, const void *gmem) { rtnq_emu::cp_async(smem, gmem); }
inline void cp_async16_policy(void *smem, const void *gmem, uint64_t) { rtnq_emu::cp_async(smem, gmem); }
inline void cp_async16_zfill(void *smem, const void *gmem, bool valid) { rtnq_emu::cp_async(smem, valid ? gmem : nullptr); }
inline void cp_async_commit() { rtnq_emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    rtnq_emu::cp_async_wait(N);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void *smem) { rtnq_emu::ldmatrix_x4(r, smem); }
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half *) {
    rtnq_emu::mma_16816(d, a, b0, b1, false);
}
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __nv_bfloat16 *) {
    rtnq_emu::mma_16816(d, a, b0, b1, true);
}

}  // namespace rtnq
