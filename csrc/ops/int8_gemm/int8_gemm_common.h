// What the CPU, CUDA and Meta kernels of int8_gemm share: the argument checks (each error names the
// argument and the rule it broke) and the one definition of the result (docs/FORMATS.md, "INT8 GEMM"):
//
//   a (M, K) int8, a_scale  ()  per-tensor  | (M, 1) per-row (per token, quantize_int8 "row")
//   b (N, K) int8, b_scale  ()  per-tensor  | (N, 1) per-channel (the nn.Linear weight's rows)
//   acc[m, n] = sum_k int32(a[m, k]) * int32(b[n, k])                       exact, int32
//   out[m, n] = round_to(out_dtype, (float(acc) * a_scale[m]) * b_scale[n] + float(bias[n]))  fp32
//
// The int32 accumulator cannot overflow while K * 128 * 128 < 2^31, so K is at most kMaxInt8GemmK. The
// scales are the fp32 dequantization multipliers quantize_int8 returns (x ~= float(q) * scale_inv).
#pragma once

#include "ops/common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace anvil::ops {

// The largest K whose int32 sum of int8 x int8 products cannot overflow: 131071 * 16384 < 2^31.
constexpr int64_t kMaxInt8GemmK = (int64_t(1) << 31) / (128 * 128) - 1;

struct Int8GemmShape {
  int64_t m, n, k;
  bool a_per_row, b_per_row;  // false: one per-tensor scale
};

// () -> per-tensor, (rows, 1) -> per-row; anything else is refused naming the argument.
inline bool int8_scale_per_row(const at::Tensor& s, int64_t rows, const char* op, const char* arg,
                               const char* operand, const char* what) {
  check_dtype(s, op, arg, {at::kFloat});
  check_contiguous(s, op, arg);
  if (s.dim() == 0) return false;
  ANVIL_CHECK(s.dim() == 2 && s.size(0) == rows && s.size(1) == 1, op, ": ", arg, " for ", operand,
              " must have shape () (per-tensor) or (", rows, ", 1) (", what, "), got ", s.sizes());
  return true;
}

inline Int8GemmShape check_int8_gemm_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                          const at::Tensor& b_scale, at::ScalarType out_dtype,
                                          const c10::optional<at::Tensor>& bias, const char* op) {
  check_rank(a, op, "a", 2);
  check_rank(b, op, "b", 2);
  check_dtype(a, op, "a", {at::kChar});
  check_dtype(b, op, "b", {at::kChar});
  check_contiguous(a, op, "a");
  check_contiguous(b, op, "b");
  check_same_device(a, b, op, "a", "b");
  ANVIL_CHECK(a.size(1) == b.size(1), op, ": a (M, K) and b (N, K) must share K, got a ", a.sizes(), " and b ",
              b.sizes());
  ANVIL_CHECK(a.size(1) <= kMaxInt8GemmK, op, ": K (", a.size(1), ") must be at most ", kMaxInt8GemmK,
              " (the int32 accumulator of int8 x int8 products could overflow beyond)");
  Int8GemmShape s{a.size(0), b.size(0), a.size(1), false, false};
  s.a_per_row = int8_scale_per_row(a_scale, s.m, op, "a_scale", "a", "per-row: one per token");
  s.b_per_row = int8_scale_per_row(b_scale, s.n, op, "b_scale", "b", "per-channel: one per output row");
  check_same_device(a_scale, a, op, "a_scale", "a");
  check_same_device(b_scale, b, op, "b_scale", "b");
  ANVIL_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat, op,
              ": out_dtype must be one of BFloat16, Half, Float, got ", out_dtype);
  if (bias.has_value()) {
    check_rank(*bias, op, "bias", 1);
    check_dtype(*bias, op, "bias", {at::kFloat, at::kBFloat16, at::kHalf});
    check_contiguous(*bias, op, "bias");
    check_same_device(*bias, a, op, "bias", "a");
    ANVIL_CHECK(bias->size(0) == s.n, op, ": bias must have shape (N) = (", s.n, "), got ", bias->sizes());
  }
  return s;
}

}  // namespace anvil::ops
