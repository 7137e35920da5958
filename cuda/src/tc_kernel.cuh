// tc_kernel.cuh: the Marlin-class tensor-core GEMM, out (m, n) = x (m, k) @ dequant(W)^T.
//
// Per CTA (8 warps): a BM x BN output tile, a contiguous range of k (split-K share, grid z). A STAGES-deep
// ring of cp.async copies brings, per KS-slab stage, the x tile (swizzled for ldmatrix), the weight blocks
// (16-byte vectors that already are each lane's B fragments, no ldmatrix needed: the point of the Marlin
// layout) and the scale rows. Each warp decodes its fragments with the magic-number tricks of layout.cuh,
// multiplies by the scale in 16 bit (the reference's rounding) and issues mma.sync m16n8k16 with fp32
// accumulators. The WK warps of a column block are summed in shared memory in fixed order; split-K CTAs
// are summed through the workspace in fixed order (device.cuh). Deterministic for a given problem shape.
#pragma once

#include "common.cuh"
#include "device.cuh"
#include "tc_config.cuh"

namespace rtnq {

template <int BITS, typename T, class C>
__global__ void __launch_bounds__(256, C::MIN_BLOCKS)
    tc_kernel(const T *__restrict__ x, const int4 *__restrict__ qweight, const T *__restrict__ scales,
              T *__restrict__ out, float *__restrict__ partials, int *__restrict__ counters, int64_t m, int64_t n,
              int64_t k, int group_size, int channelwise, int splits) {
    using T2 = typename Elem<T>::T2;
    using S = TcSmem<BITS, C>;
    constexpr int IPB = Bits<BITS>::kInt4PerBlock;
    constexpr int NV = Bits<BITS>::kInt4PerLane;
    constexpr int NW = Bits<BITS>::kWords;
    RTNQ_DYNAMIC_SMEM(int4, smem_raw);
    unsigned char *smem = reinterpret_cast<unsigned char *>(smem_raw);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int t = lane & 3, c = lane >> 2;
    const int wn = warp % C::WN, wk = warp / C::WN;
    const int64_t m0 = static_cast<int64_t>(blockIdx.x) * C::BM;
    const int64_t nb0 = static_cast<int64_t>(blockIdx.y) * C::WN;
    const int64_t left = n / kBlockN - nb0;
    const int valid_wn = left < C::WN ? static_cast<int>(left) : C::WN;  // n % BN may be nonzero
    const int split = blockIdx.z;
    const int64_t iters = k / C::BK;
    const int64_t it_begin = split_begin(iters, split, splits), it_end = split_begin(iters, split + 1, splits);
    const int64_t row_int4 = n * BITS / 8;
    const uint64_t policy = evict_first_policy();

    auto load_stage = [&](int64_t it, int slot) {
        unsigned char *base = smem + slot * S::STAGE;
        const int64_t kt0 = it * C::KS;
        constexpr int A_CHUNKS = C::BM * C::CPR;
#pragma unroll
        for (int j = 0; j < (A_CHUNKS + 255) / 256; ++j) {
            const int i = tid + j * 256;
            if (i < A_CHUNKS) {
                const int row = i / C::CPR, ch = i % C::CPR;
                const bool valid = m0 + row < m;
                const T *src = x + (valid ? m0 + row : 0) * k + kt0 * kTile + ch * 8;
                cp_async16_zfill(base + a_chunk_index(row, ch, C::CPR) * 16, src, valid);
            }
        }
        constexpr int PER_SLAB = C::WN * IPB;
#pragma unroll
        for (int j = 0; j < (S::B_INT4 + 255) / 256; ++j) {
            const int i = tid + j * 256;
            if (i < S::B_INT4) {
                const int kk = i / PER_SLAB, q = i % PER_SLAB;
                const int wb = q / IPB, l = q % IPB;
                if (wb < valid_wn)
                    cp_async16_policy(base + S::A_BYTES + b_smem_index<BITS>(kk, wb, l, C::WN) * 16,
                                      qweight + (kt0 + kk) * row_int4 + (nb0 + wb) * IPB + l, policy);
            }
        }
        if (!channelwise) {
            const int64_t g0 = kt0 * kTile / group_size;
            const int64_t rows = ((kt0 + C::KS) * kTile - 1) / group_size - g0 + 1;  // <= SROWS
            constexpr int SCH = C::BN / 8;
#pragma unroll
            for (int j = 0; j < (C::SROWS * SCH + 255) / 256; ++j) {
                const int i = tid + j * 256;
                if (i < C::SROWS * SCH) {
                    const int r = i / SCH, ch = i % SCH;
                    if (r < rows && ch * 8 < valid_wn * kBlockN)
                        cp_async16(base + S::A_BYTES + S::B_BYTES + (r * C::BN + ch * 8) * 2,
                                   scales + (g0 + r) * n + nb0 * kBlockN + ch * 8);
                }
            }
        }
    };

    // Channelwise: the lane's 8 column scales never change; keep them in registers.
    T cs[8];
#pragma unroll
    for (int ci = 0; ci < 8; ++ci) cs[ci] = from_float<T>(0.f);
    if (channelwise && wn < valid_wn) {
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) cs[ci] = scales[scale_pos_single((nb0 + wn) * kBlockN + 8 * ci + c)];
    }

    float acc[C::MB][8][4];
#pragma unroll
    for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
        for (int ci = 0; ci < 8; ++ci)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mb][ci][e] = 0.f;

#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
        if (it_begin + s < it_end) load_stage(it_begin + s, s);
        cp_async_commit();  // empty groups keep the group count uniform
    }

    for (int64_t it = it_begin; it < it_end; ++it) {
        cp_async_wait<C::STAGES - 2>();  // this thread's copies of stage `it` have landed
        __syncthreads();                 // ... everyone's have, and everyone is done with stage it - 1
        {
            const int64_t next = it + C::STAGES - 1;
            if (next < it_end) load_stage(next, static_cast<int>((next - it_begin) % C::STAGES));
            cp_async_commit();
        }
        if (wn < valid_wn) {
            const unsigned char *base = smem + static_cast<int>((it - it_begin) % C::STAGES) * S::STAGE;
            const int64_t kt0 = it * C::KS;
#pragma unroll
            for (int kk0 = 0; kk0 < C::KS; kk0 += C::WK) {
                const int kk = kk0 + wk;
                uint32_t w[NW];
#pragma unroll
                for (int i = 0; i < NV; ++i) {
                    const int4 v = reinterpret_cast<const int4 *>(base + S::A_BYTES)[b_smem_lane<BITS>(kk, wn, lane, i, C::WN)];
                    w[4 * i + 0] = static_cast<uint32_t>(v.x);
                    w[4 * i + 1] = static_cast<uint32_t>(v.y);
                    w[4 * i + 2] = static_cast<uint32_t>(v.z);
                    w[4 * i + 3] = static_cast<uint32_t>(v.w);
                }
                T s8[8];
                if (channelwise) {
#pragma unroll
                    for (int ci = 0; ci < 8; ++ci) s8[ci] = cs[ci];
                } else {
                    const int r = static_cast<int>((kt0 + kk) * kTile / group_size - kt0 * kTile / group_size);
                    const int4 v = *reinterpret_cast<const int4 *>(base + S::A_BYTES + S::B_BYTES +
                                                                    (r * C::BN + wn * kBlockN + 8 * c) * 2);
                    memcpy(s8, &v, sizeof(v));
                }
                uint32_t a[C::MB][4];
#pragma unroll
                for (int mb = 0; mb < C::MB; ++mb) {
                    int row, ch;
                    a_ldsm_src(lane, mb, kk, row, ch);
                    ldmatrix_x4(a[mb], base + a_chunk_index(row, ch, C::CPR) * 16);
                }
#pragma unroll
                for (int ci = 0; ci < 8; ++ci) {
                    T2 b0, b1;
                    b_frag<BITS, T>(w, ci, s8[ci], b0, b1);
                    const uint32_t u0 = bit_cast<uint32_t>(b0), u1 = bit_cast<uint32_t>(b1);
#pragma unroll
                    for (int mb = 0; mb < C::MB; ++mb) mma_16816(acc[mb][ci], a[mb], u0, u1, static_cast<T *>(nullptr));
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline buffers are free: reuse them for the intra-CTA reduction

    constexpr int PER = C::MB * 8 * 4;  // accumulators per lane
    float *red = reinterpret_cast<float *>(smem);
    if (wk > 0 && wn < valid_wn) {
        float *dst = red + ((wk - 1) * C::WN + wn) * PER * 32;
#pragma unroll
        for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
            for (int ci = 0; ci < 8; ++ci)
#pragma unroll
                for (int e = 0; e < 4; ++e) dst[((mb * 8 + ci) * 4 + e) * 32 + lane] = acc[mb][ci][e];
    }
    __syncthreads();
    if (wk == 0 && wn < valid_wn) {
        for (int w2 = 1; w2 < C::WK; ++w2) {
            const float *src = red + ((w2 - 1) * C::WN + wn) * PER * 32;
#pragma unroll
            for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
                for (int ci = 0; ci < 8; ++ci)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mb][ci][e] += src[((mb * 8 + ci) * 4 + e) * 32 + lane];
        }
    }

    // C fragment of n8 tile ci, m-block mb: rows c and c + 8, columns 2t and 2t + 1.
    if (splits == 1) {
        if (wk == 0 && wn < valid_wn) {
#pragma unroll
            for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
                for (int ci = 0; ci < 8; ++ci) {
                    const int64_t row = m0 + mb * 16 + c;
                    const int64_t col = (nb0 + wn) * kBlockN + ci * 8 + 2 * t;
                    if (row < m)
                        *reinterpret_cast<T2 *>(out + row * n + col) =
                            pair(from_float<T>(acc[mb][ci][0]), from_float<T>(acc[mb][ci][1]));
                    if (row + 8 < m)
                        *reinterpret_cast<T2 *>(out + (row + 8) * n + col) =
                            pair(from_float<T>(acc[mb][ci][2]), from_float<T>(acc[mb][ci][3]));
                }
        }
        return;
    }

    constexpr int SLOT = C::BM * C::BN;
    const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    float *slots = partials + tile * splits * SLOT;
    if (wk == 0 && wn < valid_wn) {
        float *mine = slots + split * SLOT;
#pragma unroll
        for (int mb = 0; mb < C::MB; ++mb)
#pragma unroll
            for (int ci = 0; ci < 8; ++ci) {
                const int r = mb * 16 + c, col = wn * kBlockN + ci * 8 + 2 * t;
                *reinterpret_cast<float2 *>(mine + r * C::BN + col) = make_float2(acc[mb][ci][0], acc[mb][ci][1]);
                *reinterpret_cast<float2 *>(mine + (r + 8) * C::BN + col) = make_float2(acc[mb][ci][2], acc[mb][ci][3]);
            }
    }
    if (!splitk_arrive(counters + tile, splits)) return;
    for (int i4 = tid; i4 < SLOT / 4; i4 += 256) {
        const int r = i4 * 4 / C::BN, col = i4 * 4 % C::BN;
        if (m0 + r >= m || col >= valid_wn * kBlockN) continue;
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int sp = 0; sp < splits; ++sp) {
            const float4 p = load_partial(slots + sp * SLOT + i4 * 4);
            s.x += p.x;
            s.y += p.y;
            s.z += p.z;
            s.w += p.w;
        }
        T *o = out + (m0 + r) * n + nb0 * kBlockN + col;
        *reinterpret_cast<T2 *>(o) = pair(from_float<T>(s.x), from_float<T>(s.y));
        *reinterpret_cast<T2 *>(o + 2) = pair(from_float<T>(s.z), from_float<T>(s.w));
    }
}

#ifndef RTNQ_EMULATE
template <int BITS, typename T, class C>
int tc_launch(GemmArgs &a) {
    using S = TcSmem<BITS, C>;
    auto kernel = tc_kernel<BITS, T, C>;
    const void *fn = reinterpret_cast<const void *>(kernel);
    const int st = ensure_smem(fn, S::TOTAL, a.dev, "tc_kernel");
    if (st != RTNQ_OK) return st;
    const Grid3 tiles3 = tc_grid<C>(a.m, a.n, 1);
    const int64_t mtiles = tiles3.x, ntiles = tiles3.y;
    if (mtiles > 0x7fffffff || ntiles > 65535)
        return fail(RTNQ_ERR_SHAPE, "m=%lld, n=%lld exceed the tensor-core kernel's grid", (long long)a.m, (long long)a.n);
    const int64_t tiles = mtiles * ntiles;
    const int64_t target = static_cast<int64_t>(a.dev.sm_count) * blocks_per_sm(fn, 256, S::TOTAL, a.dev);
    const int64_t iters = a.k / C::BK;
    const int64_t max_splits = iters / 2 > 1 ? iters / 2 : 1;  // >= 2 stages per split keeps the pipeline useful
    const int splits = plan_splits(tiles, target, max_splits, int64_t(C::BM) * C::BN * 4);
    if (a.dry_run) {
        a.plan_splits = splits;
        a.plan_rows = C::BM;
        return RTNQ_OK;
    }
    const dim3 grid(static_cast<unsigned>(mtiles), static_cast<unsigned>(ntiles), static_cast<unsigned>(splits));
    kernel<<<grid, 256, S::TOTAL, a.stream>>>(
        static_cast<const T *>(a.x), static_cast<const int4 *>(a.qweight), static_cast<const T *>(a.scales),
        static_cast<T *>(a.out), a.partials, a.counters, a.m, a.n, a.k,
        a.groups.channelwise ? 0 : static_cast<int>(a.groups.size), a.groups.channelwise ? 1 : 0, splits);
    return check_launch("tc_kernel");
}

template <int BITS, typename T>
int tc_launch_typed(GemmArgs &a) {
    switch (tc_config_index(a.m)) {
        case 0: return tc_launch<BITS, T, TcSmall<BITS>>(a);
        case 1: return tc_launch<BITS, T, TcMid<BITS>>(a);
        default: return tc_launch<BITS, T, TcLarge<BITS>>(a);
    }
}
#endif  // !RTNQ_EMULATE

}  // namespace rtnq
