// Sweep candidate "coop_128x192_c2x1", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): CTA tile
// 128 x 192 x 128, the unaligned N tile DeepGEMM uses to fill 132 SMs (N = 2112 = 11 x 192: 352 tiles at
// M = 4096, 2.7 waves, where 128 x 128 gives 544 tiles, 4.1 waves, the fifth nearly empty). Each consumer
// warpgroup holds 64 x 192 FP32 accumulators twice (the promoted sum and the current 128-deep block):
// 192 registers, the most that fits beside addressing under the 240 a consumer gets (64 x 256 would
// spill). CUTLASS wants the scale granularity to divide the tile, so b's scales are read per 64 rows
// (each 128x128 block's scale repeated twice by the launcher). Cluster 2 x 1 (11 N tiles are odd).
// Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_coop_128x192_c2x1_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _192, _128>, Shape<_2, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, void, /*kSfaMMajor=*/true,
                   OutType::kBFloat16, /*kSfbGranN=*/64>::run(p);
}

}  // namespace anvil::ops::sm90
