// small_m_w8.cu: 8-bit instantiations of the small-M kernel (4 row counts x fp16/bf16), one translation
// unit per bit width so `make -j` compiles them in parallel.
#include "small_m_kernel.cuh"

namespace rtnq {

int launch_small_m_w8(GemmArgs &a) {
    return a.dtype == RTNQ_BFLOAT16 ? small_m::launch_typed<8, __nv_bfloat16>(a) : small_m::launch_typed<8, __half>(a);
}

}  // namespace rtnq
