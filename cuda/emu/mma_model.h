// mma_model.h: the one CPU model of the warp-wide mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
// instruction. Test-only: the SIMT emulator (emulate.cpp) resolves the kernel's own mma_16816 calls with it and the
// tensor-core host reference (host_ref.cpp) calls it directly, so a fix to the model reaches both. Nothing in
// librtnq_cuda.so includes it.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace rtnq_emu {

// One lane's registers for one mma: the A fragment (4 x b32), the B fragment (2 x b32) and the fp32 accumulators,
// which the model replaces by D = A x B + C.
struct MmaLane {
    uint32_t a[4];
    uint32_t b0, b1;
    float d[4];
};

inline float mma_half_bits(uint16_t h, bool bf16) {
    if (bf16) {
        __nv_bfloat16 v;
        memcpy(static_cast<void *>(&v), &h, 2);
        return __bfloat162float(v);
    }
    __half v;
    memcpy(static_cast<void *>(&v), &h, 2);
    return __half2float(v);
}

// D (16x8) += A (16x16) x B (16x8) for one warp; lanes[l] holds lane l's registers. Fragment layout as the PTX ISA
// defines it, with g = l / 4 and q = l % 4 (the low 16 bits of a register hold the lower column or k index):
//   A register r: row g + 8(r & 1), columns 2q + 8(r >> 1) + {0, 1};
//   B register r (b0, b1): k rows 2q + 8r + {0, 1}, column g;
//   D element e: row g + 8(e >> 1), column 2q + (e & 1).
// Arithmetic: the 16 products of each output are summed in double (a product of two f16/bf16 values is exact in
// double) and the sum is rounded once to fp32 before it is added to the fp32 accumulator. Why not a bit-accurate
// tensor core: the PTX ISA does not specify the order or the intermediate precision of the hardware's sum, so a
// model can only be a fixed, nearly exact reference. Hence the tensor-core kernel is checked against a float64
// result within tolerance, never bitwise against a GPU; the emulator and the host reference, both built on this one
// function, still see identical fp32 accumulators.
inline void mma_m16n8k16(MmaLane (&lanes)[32], bool bf16) {
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, q = l & 3;
        const MmaLane &s = lanes[l];
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r & 1), col = 2 * q + 8 * (r >> 1);
            A[row][col] = mma_half_bits(static_cast<uint16_t>(s.a[r] & 0xFFFF), bf16);
            A[row][col + 1] = mma_half_bits(static_cast<uint16_t>(s.a[r] >> 16), bf16);
        }
        B[2 * q][g] = mma_half_bits(static_cast<uint16_t>(s.b0 & 0xFFFF), bf16);
        B[2 * q + 1][g] = mma_half_bits(static_cast<uint16_t>(s.b0 >> 16), bf16);
        B[2 * q + 8][g] = mma_half_bits(static_cast<uint16_t>(s.b1 & 0xFFFF), bf16);
        B[2 * q + 9][g] = mma_half_bits(static_cast<uint16_t>(s.b1 >> 16), bf16);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, q = l & 3;
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
            double sum = 0;
            for (int kx = 0; kx < 16; ++kx) sum += static_cast<double>(A[row][kx]) * B[kx][col];
            lanes[l].d[e] += static_cast<float>(sum);
        }
    }
}

}  // namespace rtnq_emu
