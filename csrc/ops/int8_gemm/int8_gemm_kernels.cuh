// The generic CUDA kernels of int8_gemm (built for every architecture; the Hopper kernel is
// int8_gemm_sm90.cu):
//
//   int8_epilogue_kernel   out[m, n] = (float(acc[m, n]) * a_scale[m]) * b_scale[n] + bias[n], rounded once to
//                          the output dtype: the scale epilogue after cuBLASLt's int32 GEMM (at::_int_mm). One
//                          thread per 4 consecutive outputs of a row when N % 4 == 0 (16-byte int32 loads),
//                          else per output; grid-stride, so any M * N.
//   int8_simt_gemm_kernel  the whole op for the shapes cuBLASLt refuses (M <= 16 decode batches, K or N not a
//                          multiple of 8) or a device without the INT8 tensor-core path: one warp per output,
//                          its 32 lanes striding over K (4 int8 per step via __dp4a when K % 4 == 0 and the rows
//                          are 4-byte aligned), a butterfly sum, then the same epilogue. Exact int32 like the
//                          tensor cores; it is memory bound on b, which is what small M is anyway.
// Both follow int8_gemm_common.h's definition to the operation order, so the CPU reference gives the same
// bits for the same int32 sums (the product and the add are separate fp32 roundings: __fmul_rn, __fadd_rn,
// never a contracted fma).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace anvil::ops::int8k {

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// The scales and bias of one problem. a_scale / b_scale: per-row when the flag is set, else element 0.
struct Epilogue {
  const float* a_scale;
  bool a_per_row;
  const float* b_scale;
  bool b_per_row;
  const float* bias;  // (N) fp32 or nullptr
};

__device__ __forceinline__ float epilogue_value(int32_t acc, int64_t m, int64_t n, const Epilogue& e) {
  const float sa = e.a_scale[e.a_per_row ? m : 0];
  const float sb = e.b_scale[e.b_per_row ? n : 0];
  float v = __fmul_rn(__fmul_rn(float(acc), sa), sb);
  if (e.bias) v = __fadd_rn(v, e.bias[n]);
  return v;
}

template <typename T>
__global__ void int8_epilogue_kernel(const int32_t* __restrict__ acc, T* __restrict__ out, int64_t m, int64_t n,
                                     Epilogue e) {
  const bool vec = n % 4 == 0;
  const int64_t per_row = vec ? n / 4 : n;
  const int64_t total = m * per_row;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    if (vec) {
      const int64_t col = (i % per_row) * 4;
      const int4 a = reinterpret_cast<const int4*>(acc)[i];
      T* o = out + row * n + col;
      o[0] = from_float<T>(epilogue_value(a.x, row, col, e));
      o[1] = from_float<T>(epilogue_value(a.y, row, col + 1, e));
      o[2] = from_float<T>(epilogue_value(a.z, row, col + 2, e));
      o[3] = from_float<T>(epilogue_value(a.w, row, col + 3, e));
    } else {
      const int64_t col = i % per_row;
      out[row * n + col] = from_float<T>(epilogue_value(acc[i], row, col, e));
    }
  }
}

constexpr int kSimtWarps = 8;  // warps (outputs) per block of int8_simt_gemm_kernel

template <typename T, bool kDp4a>
__global__ void int8_simt_gemm_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ b, T* __restrict__ out,
                                      int64_t m, int64_t n, int64_t k, Epilogue e) {
  const int lane = threadIdx.x % 32;
  const int64_t idx = int64_t(blockIdx.x) * kSimtWarps + threadIdx.x / 32;  // output m * N + n
  if (idx >= m * n) return;
  const int64_t row = idx / n, col = idx % n;
  const int8_t* ar = a + row * k;
  const int8_t* br = b + col * k;
  int32_t sum = 0;
  if constexpr (kDp4a) {
    const int* a4 = reinterpret_cast<const int*>(ar);
    const int* b4 = reinterpret_cast<const int*>(br);
    for (int64_t i = lane; i < k / 4; i += 32) sum = __dp4a(a4[i], b4[i], sum);
  } else {
    for (int64_t i = lane; i < k; i += 32) sum += int32_t(ar[i]) * int32_t(br[i]);
  }
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) out[idx] = from_float<T>(epilogue_value(sum, row, col, e));
}

}  // namespace anvil::ops::int8k
