// CPU tests of the FP8 GEMM ops: fp8_gemm against the formula written independently here (element-wise
// dequantization from the scale's meaning, fp64 matmul) for every pair of scale granularities, bias and
// output dtypes; grouped layouts (empty experts, rows of no expert, masked counts); bad inputs naming the
// rule; fp8_linear and its gradient; the Fp8Linear module.
#include "anvil/fp8_linear.h"
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

namespace {

using anvil::test::expect_error;

// 1 - 2 sum(xy) / sum(x^2 + y^2), the measure.
double gemm_diff(const at::Tensor& x, const at::Tensor& y) {
  const auto a = x.to(at::kDouble), b = y.to(at::kDouble);
  return 1.0 - 2.0 * (a * b).sum().item<double>() / (a * a + b * b).sum().item<double>();
}

// Each element's scale, from the meaning of the scale's shape (not from anvil's helpers).
at::Tensor expand_scale(const at::Tensor& s, int64_t rows, int64_t cols, bool weight) {
  if (s.dim() == 0) return s.to(at::kDouble).expand({rows, cols});
  if (s.size(1) == 1 && s.size(0) == rows) return s.to(at::kDouble).expand({rows, cols});
  const int64_t rb = weight ? 128 : 1;
  return s.to(at::kDouble).repeat_interleave(rb, 0).narrow(0, 0, rows).repeat_interleave(128, 1).narrow(1, 0, cols);
}

at::Tensor formula(const at::Tensor& qa, const at::Tensor& sa, const at::Tensor& qb, const at::Tensor& sb,
                   const c10::optional<at::Tensor>& bias) {
  const auto a = qa.to(at::kDouble) * expand_scale(sa, qa.size(0), qa.size(1), false);
  const auto b = qb.to(at::kDouble) * expand_scale(sb, qb.size(0), qb.size(1), true);
  auto out = at::matmul(a, b.t());
  if (bias) out = out + bias->to(at::kDouble);
  return out;
}

TEST(Fp8Gemm, EveryGranularityPairMatchesTheFormula) {
  const int64_t M = 33, N = 200, K = 384;
  const auto x = anvil::test::wide_random({M, K}, at::kFloat);
  const auto w = at::randn({N, K}) * 0.02;
  const auto bias = at::randn({N});
  for (const char* ga : {"tensor", "row", "block1x128"})
    for (const char* gb : {"tensor", "row", "block128x128"}) {
      SCOPED_TRACE(std::string(ga) + " x " + gb);
      const auto [qa, sa] = anvil::ops::quantize_fp8(x, ga);
      const auto [qb, sb] = anvil::ops::quantize_fp8(w, gb);
      const auto want = formula(qa, sa, qb, sb, bias);
      const auto got = anvil::ops::fp8_gemm(qa, sa, qb, sb, at::kFloat, bias);
      ASSERT_EQ(got.sizes(), at::IntArrayRef({M, N}));
      EXPECT_LT(gemm_diff(got, want), 1e-9);
      EXPECT_TRUE(at::allclose(got.to(at::kDouble), want, 1e-4, 1e-4));
      for (auto dt : {at::kBFloat16, at::kHalf}) {
        const auto low = anvil::ops::fp8_gemm(qa, sa, qb, sb, dt, c10::nullopt);
        EXPECT_EQ(low.scalar_type(), dt);
        EXPECT_LT(gemm_diff(low, formula(qa, sa, qb, sb, c10::nullopt)), 1e-4);
      }
    }
}

TEST(Fp8Gemm, PartialBlocksAndEdgeShapes) {
  // N not a multiple of 128 (partial weight block), M = 1 and M = 0, K = 128.
  for (int64_t M : {0, 1, 7})
    for (int64_t N : {1, 130}) {
      const auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({M, 128}), "block1x128");
      const auto [qb, sb] = anvil::ops::quantize_fp8(at::randn({N, 128}), "block128x128");
      const auto got = anvil::ops::fp8_gemm(qa, sa, qb, sb, at::kFloat);
      ASSERT_EQ(got.sizes(), at::IntArrayRef({M, N}));
      if (M > 0) EXPECT_LT(gemm_diff(got, formula(qa, sa, qb, sb, c10::nullopt)), 1e-9);
    }
  // per-tensor / per-row work for K not a multiple of 128
  const auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({5, 100}), "row");
  const auto [qb, sb] = anvil::ops::quantize_fp8(at::randn({9, 100}), "tensor");
  EXPECT_LT(gemm_diff(anvil::ops::fp8_gemm(qa, sa, qb, sb, at::kFloat), formula(qa, sa, qb, sb, c10::nullopt)), 1e-9);
}

TEST(Fp8Gemm, BadInputsNameTheRule) {
  const auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({4, 256}), "block1x128");
  const auto [qb, sb] = anvil::ops::quantize_fp8(at::randn({8, 256}), "block128x128");
  const auto [qa2, sa2] = anvil::ops::quantize_fp8(at::randn({4, 200}), "block1x128");
  const auto [qb2, sb2] = anvil::ops::quantize_fp8(at::randn({8, 200}), "block128x128");
  expect_error([&] { anvil::ops::fp8_gemm(qa2, sa2, qb2, sb2); }, {"K (200)", "multiple of 128", "block"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, at::ones({4, 3}), qb, sb); }, {"a_scale", "(4, 2)", "1x128"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, sa, qb, at::ones({2, 2})); }, {"b_scale", "128x128", "(1, 2)"});
  expect_error([&] { anvil::ops::fp8_gemm(qa.to(at::kFloat), sa, qb, sb); }, {"a must have dtype", "Float8_e4m3fn"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, sa.to(at::kDouble), qb, sb); }, {"a_scale must have dtype", "Float"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, sa, qb2, sb2); }, {"share K"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, sa, qb, sb, at::kInt); }, {"out_dtype"});
  expect_error([&] { anvil::ops::fp8_gemm(qa, sa, qb, sb, at::kBFloat16, at::ones({7})); }, {"bias", "(N) = (8)"});
  expect_error([&] { anvil::ops::fp8_gemm(qa.t(), sa, qb, sb); }, {"a must be contiguous"});
}

// Random expert weights (E, N, K) and their block scales.
std::pair<at::Tensor, at::Tensor> expert_weights(int64_t E, int64_t N, int64_t K) {
  std::vector<at::Tensor> qs, ss;
  for (int64_t e = 0; e < E; ++e) {
    auto [q, s] = anvil::ops::quantize_fp8(at::randn({N, K}) * 0.05, "block128x128");
    qs.push_back(q);
    ss.push_back(s);
  }
  return {at::stack(qs), at::stack(ss)};
}

TEST(Fp8GroupedGemm, ContiguousLayoutWithEmptyExpertsAndPadding) {
  const int64_t E = 4, N = 136, K = 256;
  const auto [qb, sb] = expert_weights(E, N, K);
  const std::vector<int32_t> off{3, 19, 19, 19, 50};  // rows 0..2 and 50..63 belong to no expert
  const int64_t R = 64;
  const auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({R, K}), "block1x128");
  const auto got = anvil::ops::fp8_grouped_gemm(qa, sa, qb, sb, at::tensor(off, at::kInt), at::kFloat);
  ASSERT_EQ(got.sizes(), at::IntArrayRef({R, N}));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], r1 = off[e + 1];
    if (r1 == r0) continue;
    const auto want = formula(qa.narrow(0, r0, r1 - r0), sa.narrow(0, r0, r1 - r0), qb[e], sb[e], c10::nullopt);
    EXPECT_LT(gemm_diff(got.narrow(0, r0, r1 - r0), want), 1e-9) << "expert " << e;
  }
  EXPECT_EQ(got.narrow(0, 0, 3).abs().max().item<float>(), 0.0f);
  EXPECT_EQ(got.narrow(0, 50, 14).abs().max().item<float>(), 0.0f);
  const auto bad_offsets = at::tensor(std::vector<int32_t>{0, 9, 5, 9, 9}, at::kInt);
  expect_error([&] { anvil::ops::fp8_grouped_gemm(qa, sa, qb, sb, bad_offsets); }, {"offsets must be non-decreasing"});
  expect_error([&] { anvil::ops::fp8_grouped_gemm(qa, sa, qb, sb, at::zeros({E}, at::kInt)); },
               {"offsets must have shape (E + 1) = (5)"});
  const auto short_scale = sb.narrow(1, 0, 1).contiguous();
  expect_error([&] { anvil::ops::fp8_grouped_gemm(qa, sa, qb, short_scale, at::tensor(off, at::kInt)); },
               {"b_scale must have shape (E, ceil(N/128), ceil(K/128))"});
}

TEST(Fp8GroupedGemm, MaskedLayoutValidRowsOnly) {
  const int64_t E = 3, C = 8, N = 128, K = 128;
  const auto [qb, sb] = expert_weights(E, N, K);
  const auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({E, C, K}), "block1x128");
  const std::vector<int32_t> valid{8, 0, 5};
  const auto got = anvil::ops::fp8_grouped_gemm_masked(qa, sa, qb, sb, at::tensor(valid, at::kInt), at::kFloat);
  ASSERT_EQ(got.sizes(), at::IntArrayRef({E, C, N}));
  for (int64_t e = 0; e < E; ++e) {
    if (valid[e] > 0) {
      const auto want = formula(qa[e].narrow(0, 0, valid[e]), sa[e].narrow(0, 0, valid[e]), qb[e], sb[e], c10::nullopt);
      EXPECT_LT(gemm_diff(got[e].narrow(0, 0, valid[e]), want), 1e-9);
    }
    if (valid[e] < C) EXPECT_EQ(got[e].narrow(0, valid[e], C - valid[e]).abs().max().item<float>(), 0.0f);
  }
  const auto too_many = at::tensor(std::vector<int32_t>{9, 0, 0}, at::kInt);
  expect_error([&] { anvil::ops::fp8_grouped_gemm_masked(qa, sa, qb, sb, too_many); }, {"masked_m[0] = 9", "[0, C = 8]"});
}

TEST(Fp8Linear, ForwardAndInputGradient) {
  const int64_t N = 160, K = 256;
  const auto w = at::randn({N, K}) * 0.05;
  auto lin = anvil::Fp8Linear(anvil::Fp8LinearImpl::from_float(w, at::randn({N}).requires_grad_(true)));
  auto x = at::randn({2, 3, K}).requires_grad_(true);
  const auto y = lin->forward(x);
  ASSERT_EQ(y.sizes(), at::IntArrayRef({2, 3, N}));
  const auto wd = anvil::ops::dequantize_fp8(lin->weight, lin->weight_scale_inv, "block128x128", at::kFloat);
  const auto [qx, sx] = anvil::ops::quantize_fp8(x.detach().reshape({6, K}), "block1x128");
  const auto xd = anvil::ops::dequantize_fp8(qx, sx, "block1x128", at::kFloat);
  const auto want = at::matmul(xd, wd.t()) + lin->bias.detach();
  EXPECT_LT(gemm_diff(y.detach().reshape({6, N}), want), 1e-9);
  const auto gy = at::randn({2, 3, N});
  const auto grads = torch::autograd::grad({y}, {x, lin->bias}, {gy});
  const auto gx_ref = at::matmul(gy.reshape({6, N}).to(at::kDouble), wd.to(at::kDouble)).reshape({2, 3, K});
  EXPECT_LT(((grads[0] - gx_ref).norm() / gx_ref.norm()).item<double>(), 1e-5);
  EXPECT_TRUE(at::allclose(grads[1], gy.sum(at::IntArrayRef{0, 1}), 1e-5, 1e-5));
  // state_dict names as in DeepSeek-V3 / FineGrainedFP8 checkpoints
  const auto buffers = lin->named_buffers();
  EXPECT_TRUE(buffers.contains("weight") && buffers.contains("weight_scale_inv"));
  expect_error([&] { lin->forward(at::randn({4, 100})); }, {"must share K"});
}

}  // namespace
