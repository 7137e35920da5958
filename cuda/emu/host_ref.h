/*
 * host_ref.h: CPU references of rtnq's three kernels, exported by the test-only build/librtnq_emu.so (not by
 * librtnq_cuda.so, whose ABI is include/rtnq_cuda.h). They run the same decode helpers the kernels use over host
 * memory, so CI checks the layout arithmetic without a GPU, and a GPU run can be compared with them bitwise.
 * All pointers are host pointers; no alignment requirement. Shapes, dtypes, layouts and statuses as in rtnq_cuda.h.
 *   rtnq_host_dequantize: variant 0 = the dequantize kernel's arithmetic (fp32 product, one rounding),
 *                         variant 1 = the GEMM kernels' arithmetic (magic-number decode + 16-bit multiply).
 *   rtnq_host_gemm_small_m: emulates the small-M kernel lane by lane with the same fp32 operation order
 *     (fmaf chain, shuffle butterfly, warp and split sums), so with the splits rtnq_gemm_plan reports the
 *     GPU result should be bit-identical.
 *   rtnq_host_gemm_tensor_core: emulates the tensor-core kernel warp by warp: the swizzled shared-memory
 *     tiles, ldmatrix and mma.sync fragment layouts as the PTX ISA defines them, the split-K reduction
 *     (equal to the GPU up to the tensor cores' fp32 summation order, see mma_model.h).
 *   splits: the k-split count to emulate (1 .. k/16 for small-M, 1 .. k/64 for tensor-core).
 *   rtnq_host_last_error: one-line detail of this thread's last failed rtnq_host_* call ("" after a success).
 */
#ifndef RTNQ_HOST_REF_H
#define RTNQ_HOST_REF_H

#include "../include/rtnq_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

RTNQ_API const char *rtnq_host_last_error(void);
RTNQ_API int rtnq_host_dequantize(const void *qweight, const void *scales, void *out, int64_t n, int64_t k,
                                  int32_t bits, int32_t group_size, int32_t dtype, int32_t layout, int32_t variant);
RTNQ_API int rtnq_host_gemm_small_m(const void *x, const void *qweight, const void *scales, void *out, int64_t m,
                                    int64_t n, int64_t k, int32_t bits, int32_t group_size, int32_t dtype,
                                    int32_t splits);
RTNQ_API int rtnq_host_gemm_tensor_core(const void *x, const void *qweight, const void *scales, void *out,
                                        int64_t m, int64_t n, int64_t k, int32_t bits, int32_t group_size,
                                        int32_t dtype, int32_t splits);

#ifdef __cplusplus
}
#endif

#endif /* RTNQ_HOST_REF_H */
