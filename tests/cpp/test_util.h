// Helpers shared by the C++ tests: random data that is never all-zero, bit comparison, and an
// assertion that a call throws c10::Error whose message contains given words.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

namespace anvil::test {

// Normal values times a log-normal magnitude: spans many binades, so rounding is exercised at every
// exponent (subnormal e4m3 outputs included), not only near 1. Clamped to fp16's finite range, which
// it would otherwise leave in ~1e-7 of the values (non-finite input has tests of its own).
inline at::Tensor wide_random(at::IntArrayRef shape, at::ScalarType dtype) {
  auto mag = at::exp(at::randn(shape) * 2.0);
  return (at::randn(shape) * mag).clamp(-65504.0, 65504.0).to(dtype);
}

inline bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes() || a.scalar_type() != b.scalar_type()) return false;
  auto ac = a.cpu().contiguous(), bc = b.cpu().contiguous();
  return std::memcmp(ac.const_data_ptr(), bc.const_data_ptr(), ac.nbytes()) == 0;
}

// Index of the first differing element, for messages.
inline std::string first_difference(const at::Tensor& a, const at::Tensor& b) {
  auto av = a.cpu().contiguous().view(at::kByte).reshape({a.numel(), -1});
  auto bv = b.cpu().contiguous().view(at::kByte).reshape({b.numel(), -1});
  auto ne = (av != bv).any(1).nonzero();
  if (ne.numel() == 0) return "none";
  const int64_t i = ne[0].item<int64_t>();
  return "flat index " + std::to_string(i) + ": " + std::to_string(a.cpu().flatten()[i].to(at::kFloat).item<float>()) +
         " vs " + std::to_string(b.cpu().flatten()[i].to(at::kFloat).item<float>());
}

template <typename F>
void expect_error(F&& f, const std::vector<std::string>& words) {
  try {
    f();
    ADD_FAILURE() << "expected a c10::Error mentioning '" << words.front() << "'";
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "message lacks '" << w << "': " << msg;
  }
}

}  // namespace anvil::test
