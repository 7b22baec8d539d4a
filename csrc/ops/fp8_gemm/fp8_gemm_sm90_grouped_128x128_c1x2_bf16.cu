// Configuration "grouped_128x128_c1x2", bf16 output: the MoE grouped GEMM (contiguous and masked layouts).
// CUTLASS's pointer-array grouped kernel, cooperative 128 x 128 x 128, clusters of 1 x 2, one problem per
// expert set up on the device (no host synchronisation), a persistent scheduler over all experts' tiles.
// Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_grouped_128x128_c1x2_bf16(const GroupedArgs& p) {
  return GroupedGemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                     cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
