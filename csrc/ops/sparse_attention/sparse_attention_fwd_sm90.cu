// Instantiations of the Hopper forward of sparse_attention (sparse_attention_sm90.cuh): bf16 and fp16,
// head dims 64 and 128, 128 rows of one head or 64 rows of two heads: eight kernels, compiled for
// sm_90a only (the anvil_ops_sm90a object library). sparse_attention_cuda.cu calls launch_forward_sm90
// on sm_90 devices (ANVIL_SPARSE_SM90=0 keeps the mma.sync kernel).
#include "ops/sparse_attention/sparse_attention_launch.h"
#include "ops/sparse_attention/sparse_attention_sm90.cuh"
#include "ops/sparse_attention/sparse_attention_tma.h"

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace anvil::ops::sparse_cuda {
namespace {

// The overlapped kernel (FA3's intra-warpgroup overlap; ping-pong unless ANVIL_SPARSE_SM90_PINGPONG=0);
// kKStages: the K ring's depth (0: as deep as the V ring).
template <typename T, int D, int kHeads, int kKStages>
void launch_pp(const Params& p, cudaStream_t stream) {
  constexpr int kRowsH = sm90::kRows / kHeads;
  const int smem = sm90::PpConfig<D, kKStages>::kSmemBytes;
  const sm90::TmaMaps maps = qkv_maps<T, D>(p);
  const char* env = std::getenv("ANVIL_SPARSE_SM90_PINGPONG");
  const int pingpong = env != nullptr && std::string(env) == "0" ? 0 : 1;
  auto kernel = sm90::sparse_attention_fwd_sm90_pp_kernel<T, D, kHeads, kKStages>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid((p.seq + kRowsH - 1) / kRowsH, p.batch * p.heads_q / kHeads);
  kernel<<<grid, sm90::kWsThreads, smem, stream>>>(p, maps, pingpong);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ANVIL_SPARSE_SM90_KSTAGES=3: a third K stage at D = 128 (an experiment on load latency).
template <typename T, int D, int kHeads>
void launch_pp_stages(const Params& p, cudaStream_t stream) {
  if constexpr (D == 128) {
    const char* env = std::getenv("ANVIL_SPARSE_SM90_KSTAGES");
    if (env != nullptr && std::string(env) == "3") {
      launch_pp<T, D, kHeads, 3>(p, stream);
      return;
    }
  }
  launch_pp<T, D, kHeads, 0>(p, stream);
}

}  // namespace

template <typename T, int D>
void launch_forward_sm90(const Params& p, TileShape shape, cudaStream_t stream) {
  TORCH_CHECK(shape != TileShape::kRows64, "launch_forward_sm90: no 64-row shape (use the mma.sync kernel)");
  const bool two = shape == TileShape::kTwoHeads64;
  two ? launch_pp_stages<T, D, 2>(p, stream) : launch_pp_stages<T, D, 1>(p, stream);
}

template void launch_forward_sm90<__nv_bfloat16, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward_sm90<__nv_bfloat16, 128>(const Params&, TileShape, cudaStream_t);
template void launch_forward_sm90<__half, 64>(const Params&, TileShape, cudaStream_t);
template void launch_forward_sm90<__half, 128>(const Params&, TileShape, cudaStream_t);

}  // namespace anvil::ops::sparse_cuda
