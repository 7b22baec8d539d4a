// Typed entry points (include/anvil/ops.h): each looks its schema up once and calls the dispatcher.
#include "anvil/ops.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace anvil::ops {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const std::string& granularity) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view)>(
      "anvil::quantize_fp8");
  return op.call(x, granularity);
}

at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                          at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                              at::ScalarType)>("anvil::dequantize_fp8");
  return op.call(q, scale_inv, granularity, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, const std::string& granularity) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view)>(
      "anvil::quantize_int8");
  return op.call(x, granularity);
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                           at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                              at::ScalarType)>("anvil::dequantize_int8");
  return op.call(q, scale_inv, granularity, out_dtype);
}

}  // namespace anvil::ops
