// Instantiations of the sparse_attention forward kernel: bf16 and fp16, head dims 64 and 128, five tile
// shapes (64 rows; 128 rows or 2 heads x 64 rows, each as 8 warps x 16 rows or 4 warps x 32 rows):
// twenty kernels. Kernel: sparse_attention_kernels.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <string>

namespace anvil::ops::sparse_cuda {
namespace {

template <typename T, int D, int kWarps, int kHeads, int kM>
void launch(const Params& p, cudaStream_t stream) {
  constexpr int kRows = kWarps * 16 * kM, kRowsH = kRows / kHeads;
  const int smem = (kRows + 4 * kTile) * D * static_cast<int>(sizeof(T));  // Q, 2 x K, 2 x V
  auto kernel = sparse_attention_fwd_kernel<T, D, kWarps, kHeads, kM>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seq + kRowsH - 1) / kRowsH, p.batch * p.heads_q / kHeads);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The wide shapes come as 8 warps x 16 rows (default) or 4 warps x 32 rows (ANVIL_SPARSE_FWD_WARPS=4);
// read on every call, so a benchmark can time both in one process.
bool four_warps_of_32_rows() {
  const char* env = std::getenv("ANVIL_SPARSE_FWD_WARPS");
  return env != nullptr && std::string(env) == "4";
}

}  // namespace

template <typename T, int D>
void launch_forward(const Params& p, TileShape shape, cudaStream_t stream) {
  const int wide_smem = (8 * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T)) + static_cast<int>(sizeof(QueryPlan));
  if (at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin < static_cast<size_t>(wide_smem)) {
    shape = TileShape::kRows64;
  }
  const bool four = four_warps_of_32_rows();
  switch (shape) {
    case TileShape::kRows128:
      four ? launch<T, D, 4, 1, 2>(p, stream) : launch<T, D, 8, 1, 1>(p, stream);
      break;
    case TileShape::kTwoHeads64:
      four ? launch<T, D, 4, 2, 2>(p, stream) : launch<T, D, 8, 2, 1>(p, stream);
      break;
    default: launch<T, D, 4, 1, 1>(p, stream);
  }
}

template void launch_forward<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__half, 128>(const Params&, TileShape, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
