// Instantiations of the sparse_attention forward kernel: bf16 and fp16, head dims 64 and 128, 4 or 8
// warps (eight kernels). Kernel: sparse_attention_kernels.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace anvil::ops::sparse_cuda {
namespace {

template <typename T, int D, int kWarps>
void launch(const Params& p, cudaStream_t stream) {
  const int smem = (kWarps * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T));  // Q, 2 x K, 2 x V
  auto kernel = sparse_attention_fwd_kernel<T, D, kWarps>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seq + kWarps * 16 - 1) / (kWarps * 16), p.batch * p.heads_q);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int D>
void launch_forward(const Params& p, bool wide, cudaStream_t stream) {
  const int wide_smem = (8 * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T)) + static_cast<int>(sizeof(QueryPlan));
  if (wide && at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin >= static_cast<size_t>(wide_smem)) {
    launch<T, D, 8>(p, stream);
  } else {
    launch<T, D, 4>(p, stream);
  }
}

template void launch_forward<__nv_bfloat16, 64>(const Params&, bool, cudaStream_t);
template void launch_forward<__nv_bfloat16, 128>(const Params&, bool, cudaStream_t);
template void launch_forward<__half, 64>(const Params&, bool, cudaStream_t);
template void launch_forward<__half, 128>(const Params&, bool, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
