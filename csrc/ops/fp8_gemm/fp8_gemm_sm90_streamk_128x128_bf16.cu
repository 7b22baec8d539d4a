// Configuration "streamk_128x128", bf16 output: mid-size problems (M > 128) with fewer tiles than four
// waves of SMs (M <= 128 goes to the swapped configurations since the sweep of 2026-11-23). Cooperative
// 128 x 128 x 128, cluster 1 x 1, CUTLASS's stream-K scheduler: the K loop of the tiles is split across
// the SMs (partial sums reduced through a workspace), so every SM streams its share of the weight, which
// is what bounds a small-M GEMM. a's scales K-major (anvil's layout as is: no extra launch before the
// GEMM, which would cost as much as the GEMM at M = 1). Template: fp8_gemm_sm90_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_streamk_128x128_bf16(const DenseArgs& p) {
  return DenseGemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>,
                   cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum,
                   cutlass::epilogue::TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler,
                   /*kSfaMMajor=*/false, OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
