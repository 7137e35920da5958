// dequant.cu: launcher of the dequantize kernel (dequant_kernel.cuh).
#include "common.cuh"
#include "dequant_kernel.cuh"

namespace rtnq {
namespace {

using dequant::dequant_kernel;
using dequant::kTileK;

template <int BITS, typename T>
int launch(const DequantArgs &a) {
    const dim3 grid(static_cast<unsigned>(a.n / kBlockN), static_cast<unsigned>(a.k / kTileK));
    dequant_kernel<BITS, T><<<grid, 256, 0, a.stream>>>(
        static_cast<const int4 *>(a.qweight), static_cast<const T *>(a.scales), static_cast<T *>(a.out), a.n, a.k,
        a.groups.channelwise ? 0 : static_cast<int>(a.groups.size), a.groups.channelwise ? 1 : 0, a.layout);
    return check_launch("dequant_kernel");
}

}  // namespace

int launch_dequantize(const DequantArgs &a) {
    if (a.k / kTileK > 65535) return fail(RTNQ_ERR_SHAPE, "k=%lld is too large for the dequantize grid", (long long)a.k);
    if (a.n / kBlockN > 0x7fffffff) return fail(RTNQ_ERR_SHAPE, "n=%lld is too large", (long long)a.n);
    const bool bf16 = a.dtype == RTNQ_BFLOAT16;
    if (a.bits == 4) return bf16 ? launch<4, __nv_bfloat16>(a) : launch<4, __half>(a);
    return bf16 ? launch<8, __nv_bfloat16>(a) : launch<8, __half>(a);
}

}  // namespace rtnq
