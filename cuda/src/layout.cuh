// layout.cuh: the Marlin layout facts and the dequantization arithmetic, as __host__ __device__ helpers.
//
// Every kernel decodes weights through these functions and the host references (emu/host_ref.cpp) call the
// very same ones, so CI checks this arithmetic on the CPU against rtnq.marlin.unpack + rtnq.rtn.
//
// Layout recap (FORMATS.md 3.3): qweight row kt holds 16 rows of B = W^T; each 16 x 64 column block nb
// is 128 (4-bit) or 256 (8-bit) consecutive int32. Lane L (t = L % 4, c = L / 4) owns WORDS = 4 or 8
// consecutive words of a block, starting at word L * WORDS. Those words hold k rows
// {2t, 2t+1, 2t+8, 2t+9} of the 8 columns 8*ci + c (ci = 0..7): exactly the B fragments of eight
// m16n8k16 tensor-core tiles. ci is called the lane's "n8 tile".
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define RTNQ_HD __host__ __device__ __forceinline__

namespace rtnq {

constexpr int kTile = 16;    // k rows per qweight row (one slab)
constexpr int kBlockN = 64;  // columns per permuted block
constexpr int kMinK = 128;   // k must be a multiple of this (the converter's gate)

template <int BITS>
struct Bits {
    static_assert(BITS == 4 || BITS == 8, "4 or 8 bit");
    static constexpr int kWords = BITS == 4 ? 4 : 8;          // int32 words per lane per block
    static constexpr int kInt4PerLane = kWords / 4;           // 16-byte vectors per lane per block
    static constexpr int kInt4PerBlock = 32 * kInt4PerLane;   // 16-byte vectors per 16 x 64 block
    static constexpr int kBias = BITS == 4 ? 8 : 128;
};

// Element types: storage type T and its pair type T2 (one 32-bit register).
template <typename T>
struct Elem;
template <>
struct Elem<__half> {
    using T2 = __half2;
};
template <>
struct Elem<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
};

// Bit-cast through memcpy: well defined on host and device, compiles to a register move.
template <typename To, typename From>
RTNQ_HD To bit_cast(const From &from) {
    static_assert(sizeof(To) == sizeof(From), "same size");
    To to;
    memcpy(static_cast<void *>(&to), static_cast<const void *>(&from), sizeof(To));
    return to;
}

RTNQ_HD float to_float(__half v) { return __half2float(v); }
RTNQ_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
RTNQ_HD T from_float(float v);
template <>
RTNQ_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
RTNQ_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

RTNQ_HD float2 to_float2(__half2 v) { return make_float2(__low2float(v), __high2float(v)); }
RTNQ_HD float2 to_float2(__nv_bfloat162 v) { return make_float2(__low2float(v), __high2float(v)); }

RTNQ_HD __half2 pair(__half a, __half b) { return __halves2half2(a, b); }
RTNQ_HD __nv_bfloat162 pair(__nv_bfloat16 a, __nv_bfloat16 b) { return __halves2bfloat162(a, b); }

// Byte permute (PRMT): result byte i = byte sel[i] of the 8-byte value {hi:lo}. One instruction on device.
RTNQ_HD uint32_t byte_perm(uint32_t lo, uint32_t hi, uint32_t sel) {
#ifdef __CUDA_ARCH__
    return __byte_perm(lo, hi, sel);
#else
    const uint64_t v = (static_cast<uint64_t>(hi) << 32) | lo;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
#endif
}

// ---- Scale positions -------------------------------------------------------------------------------
// Position of plain column p's scale inside one Marlin-permuted scale row (FORMATS.md 4.1).
// Grouped table: an 8 x 8 transpose in each 64-chunk, so a lane's 8 scales (columns 8*ci + c) sit at
// 8c .. 8c+7: one 16-byte load.
RTNQ_HD int64_t scale_pos_grouped(int64_t p) { return (p & ~int64_t(63)) + 8 * (p & 7) + ((p & 63) >> 3); }
// Single-row (channelwise) table: out[32m + 8i + s] = in[32m + 2i + off[s]], off = (0,1,8,9,16,17,24,25).
RTNQ_HD int64_t scale_pos_single(int64_t p) {
    const int q = static_cast<int>(p & 31);
    return (p & ~int64_t(31)) + 8 * ((q & 7) >> 1) + 2 * (q >> 3) + (q & 1);
}

// Scale geometry of a problem: channelwise iff there is one scale row (group_size -1 or == k).
struct Groups {
    int64_t rows;       // scale rows: k / group_size, or 1
    int64_t size;       // k rows per group (k for channelwise)
    bool channelwise;
};
RTNQ_HD Groups make_groups(int64_t k, int group_size) {
    Groups g;
    g.rows = group_size == -1 ? 1 : k / group_size;
    g.channelwise = g.rows == 1;
    g.size = g.channelwise ? k : group_size;
    return g;
}

// ---- Which value a lane holds ----------------------------------------------------------------------
// A lane decodes 32 values per block, index v = 0..31. For value v: k row 2t + value_row<BITS>(v) of
// the slab and column 8 * value_ci<BITS>(v) + c of the block.
// 4-bit: v = 8j + s (word j, nibble s at bits 4s). Nibbles 0..7 hold rows 2t,2t+8,2t,2t+8,2t+1,2t+9,2t+1,
// 2t+9 and columns c, c, c+8, c+8, ... of 16-column tile j (FORMATS.md 3.3), i.e. n8 tile 2j + h.
// 8-bit: v = 4w + b (word w = n8 tile, byte b); bytes 0..3 hold rows 2t, 2t+8, 2t+1, 2t+9.
template <int BITS>
RTNQ_HD int value_row(int v) {
    const int s = BITS == 4 ? (v & 7) : (v & 3);
    return BITS == 4 ? ((s & 1) ? 8 : 0) + (s >> 2) : ((s & 1) ? 8 : 0) + (s >> 1);
}
template <int BITS>
RTNQ_HD int value_ci(int v) {
    return BITS == 4 ? 2 * (v >> 3) + ((v >> 1) & 1) : (v >> 2);
}
template <int BITS>
RTNQ_HD int value_code(const uint32_t *w, int v) {
    return BITS == 4 ? static_cast<int>((w[v >> 3] >> (4 * (v & 7))) & 0xF)
                     : static_cast<int>((w[v >> 2] >> (8 * (v & 3))) & 0xFF);
}

// Exact dequantization of one value: (code - bias) is exact in fp32, the fp32 product of two 16-bit
// values is exact, so one rounding to T gives what torch computes on the CPU (rtn.dequantize).
template <typename T>
RTNQ_HD T dequant_exact(int q, T scale) {
    return from_float<T>(static_cast<float>(q) * to_float(scale));
}

// ---- Fragment decode (GEMM kernels) -----------------------------------------------------------------
// Unscaled q - bias pairs for n8 tile ci: b0 = rows (2t, 2t+1), b1 = rows (2t+8, 2t+9), low half first:
// the two registers of an m16n8k16 B fragment.

// 4-bit fp16: OR a nibble pair into the mantissa of 1024.0 (ulp 1 there) -> 1024 + q, then subtract
// 1032 = 1024 + 8: exact q - 8 in one LOP3 and one HSUB2. The 8-value interleave puts nibbles s and s+4
// at bits 4s and 4s+16, so one mask extracts a (row 2t, row 2t+1) or (2t+8, 2t+9) pair.
RTNQ_HD __half2 dq4_pair(uint32_t shifted, __half2 *) {
    const uint32_t v = (shifted & 0x000F000Fu) | 0x64006400u;
    return __hsub2(bit_cast<__half2>(v), bit_cast<__half2>(0x64086408u));
}
// 4-bit bf16: same trick with 128.0 (0x4300, 7 mantissa bits, ulp 1) and 136 = 128 + 8 (0x4308).
RTNQ_HD __nv_bfloat162 dq4_pair(uint32_t shifted, __nv_bfloat162 *) {
    const uint32_t v = (shifted & 0x000F000Fu) | 0x43004300u;
    return __hsub2(bit_cast<__nv_bfloat162>(v), bit_cast<__nv_bfloat162>(0x43084308u));
}
// 8-bit fp16: PRMT places bytes under exponent byte 0x64 -> 1024 + code (exact up to 2047), then
// subtract 1152 = 1024 + 128 (0x6480). sel picks (byte0, byte2) = 0x5250 or (byte1, byte3) = 0x5351.
RTNQ_HD __half2 dq8_pair(uint32_t w, uint32_t sel, __half2 *) {
    const uint32_t v = byte_perm(w, 0x64646464u, sel);
    return __hsub2(bit_cast<__half2>(v), bit_cast<__half2>(0x64806480u));
}
// 8-bit bf16: 9 significant bits do not fit bf16's 8, so go through fp32: 2^23 + code has ulp 1, subtract
// 2^23 + 128, and the small integer converts to bf16 exactly.
RTNQ_HD __nv_bfloat162 dq8_pair(uint32_t w, uint32_t sel, __nv_bfloat162 *) {
    const uint32_t lo = byte_perm(w, 0x4B000000u, (sel & 0xF) | 0x7650u);
    const uint32_t hi = byte_perm(w, 0x4B000000u, ((sel >> 8) & 0xF) | 0x7650u);
    const float a = bit_cast<float>(lo) - 8388736.0f;
    const float b = bit_cast<float>(hi) - 8388736.0f;
    return __floats2bfloat162_rn(a, b);
}

template <int BITS, typename T>
RTNQ_HD void b_frag_raw(const uint32_t *w, int ci, typename Elem<T>::T2 &b0, typename Elem<T>::T2 &b1) {
    using T2 = typename Elem<T>::T2;
    if (BITS == 4) {
        const uint32_t word = w[ci >> 1];
        const int sh = 8 * (ci & 1);  // n8 half h = ci & 1 lives in nibbles 2h, 2h+1 (+4)
        b0 = dq4_pair(word >> sh, static_cast<T2 *>(nullptr));
        b1 = dq4_pair(word >> (sh + 4), static_cast<T2 *>(nullptr));
    } else {
        b0 = dq8_pair(w[ci], 0x5250u, static_cast<T2 *>(nullptr));
        b1 = dq8_pair(w[ci], 0x5351u, static_cast<T2 *>(nullptr));
    }
}

// Scaled fragments: one 16-bit multiply (single rounding) per weight, so the tensor cores see exactly
// the dequantized weight the reference computes.
template <int BITS, typename T>
RTNQ_HD void b_frag(const uint32_t *w, int ci, T scale, typename Elem<T>::T2 &b0, typename Elem<T>::T2 &b1) {
    b_frag_raw<BITS, T>(w, ci, b0, b1);
    const typename Elem<T>::T2 s2 = pair(scale, scale);
    b0 = __hmul2(b0, s2);
    b1 = __hmul2(b1, s2);
}

// ---- Addresses shared by kernels and emulators --------------------------------------------------------
// int4 offset of lane L's first vector of block nb in qweight row kt (row length n * BITS / 8 int4).
template <int BITS>
RTNQ_HD int64_t lane_int4_offset(int64_t kt, int64_t nb, int lane, int64_t n) {
    return kt * (n * BITS / 8) + nb * Bits<BITS>::kInt4PerBlock + lane * Bits<BITS>::kInt4PerLane;
}

}  // namespace rtnq
