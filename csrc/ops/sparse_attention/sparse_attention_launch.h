// Declarations of the kernel launchers that sparse_attention_fwd.cu and sparse_attention_bwd.cu
// instantiate (one heavy translation unit each, so the two compile in parallel) and that
// sparse_attention_cuda.cu calls.
#pragma once

#include "ops/sparse_attention/sparse_attention_kernels.cuh"

#include <cuda_runtime.h>

namespace anvil::ops::sparse_cuda {

// Grid (query tiles, B * Hq); T is __nv_bfloat16 or __half, D 64 or 128. wide: 128-row query tiles
// (8 warps; allowed when a query tile lies in one query block), used where shared memory allows.
template <typename T, int D>
void launch_forward(const Params& p, bool wide, cudaStream_t stream);
// dq kernel, then the dk/dv kernel.
template <typename T, int D>
void launch_backward(const Params& p, bool wide, cudaStream_t stream);

}  // namespace anvil::ops::sparse_cuda
