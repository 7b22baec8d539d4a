// The interface between int8_gemm's launcher (int8_gemm_cuda.cu, built for every architecture) and its Hopper
// kernel (int8_gemm_sm90.cu, built for sm_90a alone): a plain struct of pointers and sizes, so the launcher
// never sees a CUTLASS type (the pattern of fp8_gemm_sm90.h).
//
//   a (M, K) int8 row-major (K-major)      b (N, K) int8 row-major (K-major: the nn.Linear weight)
//   out (M, N) bf16 row-major
//   out[m, n] = (float(acc[m, n]) * a_scale[m]) * b_scale[n] + bias[n], acc the exact int32 sum on the INT8
//   tensor cores; a_scale (M) or one scalar, b_scale (N) or one scalar, bias (N) fp32 or nullptr.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace anvil::ops::int8sm90 {

struct Args {
  const int8_t* a;
  const int8_t* b;
  const float* a_scale;
  bool a_per_row;
  const float* b_scale;
  bool b_per_row;
  const float* bias;  // (N) or nullptr
  void* out;          // (M, N) bf16
  int64_t m, n, k;
  int device;
  int sm_count;
  cudaStream_t stream;
};

// Runs the fused kernel; "" on success, else why it could not (CUTLASS's can_implement, ...), nothing launched.
std::string run_bf16(const Args& p);

}  // namespace anvil::ops::int8sm90
