// Meta kernel of int8_gemm: the output's shape and dtype only, after the same argument checks as on a real
// device, so the op traces under torch.compile and FakeTensor.
#include "ops/int8_gemm/int8_gemm_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

at::Tensor int8_gemm_meta(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, c10::optional<at::ScalarType> out_dtype_opt,
                          const c10::optional<at::Tensor>& bias) {
  const at::ScalarType out_dtype = out_dtype_opt.value_or(at::kBFloat16);
  const Int8GemmShape s = check_int8_gemm_args(a, a_scale, b, b_scale, out_dtype, bias, "anvil::int8_gemm");
  return at::empty({s.m, s.n}, a.options().dtype(out_dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) { m.impl("int8_gemm", &int8_gemm_meta); }

}  // namespace anvil::ops
