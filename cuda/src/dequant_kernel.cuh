// dequant_kernel.cuh: Marlin layout -> dense fp16/bf16, (k, n) or (n, k). Bit-exact with rtn.dequantize(unpack()).
//
// One CTA = 8 warps = one 128 x 64 tile of B (8 slabs of one column block). Each warp reads its slab's
// block with one (4-bit) or two (8-bit) 16-byte loads per lane, decodes 32 values per lane into a
// shared-memory tile, and the CTA writes the tile back with 16-byte coalesced stores in either layout.
// Grid: (n / 64, k / 128), 256 threads.
#pragma once

#include "../include/rtnq_cuda.h"
#include "device.cuh"

namespace rtnq {
namespace dequant {

constexpr int kWarps = 8;                // slabs per CTA
constexpr int kTileK = kWarps * kTile;   // 128 k rows per CTA
constexpr int kPitchKN = kBlockN + 8;    // (k, n) tile row: 72 values = 144 B (16-byte aligned; rows 2t apart
                                         // land in different banks, so a warp's 2-byte stores do not conflict)
constexpr int kPitchNK = kTileK + 8;     // (n, k) tile row: 136 values = 272 B (16-byte aligned, skews banks)
constexpr int kSmemElems = kTileK * kPitchKN > kBlockN * kPitchNK ? kTileK * kPitchKN : kBlockN * kPitchNK;

template <int BITS, typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const int4 *__restrict__ qweight, const T *__restrict__ scales,
                                                      T *__restrict__ out, int64_t n, int64_t k, int group_size,
                                                      int channelwise, int layout) {
    __shared__ __align__(16) T tile[kSmemElems];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int t = lane & 3, c = lane >> 2;
    const int64_t nb = blockIdx.x;
    const int64_t kt = static_cast<int64_t>(blockIdx.y) * kWarps + warp;

    // The lane's words: WORDS consecutive int32 of its block.
    uint32_t w[Bits<BITS>::kWords];
    const int4 *src = qweight + lane_int4_offset<BITS>(kt, nb, lane, n);
#pragma unroll
    for (int i = 0; i < Bits<BITS>::kInt4PerLane; ++i) {
        const int4 v = load_stream(src + i);
        w[4 * i + 0] = static_cast<uint32_t>(v.x);
        w[4 * i + 1] = static_cast<uint32_t>(v.y);
        w[4 * i + 2] = static_cast<uint32_t>(v.z);
        w[4 * i + 3] = static_cast<uint32_t>(v.w);
    }
    // The lane's 8 scales (columns 8*ci + c of the block), for the slab's group.
    T s8[8];
    if (channelwise) {
#pragma unroll
        for (int ci = 0; ci < 8; ++ci) s8[ci] = scales[scale_pos_single(nb * kBlockN + 8 * ci + c)];
    } else {
        const int64_t g = kt * kTile / group_size;  // groups are >= 16 rows, so a slab has one group
        const int4 v = *reinterpret_cast<const int4 *>(scales + g * n + nb * kBlockN + 8 * c);
        memcpy(s8, &v, sizeof(v));
    }

#pragma unroll
    for (int v = 0; v < 32; ++v) {
        const int row = warp * kTile + 2 * t + value_row<BITS>(v);  // k row inside the 128-row tile
        const int col = 8 * value_ci<BITS>(v) + c;                  // column inside the 64-column block
        const T val = dequant_exact<T>(value_code<BITS>(w, v) - Bits<BITS>::kBias, s8[value_ci<BITS>(v)]);
        if (layout == RTNQ_LAYOUT_KN)
            tile[row * kPitchKN + col] = val;
        else
            tile[col * kPitchNK + row] = val;
    }
    __syncthreads();

    const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kTileK;
    if (layout == RTNQ_LAYOUT_KN) {
        // 128 rows x 8 vectors; 8 consecutive threads write one contiguous 128-byte row segment.
        for (int i = threadIdx.x; i < kTileK * 8; i += blockDim.x) {
            const int r = i >> 3, ch = i & 7;
            const int4 v = *reinterpret_cast<const int4 *>(&tile[r * kPitchKN + ch * 8]);
            *reinterpret_cast<int4 *>(out + (k0 + r) * n + nb * kBlockN + ch * 8) = v;
        }
    } else {
        // 64 rows (output features) x 16 vectors of 8 k values; 256 contiguous bytes per row.
        for (int i = threadIdx.x; i < kBlockN * 16; i += blockDim.x) {
            const int r = i >> 4, ch = i & 15;
            const int4 v = *reinterpret_cast<const int4 *>(&tile[r * kPitchNK + ch * 8]);
            *reinterpret_cast<int4 *>(out + (nb * kBlockN + r) * k + k0 + ch * 8) = v;
        }
    }
}

}  // namespace dequant
}  // namespace rtnq
