// small_m_kernel.cuh: the decode kernel (M = 1..16 and beyond), CUDA cores, fp32 accumulation.
//
// Work split: one CTA = 8 warps on one 64-column block and one k-range (a split-K share); each warp takes a
// contiguous run of 16-row slabs. Per slab a lane issues one (4-bit) or two (8-bit) 16-byte streaming
// loads: a warp reads the block's 512 B / 1 KiB contiguously, and U slabs are loaded before any is used
// so 64 B per lane are in flight. A lane's words are the B fragments of 8 n8 tiles (layout.cuh); it
// dequantizes them once and reuses them for the MT rows of x, reading x through L1 (every warp of a CTA
// reads the same x). Reduction: 4 lanes per column by shuffles, 8 warps through shared memory in fixed
// order, then split-K through the workspace in fixed order, so results are deterministic.
// Rows of x beyond MT are handled by more CTAs along grid z (each re-reads the weights: this path is for
// small M; the dispatcher's measured thresholds decide where it stops paying).
#pragma once

#include "common.cuh"
#include "device.cuh"
#include "tc_config.cuh"

namespace rtnq {
namespace small_m {

constexpr int kWarps = 8;

template <int BITS, typename T, int MT>
__global__ void __launch_bounds__(256) small_m_kernel(const T *__restrict__ x, const int4 *__restrict__ qweight,
                                                      const T *__restrict__ scales, T *__restrict__ out,
                                                      float *__restrict__ partials, int *__restrict__ counters, int m,
                                                      int64_t n, int64_t k, int group_size, int channelwise,
                                                      int splits) {
    using T2 = typename Elem<T>::T2;
    constexpr int U = BITS == 4 ? 4 : 2;  // slabs loaded ahead: 4 x 16 B per lane either way
    constexpr int NW = Bits<BITS>::kWords;
    constexpr int NV = Bits<BITS>::kInt4PerLane;
    __shared__ float red[kWarps][MT][kBlockN];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = lane & 3, c = lane >> 2;
    const int64_t nb = blockIdx.x;
    const int split = blockIdx.y;
    const int m0 = blockIdx.z * MT;

    const int64_t slabs = k / kTile;
    const int64_t cta_begin = slabs * split / splits, cta_end = slabs * (split + 1) / splits;
    const int64_t span = cta_end - cta_begin;
    const int64_t begin = cta_begin + span * warp / kWarps, end = cta_begin + span * (warp + 1) / kWarps;

    float acc[MT][8];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) acc[i][ci] = 0.f;

    T s8[8];
    int64_t cur_group = -1;
    if (channelwise) {
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) s8[ci] = scales[scale_pos_single(nb * kBlockN + 8 * ci + c)];
    }
    const T *xbase = x + static_cast<int64_t>(m0) * k + 2 * t;

    for (int64_t kt = begin; kt < end; kt += U) {
        uint32_t w[U][NW];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool ok = kt + u < end;
            const int4 *src = qweight + lane_int4_offset<BITS>(ok ? kt + u : kt, nb, lane, n);
#pragma unroll
            for (int i = 0; i < NV; ++i) {
                int4 v = make_int4(0, 0, 0, 0);
                if (ok) v = load_stream(src + i);
                w[u][4 * i + 0] = static_cast<uint32_t>(v.x);
                w[u][4 * i + 1] = static_cast<uint32_t>(v.y);
                w[u][4 * i + 2] = static_cast<uint32_t>(v.z);
                w[u][4 * i + 3] = static_cast<uint32_t>(v.w);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int64_t slab = kt + u;
            if (slab < end) {
                if (!channelwise) {
                    const int64_t g = slab * kTile / group_size;
                    if (g != cur_group) {  // a 128-row group spans 8 slabs: reload only when it changes
                        cur_group = g;
                        const int4 v = *reinterpret_cast<const int4 *>(scales + g * n + nb * kBlockN + 8 * c);
                        memcpy(s8, &v, sizeof(v));
                    }
                }
                float2 lo[8], hi[8];  // rows (2t, 2t+1) and (2t+8, 2t+9) of columns 8ci + c
#pragma unroll
                for (int ci = 0; ci < 8; ++ci) {
                    T2 b0, b1;
                    b_frag<BITS, T>(w[u], ci, s8[ci], b0, b1);
                    lo[ci] = to_float2(b0);
                    hi[ci] = to_float2(b1);
                }
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    if (m0 + i < m) {
                        const T *xp = xbase + static_cast<int64_t>(i) * k + slab * kTile;
                        const float2 xa = to_float2(*reinterpret_cast<const T2 *>(xp));
                        const float2 xb = to_float2(*reinterpret_cast<const T2 *>(xp + 8));
#pragma unroll
                        for (int ci = 0; ci < 8; ++ci) {
                            float s = acc[i][ci];
                            s = fmaf(xa.x, lo[ci].x, s);
                            s = fmaf(xa.y, lo[ci].y, s);
                            s = fmaf(xb.x, hi[ci].x, s);
                            s = fmaf(xb.y, hi[ci].y, s);
                            acc[i][ci] = s;
                        }
                    }
                }
            }
        }
    }

    // The 4 lanes t = 0..3 of a column hold its 4 k-row subsets: butterfly-sum them.
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) {
            acc[i][ci] += __shfl_xor_sync(0xffffffffu, acc[i][ci], 1);
            acc[i][ci] += __shfl_xor_sync(0xffffffffu, acc[i][ci], 2);
        }
    // Lane t stores n8 tiles 2t and 2t+1 (one writer per address).
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int ci = 0; ci < 8; ++ci)
            if ((ci >> 1) == t) red[warp][i][8 * ci + c] = acc[i][ci];
    __syncthreads();

    const int64_t tile = static_cast<int64_t>(blockIdx.z) * gridDim.x + nb;
    float *slots = partials + tile * splits * (MT * kBlockN);
    for (int idx = threadIdx.x; idx < MT * kBlockN; idx += blockDim.x) {
        const int i = idx / kBlockN, col = idx % kBlockN;
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < kWarps; ++wi) v += red[wi][i][col];
        if (splits == 1) {
            if (m0 + i < m) out[static_cast<int64_t>(m0 + i) * n + nb * kBlockN + col] = from_float<T>(v);
        } else {
            slots[split * (MT * kBlockN) + idx] = v;
        }
    }
    if (splits == 1) return;
    if (!splitk_arrive(counters + tile, splits)) return;
    for (int idx4 = threadIdx.x; idx4 < MT * kBlockN / 4; idx4 += blockDim.x) {
        const int i = idx4 * 4 / kBlockN, col = idx4 * 4 % kBlockN;
        if (m0 + i >= m) continue;
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int sp = 0; sp < splits; ++sp) {
            const float4 p = load_partial(slots + sp * (MT * kBlockN) + idx4 * 4);
            s.x += p.x;
            s.y += p.y;
            s.z += p.z;
            s.w += p.w;
        }
        T *o = out + static_cast<int64_t>(m0 + i) * n + nb * kBlockN + col;
        *reinterpret_cast<T2 *>(o) = pair(from_float<T>(s.x), from_float<T>(s.y));
        *reinterpret_cast<T2 *>(o + 2) = pair(from_float<T>(s.z), from_float<T>(s.w));
    }
}

#ifndef RTNQ_EMULATE
template <int BITS, typename T, int MT>
int launch_mt(GemmArgs &a) {
    auto kernel = small_m_kernel<BITS, T, MT>;
    const int64_t mchunks = small_m_grid(a.m, a.n, MT, 1).z;
    if (mchunks > 65535) return fail(RTNQ_ERR_SHAPE, "m=%lld is too large for the small-M kernel (max %d)", (long long)a.m, 65535 * MT);
    const int64_t nblocks = a.n / kBlockN;
    const int64_t tiles = nblocks * mchunks;
    const int64_t target = static_cast<int64_t>(a.dev.sm_count) * blocks_per_sm(reinterpret_cast<const void *>(kernel), 256, 0, a.dev);
    const int64_t max_splits = a.k / kTile / 32 > 1 ? a.k / kTile / 32 : 1;  // keep >= 4 slabs per warp
    const int splits = plan_splits(tiles, target, max_splits, MT * kBlockN * 4);
    if (a.dry_run) {
        a.plan_splits = splits;
        a.plan_rows = MT;
        return RTNQ_OK;
    }
    const dim3 grid(static_cast<unsigned>(nblocks), static_cast<unsigned>(splits), static_cast<unsigned>(mchunks));
    kernel<<<grid, 256, 0, a.stream>>>(static_cast<const T *>(a.x), static_cast<const int4 *>(a.qweight),
                                       static_cast<const T *>(a.scales), static_cast<T *>(a.out), a.partials,
                                       a.counters, static_cast<int>(a.m), a.n, a.k,
                                       a.groups.channelwise ? 0 : static_cast<int>(a.groups.size),
                                       a.groups.channelwise ? 1 : 0, splits);
    return check_launch("small_m_kernel");
}

template <int BITS, typename T>
int launch_typed(GemmArgs &a) {
    switch (small_m_rows(a.m)) {
        case 1: return launch_mt<BITS, T, 1>(a);
        case 2: return launch_mt<BITS, T, 2>(a);
        case 4: return launch_mt<BITS, T, 4>(a);
        default: return launch_mt<BITS, T, 8>(a);
    }
}
#endif  // !RTNQ_EMULATE

}  // namespace small_m
}  // namespace rtnq
