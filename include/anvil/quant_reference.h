// Reference (de)quantization helpers in plain ATen ops: slow, obviously correct, device-agnostic.
// The self-check and the tests use them as the formula the anvil kernels must reproduce.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace anvil::ops {

/// scale_inv of a granularity broadcast to the full shape of x (..., K): every element gets the
/// scale of its group (partial blocks at the edges included).
at::Tensor expand_scale_inv(const at::Tensor& scale_inv, at::IntArrayRef x_shape, const std::string& granularity);

/// float(q) * expand_scale_inv(...) in fp32: the dequantization formula.
at::Tensor reference_dequantize(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity);

}  // namespace anvil::ops
