/* rtnq CPU fast path: fused RTN quantize + pack + error statistic, one pass per weight.
 *
 * No Python and no torch: a C ABI loaded with ctypes by rtnq/fastquant.py, built by `pip install`
 * (setup.py, optional: rtnq falls back to its pure-torch reference when this library is absent).
 *
 * Numerics are those of rtn.quantize (shared FORMATS.md 2.1), reproduced bit for bit. Every
 * operation below that the reference performs on a 16-bit tensor is done as torch does it on the
 * CPU: widen both operands to fp32, one fp32 operation, round the result to the 16-bit dtype with
 * round-to-nearest-even. So:
 *     maxabs  = max |w| over the group                      exact (compared as integers, below)
 *     scale   = r16( r16(maxabs * 2) / (2^bits - 1) )       two roundings, true fp32 division
 *     t       = r16( w / scale )                            true fp32 division (never a reciprocal)
 *     q       = rint(t)                                     half to even
 *     code    = clamp(q, -bias, bias - 1) + bias            (= the reference's clamp(q + bias, 0, max))
 *     w_hat   = r16( q * scale )                            what rtn.dequantize returns
 * where r16 rounds to bf16 or fp16. scale == 0 (all-zero or sub-underflow group) follows the
 * reference's nan_to_num: 0/0 -> NaN -> q = 0; w/0 = +-inf -> the dtype's max -> clamped.
 * No -ffast-math, no FMA contraction (-ffp-contract=off) and the default MXCSR (no FTZ/DAZ), so
 * subnormal weights and scales round exactly as in torch.
 *
 * The Marlin layout (FORMATS.md 3): for a 64-row block of W (64 output columns of B = W^T) and a
 * 16-wide slab of k, the 1024 entries are stored in the fragment order of rtnq/marlin.py. With the
 * codes of one W row's 16 k-values in one 16-byte vector, that order is a few byte interleaves and
 * a 4x4 word transpose (derivation in docs/PERFORMANCE.md), done here with SSE2 on x86.
 *
 * The same codes can instead be packed along k (rtnq/kpack.py, FORMATS.md 5-6): 32/bits codes of
 * one W row per int32 word, LSB first, stored row-major (n, k*bits/32) for compressed-tensors or
 * transposed (k*bits/32, n) for GPTQ, with plain (unpermuted) scales. Only the stores differ: the
 * quantizer, the codes, the scale values and the error sums are those of the Marlin layout.
 * All packers build words from little-endian bytes, as torch's .view(torch.int32) of the
 * reference's bytes does (rtnq.marlin refuses big-endian machines).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#define RTNQ_X86 1
#include <immintrin.h>
#endif

#define RTNQ_CPU_ABI 3
#define EXPORT __attribute__((visibility("default")))

enum { DT_BF16 = 0, DT_F16 = 1 };
enum { OK = 0, NONFINITE = 1, BAD_ARGS = -1 };
enum { FLAG_SCALAR = 1, FLAG_MSE = 2 };
enum { LAYOUT_MARLIN = 0, LAYOUT_ROWS = 1, LAYOUT_COLS = 2 }; /* fastquant.LAYOUTS, in order */

#define BLOCK_N 64 /* rows of W per Marlin block */
#define CW 128     /* k-columns per tile: a multiple of 16 and of every group size <= 128 */

/* ---------------------------------------------------------------- 16-bit <-> fp32, RNE */

static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return u2f((uint32_t)h << 16); }

/* c10::BFloat16's round_to_nearest_even. */
static inline uint16_t f32_to_bf16(float f) {
    if (f != f) return 0x7FC0;
    uint32_t u = f2u(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) { /* zero or subnormal: m * 2^-24, exact in fp32 */
        float f = (float)m * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
    return u2f(sign | ((e + 112u) << 23) | (m << 13));
}

/* IEEE fp32 -> fp16, round to nearest even, overflow to inf (as F16C and c10::Half do). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t x = f2u(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00 : 0x7C00);
    if (ax >= 0x477FF000u) return sign | 0x7C00; /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) {
        /* below 2^-14: adding 0.5 aligns the value to multiples of 2^-24 (the fp16 subnormal
           step), rounding half to even in the FPU; the low bits are then the fp16 encoding. */
        float a = u2f(ax) + 0.5f;
        return sign | (uint16_t)(f2u(a) - 0x3F000000u);
    }
    ax += 0x0FFFu + ((ax >> 13) & 1u);
    ax -= 0x38000000u; /* rebias 127 -> 15 */
    return sign | (uint16_t)(ax >> 13);
}

static inline float to_f32(uint16_t h, int dt) { return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h); }
static inline float r16(float f, int dt) {
    return dt == DT_BF16 ? bf16_to_f32(f32_to_bf16(f)) : f16_to_f32(f32_to_f16(f));
}

/* |x| bits at or above this are Inf/NaN; below it, integer order of |x| bits is magnitude order. */
static inline uint16_t inf_bits(int dt) { return dt == DT_BF16 ? 0x7F80 : 0x7C00; }

/* The reference's scale, from the group's max |w| given as 16-bit bits. */
static inline float group_scale(uint16_t maxabs_bits, int bits, int dt) {
    float m2 = r16(to_f32(maxabs_bits, dt) * 2.0f, dt);
    return r16(m2 / (float)((1 << bits) - 1), dt);
}

/* ---------------------------------------------------------------- the "mse" scale rule */

/* rtn.py's "mse" rule for one group of len values with max |w| bits m (finite): of the clipping ratios
 * r = 1.00, 0.99, ..., 0.80 (Python's 1 - i/100 rounded to fp32), the scale whose dequantized group has the
 * smallest squared error, ties to the larger r. Step for step as rtn._mse_scale:
 *     clip  = r16( fp32(m) * fp32(r) )            one fp32 product, then the 16-bit rounding
 *     s     = r16( r16(clip * 2) / (2^bits - 1) )  as the absmax scale, clip for maxabs
 *     w_hat = r16( clamp(rint(r16(w / s)), -bias, bias - 1) * s )     (NaN -> 0, +-inf -> +-max first)
 *     err   = the float64 squares (w - w_hat)^2, zero-padded to the next power of two P, summed as a
 *             balanced tree: x[i] += x[i + h] for h = P/2, ..., 1 (rtn._tree_sum's order, so the sum is
 *             the reference's to the last bit)
 * sq: scratch for P doubles. An overflowed (inf) scale gives err NaN at r = 1, which no later err beats,
 * so that scale is kept and refused later, as in the reference. */
#ifdef RTNQ_X86
static void mse_squares_avx2(const uint16_t *w, int64_t len, float s, int bits, int dt, double *sq);
#endif

static float mse_scale(const uint16_t *w, int64_t len, uint16_t m, int bits, int dt, double *sq, int vec) {
    const float lo = -(float)(1 << (bits - 1)), hi = (float)((1 << (bits - 1)) - 1);
    const float big = dt == DT_BF16 ? bf16_to_f32(0x7F7F) : 65504.0f;
    int64_t P = 1;
    while (P < len) P <<= 1;
    const float mf = to_f32(m, dt);
    (void)vec; /* no vector loop off x86 */
    float best_s = 0.0f;
    double best_e = 0.0;
    for (int i = 0; i <= 20; i++) {
        const float r = (float)(1.0 - (double)i / 100.0);
        const float clip = r16(mf * r, dt);
        const float s = r16(r16(clip * 2.0f, dt) / (float)((1 << bits) - 1), dt);
#ifdef RTNQ_X86
        /* a finite positive scale keeps every step finite, so the vector loop needs no NaN/inf cases */
        if (vec && s > 0.0f && s < INFINITY && len % 16 == 0) mse_squares_avx2(w, len, s, bits, dt, sq);
        else
#endif
        for (int64_t j = 0; j < len; j++) {
            float x = to_f32(w[j], dt);
            float q = rintf(r16(x / s, dt));
            if (q != q) q = 0.0f;
            else if (isinf(q)) q = q > 0 ? big : -big;
            q = q < lo ? lo : (q > hi ? hi : q);
            double d = (double)x - (double)r16(q * s, dt);
            sq[j] = d * d;
        }
        for (int64_t j = len; j < P; j++) sq[j] = 0.0;
        for (int64_t h = P / 2; h >= 1; h /= 2)
            for (int64_t j = 0; j < h; j++) sq[j] += sq[j + h];
        if (i == 0 || sq[0] < best_e) { /* strict: a tie keeps the larger r */
            best_e = sq[0];
            best_s = s;
        }
    }
    return best_s;
}

/* ---------------------------------------------------------------- scales in Marlin order */

/* Position of W row r (0..63 within its block) in the permuted scale row: an 8x8 transpose of
   each 64-chunk for grouped scales, the inverse of the 32-entry table for a single scale row. */
static int scale_pos(int r, int single) {
    if (!single) return 8 * (r % 8) + r / 8;
    static const int off[8] = {0, 1, 8, 9, 16, 17, 24, 25};
    int base = r / 32 * 32, rr = r % 32;
    for (int p = 0; p < 32; p++)
        if (2 * (p / 8) + off[p % 8] == rr) return base + p;
    return -1; /* unreachable */
}

/* ---------------------------------------------------------------- one group, scalar */

/* Quantize len values of one row with scale s; codes to out; error sums (double) to acc. */
static void quant_scalar(const uint16_t *w, int64_t len, float s, int bits, int dt, uint8_t *out,
                         double acc[2]) {
    const float lo = -(float)(1 << (bits - 1)), hi = (float)((1 << (bits - 1)) - 1);
    const float big = dt == DT_BF16 ? bf16_to_f32(0x7F7F) : 65504.0f; /* nan_to_num's posinf */
    const int bias = 1 << (bits - 1);
    for (int64_t i = 0; i < len; i++) {
        float x = to_f32(w[i], dt);
        float t = r16(x / s, dt);
        float q = rintf(t);
        if (q != q) q = 0.0f;
        else if (isinf(q)) q = q > 0 ? big : -big;
        q = q < lo ? lo : (q > hi ? hi : q);
        out[i] = (uint8_t)((int)q + bias);
        float wh = r16(q * s, dt);
        double d = (double)x - (double)wh;
        acc[0] += (double)x * (double)x;
        acc[1] += d * d;
    }
}

static uint16_t maxabs_scalar(const uint16_t *w, int64_t len) {
    uint16_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        uint16_t a = w[i] & 0x7FFFu;
        m = a > m ? a : m;
    }
    return m;
}

/* ---------------------------------------------------------------- Marlin pack of one tile */

/* tile: 64 rows (W rows = n) x CW codes (k), row stride CW. Writes the tile's CW/16 slabs of this
   block: slab s goes to qrow0 + s * row_bytes (row_bytes = one qweight row). */
static void pack_scalar(const uint8_t *tile, int bits, uint8_t *qrow0, int64_t row_bytes) {
    for (int s = 0; s < CW / 16; s++) {
        uint8_t *dst = qrow0 + s * row_bytes;
        for (int c = 0; c < 8; c++)
            for (int t = 0; t < 4; t++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t *a = tile + (16 * j + c) * CW + 16 * s;
                    const uint8_t *b = a + 8 * CW;
                    if (bits == 4) {
                        uint8_t *o = dst + 4 * (16 * c + 4 * t + j);
                        o[0] = a[2 * t] | (uint8_t)(a[2 * t + 8] << 4);
                        o[1] = b[2 * t] | (uint8_t)(b[2 * t + 8] << 4);
                        o[2] = a[2 * t + 1] | (uint8_t)(a[2 * t + 9] << 4);
                        o[3] = b[2 * t + 1] | (uint8_t)(b[2 * t + 9] << 4);
                    } else {
                        uint8_t *o = dst + 4 * (32 * c + 8 * t + 2 * j);
                        o[0] = a[2 * t], o[1] = a[2 * t + 8], o[2] = a[2 * t + 1], o[3] = a[2 * t + 9];
                        o[4] = b[2 * t], o[5] = b[2 * t + 8], o[6] = b[2 * t + 1], o[7] = b[2 * t + 9];
                    }
                }
    }
}

#ifdef RTNQ_X86
static void pack_sse2(const uint8_t *tile, int bits, uint8_t *qrow0, int64_t row_bytes) {
    for (int s = 0; s < CW / 16; s++) {
        uint8_t *dst = qrow0 + s * row_bytes;
        for (int c = 0; c < 8; c++) {
            __m128i v[4], p[4], q[4];
            for (int j = 0; j < 4; j++) {
                __m128i a = _mm_loadu_si128((const __m128i *)(tile + (16 * j + c) * CW + 16 * s));
                __m128i b = _mm_loadu_si128((const __m128i *)(tile + (16 * j + c + 8) * CW + 16 * s));
                if (bits == 4) { /* a'[r] = a[r] | a[r+8] << 4 (codes <= 15: no carry across bytes) */
                    a = _mm_or_si128(a, _mm_slli_epi16(_mm_srli_si128(a, 8), 4));
                    b = _mm_or_si128(b, _mm_slli_epi16(_mm_srli_si128(b, 8), 4));
                    v[j] = _mm_unpacklo_epi8(a, b); /* word t = a'[2t], b'[2t], a'[2t+1], b'[2t+1] */
                } else {                            /* word t of a'' = a[2t], a[2t+8], a[2t+1], a[2t+9] */
                    a = _mm_unpacklo_epi8(a, _mm_srli_si128(a, 8));
                    b = _mm_unpacklo_epi8(b, _mm_srli_si128(b, 8));
                    p[j] = _mm_unpacklo_epi32(a, b); /* (a t0, b t0, a t1, b t1) */
                    q[j] = _mm_unpackhi_epi32(a, b); /* (a t2, b t2, a t3, b t3) */
                }
            }
            if (bits == 4) { /* words 16c + 4t + j: a 4x4 transpose of (j, t) */
                __m128i t0 = _mm_unpacklo_epi32(v[0], v[1]), t1 = _mm_unpacklo_epi32(v[2], v[3]);
                __m128i t2 = _mm_unpackhi_epi32(v[0], v[1]), t3 = _mm_unpackhi_epi32(v[2], v[3]);
                __m128i *o = (__m128i *)(dst + 64 * c);
                _mm_storeu_si128(o + 0, _mm_unpacklo_epi64(t0, t1));
                _mm_storeu_si128(o + 1, _mm_unpackhi_epi64(t0, t1));
                _mm_storeu_si128(o + 2, _mm_unpacklo_epi64(t2, t3));
                _mm_storeu_si128(o + 3, _mm_unpackhi_epi64(t2, t3));
            } else { /* word pairs 32c + 8t + 2j: a 4x4 transpose of 64-bit pairs */
                __m128i *o = (__m128i *)(dst + 128 * c);
                _mm_storeu_si128(o + 0, _mm_unpacklo_epi64(p[0], p[1]));
                _mm_storeu_si128(o + 1, _mm_unpacklo_epi64(p[2], p[3]));
                _mm_storeu_si128(o + 2, _mm_unpackhi_epi64(p[0], p[1]));
                _mm_storeu_si128(o + 3, _mm_unpackhi_epi64(p[2], p[3]));
                _mm_storeu_si128(o + 4, _mm_unpacklo_epi64(q[0], q[1]));
                _mm_storeu_si128(o + 5, _mm_unpacklo_epi64(q[2], q[3]));
                _mm_storeu_si128(o + 6, _mm_unpackhi_epi64(q[0], q[1]));
                _mm_storeu_si128(o + 7, _mm_unpackhi_epi64(q[2], q[3]));
            }
        }
    }
}

#endif

/* ---------------------------------------------------------------- k-packed layouts of one tile */

/* One tile row's CW codes -> its CW*bits/8 bytes of LSB-first words. 4-bit: code 2i in the low
   nibble of byte i and 2i+1 in the high one, so word w holds codes 8w..8w+7 at bits 4s on a
   little-endian machine; 8-bit codes already are their bytes. Plain loops: -O3 vectorizes them. */
static inline void kpack_row(const uint8_t *codes, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, codes, CW);
        return;
    }
    for (int i = 0; i < CW / 2; i++) out[i] = codes[2 * i] | (uint8_t)(codes[2 * i + 1] << 4);
}

/* compressed-tensors (n, k*bits/32): each W row's words are contiguous, so a tile row goes to
   one run of its qweight row. dst: the tile's first row at its k offset; row_bytes: k*bits/8. */
static void store_rows(const uint8_t *tile, int bits, uint8_t *dst, int64_t row_bytes) {
    for (int r = 0; r < BLOCK_N; r++) kpack_row(tile + r * CW, bits, dst + r * row_bytes);
}

/* GPTQ (k*bits/32, n): the transpose, so the tile's words are packed per row first and then
   stored one word row at a time, each a run of 64 consecutive int32 (256 bytes) of this block.
   dst: word row kc*bits/32, column row0 of the block; n: the qweight row stride in words. */
static void store_cols(const uint8_t *tile, int bits, uint32_t *dst, int64_t n) {
    const int wpr = CW * bits / 32; /* words per tile row: 16 (4-bit) or 32 (8-bit) */
    uint32_t words[BLOCK_N][CW / 4];
    for (int r = 0; r < BLOCK_N; r++) kpack_row(tile + r * CW, bits, (uint8_t *)words[r]);
    for (int w = 0; w < wpr; w++) {
        uint32_t *o = dst + w * n;
        for (int r = 0; r < BLOCK_N; r++) o[r] = words[r][w];
    }
}

#ifdef RTNQ_X86
/* The same two stores with SSE2. With the scalar ones and the AVX2 quantizer, a 4096 x 4096 bf16
   weight took 1.3x the Marlin time in the GPTQ layout at 8 bits (the word transpose) and 1.05-1.1x
   at 4 bits (measured, one thread); with these, every layout is within noise of the Marlin one. */

/* 32 codes -> 16 bytes: in each 16-bit lane (c0 | c1 << 8), lane | lane >> 4 puts c1 in the high
   nibble of the low byte (codes <= 15: nothing else moves there); then keep the low bytes. */
static inline __m128i nibbles_sse2(const uint8_t *c) {
    const __m128i lo = _mm_set1_epi16(0x00FF);
    __m128i a = _mm_loadu_si128((const __m128i *)c), b = _mm_loadu_si128((const __m128i *)(c + 16));
    a = _mm_and_si128(_mm_or_si128(a, _mm_srli_epi16(a, 4)), lo);
    b = _mm_and_si128(_mm_or_si128(b, _mm_srli_epi16(b, 4)), lo);
    return _mm_packus_epi16(a, b);
}

static void store_rows_sse2(const uint8_t *tile, int bits, uint8_t *dst, int64_t row_bytes) {
    if (bits == 8) {
        store_rows(tile, bits, dst, row_bytes);
        return;
    }
    for (int r = 0; r < BLOCK_N; r++)
        for (int i = 0; i < CW / 2; i += 16)
            _mm_storeu_si128((__m128i *)(dst + r * row_bytes + i), nibbles_sse2(tile + r * CW + 2 * i));
}

/* 4x4 word transposes: rows r..r+3 x words w..w+3 of the packed tile become 16 bytes of each of
   word rows w..w+3 (8-bit: the tile's bytes already are the words). */
static void store_cols_sse2(const uint8_t *tile, int bits, uint32_t *dst, int64_t n) {
    const int wpr = CW * bits / 32;
    uint32_t words[BLOCK_N][CW / 8]; /* 4-bit only: 16 words per row */
    const uint8_t *src = tile;
    int64_t stride = CW; /* bytes per row of src */
    if (bits == 4) {
        for (int r = 0; r < BLOCK_N; r++)
            for (int i = 0; i < CW / 2; i += 16)
                _mm_storeu_si128((__m128i *)((uint8_t *)words[r] + i), nibbles_sse2(tile + r * CW + 2 * i));
        src = (const uint8_t *)words, stride = sizeof words[0];
    }
    for (int w = 0; w < wpr; w += 4) {
        uint32_t *o = dst + w * n;
        for (int r = 0; r < BLOCK_N; r += 4) {
            const uint8_t *p = src + r * stride + 4 * w;
            __m128i r0 = _mm_loadu_si128((const __m128i *)p);
            __m128i r1 = _mm_loadu_si128((const __m128i *)(p + stride));
            __m128i r2 = _mm_loadu_si128((const __m128i *)(p + 2 * stride));
            __m128i r3 = _mm_loadu_si128((const __m128i *)(p + 3 * stride));
            __m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3); /* words w, w+1 */
            __m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3); /* words w+2, w+3 */
            _mm_storeu_si128((__m128i *)(o + r), _mm_unpacklo_epi64(t0, t1));
            _mm_storeu_si128((__m128i *)(o + n + r), _mm_unpackhi_epi64(t0, t1));
            _mm_storeu_si128((__m128i *)(o + 2 * n + r), _mm_unpacklo_epi64(t2, t3));
            _mm_storeu_si128((__m128i *)(o + 3 * n + r), _mm_unpackhi_epi64(t2, t3));
        }
    }
}

/* ---------------------------------------------------------------- one group, AVX2 */

#define AVX2 __attribute__((target("avx2,f16c,fma")))

AVX2 static inline __m256 load8(const uint16_t *p, int dt) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dt == DT_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* Round 8 fp32 to the 16-bit dtype (RNE) and widen back. Inputs here are never NaN except
   0 * inf in w_hat, which stays NaN through the bf16 integer rounding. */
AVX2 static inline __m256 r16x8(__m256 x, int dt) {
    if (dt == DT_BF16) {
        __m256i u = _mm256_castps_si256(x);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
        return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

AVX2 static uint16_t maxabs_avx2(const uint16_t *w, int64_t len) {
    __m256i m = _mm256_setzero_si256(), mask = _mm256_set1_epi16(0x7FFF);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16)
        m = _mm256_max_epu16(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(w + i)), mask));
    __m128i r = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    r = _mm_max_epu16(r, _mm_srli_si128(r, 8));
    r = _mm_max_epu16(r, _mm_srli_si128(r, 4));
    r = _mm_max_epu16(r, _mm_srli_si128(r, 2));
    uint16_t out = (uint16_t)_mm_extract_epi16(r, 0);
    uint16_t tail = maxabs_scalar(w + i, len - i);
    return tail > out ? tail : out;
}

/* Max |w| of one group in each of 8 rows (p, p + stride, ...; len % 16 == 0) and their scales,
   8 at a time: one transpose-reduce instead of 8 horizontal maxima, one division for 8 scales. */
AVX2 static void scales8_avx2(const uint16_t *p, int64_t stride, int64_t len, int bits, int dt, uint16_t mo[8],
                              float so[8]) {
    const __m256i mask = _mm256_set1_epi16(0x7FFF);
    __m128i v[8];
    for (int r = 0; r < 8; r++) {
        const uint16_t *q = p + r * stride;
        __m256i m = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)q), mask);
        for (int64_t i = 16; i < len; i += 16)
            m = _mm256_max_epu16(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(q + i)), mask));
        v[r] = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    }
    __m128i a0 = _mm_max_epu16(_mm_unpacklo_epi16(v[0], v[1]), _mm_unpackhi_epi16(v[0], v[1]));
    __m128i a1 = _mm_max_epu16(_mm_unpacklo_epi16(v[2], v[3]), _mm_unpackhi_epi16(v[2], v[3]));
    __m128i a2 = _mm_max_epu16(_mm_unpacklo_epi16(v[4], v[5]), _mm_unpackhi_epi16(v[4], v[5]));
    __m128i a3 = _mm_max_epu16(_mm_unpacklo_epi16(v[6], v[7]), _mm_unpackhi_epi16(v[6], v[7]));
    __m128i b0 = _mm_max_epu16(_mm_unpacklo_epi32(a0, a1), _mm_unpackhi_epi32(a0, a1));
    __m128i b1 = _mm_max_epu16(_mm_unpacklo_epi32(a2, a3), _mm_unpackhi_epi32(a2, a3));
    __m128i c = _mm_max_epu16(_mm_unpacklo_epi64(b0, b1), _mm_unpackhi_epi64(b0, b1)); /* row r's max in lane r */
    _mm_storeu_si128((__m128i *)mo, c);
    __m256 mf = dt == DT_BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(c), 16)) : _mm256_cvtph_ps(c);
    __m256 m2 = r16x8(_mm256_add_ps(mf, mf), dt); /* maxabs * 2, exact in fp32, rounded to 16 bits */
    _mm256_storeu_ps(so, r16x8(_mm256_div_ps(m2, _mm256_set1_ps((float)((1 << bits) - 1))), dt));
}

/* len % 16 == 0 and len <= CW; s > 0 (finite or inf); |values| in the float-safe range (see caller).
   Error sums are accumulated in fp32 over at most CW elements (8 per lane), then added in double.
   dt is a constant in each caller, so each dtype gets its own loop. */
AVX2 static inline __attribute__((always_inline)) void quant_avx2_body(
    const uint16_t *w, int64_t len, float s, int bits, const int dt, uint8_t *out, double acc[2]) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-(float)(1 << (bits - 1)));
    const __m256 hi = _mm256_set1_ps((float)((1 << (bits - 1)) - 1));
    const __m256 vb = _mm256_set1_ps((float)(1 << (bits - 1)));
    __m256 ew = _mm256_setzero_ps(), ed = _mm256_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
        __m256 x0, x1;
        if (dt == DT_BF16) {
            /* bf16 -> fp32 is "put the bits in the high half": one unpack per 8 values. x0 holds
               values 0-3 and 8-11, x1 4-7 and 12-15; packs_epi32 below puts them back in order. */
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + i));
            x0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
            x1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
        } else {
            x0 = load8(w + i, dt);
            x1 = load8(w + i + 8, dt);
        }
        __m256 q0 = _mm256_round_ps(r16x8(_mm256_div_ps(x0, vs), dt), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 q1 = _mm256_round_ps(r16x8(_mm256_div_ps(x1, vs), dt), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q0 = _mm256_min_ps(_mm256_max_ps(q0, lo), hi);
        q1 = _mm256_min_ps(_mm256_max_ps(q1, lo), hi);
        __m256 d0 = _mm256_sub_ps(x0, r16x8(_mm256_mul_ps(q0, vs), dt));
        __m256 d1 = _mm256_sub_ps(x1, r16x8(_mm256_mul_ps(q1, vs), dt));
        /* the error statistic only: an fma here changes no code or scale */
        ew = _mm256_fmadd_ps(x1, x1, _mm256_fmadd_ps(x0, x0, ew));
        ed = _mm256_fmadd_ps(d1, d1, _mm256_fmadd_ps(d0, d0, ed));
        __m256i c0 = _mm256_cvtps_epi32(_mm256_add_ps(q0, vb)), c1 = _mm256_cvtps_epi32(_mm256_add_ps(q1, vb));
        __m256i c16 = _mm256_packs_epi32(c0, c1); /* per 128-bit lane: c0's 4 values, then c1's */
        if (dt != DT_BF16) c16 = _mm256_permute4x64_epi64(c16, 0xD8);
        __m128i c8 = _mm_packus_epi16(_mm256_castsi256_si128(c16), _mm256_extracti128_si256(c16, 1));
        _mm_storeu_si128((__m128i *)(out + i), c8);
    }
    __m256d a = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(ew)), _mm256_cvtps_pd(_mm256_extractf128_ps(ew, 1)));
    __m256d b = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(ed)), _mm256_cvtps_pd(_mm256_extractf128_ps(ed, 1)));
    double ta[4], tb[4];
    _mm256_storeu_pd(ta, a);
    _mm256_storeu_pd(tb, b);
    acc[0] += (ta[0] + ta[1]) + (ta[2] + ta[3]);
    acc[1] += (tb[0] + tb[1]) + (tb[2] + tb[3]);
}

AVX2 static void quant_avx2(const uint16_t *w, int64_t len, float s, int bits, int dt, uint8_t *out,
                            double acc[2]) {
    if (dt == DT_BF16)
        quant_avx2_body(w, len, s, bits, DT_BF16, out, acc);
    else
        quant_avx2_body(w, len, s, bits, DT_F16, out, acc);
}

/* mse_scale's squares (double (w - w_hat)^2 into sq[0..len)) for one finite scale s > 0, 8 at a time:
 * the same fp32 steps and roundings as its scalar loop, the difference and square in double. */
AVX2 static void mse_squares_avx2(const uint16_t *w, int64_t len, float s, int bits, int dt, double *sq) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256 lo = _mm256_set1_ps(-(float)(1 << (bits - 1)));
    const __m256 hi = _mm256_set1_ps((float)((1 << (bits - 1)) - 1));
    for (int64_t i = 0; i < len; i += 8) {
        __m256 x = load8(w + i, dt);
        __m256 q = _mm256_round_ps(r16x8(_mm256_div_ps(x, vs), dt), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        __m256 wh = r16x8(_mm256_mul_ps(q, vs), dt);
        __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_castps256_ps128(wh)));
        __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(wh, 1)));
        _mm256_storeu_pd(sq + i, _mm256_mul_pd(d0, d0));
        _mm256_storeu_pd(sq + i + 4, _mm256_mul_pd(d1, d1));
    }
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#else
static int have_avx2(void) { return 0; }
#endif

/* ---------------------------------------------------------------- the entry points */

EXPORT int rtnq_cpu_abi(void) { return RTNQ_CPU_ABI; }

/* 2: AVX2 + F16C + FMA quantizer and SSE2 packer; 0: portable scalar C. */
EXPORT int rtnq_cpu_isa(void) { return have_avx2() ? 2 : 0; }

/* Quantize rows [row0, row0 + rows) of an (n, k) 16-bit weight and write their part of the
 * whole tensor's qweight and scales (16-bit, G = k/group groups) in one layout:
 *   0 Marlin:             qweight (k/16) x (n*16*bits/8) bytes, scales (G, n) Marlin-permuted;
 *   1 compressed-tensors: qweight (n, k*bits/32) int32, row-major, scales (n, G);
 *   2 GPTQ:               qweight (k*bits/32, n) int32, scales (G, n); both unpermuted.
 * Adds sum(w^2) and sum((w - w_hat)^2) to sums[0], sums[1].
 *   w: the chunk's rows, row-major, rows % 64 == 0, row0 % 64 == 0, n % 64 == 0, k % 128 == 0.
 *   group: 32, 64 or 128, or k (one group per row).
 * flags: FLAG_SCALAR (the portable loop; tests), FLAG_MSE (the "mse" scale rule, mse_scale, instead of absmax).
 * Returns 0; 1 if a group holds NaN or Inf (*bad_row = its row in the tensor; the chunk's outputs
 * are then partly written); -1 for arguments outside this contract.
 */
EXPORT int rtnq_quant_pack(const uint16_t *w, int64_t rows, int64_t k, int64_t n, int64_t row0,
                           int dtype, int bits, int64_t group, int layout, uint8_t *qweight,
                           uint16_t *scales, double *sums, int64_t *bad_row, int flags) {
    if ((dtype != DT_BF16 && dtype != DT_F16) || (bits != 4 && bits != 8)) return BAD_ARGS;
    if (layout != LAYOUT_MARLIN && layout != LAYOUT_ROWS && layout != LAYOUT_COLS) return BAD_ARGS;
    if (rows < 0 || rows % BLOCK_N || row0 % BLOCK_N || row0 + rows > n || n % BLOCK_N) return BAD_ARGS;
    if (k <= 0 || k % CW || group <= 0 || k % group || !(CW % group == 0 || group == k)) return BAD_ARGS;
    const int vec = have_avx2() && !(flags & FLAG_SCALAR);
    const int dt = dtype;
    const int64_t groups = k / group;
    const int single = groups == 1;
    const int64_t row_bytes = n * 16 * bits / 8;           /* one Marlin qweight row */
    const int64_t block_bytes = 1024 * bits / 8;           /* one 16 x 64 block in a qweight row */
    const int64_t kp_bytes = k * bits / 8;                 /* one compressed-tensors qweight row */
    /* scale of tensor row t, group gi: scales[gi * s_g + t * s_t] ((G, n) or, rows layout, (n, G)) */
    const int64_t s_g = layout == LAYOUT_ROWS ? 1 : n, s_t = layout == LAYOUT_ROWS ? groups : 1;
    const int64_t gpc = group <= CW ? CW / group : 1;      /* groups per tile row */
    const int64_t glen = group <= CW ? group : CW;         /* quantized per call */
    const uint16_t infb = inf_bits(dt);
    /* fp32 error sums are safe when |w| is in [2^-40, 2^40] (no overflow or harmful underflow of
       squares); groups outside that range take the scalar path, which sums in double. */
    const uint16_t lo_ok = dt == DT_BF16 ? 0x2B80 : 0x0000, hi_ok = dt == DT_BF16 ? 0x5380 : 0x7C00;
    (void)vec, (void)lo_ok, (void)hi_ok; /* unused where there is no vector path */
    uint8_t tile[BLOCK_N * CW];
    float rowscale[BLOCK_N];
    uint16_t rowmax[BLOCK_N];
    int pos[BLOCK_N];
    for (int r = 0; r < BLOCK_N; r++) pos[r] = layout == LAYOUT_MARLIN ? scale_pos(r, single) : r;
    double acc[2] = {0.0, 0.0};
    const int mse = (flags & FLAG_MSE) != 0;
    double sq[CW]; /* the mse search's squares for one group of at most CW values */
    double *sq_big = NULL; /* ... and for one whole row (channelwise): P(k) doubles */
    if (mse && group > CW) {
        int64_t P = 1;
        while (P < k) P <<= 1;
        sq_big = malloc((size_t)P * sizeof(double));
        if (!sq_big) return BAD_ARGS;
    }

    for (int64_t b0 = 0; b0 < rows; b0 += BLOCK_N) {
        const uint16_t *wb = w + b0 * k;
        const int64_t nrow = row0 + b0; /* tensor row of the block's first row */
        if (group > CW) { /* one group per row: its scale before any tile */
            for (int r = 0; r < BLOCK_N; r++) {
#ifdef RTNQ_X86
                uint16_t m = vec ? maxabs_avx2(wb + r * k, k) : maxabs_scalar(wb + r * k, k);
#else
                uint16_t m = maxabs_scalar(wb + r * k, k);
#endif
                if (m >= infb) { free(sq_big); *bad_row = nrow + r; return NONFINITE; }
                rowmax[r] = m;
                rowscale[r] = mse ? mse_scale(wb + r * k, k, m, bits, dt, sq_big, vec) : group_scale(m, bits, dt);
                uint16_t sb = dt == DT_BF16 ? f32_to_bf16(rowscale[r]) : f32_to_f16(rowscale[r]);
                scales[(nrow + pos[r]) * s_t] = sb; /* groups == 1: group 0 */
            }
        }
        for (int64_t kc = 0; kc < k; kc += CW) {
            for (int rb = 0; rb < BLOCK_N; rb += 8) {
                uint16_t m8[4][8]; /* [group in tile row][row in batch] */
                float s8[4][8];
                for (int64_t gi = 0; gi < gpc; gi++) {
                    const uint16_t *gs = wb + rb * k + kc + gi * glen;
                    if (group > CW) {
                        memcpy(m8[gi], rowmax + rb, sizeof m8[gi]);
                        memcpy(s8[gi], rowscale + rb, sizeof s8[gi]);
                        continue;
                    }
#ifdef RTNQ_X86
                    if (vec) {
                        scales8_avx2(gs, k, glen, bits, dt, m8[gi], s8[gi]);
                    } else
#endif
                        for (int r = 0; r < 8; r++) {
                            m8[gi][r] = maxabs_scalar(gs + r * k, glen);
                            s8[gi][r] = m8[gi][r] < infb ? group_scale(m8[gi][r], bits, dt) : 0.0f;
                        }
                    for (int r = 0; r < 8; r++) {
                        if (m8[gi][r] >= infb) { free(sq_big); *bad_row = nrow + rb + r; return NONFINITE; }
                        if (mse) s8[gi][r] = mse_scale(gs + r * k, glen, m8[gi][r], bits, dt, sq, vec);
                        int64_t g_index = (kc + gi * glen) / group;
                        float sv = s8[gi][r];
                        scales[g_index * s_g + (nrow + pos[rb + r]) * s_t] =
                            dt == DT_BF16 ? f32_to_bf16(sv) : f32_to_f16(sv);
                    }
                }
                for (int r = rb; r < rb + 8; r++) {
                    const uint16_t *src = wb + r * k + kc;
                    uint8_t *dst = tile + r * CW;
                    for (int64_t gi = 0; gi < gpc; gi++) {
                        const uint16_t *gs = src + gi * glen;
                        const uint16_t m = m8[gi][r - rb];
                        const float sv = s8[gi][r - rb];
                        if (m == 0) { /* all zeros: code = bias, w_hat = 0, nothing to add */
                            memset(dst + gi * glen, 1 << (bits - 1), (size_t)glen);
                            continue;
                        }
#ifdef RTNQ_X86
                        if (vec && sv > 0.0f && m >= lo_ok && m < hi_ok) {
                            quant_avx2(gs, glen, sv, bits, dt, dst + gi * glen, acc);
                            continue;
                        }
#endif
                        quant_scalar(gs, glen, sv, bits, dt, dst + gi * glen, acc);
                    }
                }
            }
            if (layout == LAYOUT_ROWS) {
                uint8_t *d = qweight + nrow * kp_bytes + kc * bits / 8;
#ifdef RTNQ_X86
                if (!(flags & FLAG_SCALAR)) {
                    store_rows_sse2(tile, bits, d, kp_bytes);
                    continue;
                }
#endif
                store_rows(tile, bits, d, kp_bytes);
                continue;
            }
            if (layout == LAYOUT_COLS) {
                uint32_t *d = (uint32_t *)qweight + (kc * bits / 32) * n + nrow;
#ifdef RTNQ_X86
                if (!(flags & FLAG_SCALAR)) {
                    store_cols_sse2(tile, bits, d, n);
                    continue;
                }
#endif
                store_cols(tile, bits, d, n);
                continue;
            }
            uint8_t *q0 = qweight + (kc / 16) * row_bytes + (nrow / BLOCK_N) * block_bytes;
#ifdef RTNQ_X86
            if (!(flags & FLAG_SCALAR)) {
                pack_sse2(tile, bits, q0, row_bytes);
                continue;
            }
#endif
            pack_scalar(tile, bits, q0, row_bytes);
        }
    }
    free(sq_big);
    sums[0] += acc[0];
    sums[1] += acc[1];
    return OK;
}
