// Instantiations of the sparse_attention forward kernel: bf16 and fp16, head dims 64 and 128, three tile
// shapes (64 rows; 128 rows; 2 heads x 64 rows): twelve kernels. Kernel: sparse_attention_kernels.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace anvil::ops::sparse_cuda {
namespace {

template <typename T, int D, int kWarps, int kHeads>
void launch(const Params& p, cudaStream_t stream) {
  const int smem = (kWarps * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T));  // Q, 2 x K, 2 x V
  auto kernel = sparse_attention_fwd_kernel<T, D, kWarps, kHeads>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int kRowsH = kWarps * 16 / kHeads;
  const dim3 grid((p.seq + kRowsH - 1) / kRowsH, p.batch * p.heads_q / kHeads);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int D>
void launch_forward(const Params& p, TileShape shape, cudaStream_t stream) {
  const int wide_smem = (8 * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T)) + static_cast<int>(sizeof(QueryPlan));
  if (at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin < static_cast<size_t>(wide_smem)) {
    shape = TileShape::kRows64;
  }
  switch (shape) {
    case TileShape::kRows128: launch<T, D, 8, 1>(p, stream); break;
    case TileShape::kTwoHeads64: launch<T, D, 8, 2>(p, stream); break;
    default: launch<T, D, 4, 1>(p, stream);
  }
}

template void launch_forward<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward<__half, 128>(const Params&, TileShape, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
