// CPU reference of int8_gemm, exactly its definition (int8_gemm_common.h): the int8 x int8 products summed
// exactly, then the fp32 epilogue (float(acc) * a_scale[m]) * b_scale[n] + bias[n], rounded once to
// out_dtype. The exact sum runs as an fp64 matmul of the integer values: every partial sum is an integer
// below 2^31 < 2^53, so fp64 represents each one exactly whatever order the BLAS adds them in, and the
// result converts to int32 without loss (faster than an integer loop, and the same bits). It is the oracle
// for the CUDA kernels and the fallback without a GPU.
#include "ops/int8_gemm/int8_gemm_common.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

// acc (M, N) int32 = a (M, K) int8 times b (N, K) int8 transposed, exact.
at::Tensor int8_gemm_accumulate_cpu(const at::Tensor& a, const at::Tensor& b) {
  return at::mm(a.to(at::kDouble), b.to(at::kDouble).t()).to(at::kInt);  // (M, N)
}

// The epilogue on an exact int32 accumulator, in fp32 and in the documented order.
at::Tensor int8_gemm_epilogue_reference(const at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& b_scale,
                                        at::ScalarType out_dtype, const c10::optional<at::Tensor>& bias) {
  auto out = acc.to(at::kFloat) * (a_scale.dim() == 0 ? a_scale : a_scale.view({-1, 1}));  // (M, N) fp32
  out = out * (b_scale.dim() == 0 ? b_scale : b_scale.view({1, -1}));
  if (bias.has_value()) out = out + bias->to(at::kFloat).view({1, -1});
  return out.to(out_dtype);
}

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                         const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  check_int8_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, "anvil::int8_gemm");
  return int8_gemm_epilogue_reference(int8_gemm_accumulate_cpu(a, b), a_scale, b_scale, out_dtype, bias);
}

}  // namespace

#ifndef ANVIL_WITH_CUDA
std::string int8_gemm_path(int64_t, int64_t, int64_t, at::ScalarType) { return "cpu"; }
#endif

TORCH_LIBRARY_IMPL(anvil, CPU, m) { m.impl("int8_gemm", &int8_gemm_cpu); }

}  // namespace anvil::ops
