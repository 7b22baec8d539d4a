// Sweep candidate "grouped_pingpong_64x128_c1x2", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only):
// the MoE grouped GEMM with CUTLASS's pointer-array ping-pong kernel: 64 x 128 x 128 tiles, two consumer
// warpgroups on alternate tiles so one's epilogue (and tensor-map switch between experts) hides under the
// other's mainloop; cluster 1 x 2. Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_grouped_pingpong_64x128_c1x2_bf16(const GroupedArgs& p) {
  return GroupedGemm<Shape<_64, _128, _128>, Shape<_1, _2, _1>,
                     cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                     cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
