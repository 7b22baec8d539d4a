// THE one TORCH_LIBRARY(anvil, m): every anvil operator's schema, one purpose line each.
// Kernels register per dispatch key beside their implementations (csrc/ops/<op>/<op>_{cpu,cuda,meta}).
// Scales are dequantization multipliers everywhere (x ~= q * scale_inv); see docs/FORMATS.md.
#include <torch/library.h>

TORCH_LIBRARY(anvil, m) {
  // Quantize x (..., K) fp32/bf16/fp16 to float8_e4m3fn with one scale per group:
  // granularity tensor | row | block1x128 | block128x128 (x 2-D). Saturates at +-448.
  m.def("quantize_fp8(Tensor x, str granularity) -> (Tensor q, Tensor scale_inv)");
  // q * scale_inv in out_dtype; the inverse of quantize_fp8 for the same granularity.
  m.def("dequantize_fp8(Tensor q, Tensor scale_inv, str granularity, ScalarType out_dtype) -> Tensor");
  // Symmetric int8 in [-127, 127], round half to even, same granularities as quantize_fp8.
  m.def("quantize_int8(Tensor x, str granularity) -> (Tensor q, Tensor scale_inv)");
  // q * scale_inv in out_dtype; the inverse of quantize_int8.
  m.def("dequantize_int8(Tensor q, Tensor scale_inv, str granularity, ScalarType out_dtype) -> Tensor");
}
