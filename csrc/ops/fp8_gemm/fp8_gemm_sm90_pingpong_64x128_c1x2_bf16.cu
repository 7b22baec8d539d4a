// Configuration "pingpong_64x128_c1x2", bf16 output: mid-size M. CTA tile 64 x 128 x 128; two consumer
// warpgroups each own a tile and take turns (ping-pong), so one's epilogue hides under the other's
// mainloop; clusters of 1 x 2 sharing A by TMA multicast; persistent scheduler; a's scales K-major
// (anvil's (M, Kb) as is, loaded by cp.async: no transpose). Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_pingpong_64x128_c1x2_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_64, _128, _128>, Shape<_1, _2, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecialized, void, /*kSfaMMajor=*/false,
                   OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
