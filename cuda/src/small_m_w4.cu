// small_m_w4.cu: 4-bit instantiations of the small-M kernel (4 row counts x fp16/bf16), one translation
// unit per bit width so `make -j` compiles them in parallel.
#include "small_m_kernel.cuh"

namespace rtnq {

int launch_small_m_w4(GemmArgs &a) {
    return a.dtype == RTNQ_BFLOAT16 ? small_m::launch_typed<4, __nv_bfloat16>(a) : small_m::launch_typed<4, __half>(a);
}

}  // namespace rtnq
