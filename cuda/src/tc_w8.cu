// tc_w8.cu: 8-bit instantiations of the tensor-core kernel (3 tile configs x fp16/bf16), in their own
// translation unit so `make -j` compiles the two bit widths in parallel.
#include "tc_kernel.cuh"

namespace rtnq {

int launch_tensor_core_w8(GemmArgs &a) {
    return a.dtype == RTNQ_BFLOAT16 ? tc_launch_typed<8, __nv_bfloat16>(a) : tc_launch_typed<8, __half>(a);
}

}  // namespace rtnq
