// Instantiations of the Hopper backward kernels of sparse_attention (sparse_attention_bwd_sm90.cuh): the dq
// kernel (128 rows or 2 heads x 64) and the dk/dv kernel (128 or 64 keys), bf16 and fp16, head dims 64 and
// 128, sixteen kernels, compiled for sm_90a only (the anvil_ops_sm90a object library). launch_backward
// (sparse_attention_bwd.cu) calls them on sm_90 devices (ANVIL_SPARSE_SM90=0 or ANVIL_SPARSE_SM90_BWD=0
// keep the mma.sync kernels).
#include "ops/sparse_attention/sparse_attention_bwd_sm90.cuh"
#include "ops/sparse_attention/sparse_attention_launch.h"
#include "ops/sparse_attention/sparse_attention_tma.h"

#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <string>

namespace anvil::ops::sparse_cuda {

template <typename T, int D, int kKeys>
void launch_dkdv_sm90_keys(const Params& p, cudaStream_t stream) {
  const sm90::TmaMaps maps = qkv_maps<T, D>(p);
  const CUtensorMap grad_o_map = head_map<T, D>(p.grad_o, p.seq, static_cast<int64_t>(p.batch) * p.heads_q);
  const int smem = sm90::DkdvConfig<D, kKeys>::kSmemBytes;
  auto kernel = sm90::sparse_attention_dkdv_sm90_kernel<T, D, kKeys>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int tiles = (p.seq + kKeys - 1) / kKeys;
  const int split = p.dk_accum != nullptr ? p.heads_q / p.heads_kv : 1;
  kernel<<<dim3(tiles, p.batch * p.heads_kv, split), sm90::kWsThreads, smem, stream>>>(p, maps, grad_o_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 128 keys per CTA where every 128-key tile lies in one key block (the kRows128 shape), else 64.
// ANVIL_SPARSE_SM90_DKDV_KEYS=64 takes 64 everywhere (read on every call).
template <typename T, int D>
void launch_dkdv_sm90(const Params& p, TileShape shape, cudaStream_t stream) {
  const char* env = std::getenv("ANVIL_SPARSE_SM90_DKDV_KEYS");
  const bool force64 = env != nullptr && std::string(env) == "64";
  if (shape == TileShape::kRows128 && !force64) launch_dkdv_sm90_keys<T, D, 128>(p, stream);
  else launch_dkdv_sm90_keys<T, D, 64>(p, stream);
}

template <typename T, int D, int kHeads>
void launch_dq_sm90_heads(const Params& p, cudaStream_t stream) {
  constexpr int kRowsH = sm90::kRows / kHeads;
  const sm90::TmaMaps maps = qkv_maps<T, D>(p);
  const CUtensorMap grad_o_map = head_map<T, D>(p.grad_o, p.seq, static_cast<int64_t>(p.batch) * p.heads_q);
  const int smem = sm90::DqConfig<D>::kSmemBytes;
  auto kernel = sm90::sparse_attention_dq_sm90_kernel<T, D, kHeads>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seq + kRowsH - 1) / kRowsH, p.batch * p.heads_q / kHeads);
  kernel<<<grid, sm90::kWsThreads, smem, stream>>>(p, maps, grad_o_map);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void launch_dq_sm90(const Params& p, TileShape shape, cudaStream_t stream) {
  TORCH_CHECK(shape != TileShape::kRows64, "launch_dq_sm90: no 64-row shape (use the mma.sync kernel)");
  if (shape == TileShape::kTwoHeads64) launch_dq_sm90_heads<T, D, 2>(p, stream);
  else launch_dq_sm90_heads<T, D, 1>(p, stream);
}

template void launch_dq_sm90<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_dq_sm90<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_dq_sm90<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_dq_sm90<__half, 128>(const Params&, TileShape, cudaStream_t);
template void launch_dkdv_sm90<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_dkdv_sm90<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_dkdv_sm90<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_dkdv_sm90<__half, 128>(const Params&, TileShape, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
