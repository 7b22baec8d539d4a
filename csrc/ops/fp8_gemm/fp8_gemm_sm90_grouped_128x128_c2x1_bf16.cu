// Sweep candidate "grouped_128x128_c2x1", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): the MoE
// grouped GEMM of grouped_128x128_c1x2 with clusters of 2 x 1, multicasting the expert's weight tile to two
// CTAs on neighbouring row tiles (the weight is the operand every row tile of an expert re-reads).
// Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_grouped_128x128_c2x1_bf16(const GroupedArgs& p) {
  return GroupedGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                     cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
