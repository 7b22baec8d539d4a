// Declarations of the kernel launchers that sparse_attention_fwd.cu and sparse_attention_bwd.cu
// instantiate (one heavy translation unit each, so the two compile in parallel) and that
// sparse_attention_cuda.cu calls.
#pragma once

#include "ops/sparse_attention/sparse_attention_kernels.cuh"

#include <cuda_runtime.h>

namespace anvil::ops::sparse_cuda {

// Query tiles of the forward and dq kernels: 64 rows (4 warps); 128 rows (8 warps; every tile must lie in
// one query block); two heads of a GQA group x 64 rows (8 warps; the group must be even). The wide shapes
// fall back to 64 rows where the device's shared memory is too small (sm_89).
enum class TileShape { kRows64, kRows128, kTwoHeads64 };

// Grid (query tiles, B * Hq / heads per CTA); T is __nv_bfloat16 or __half, D 64 or 128.
template <typename T, int D>
void launch_forward(const Params& p, TileShape shape, cudaStream_t stream);
// The Hopper forward (wgmma; sparse_attention_fwd_sm90.cu, built only with ANVIL_WITH_SM90A): shapes
// kRows128 and kTwoHeads64 only, on an sm_90 device.
template <typename T, int D>
void launch_forward_sm90(const Params& p, TileShape shape, cudaStream_t stream);
// The Hopper dk/dv kernel (wgmma; sparse_attention_bwd_sm90.cu, built only with ANVIL_WITH_SM90A): 128 keys
// per CTA for the kRows128 shape, 64 for the others, on an sm_90 device.
template <typename T, int D>
void launch_dkdv_sm90(const Params& p, TileShape shape, cudaStream_t stream);
// The Hopper dq kernel: shapes kRows128 and kTwoHeads64, on an sm_90 device.
template <typename T, int D>
void launch_dq_sm90(const Params& p, TileShape shape, cudaStream_t stream);
// Delta = rowsum(dO * O) in fp32: grad_o and o (rows, dim_v) contiguous, delta (rows).
template <typename T>
void launch_delta(const T* grad_o, const T* o, float* delta, int64_t rows, int dim_v, cudaStream_t stream);
// dq kernel, then the dk/dv kernel.
template <typename T, int D>
void launch_backward(const Params& p, TileShape shape, cudaStream_t stream);

}  // namespace anvil::ops::sparse_cuda
