// Configuration "coop_128x128_c1x2", bf16 output: the large-M workhorse. CTA tile 128 x 128 x 128 (one scale
// block deep), two consumer warpgroups splitting the tile's rows (cooperative), clusters of 1 x 2 CTAs
// sharing each A tile by TMA multicast, a persistent tile scheduler, a's scales M-major (TMA-loaded; the
// launcher transposes anvil's (M, Kb) into (Kb, M_pad)). Compiled for every output dtype: the
// configuration each can fall back to. Template: fp8_gemm_sm90_kernels.cuh; selection: fp8_gemm_heuristic.cpp.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_coop_128x128_c1x2_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, void, /*kSfaMMajor=*/true,
                   OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
