// tc_config.cuh: tile configurations and shared-memory addressing of the tensor-core kernel.
// __host__ __device__ so the host reference (emu/host_ref.cpp) lays out and reads shared memory exactly as the
// kernel does.
#pragma once

#include "layout.cuh"

namespace rtnq {

// One CTA = 8 warps computes a BM x BN output tile over a range of k (its split-K share).
// Warps form WN column groups (64 columns each, one Marlin block) x WK k groups; warp (wn, wk) handles
// slabs wk, wk + WK, ... of every KS-slab pipeline stage, and the WK partial sums are added in shared
// memory at the end (intra-CTA split-K, as Marlin does, so small M still keeps 8 warps busy).
template <int MB_, int WN_, int WK_, int KS_, int STAGES_, int MIN_BLOCKS_>
struct TcCfg {
    static constexpr int MB = MB_;          // 16-row m-blocks per CTA
    static constexpr int WN = WN_;          // column blocks per CTA
    static constexpr int WK = WK_;          // warps sharing one column block along k
    static constexpr int KS = KS_;          // slabs (16 k rows) per pipeline stage
    static constexpr int STAGES = STAGES_;  // cp.async ring depth
    static constexpr int MIN_BLOCKS = MIN_BLOCKS_;
    static constexpr int BM = 16 * MB;
    static constexpr int BN = 64 * WN;
    static constexpr int BK = 16 * KS;
    static constexpr int CPR = BK / 8;       // 16-byte chunks per A row in shared memory
    static constexpr int SROWS = BK / 32;    // scale rows a stage may span (groups are >= 32 rows)
    static_assert(WN * WK == 8, "8 warps");
    static_assert(KS % WK == 0, "each warp gets the same number of slabs per stage");
    static_assert(CPR >= 8, "the XOR swizzle permutes 8 chunks");
};

// M <= 16: a tall-k tile (128 k x 128 n) so a stage still carries 8 KiB of 4-bit weights.
template <int BITS>
using TcSmall = TcCfg<1, 2, 4, 8, BITS == 4 ? 4 : 3, 2>;
// M 17..32 and 33..: 64 k x 256 n stages with 2 or 4 m-blocks.
template <int BITS>
using TcMid = TcCfg<2, 4, 2, 4, BITS == 4 ? 4 : 3, 1>;
template <int BITS>
using TcLarge = TcCfg<4, 4, 2, 4, BITS == 4 ? 4 : 3, 1>;

// Shared memory of one stage: [A: BM x BK halves, swizzled][B: KS x WN blocks][scales: SROWS x BN].
template <int BITS, class C>
struct TcSmem {
    static constexpr int A_BYTES = C::BM * C::BK * 2;
    static constexpr int B_INT4 = C::KS * C::WN * Bits<BITS>::kInt4PerBlock;
    static constexpr int B_BYTES = B_INT4 * 16;
    static constexpr int S_BYTES = C::SROWS * C::BN * 2;
    static constexpr int STAGE = A_BYTES + B_BYTES + S_BYTES;
    static constexpr int PIPE = STAGE * C::STAGES;
    static constexpr int RED_FLOATS = (C::WK - 1) * C::WN * 32 * C::MB * 32;  // warps wk > 0 park their sums
    static constexpr int RED = RED_FLOATS * 4;
    static constexpr int TOTAL = PIPE > RED ? PIPE : RED;
    static_assert(A_BYTES % 16 == 0 && B_BYTES % 16 == 0 && S_BYTES % 16 == 0, "16-byte aligned regions");
};

// A tile: chunk ch (8 k values) of row r is stored at chunk ch ^ (r & 7) of that row, so the 8 rows read by
// one ldmatrix phase, and the 16-byte cp.async writes of a warp, fall into 8 different bank groups.
RTNQ_HD int a_chunk_index(int row, int ch, int cpr) { return row * cpr + (ch ^ (row & 7)); }

// ldmatrix.x4 row address supplied by `lane` for m-block mb and slab kk of a stage: tile j = lane / 8 is
// (rows +0 / +8) x (k 0-7 / 8-15) in the order a0-a3 of the m16n8k16 A fragment.
RTNQ_HD void a_ldsm_src(int lane, int mb, int kk, int &row, int &ch) {
    const int j = lane >> 3;
    row = mb * 16 + (j & 1) * 8 + (lane & 7);
    ch = 2 * kk + (j >> 1);
}

// B tile: int4 slot of global vector l (0 .. kInt4PerBlock-1) of column block wb in slab kk. 8-bit lanes own
// two consecutive vectors (2L, 2L+1); they are split into two 32-vector halves so that each of the lane's
// two 16-byte shared loads is a consecutive, conflict-free warp access.
template <int BITS>
RTNQ_HD int b_smem_index(int kk, int wb, int l, int wn_count) {
    const int base = (kk * wn_count + wb) * Bits<BITS>::kInt4PerBlock;
    return BITS == 4 ? base + l : base + (l & 1) * 32 + (l >> 1);
}
// Lane's vector i of (kk, wn): b_smem_index(kk, wn, lane * kInt4PerLane + i) == this.
template <int BITS>
RTNQ_HD int b_smem_lane(int kk, int wn, int lane, int i, int wn_count) {
    return (kk * wn_count + wn) * Bits<BITS>::kInt4PerBlock + i * 32 + lane;
}

// Split a range of `total` units into `parts` nearly equal contiguous pieces; piece `p` is [begin, end).
RTNQ_HD int64_t split_begin(int64_t total, int64_t p, int64_t parts) { return total * p / parts; }

// Launch grids, shared by the launchers and the host emulator (cuda/emu).
struct Grid3 {
    int64_t x, y, z;
};
// Small-M kernel: (64-column blocks, k-splits, chunks of `rows` rows of x).
RTNQ_HD Grid3 small_m_grid(int64_t m, int64_t n, int rows, int splits) {
    return Grid3{n / kBlockN, splits, (m + rows - 1) / rows};
}
// Tensor-core kernel: (m-tiles, column tiles of WN blocks, k-splits).
template <class C>
RTNQ_HD Grid3 tc_grid(int64_t m, int64_t n, int splits) {
    return Grid3{(m + C::BM - 1) / C::BM, (n / kBlockN + C::WN - 1) / C::WN, splits};
}

// Which tile configuration the tensor-core path uses for m rows: 0 = TcSmall, 1 = TcMid, 2 = TcLarge.
RTNQ_HD int tc_config_index(int64_t m) { return m <= 16 ? 0 : m <= 32 ? 1 : 2; }

// Rows of x each small-M CTA covers.
RTNQ_HD int small_m_rows(int64_t m) { return m <= 1 ? 1 : m == 2 ? 2 : m <= 4 ? 4 : 8; }

}  // namespace rtnq
