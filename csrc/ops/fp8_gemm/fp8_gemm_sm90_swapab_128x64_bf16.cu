// Configuration "swapab_128x64", bf16 output: decode (M <= 64). The operands swapped (out^T = b a^T) so
// the weight's N fills the 128-row side of the tile and the tokens a 64-wide side; cooperative, cluster
// 1 x 1, stream-K (a few dozen N tiles for 132 SMs: the K loop is split so every SM streams its share of
// the weight). a's scales K-major as anvil makes them. Template: fp8_gemm_sm90_swap_kernels.cuh.
#include "ops/fp8_gemm/fp8_gemm_sm90_swap_kernels.cuh"

namespace anvil::ops::sm90 {

std::string run_swapab_128x64_bf16(const DenseArgs& p) {
  return SwapAbGemm<Shape<_128, _64, _128>, Shape<_1, _1, _1>, cutlass::gemm::StreamKScheduler,
                    OutType::kBFloat16>::run(p);
}

}  // namespace anvil::ops::sm90
