// Sweep candidate "streamk_128x128_c2x1", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): the
// workhorse tile (cooperative 128 x 128 x 128, a's scales M-major) under CUTLASS's stream-K scheduler with
// clusters of 2 x 1. Its decomposition is a run-time argument (SchedulerKnobs.mode): data-parallel (the
// persistent schedule), stream-K for the partial last wave (N = 2112 at M = 4096: 4 full waves and 16
// tiles; stream-K spreads those 16 tiles' K loops over all SMs) or split-K. Template:
// fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_streamk_128x128_c2x1_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                   /*kSfaMMajor=*/true, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
