// Instantiations of the sparse_attention backward kernels (dq, then dk/dv): bf16 and fp16, head dims 64
// and 128 (eight kernels). Kernels: sparse_attention_kernels.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <c10/cuda/CUDAException.h>

namespace anvil::ops::sparse_cuda {

template <typename T, int D>
void launch_backward(const Params& p, cudaStream_t stream) {
  const int tile_bytes = kTile * D * static_cast<int>(sizeof(T));
  const int smem_dq = 6 * tile_bytes;                                                 // Q, dO, 2 x K, 2 x V
  const int smem_dkdv = 6 * tile_bytes + 4 * kTile * static_cast<int>(sizeof(float));  // K, V, 2 x (Q, dO, lse, Delta)
  auto dq_kernel = sparse_attention_dq_kernel<T, D>;
  auto dkdv_kernel = sparse_attention_dkdv_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dq));
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_dkdv));
  const int tiles = (p.seq + kTile - 1) / kTile;
  dq_kernel<<<dim3(tiles, p.batch * p.heads_q), kThreads, smem_dq, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dkdv_kernel<<<dim3(tiles, p.batch * p.heads_kv), kThreads, smem_dkdv, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_backward<__nv_bfloat16, 64>(const Params&, cudaStream_t);
template void launch_backward<__nv_bfloat16, 128>(const Params&, cudaStream_t);
template void launch_backward<__half, 64>(const Params&, cudaStream_t);
template void launch_backward<__half, 128>(const Params&, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
