// Configuration "swapab_128x32", bf16 output: decode and small batches (M <= 128 where ceil(M/32) x
// ceil(N/128) tiles fit one wave). As swapab_128x64 (out^T = b a^T: the weight's N on the 128-row side of
// the tile) with the tokens on a 32-wide side: twice the tiles of swapab_128x64 at M = 64, so twice the
// SMs stream the weight, and a stage of 20 KB instead of 24 KB (more stages in flight). Cooperative,
// cluster 1 x 1, CUTLASS's stream-K scheduler, run by the heuristic as data-parallel or split-K (the
// sweep of 2026-11-23: 1.0-1.4x the best baseline at M = 64 and 128, where swapab_128x64 and
// streamk_128x128 gave 0.63-0.99x). Template: fp8_gemm_sm90_swap_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_swap_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_swapab_128x32_bf16(const DenseArgs& p) {
  return SwapAbGemm<Shape<_128, _32, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler,
                    OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
