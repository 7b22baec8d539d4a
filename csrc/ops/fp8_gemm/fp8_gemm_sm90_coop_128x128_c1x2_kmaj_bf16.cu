// Sweep candidate "coop_128x128_c1x2_kmaj", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only):
// coop_128x128_c1x2 reading a's scales K-major as anvil makes them (cp.async by the producer) instead of
// M-major through TMA: no transposing launch before the GEMM, against a slower scale load in the
// mainloop. Measures which of the two costs more. Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_coop_128x128_c1x2_kmaj_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, void, /*kSfaMMajor=*/false,
                   OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
