// Configuration "streamk_128x128_c2x1", bf16 output: large M where whole waves of 128 x 128 tiles leave a
// nearly empty last wave (N = 2112 at M = 4096: 544 tiles on 132 SMs, 4 full waves and 16 tiles). The
// workhorse tile (cooperative 128 x 128 x 128, a's scales M-major through TMA) under CUTLASS's stream-K
// scheduler with its own decomposition heuristic: the full waves data-parallel, the remainder's K loops
// spread over every SM. Clusters of 2 x 1 (B multicast to two row tiles): 17 column tiles are odd, so a
// 1 x 2 cluster would leave one CTA of every pair idle on the last column. Sweep of 2026-11-23: 0.91x /
// 0.94x cuBLAS at M = 4096 / 8192, N = 2112, where coop_128x128_c1x2 gave 0.77x / 0.87x.
// Template: fp8_gemm_sm90_kernels.cuh; selection: fp8_gemm_heuristic.cpp.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_streamk_128x128_c2x1_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                   /*kSfaMMajor=*/true, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
