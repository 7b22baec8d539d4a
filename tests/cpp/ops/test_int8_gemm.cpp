// CPU tests of int8_gemm against its definition written out here with plain integer loops (int64 sums of
// int8 products, then (float(acc) * a_scale[m]) * b_scale[n] + bias[n] in fp32): every pair of scale kinds,
// each output dtype, edge shapes (M = 1, K = 0, K not a multiple of 8, the int8 extremes), the Meta kernel's
// shapes, and bad inputs whose errors name the argument. The CUDA paths: test_int8_gemm_cuda.cpp.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <array>
#include <cstdlib>

namespace {

using anvil::test::bit_equal;
using anvil::test::expect_error;
using anvil::test::first_difference;

at::Tensor random_int8(int64_t rows, int64_t cols) {
  return at::randint(-128, 128, {rows, cols}, at::TensorOptions().dtype(at::kChar));
}

// The definition, one element at a time.
at::Tensor formula(const at::Tensor& a, const at::Tensor& sa, const at::Tensor& b, const at::Tensor& sb,
                   const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  auto out = at::empty({m, n}, at::kFloat);
  const auto* pa = a.const_data_ptr<int8_t>();
  const auto* pb = b.const_data_ptr<int8_t>();
  const auto bias32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      int64_t acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += int64_t(pa[i * k + p]) * int64_t(pb[j * k + p]);
      EXPECT_LT(std::abs(acc), int64_t(1) << 31);
      float v = float(int32_t(acc)) * sa.const_data_ptr<float>()[sa.dim() ? i : 0];
      v = v * sb.const_data_ptr<float>()[sb.dim() ? j : 0];
      if (bias) v = v + bias32.const_data_ptr<float>()[j];
      out.data_ptr<float>()[i * n + j] = v;
    }
  return out.to(out_dtype);
}

TEST(Int8Gemm, CpuEqualsTheDefinition) {
  at::manual_seed(11);
  const std::vector<std::array<int64_t, 3>> shapes = {{1, 8, 16}, {5, 24, 40}, {17, 9, 13}, {33, 64, 96}};
  for (const auto& [m, n, k] : shapes)
    for (bool row_a : {false, true})
      for (bool row_b : {false, true}) {
        auto a = random_int8(m, k), b = random_int8(n, k);
        a[0].fill_(-128);
        b[0].fill_(-128);  // the extreme product, K times
        const auto sa = row_a ? (at::rand({m, 1}) + 0.1) / 127 : at::full({}, 0.013f);
        const auto sb = row_b ? (at::rand({n, 1}) + 0.1) / 127 : at::full({}, 0.021f);
        const auto bias = at::randn({n}).to(at::kBFloat16);
        for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
          const auto got = anvil::ops::int8_gemm(a, sa, b, sb, dt);
          const auto want = formula(a, sa, b, sb, c10::nullopt, dt);
          EXPECT_TRUE(bit_equal(got, want)) << m << "x" << n << "x" << k << " " << dt << ": " << first_difference(got, want);
          const auto got_b = anvil::ops::int8_gemm(a, sa, b, sb, dt, bias);
          EXPECT_TRUE(bit_equal(got_b, formula(a, sa, b, sb, bias, dt))) << "with bias";
        }
      }
}

TEST(Int8Gemm, EmptyAndMetaShapes) {
  const auto bias = at::randn({5});
  const auto out = anvil::ops::int8_gemm(random_int8(3, 0), at::ones({3, 1}), random_int8(5, 0), at::ones({5, 1}),
                                         at::kFloat, bias);
  EXPECT_TRUE(at::equal(out, bias.expand({3, 5})));
  EXPECT_EQ(anvil::ops::int8_gemm(random_int8(0, 8), at::ones({}), random_int8(5, 8), at::ones({})).sizes(),
            (at::IntArrayRef{0, 5}));
  const auto meta = at::TensorOptions().device(at::kMeta);
  const auto m = anvil::ops::int8_gemm(at::empty({7, 40}, meta.dtype(at::kChar)), at::empty({7, 1}, meta.dtype(at::kFloat)),
                                       at::empty({24, 40}, meta.dtype(at::kChar)), at::empty({}, meta.dtype(at::kFloat)),
                                       at::kHalf);
  EXPECT_EQ(m.sizes(), (at::IntArrayRef{7, 24}));
  EXPECT_EQ(m.scalar_type(), at::kHalf);
}

TEST(Int8Gemm, BadInputsNameTheArgument) {
  const auto a = random_int8(4, 16), b = random_int8(8, 16);
  const auto sa = at::ones({4, 1}), sb = at::ones({8, 1});
  using anvil::ops::int8_gemm;
  expect_error([&] { int8_gemm(a.to(at::kFloat), sa, b, sb); }, {"anvil::int8_gemm", "a must have dtype", "Char"});
  expect_error([&] { int8_gemm(a, sa, b.to(at::kByte), sb); }, {"b must have dtype", "Char"});
  expect_error([&] { int8_gemm(a, sa, random_int8(8, 12), sb); }, {"must share K"});
  expect_error([&] { int8_gemm(a, at::ones({4, 2}), b, sb); }, {"a_scale for a", "(4, 1)", "per token"});
  expect_error([&] { int8_gemm(a, sa, b, at::ones({8})); }, {"b_scale for b", "(8, 1)", "per-channel"});
  expect_error([&] { int8_gemm(a, sa.to(at::kDouble), b, sb); }, {"a_scale must have dtype", "Float"});
  expect_error([&] { int8_gemm(random_int8(16, 4).t(), sa, b, sb); }, {"a must be contiguous"});
  expect_error([&] { int8_gemm(a, sa, b, sb, at::kDouble); }, {"out_dtype must be one of"});
  expect_error([&] { int8_gemm(a, sa, b, sb, at::kFloat, at::zeros({7})); }, {"bias must have shape (N) = (8)"});
  expect_error([&] { int8_gemm(a.view({4, 16, 1}).squeeze(-1).unsqueeze(0), sa, b, sb); }, {"a must have exactly 2"});
  expect_error([&] { int8_gemm(random_int8(1, 131072), at::ones({}), random_int8(1, 131072), at::ones({})); },
               {"K (131072) must be at most 131071", "overflow"});
}

}  // namespace
