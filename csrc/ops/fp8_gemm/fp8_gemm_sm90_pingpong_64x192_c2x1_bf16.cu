// Sweep candidate "pingpong_64x192_c2x1", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): CTA
// tile 64 x 192 x 128, two consumer warpgroups each owning a tile and taking turns (one's epilogue under
// the other's mainloop: short K such as 1536 and 2048 spends a larger share in the epilogue), N = 192 as
// in coop_128x192_c2x1 (b's scales per 64 rows), cluster 2 x 1, a's scales K-major (cp.async).
// Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_pingpong_64x192_c2x1_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_64, _192, _128>, Shape<_2, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecialized, void, /*kSfaMMajor=*/false, OutType::kBFloat16,
                   /*kSfbGranN=*/64>::run(p);
}

}  // namespace anvil::ops::sm90
