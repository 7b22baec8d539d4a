// Typed C++ entry points of every anvil operator. Each calls the PyTorch dispatcher, so the CPU,
// CUDA, Meta and Autograd kernels registered in csrc/ops are chosen exactly as from Python
// (`torch.ops.anvil.<name>`). Schemas: csrc/ops/registration.cpp; formats: docs/FORMATS.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <tuple>

namespace anvil::ops {

/// Quantizes x (..., K) (fp32, bf16 or fp16, contiguous) to float8_e4m3fn.
/// granularity: "tensor" -> scale_inv (); "row" -> (..., 1); "block1x128" -> (..., ceil(K/128));
/// "block128x128" (x 2-D (N, K)) -> (ceil(N/128), ceil(K/128)), DeepSeek-V3's weight_scale_inv.
/// scale_inv is fp32 and a dequantization multiplier: x ~= float(q) * scale_inv, where
/// scale_inv = max(amax, 1e-10) / 448 and q = round_nearest_even(clamp(x / scale_inv, -448, 448)).
/// A group holding NaN or inf gets scale_inv = NaN and q = NaN.
/// @returns (q, scale_inv)
std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const std::string& granularity);

/// float(q) * scale_inv rounded to out_dtype (fp32, bf16 or fp16); shapes as for quantize_fp8.
at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                          at::ScalarType out_dtype);

/// Symmetric int8: scale_inv = max(amax, 1e-10) / 127, q = round_half_even(clamp(x / scale_inv, -127, 127)).
/// Same granularities and shapes as quantize_fp8; a group holding NaN or inf gets scale_inv = NaN, q = 0.
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, const std::string& granularity);

/// float(q) * scale_inv rounded to out_dtype.
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                           at::ScalarType out_dtype);

}  // namespace anvil::ops
