// Meta kernels of the quantization ops: shapes and dtypes only, so the ops trace under
// torch.compile and FakeTensor. The same checks run as on a real device.
#include "ops/quantize/quantize_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace anvil::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_meta(const at::Tensor& x, c10::string_view granularity,
                                                 at::ScalarType q_dtype, const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_quantize_args(x, g, op);
  return {at::empty(x.sizes(), x.options().dtype(q_dtype)),
          at::empty(scale_shape(x.sizes(), g), x.options().dtype(at::kFloat))};
}

at::Tensor dequantize_meta(const at::Tensor& q, const at::Tensor& scale_inv, c10::string_view granularity,
                           at::ScalarType q_dtype, at::ScalarType out_dtype, const char* op) {
  const Granularity g = parse_granularity(granularity, op);
  check_dequantize_args(q, scale_inv, g, q_dtype, out_dtype, op);
  return at::empty(q.sizes(), q.options().dtype(out_dtype));
}

std::tuple<at::Tensor, at::Tensor> quantize_fp8_meta(const at::Tensor& x, c10::string_view granularity) {
  return quantize_meta(x, granularity, at::kFloat8_e4m3fn, "anvil::quantize_fp8");
}
std::tuple<at::Tensor, at::Tensor> quantize_int8_meta(const at::Tensor& x, c10::string_view granularity) {
  return quantize_meta(x, granularity, at::kChar, "anvil::quantize_int8");
}
at::Tensor dequantize_fp8_meta(const at::Tensor& q, const at::Tensor& s, c10::string_view granularity,
                               at::ScalarType out_dtype) {
  return dequantize_meta(q, s, granularity, at::kFloat8_e4m3fn, out_dtype, "anvil::dequantize_fp8");
}
at::Tensor dequantize_int8_meta(const at::Tensor& q, const at::Tensor& s, c10::string_view granularity,
                                at::ScalarType out_dtype) {
  return dequantize_meta(q, s, granularity, at::kChar, out_dtype, "anvil::dequantize_int8");
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("quantize_fp8", &quantize_fp8_meta);
  m.impl("dequantize_fp8", &dequantize_fp8_meta);
  m.impl("quantize_int8", &quantize_int8_meta);
  m.impl("dequantize_int8", &dequantize_int8_meta);
}

}  // namespace anvil::ops
