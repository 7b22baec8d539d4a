// Meta kernels of the FP8 GEMM ops: shapes and dtypes only (every output shape is data independent), with
// the same argument checks as on a real device, so the ops trace under torch.compile and FakeTensor.
#include "ops/fp8_gemm/fp8_gemm_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

at::Tensor fp8_gemm_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, at::ScalarType out_dtype, const c10::optional<at::Tensor>& bias) {
  const GemmShape s = check_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, "anvil::fp8_gemm");
  return at::empty({s.m, s.n}, a.options().dtype(out_dtype));
}

at::Tensor fp8_grouped_gemm_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                 const at::Tensor& b_scale, const at::Tensor& offsets, at::ScalarType out_dtype) {
  const GroupedShape s =
      check_grouped_args(a, a_scale, b, b_scale, offsets, out_dtype, "anvil::fp8_grouped_gemm");
  return at::empty({s.rows, s.n}, a.options().dtype(out_dtype));
}

at::Tensor fp8_grouped_gemm_masked_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                        const at::Tensor& b_scale, const at::Tensor& masked_m,
                                        at::ScalarType out_dtype) {
  const GroupedShape s =
      check_masked_args(a, a_scale, b, b_scale, masked_m, out_dtype, "anvil::fp8_grouped_gemm_masked");
  return at::empty({s.experts, s.capacity, s.n}, a.options().dtype(out_dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("fp8_gemm", &fp8_gemm_meta);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_meta);
  m.impl("fp8_grouped_gemm_masked", &fp8_grouped_gemm_masked_meta);
}

}  // namespace anvil::ops
