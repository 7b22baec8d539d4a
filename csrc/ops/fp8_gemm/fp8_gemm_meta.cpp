// Meta kernels of the FP8 GEMM ops: shapes and dtypes only (every output shape is data independent), with
// the same argument checks as on a real device, so the ops trace under torch.compile and FakeTensor.
#include "ops/fp8_gemm/fp8_gemm_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

at::Tensor fp8_gemm_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                         const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                         const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const GemmShape s = check_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, "anvil::fp8_gemm");
  return at::empty({s.m, s.n}, a.options().dtype(out_dtype));
}

at::Tensor fp8_grouped_gemm_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                 const at::Tensor& b_scale, const at::Tensor& offsets,
                                 c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const GroupedShape s =
      check_grouped_args(a, a_scale, b, b_scale, offsets, out_dtype, "anvil::fp8_grouped_gemm");
  return at::empty({s.rows, s.n}, a.options().dtype(out_dtype));
}

at::Tensor fp8_grouped_gemm_masked_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                        const at::Tensor& b_scale, const at::Tensor& masked_m,
                                        c10::optional<at::ScalarType> out_dtype_opt) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const GroupedShape s =
      check_masked_args(a, a_scale, b, b_scale, masked_m, out_dtype, "anvil::fp8_grouped_gemm_masked");
  return at::empty({s.experts, s.capacity, s.n}, a.options().dtype(out_dtype));
}

// fp8_linear and its backward are composites (fp8_gemm_autograd.cpp); their own Meta kernels keep
// FakeTensor from tracing through the composite (slicing fp8 weights under fake mode trips torch).
at::Tensor fp8_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                           const c10::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, weight_scale_inv, "anvil::fp8_linear");
  auto shape = x.sizes().vec();
  shape.back() = weight.size(0);
  return at::empty(shape, x.options());
}

at::Tensor fp8_linear_backward_meta(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor&) {
  auto shape = grad_out.sizes().vec();
  shape.back() = weight.size(1);
  return at::empty(shape, grad_out.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("fp8_linear", &fp8_linear_meta);
  m.impl("fp8_linear_backward", &fp8_linear_backward_meta);
  m.impl("fp8_gemm", &fp8_gemm_meta);
  m.impl("fp8_grouped_gemm", &fp8_grouped_gemm_meta);
  m.impl("fp8_grouped_gemm_masked", &fp8_grouped_gemm_masked_meta);
}

}  // namespace anvil::ops
