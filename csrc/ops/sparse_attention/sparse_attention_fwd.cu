// Instantiations of the sparse_attention forward kernel: bf16 and fp16, head dims 64 and 128 (four
// kernels; about 40 s to compile per architecture on one core). Kernel: sparse_attention_kernels.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <c10/cuda/CUDAException.h>

namespace anvil::ops::sparse_cuda {

template <typename T, int D>
void launch_forward(const Params& p, cudaStream_t stream) {
  const int smem = 5 * kTile * D * static_cast<int>(sizeof(T));  // Q, 2 x K, 2 x V
  auto kernel = sparse_attention_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seq + kTile - 1) / kTile, p.batch * p.heads_q);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_forward<__nv_bfloat16, 64>(const Params&, cudaStream_t);
template void launch_forward<__nv_bfloat16, 128>(const Params&, cudaStream_t);
template void launch_forward<__half, 64>(const Params&, cudaStream_t);
template void launch_forward<__half, 128>(const Params&, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
