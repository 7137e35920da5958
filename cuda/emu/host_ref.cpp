// host_ref.cpp: CPU references of the three kernels, built from the same layout helpers (layout.cuh,
// tc_config.cuh) the kernels use. CI has no GPU, so these are how the decode arithmetic, the fragment
// bookkeeping and the shared-memory addressing get executed and checked against rtnq.marlin/rtnq.rtn.
// Test-only: linked into build/librtnq_emu.so (declarations in host_ref.h), never into librtnq_cuda.so.
//
// The tensor-core emulator models the warp-collective instructions from their PTX ISA definitions:
//   ldmatrix .x4 .b16: lanes 8j..8j+7 supply the 8 row addresses of tile j; lane l receives, in register j,
//     row l/4, elements 2(l%4) and 2(l%4)+1 of tile j.
//   mma m16n8k16 (f16/bf16 -> f32): mma_model.h, the model the SIMT emulator uses too.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../src/common.cuh"
#include "../src/tc_config.cuh"
#include "host_ref.h"
#include "mma_model.h"

using namespace rtnq;

// fail() and clear_error() (common.cuh) are defined by api.cu, which only the production library links; the
// references keep their own thread-local detail here, read back with rtnq_host_last_error().
namespace rtnq {
namespace {
thread_local char g_host_error[512] = "";
}

void clear_error() { g_host_error[0] = '\0'; }

int fail(int status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_host_error, sizeof(g_host_error), fmt, ap);
    va_end(ap);
    return status;
}
}  // namespace rtnq

namespace {

template <typename T2, typename T>
void split_pair(T2 v, T &lo, T &hi) {
    const uint32_t u = bit_cast<uint32_t>(v);
    lo = bit_cast<T>(static_cast<uint16_t>(u & 0xFFFF));
    hi = bit_cast<T>(static_cast<uint16_t>(u >> 16));
}

template <int BITS>
void lane_words(const int32_t *qweight, int64_t kt, int64_t nb, int lane, int64_t n, uint32_t *w) {
    memcpy(w, qweight + 4 * lane_int4_offset<BITS>(kt, nb, lane, n), Bits<BITS>::kWords * 4);
}

template <typename T>
void lane_scales(const T *scales, const Groups &g, int64_t kt, int64_t nb, int c, int64_t n, T *s8) {
    for (int ci = 0; ci < 8; ++ci) {
        const int64_t col = nb * kBlockN + 8 * ci + c;
        s8[ci] = g.channelwise ? scales[scale_pos_single(col)]
                               : scales[(kt * kTile / g.size) * n + scale_pos_grouped(col)];
    }
}

// ---- Dequantize ------------------------------------------------------------------------------------------
template <int BITS, typename T>
void host_dequant(const int32_t *qweight, const T *scales, T *out, int64_t n, int64_t k, Groups g, int layout,
                  int variant) {
    using T2 = typename Elem<T>::T2;
    auto put = [&](int64_t row, int64_t col, T v) {
        if (layout == RTNQ_LAYOUT_KN)
            out[row * n + col] = v;
        else
            out[col * k + row] = v;
    };
    for (int64_t kt = 0; kt < k / kTile; ++kt)
        for (int64_t nb = 0; nb < n / kBlockN; ++nb)
            for (int lane = 0; lane < 32; ++lane) {
                const int t = lane & 3, c = lane >> 2;
                uint32_t w[Bits<BITS>::kWords];
                T s8[8];
                lane_words<BITS>(qweight, kt, nb, lane, n, w);
                lane_scales(scales, g, kt, nb, c, n, s8);
                const int64_t row0 = kt * kTile + 2 * t;
                if (variant == 0) {  // the dequantize kernel's arithmetic
                    for (int v = 0; v < 32; ++v) {
                        const int ci = value_ci<BITS>(v);
                        put(row0 + value_row<BITS>(v), nb * kBlockN + 8 * ci + c,
                            dequant_exact<T>(value_code<BITS>(w, v) - Bits<BITS>::kBias, s8[ci]));
                    }
                } else {  // the GEMM kernels' fragments
                    for (int ci = 0; ci < 8; ++ci) {
                        T2 b0, b1;
                        T a, b;
                        b_frag<BITS, T>(w, ci, s8[ci], b0, b1);
                        const int64_t col = nb * kBlockN + 8 * ci + c;
                        split_pair(b0, a, b);
                        put(row0, col, a);
                        put(row0 + 1, col, b);
                        split_pair(b1, a, b);
                        put(row0 + 8, col, a);
                        put(row0 + 9, col, b);
                    }
                }
            }
}

// ---- Small-M emulation (same fp32 operation order as small_m.cu) --------------------------------------------
template <int BITS, typename T>
void host_small_m(const T *x, const int32_t *qweight, const T *scales, T *out, int64_t m, int64_t n, int64_t k,
                  Groups g, int splits) {
    using T2 = typename Elem<T>::T2;
    const int MT = small_m_rows(m);
    const int64_t slabs = k / kTile, mchunks = ceil_div(m, MT);
    std::vector<float> slots(static_cast<size_t>(splits) * MT * kBlockN);
    std::vector<float> red(static_cast<size_t>(8) * MT * kBlockN);
    std::vector<float> acc(static_cast<size_t>(32) * MT * 8), tmp(acc.size());
    for (int64_t z = 0; z < mchunks; ++z)
        for (int64_t nb = 0; nb < n / kBlockN; ++nb) {
            const int64_t m0 = z * MT;
            for (int split = 0; split < splits; ++split) {
                const int64_t cta_begin = split_begin(slabs, split, splits), cta_end = split_begin(slabs, split + 1, splits);
                for (int warp = 0; warp < 8; ++warp) {
                    const int64_t begin = cta_begin + (cta_end - cta_begin) * warp / 8;
                    const int64_t end = cta_begin + (cta_end - cta_begin) * (warp + 1) / 8;
                    std::fill(acc.begin(), acc.end(), 0.f);
                    for (int lane = 0; lane < 32; ++lane) {
                        const int t = lane & 3, c = lane >> 2;
                        float *a = &acc[static_cast<size_t>(lane) * MT * 8];
                        for (int64_t slab = begin; slab < end; ++slab) {
                            uint32_t w[Bits<BITS>::kWords];
                            T s8[8];
                            lane_words<BITS>(qweight, slab, nb, lane, n, w);
                            lane_scales(scales, g, slab, nb, c, n, s8);
                            float2 lo[8], hi[8];
                            for (int ci = 0; ci < 8; ++ci) {
                                T2 b0, b1;
                                b_frag<BITS, T>(w, ci, s8[ci], b0, b1);
                                lo[ci] = to_float2(b0);
                                hi[ci] = to_float2(b1);
                            }
                            for (int i = 0; i < MT; ++i) {
                                if (m0 + i >= m) continue;
                                const T *xp = x + (m0 + i) * k + slab * kTile + 2 * t;
                                const float xa0 = to_float(xp[0]), xa1 = to_float(xp[1]);
                                const float xb0 = to_float(xp[8]), xb1 = to_float(xp[9]);
                                for (int ci = 0; ci < 8; ++ci) {
                                    float s = a[i * 8 + ci];
                                    s = fmaf(xa0, lo[ci].x, s);
                                    s = fmaf(xa1, lo[ci].y, s);
                                    s = fmaf(xb0, hi[ci].x, s);
                                    s = fmaf(xb1, hi[ci].y, s);
                                    a[i * 8 + ci] = s;
                                }
                            }
                        }
                    }
                    // __shfl_xor butterfly over lane bits 0 and 1
                    for (int mask = 1; mask <= 2; mask <<= 1) {
                        for (int lane = 0; lane < 32; ++lane)
                            for (int j = 0; j < MT * 8; ++j)
                                tmp[lane * MT * 8 + j] = acc[lane * MT * 8 + j] + acc[(lane ^ mask) * MT * 8 + j];
                        acc.swap(tmp);
                    }
                    for (int lane = 0; lane < 32; ++lane)
                        for (int i = 0; i < MT; ++i)
                            for (int ci = 0; ci < 8; ++ci)
                                if ((ci >> 1) == (lane & 3))
                                    red[(static_cast<size_t>(warp) * MT + i) * kBlockN + 8 * ci + (lane >> 2)] =
                                        acc[lane * MT * 8 + i * 8 + ci];
                }
                for (int idx = 0; idx < MT * kBlockN; ++idx) {
                    const int i = idx / kBlockN, col = idx % kBlockN;
                    float v = 0.f;
                    for (int wi = 0; wi < 8; ++wi) v += red[(static_cast<size_t>(wi) * MT + i) * kBlockN + col];
                    if (splits == 1) {
                        if (m0 + i < m) out[(m0 + i) * n + nb * kBlockN + col] = from_float<T>(v);
                    } else {
                        slots[static_cast<size_t>(split) * MT * kBlockN + idx] = v;
                    }
                }
            }
            if (splits == 1) continue;
            for (int idx = 0; idx < MT * kBlockN; ++idx) {
                const int i = idx / kBlockN, col = idx % kBlockN;
                if (m0 + i >= m) continue;
                float s = 0.f;
                for (int sp = 0; sp < splits; ++sp) s += slots[static_cast<size_t>(sp) * MT * kBlockN + idx];
                out[(m0 + i) * n + nb * kBlockN + col] = from_float<T>(s);
            }
        }
}

// ---- Tensor-core emulation ----------------------------------------------------------------------------------
template <int BITS, typename T, class C>
void host_tc(const T *x, const int32_t *qweight, const T *scales, T *out, int64_t m, int64_t n, int64_t k, Groups g,
             int splits) {
    using S = TcSmem<BITS, C>;
    using T2 = typename Elem<T>::T2;
    constexpr int IPB = Bits<BITS>::kInt4PerBlock;
    constexpr int NV = Bits<BITS>::kInt4PerLane;
    constexpr int NW = Bits<BITS>::kWords;
    constexpr int PER = C::MB * 8 * 4;
    constexpr int SLOT = C::BM * C::BN;
    const int64_t mtiles = ceil_div(m, C::BM), ntiles = ceil_div(n / kBlockN, C::WN), iters = k / C::BK;
    const int64_t row_int4 = n * BITS / 8;
    const unsigned char *xq = reinterpret_cast<const unsigned char *>(x);
    const unsigned char *wq = reinterpret_cast<const unsigned char *>(qweight);
    const unsigned char *sq = reinterpret_cast<const unsigned char *>(scales);
    std::vector<unsigned char> st(S::STAGE);
    std::vector<float> slots(static_cast<size_t>(splits) * SLOT);
    // acc[warp][lane][mb][ci][e]
    std::vector<float> acc(static_cast<size_t>(8) * 32 * PER);
    auto A = [&](int warp, int lane, int mb, int ci) { return &acc[((static_cast<size_t>(warp) * 32 + lane) * C::MB + mb) * 32 + ci * 4]; };

    for (int64_t bx = 0; bx < mtiles; ++bx)
        for (int64_t by = 0; by < ntiles; ++by) {
            const int64_t m0 = bx * C::BM, nb0 = by * C::WN;
            const int valid_wn = static_cast<int>(std::min<int64_t>(C::WN, n / kBlockN - nb0));
            for (int split = 0; split < splits; ++split) {
                const int64_t it_begin = split_begin(iters, split, splits), it_end = split_begin(iters, split + 1, splits);
                std::fill(acc.begin(), acc.end(), 0.f);
                for (int64_t it = it_begin; it < it_end; ++it) {
                    const int64_t kt0 = it * C::KS;
                    std::fill(st.begin(), st.end(), static_cast<unsigned char>(0xA5));  // never-written bytes stand out
                    for (int i = 0; i < C::BM * C::CPR; ++i) {
                        const int row = i / C::CPR, ch = i % C::CPR;
                        unsigned char *dst = &st[a_chunk_index(row, ch, C::CPR) * 16];
                        if (m0 + row < m)
                            memcpy(dst, xq + ((m0 + row) * k + kt0 * kTile + ch * 8) * 2, 16);
                        else
                            memset(dst, 0, 16);
                    }
                    for (int i = 0; i < S::B_INT4; ++i) {
                        const int kk = i / (C::WN * IPB), q = i % (C::WN * IPB), wb = q / IPB, l = q % IPB;
                        if (wb < valid_wn)
                            memcpy(&st[S::A_BYTES + b_smem_index<BITS>(kk, wb, l, C::WN) * 16],
                                   wq + ((kt0 + kk) * row_int4 + (nb0 + wb) * IPB + l) * 16, 16);
                    }
                    if (!g.channelwise) {
                        const int64_t g0 = kt0 * kTile / g.size;
                        const int64_t rows = ((kt0 + C::KS) * kTile - 1) / g.size - g0 + 1;
                        for (int i = 0; i < C::SROWS * (C::BN / 8); ++i) {
                            const int r = i / (C::BN / 8), ch = i % (C::BN / 8);
                            if (r < rows && ch * 8 < valid_wn * kBlockN)
                                memcpy(&st[S::A_BYTES + S::B_BYTES + (r * C::BN + ch * 8) * 2],
                                       sq + ((g0 + r) * n + nb0 * kBlockN + ch * 8) * 2, 16);
                        }
                    }
                    for (int warp = 0; warp < 8; ++warp) {
                        const int wn = warp % C::WN, wk = warp / C::WN;
                        if (wn >= valid_wn) continue;
                        for (int kk0 = 0; kk0 < C::KS; kk0 += C::WK) {
                            const int kk = kk0 + wk;
                            uint32_t w[32][NW], a[32][C::MB][4];
                            T s8[32][8];
                            for (int lane = 0; lane < 32; ++lane) {
                                const int c = lane >> 2;
                                for (int i = 0; i < NV; ++i)
                                    memcpy(&w[lane][4 * i], &st[S::A_BYTES + b_smem_lane<BITS>(kk, wn, lane, i, C::WN) * 16], 16);
                                for (int ci = 0; ci < 8; ++ci) {
                                    if (g.channelwise) {
                                        s8[lane][ci] = scales[scale_pos_single((nb0 + wn) * kBlockN + 8 * ci + c)];
                                    } else {
                                        const int r = static_cast<int>((kt0 + kk) * kTile / g.size - kt0 * kTile / g.size);
                                        memcpy(&s8[lane][ci], &st[S::A_BYTES + S::B_BYTES + (r * C::BN + wn * kBlockN + 8 * c + ci) * 2], 2);
                                    }
                                }
                                for (int mb = 0; mb < C::MB; ++mb)
                                    for (int j = 0; j < 4; ++j) {  // ldmatrix: register j comes from tile j
                                        int row, ch;
                                        a_ldsm_src(8 * j + (lane >> 2), mb, kk, row, ch);
                                        memcpy(&a[lane][mb][j], &st[a_chunk_index(row, ch, C::CPR) * 16 + 4 * (lane & 3)], 4);
                                    }
                            }
                            for (int ci = 0; ci < 8; ++ci) {
                                uint32_t u0[32], u1[32];
                                for (int lane = 0; lane < 32; ++lane) {
                                    T2 b0, b1;
                                    b_frag<BITS, T>(w[lane], ci, s8[lane][ci], b0, b1);
                                    u0[lane] = bit_cast<uint32_t>(b0);
                                    u1[lane] = bit_cast<uint32_t>(b1);
                                }
                                for (int mb = 0; mb < C::MB; ++mb) {
                                    rtnq_emu::MmaLane op[32];
                                    for (int lane = 0; lane < 32; ++lane) {
                                        memcpy(op[lane].a, a[lane][mb], sizeof(op[lane].a));
                                        op[lane].b0 = u0[lane];
                                        op[lane].b1 = u1[lane];
                                        memcpy(op[lane].d, A(warp, lane, mb, ci), sizeof(op[lane].d));
                                    }
                                    rtnq_emu::mma_m16n8k16(op, std::is_same<T, __nv_bfloat16>::value);
                                    for (int lane = 0; lane < 32; ++lane) memcpy(A(warp, lane, mb, ci), op[lane].d, sizeof(op[lane].d));
                                }
                            }
                        }
                    }
                }
                // Intra-CTA: warp (wn, 0) adds warps (wn, 1..WK-1) in order.
                for (int wn = 0; wn < valid_wn; ++wn)
                    for (int w2 = 1; w2 < C::WK; ++w2)
                        for (int lane = 0; lane < 32; ++lane)
                            for (int j = 0; j < PER; ++j)
                                acc[(static_cast<size_t>(wn) * 32 + lane) * PER + j] +=
                                    acc[(static_cast<size_t>(w2 * C::WN + wn) * 32 + lane) * PER + j];
                for (int wn = 0; wn < valid_wn; ++wn)
                    for (int lane = 0; lane < 32; ++lane)
                        for (int mb = 0; mb < C::MB; ++mb)
                            for (int ci = 0; ci < 8; ++ci) {
                                const float *v = A(wn, lane, mb, ci);
                                const int c = lane >> 2, t = lane & 3;
                                for (int e = 0; e < 4; ++e) {
                                    const int r = mb * 16 + c + 8 * (e >> 1);
                                    const int col = wn * kBlockN + ci * 8 + 2 * t + (e & 1);
                                    if (splits == 1) {
                                        if (m0 + r < m) out[(m0 + r) * n + nb0 * kBlockN + col] = from_float<T>(v[e]);
                                    } else {
                                        slots[static_cast<size_t>(split) * SLOT + r * C::BN + col] = v[e];
                                    }
                                }
                            }
            }
            if (splits == 1) continue;
            for (int r = 0; r < C::BM; ++r)
                for (int col = 0; col < valid_wn * kBlockN; ++col) {
                    if (m0 + r >= m) continue;
                    float s = 0.f;
                    for (int sp = 0; sp < splits; ++sp) s += slots[static_cast<size_t>(sp) * SLOT + r * C::BN + col];
                    out[(m0 + r) * n + nb0 * kBlockN + col] = from_float<T>(s);
                }
        }
}

template <int BITS, typename T>
void host_tc_typed(const T *x, const int32_t *qw, const T *s, T *out, int64_t m, int64_t n, int64_t k, Groups g,
                   int splits) {
    switch (tc_config_index(m)) {
        case 0: host_tc<BITS, T, TcSmall<BITS>>(x, qw, s, out, m, n, k, g, splits); break;
        case 1: host_tc<BITS, T, TcMid<BITS>>(x, qw, s, out, m, n, k, g, splits); break;
        default: host_tc<BITS, T, TcLarge<BITS>>(x, qw, s, out, m, n, k, g, splits); break;
    }
}

int check_host(const void *qweight, const void *scales, const void *out, int64_t n, int64_t k, int32_t bits,
               int32_t group_size, int32_t dtype, Groups *g) {
    if (!qweight || !scales || !out) return fail(RTNQ_ERR_INVALID_VALUE, "qweight, scales and out must not be NULL");
    if (bits != 4 && bits != 8) return fail(RTNQ_ERR_INVALID_VALUE, "bits must be 4 or 8, got %d", bits);
    if (dtype != RTNQ_FLOAT16 && dtype != RTNQ_BFLOAT16) return fail(RTNQ_ERR_INVALID_VALUE, "dtype must be 0 or 1, got %d", dtype);
    if (group_size != -1 && group_size != 32 && group_size != 64 && group_size != 128)
        return fail(RTNQ_ERR_INVALID_VALUE, "group_size must be 32, 64, 128 or -1 (channelwise), got %d", group_size);
    if (n <= 0 || k <= 0 || n % kBlockN || k % kMinK)
        return fail(RTNQ_ERR_SHAPE, "n=%lld, k=%lld: need n %% 64 == 0 and k %% 128 == 0", (long long)n, (long long)k);
    *g = make_groups(k, group_size);
    return RTNQ_OK;
}

}  // namespace

extern "C" {

RTNQ_API const char *rtnq_host_last_error(void) { return g_host_error; }

RTNQ_API int rtnq_host_dequantize(const void *qweight, const void *scales, void *out, int64_t n, int64_t k,
                                  int32_t bits, int32_t group_size, int32_t dtype, int32_t layout, int32_t variant) {
    clear_error();
    Groups g;
    int st = check_host(qweight, scales, out, n, k, bits, group_size, dtype, &g);
    if (st != RTNQ_OK) return st;
    if (layout != RTNQ_LAYOUT_KN && layout != RTNQ_LAYOUT_NK) return fail(RTNQ_ERR_INVALID_VALUE, "layout must be 0 or 1, got %d", layout);
    if (variant != 0 && variant != 1) return fail(RTNQ_ERR_INVALID_VALUE, "variant must be 0 or 1, got %d", variant);
    const int32_t *qw = static_cast<const int32_t *>(qweight);
    if (dtype == RTNQ_BFLOAT16) {
        auto *s = static_cast<const __nv_bfloat16 *>(scales);
        auto *o = static_cast<__nv_bfloat16 *>(out);
        bits == 4 ? host_dequant<4>(qw, s, o, n, k, g, layout, variant) : host_dequant<8>(qw, s, o, n, k, g, layout, variant);
    } else {
        auto *s = static_cast<const __half *>(scales);
        auto *o = static_cast<__half *>(out);
        bits == 4 ? host_dequant<4>(qw, s, o, n, k, g, layout, variant) : host_dequant<8>(qw, s, o, n, k, g, layout, variant);
    }
    return RTNQ_OK;
}

RTNQ_API int rtnq_host_gemm_small_m(const void *x, const void *qweight, const void *scales, void *out, int64_t m,
                                    int64_t n, int64_t k, int32_t bits, int32_t group_size, int32_t dtype,
                                    int32_t splits) {
    clear_error();
    Groups g;
    int st = check_host(qweight, scales, out, n, k, bits, group_size, dtype, &g);
    if (st != RTNQ_OK) return st;
    if (!x || m <= 0) return fail(RTNQ_ERR_INVALID_VALUE, "x must not be NULL and m must be positive");
    if (splits < 1 || splits > k / kTile) return fail(RTNQ_ERR_INVALID_VALUE, "splits must be in 1 .. k/16, got %d", splits);
    const int32_t *qw = static_cast<const int32_t *>(qweight);
    if (dtype == RTNQ_BFLOAT16) {
        auto *xx = static_cast<const __nv_bfloat16 *>(x);
        auto *s = static_cast<const __nv_bfloat16 *>(scales);
        auto *o = static_cast<__nv_bfloat16 *>(out);
        bits == 4 ? host_small_m<4>(xx, qw, s, o, m, n, k, g, splits) : host_small_m<8>(xx, qw, s, o, m, n, k, g, splits);
    } else {
        auto *xx = static_cast<const __half *>(x);
        auto *s = static_cast<const __half *>(scales);
        auto *o = static_cast<__half *>(out);
        bits == 4 ? host_small_m<4>(xx, qw, s, o, m, n, k, g, splits) : host_small_m<8>(xx, qw, s, o, m, n, k, g, splits);
    }
    return RTNQ_OK;
}

RTNQ_API int rtnq_host_gemm_tensor_core(const void *x, const void *qweight, const void *scales, void *out,
                                        int64_t m, int64_t n, int64_t k, int32_t bits, int32_t group_size,
                                        int32_t dtype, int32_t splits) {
    clear_error();
    Groups g;
    int st = check_host(qweight, scales, out, n, k, bits, group_size, dtype, &g);
    if (st != RTNQ_OK) return st;
    if (!x || m <= 0) return fail(RTNQ_ERR_INVALID_VALUE, "x must not be NULL and m must be positive");
    if (splits < 1 || splits > k / 64) return fail(RTNQ_ERR_INVALID_VALUE, "splits must be in 1 .. k/64, got %d", splits);
    const int32_t *qw = static_cast<const int32_t *>(qweight);
    if (dtype == RTNQ_BFLOAT16) {
        auto *xx = static_cast<const __nv_bfloat16 *>(x);
        auto *s = static_cast<const __nv_bfloat16 *>(scales);
        auto *o = static_cast<__nv_bfloat16 *>(out);
        bits == 4 ? host_tc_typed<4>(xx, qw, s, o, m, n, k, g, splits) : host_tc_typed<8>(xx, qw, s, o, m, n, k, g, splits);
    } else {
        auto *xx = static_cast<const __half *>(x);
        auto *s = static_cast<const __half *>(scales);
        auto *o = static_cast<__half *>(out);
        bits == 4 ? host_tc_typed<4>(xx, qw, s, o, m, n, k, g, splits) : host_tc_typed<8>(xx, qw, s, o, m, n, k, g, splits);
    }
    return RTNQ_OK;
}

}  // extern "C"
