// Sweep candidate "coop_128x128_c2x1", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): the
// workhorse coop_128x128_c1x2 with its cluster turned: 2 x 1 CTAs along M share each B (weight) tile by
// TMA multicast instead of each A tile. For N = 2112 (17 tiles of 128, odd) a 1 x 2 cluster leaves a CTA
// of every pair idle on the last column; pairs along M (32 tiles at M = 4096) never do.
// Template: fp8_gemm_sm90_kernels.cuh; selection: fp8_gemm_heuristic.cpp.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_coop_128x128_c2x1_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, void, /*kSfaMMajor=*/true,
                   OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
