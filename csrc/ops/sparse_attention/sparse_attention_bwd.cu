// Instantiations of the sparse_attention backward kernels: the dq kernel (the forward's three tile shapes)
// and the dk/dv kernel (64 or 128 keys), bf16 and fp16, head dims 64 and 128 (twenty kernels). Kernels: sparse_attention_kernels.cuh.
// On sm_90 the dq kernel (128-row shapes) and the dk/dv kernel (every shape) are the wgmma ones of
// sparse_attention_bwd_sm90.cuh.
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <string>

namespace anvil::ops::sparse_cuda {
namespace {

template <typename T, int D, int kWarps, int kHeads>
void launch_dq(const Params& p, cudaStream_t stream) {
  const int smem = (2 * kWarps * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T));  // Q, dO, 2 x K, 2 x V
  auto kernel = sparse_attention_dq_kernel<T, D, kWarps, kHeads>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  constexpr int kRowsH = kWarps * 16 / kHeads;
  const dim3 grid((p.seq + kRowsH - 1) / kRowsH, p.batch * p.heads_q / kHeads);
  kernel<<<grid, kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D, int kWarps>
void launch_dkdv(const Params& p, cudaStream_t stream) {
  // K, V (kWarps * 16 keys each), 2 x (Q, dO) of 64 queries, 2 x (lse, Delta)
  const int smem = (2 * kWarps * 16 + 4 * kTile) * D * static_cast<int>(sizeof(T)) +
                   4 * kTile * static_cast<int>(sizeof(float));
  auto kernel = sparse_attention_dkdv_kernel<T, D, kWarps>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int tiles = (p.seq + kWarps * 16 - 1) / (kWarps * 16);
  const int split = p.dk_accum != nullptr ? p.heads_q / p.heads_kv : 1;
  kernel<<<dim3(tiles, p.batch * p.heads_kv, split), kWarps * 32, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The Hopper dq and dk/dv kernels on sm_90 devices, unless ANVIL_SPARSE_SM90=0 or ANVIL_SPARSE_SM90_BWD=0
// (read on every call).
#if defined(ANVIL_WITH_SM90A)
bool use_sm90_backward() {
  for (const char* name : {"ANVIL_SPARSE_SM90", "ANVIL_SPARSE_SM90_BWD"}) {
    const char* env = std::getenv(name);
    if (env != nullptr && std::string(env) == "0") return false;
  }
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
}
#endif

// The Hopper dq kernel (128-row shapes) where it applies; false: the caller runs the mma.sync one.
template <typename T, int D>
bool try_dq_sm90(const Params& p, TileShape shape, cudaStream_t stream) {
#if defined(ANVIL_WITH_SM90A)
  if (shape != TileShape::kRows64 && use_sm90_backward()) {
    launch_dq_sm90<T, D>(p, shape, stream);
    return true;
  }
#endif
  (void)p, (void)shape, (void)stream;
  return false;
}

// The Hopper dk/dv kernel (128 or 64 keys) on sm_90; false: the caller runs the mma.sync one.
template <typename T, int D>
bool try_dkdv_sm90(const Params& p, TileShape shape, cudaStream_t stream) {
#if defined(ANVIL_WITH_SM90A)
  if (use_sm90_backward()) {
    launch_dkdv_sm90<T, D>(p, shape, stream);
    return true;
  }
#endif
  (void)p, (void)shape, (void)stream;
  return false;
}

}  // namespace

template <typename T>
void launch_delta(const T* grad_o, const T* o, float* delta, int64_t rows, int dim_v, cudaStream_t stream) {
  const int lanes = dim_v / 8;
  TORCH_CHECK(dim_v % 8 == 0 && lanes <= 32 && (lanes & (lanes - 1)) == 0,
              "launch_delta: Dv / 8 must be a power of two <= 32, got Dv ", dim_v);
  const int64_t threads = rows * lanes;
  if (threads == 0) return;
  const int64_t blocks = (threads + 255) / 256;
  sparse_attention_delta_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(grad_o, o, delta, rows, lanes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_delta<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*, float*, int64_t, int,
                                          cudaStream_t);
template void launch_delta<__half>(const __half*, const __half*, float*, int64_t, int, cudaStream_t);

template <typename T, int D>
void launch_backward(const Params& p, TileShape shape, cudaStream_t stream) {
  const int tile_bytes = kTile * D * static_cast<int>(sizeof(T));
  const int wide_smem = 8 * tile_bytes + static_cast<int>(sizeof(QueryPlan));
  if (at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin < static_cast<size_t>(wide_smem)) {
    shape = TileShape::kRows64;
  }
  if (!try_dq_sm90<T, D>(p, shape, stream)) {
    switch (shape) {
      case TileShape::kRows128: launch_dq<T, D, 8, 1>(p, stream); break;
      case TileShape::kTwoHeads64: launch_dq<T, D, 8, 2>(p, stream); break;
      default: launch_dq<T, D, 4, 1>(p, stream);
    }
  }
  if (!try_dkdv_sm90<T, D>(p, shape, stream)) {
    if (shape == TileShape::kRows128) launch_dkdv<T, D, 8>(p, stream);
    else launch_dkdv<T, D, 4>(p, stream);
  }
}

template void launch_backward<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_backward<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_backward<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_backward<__half, 128>(const Params&, TileShape, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
