// Configuration "swapab_128x64", bf16 output: small batches, 64 < M <= 128 where swapab_128x32's tiles
// would need more than one wave (N > 4224 on 132 SMs). The operands swapped (out^T = b a^T) so the weight's
// N fills the 128-row side of the tile and the tokens a 64-wide side; cooperative, cluster 1 x 1, CUTLASS's
// stream-K scheduler, which the heuristic runs data-parallel (fp8_gemm_heuristic.cpp). a's scales K-major
// as anvil makes them. Template: fp8_gemm_sm90_swap_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_swap_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_swapab_128x64_bf16(const DenseArgs& p) {
  return SwapAbGemm<Shape<_128, _64, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler,
                    OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
