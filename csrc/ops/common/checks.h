// Argument checks shared by every op. Each failure is a c10::Error whose message names the op, the
// argument and the rule it broke, e.g. "anvil::quantize_fp8: x must be contiguous (call .contiguous())".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

#define ANVIL_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)

namespace anvil::ops {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string s;
  for (auto d : dtypes) {
    if (!s.empty()) s += ", ";
    s += c10::toString(d);
  }
  return s;
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* arg,
                        std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK(false, op, ": ", arg, " must have dtype in {", dtype_list(allowed), "}, got ",
              t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  ANVIL_CHECK(t.is_contiguous(), op, ": ", arg, " must be contiguous (call .contiguous()), got strides ",
              t.strides());
}

inline void check_min_rank(const at::Tensor& t, const char* op, const char* arg, int64_t rank) {
  ANVIL_CHECK(t.dim() >= rank, op, ": ", arg, " must have at least ", rank, " dimension(s), got shape ",
              t.sizes());
}

inline void check_rank(const at::Tensor& t, const char* op, const char* arg, int64_t rank) {
  ANVIL_CHECK(t.dim() == rank, op, ": ", arg, " must have exactly ", rank, " dimension(s), got shape ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  ANVIL_CHECK(a.device() == b.device(), op, ": ", arg_a, " and ", arg_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

}  // namespace anvil::ops
