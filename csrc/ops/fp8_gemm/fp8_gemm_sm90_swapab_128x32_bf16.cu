// Sweep candidate "swapab_128x32", bf16 output (built with -DANVIL_FP8_GEMM_SWEEP=ON only): decode with
// 1 to 32 tokens. As swapab_128x64 (out^T = b a^T: the weight's N on the 128-row side), with the tokens on
// a 32-wide side: a stage is 20 KB instead of 24 KB (more stages streaming the weight) and a stream-K /
// split-K partial tile 128 x 32 (half the fix-up traffic). Cooperative, cluster 1 x 1, stream-K
// scheduler (decomposition at run time). Template: fp8_gemm_sm90_swap_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_swap_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_swapab_128x32_bf16(const DenseArgs& p) {
  return SwapAbGemm<Shape<_128, _32, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler,
                    OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
