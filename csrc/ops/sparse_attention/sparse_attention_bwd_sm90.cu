// Instantiations of the Hopper dk/dv kernel of sparse_attention's backward (sparse_attention_bwd_sm90.cuh):
// bf16 and fp16, head dims 64 and 128, four kernels, compiled for sm_90a only (the anvil_ops_sm90a object
// library). launch_backward (sparse_attention_bwd.cu) calls launch_dkdv_sm90 on sm_90 devices for the
// 128-key shape (ANVIL_SPARSE_SM90=0 or ANVIL_SPARSE_SM90_BWD=0 keep the mma.sync kernel).
#include "ops/sparse_attention/sparse_attention_bwd_sm90.cuh"
#include "ops/sparse_attention/sparse_attention_launch.h"
#include "ops/sparse_attention/sparse_attention_tma.h"

#include <c10/cuda/CUDAException.h>

namespace anvil::ops::sparse_cuda {

template <typename T, int D>
void launch_dkdv_sm90(const Params& p, cudaStream_t stream) {
  const int64_t hq = static_cast<int64_t>(p.batch) * p.heads_q, hkv = static_cast<int64_t>(p.batch) * p.heads_kv;
  sm90::TmaMaps maps;
  maps.q = head_map<T, D>(p.q, p.seq, hq);
  maps.k = head_map<T, D>(p.k, p.seq, hkv);
  maps.v = head_map<T, D>(p.v, p.seq, hkv);
  const CUtensorMap grad_o_map = head_map<T, D>(p.grad_o, p.seq, hq);
  constexpr int kKeys = sm90::DkdvConfig<D>::kKeys;
  const int smem = sm90::DkdvConfig<D>::kSmemBytes;
  auto kernel = sm90::sparse_attention_dkdv_sm90_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int tiles = (p.seq + kKeys - 1) / kKeys;
  const int split = p.dk_accum != nullptr ? p.heads_q / p.heads_kv : 1;
  kernel<<<dim3(tiles, p.batch * p.heads_kv, split), sm90::kWsThreads, smem, stream>>>(p, maps, grad_o_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_dkdv_sm90<__nv_bfloat16, 64>(const Params&, cudaStream_t);
template void launch_dkdv_sm90<__nv_bfloat16, 128>(const Params&, cudaStream_t);
template void launch_dkdv_sm90<__half, 64>(const Params&, cudaStream_t);
template void launch_dkdv_sm90<__half, 128>(const Params&, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
