// SmoothQuant (quantize/smoothquant.h): the scales against the paper's formula element by element in double
// with llm-compressor's guards, folding into the norm and the consumers keeps the float function, the int8
// fake-quantizer's rule, the alpha search returning the grid minimum of the MSEs it reports (each equal to
// w8a8_output_mse at that alpha), smoothing beating no smoothing on inputs with outlier channels, and errors.
// tests/python/test_gptq.py compares the scales with llm-compressor's _calculate_smoothing_scales.
#include "quantize/smoothquant.h"

#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>

namespace anvil::quantize {
namespace {

// LLM-like activations (T, K): most channels small, a few with outliers 30-100x larger.
at::Tensor outlier_inputs(int64_t T, int64_t K) {
  at::Tensor x = at::randn({T, K});
  at::Tensor gain = at::ones({K});
  for (int64_t j : {3, 17, 40}) gain[j] = 30.0 + 10.0 * double(j % 7);
  return x * gain;
}

TEST(SmoothQuant, ScalesAreThePaperFormula) {
  at::manual_seed(11);
  at::Tensor act = at::rand({64}) * 20, w = at::rand({64}) * 0.5;
  w[5] = 0;  // an all-zero consumer column: s = the activation statistic
  w[6] = 0;
  act[6] = 0;  // both zero: the floor 1e-5
  for (double alpha : {0.0, 0.3, 0.5, 0.85, 1.0}) {
    at::Tensor s = smoothquant_scales(act, w, alpha);
    ASSERT_EQ(s.scalar_type(), at::kFloat);
    for (int64_t j = 0; j < 64; ++j) {
      const double a = act[j].item<double>(), b = w[j].item<double>();
      double want = b > 0 ? std::pow(a, alpha) / std::pow(b, 1 - alpha) : a;
      want = std::max(want, kMinSmoothingScale);
      EXPECT_NEAR(s[j].item<double>(), want, 1e-5 * want) << "alpha " << alpha << " j " << j;
    }
  }
  test::expect_error([&] { smoothquant_scales(act, w, 1.5); }, {"alpha", "[0, 1]"});
  test::expect_error([&] { smoothquant_scales(act, w.slice(0, 1), 0.5); }, {"weight_absmax"});
  test::expect_error([&] { smoothquant_scales(-act, w, 0.5); }, {"act_absmax", ">= 0"});
}

TEST(SmoothQuant, ConsumerAbsmaxAndFoldingKeepTheFunction) {
  at::manual_seed(12);
  const int64_t K = 96;
  std::vector<at::Tensor> ws = {at::randn({48, K}), at::randn({32, K}) * 2};
  at::Tensor m = consumer_weight_absmax(ws);
  EXPECT_TRUE(at::equal(m, at::maximum(std::get<0>(ws[0].abs().max(0)), std::get<0>(ws[1].abs().max(0)))));
  at::Tensor x = outlier_inputs(40, K).to(at::kDouble);
  at::Tensor g = (at::rand({K}) + 0.5).to(at::kDouble);  // the norm's weight: norm(x) = xhat * g
  at::Tensor s = smoothquant_scales(std::get<0>(x.abs().max(0)), m, 0.5).to(at::kDouble);
  std::vector<at::Tensor> wd = {ws[0].to(at::kDouble), ws[1].to(at::kDouble)};
  Smoothed sm = apply_smoothing(g, wd, s);
  for (size_t i = 0; i < wd.size(); ++i) {
    at::Tensor before = at::matmul(x * g, wd[i].t());
    at::Tensor after = at::matmul(x * sm.norm_weight, sm.weights[i].t());
    // In fp64 the fold is exact to fp64 rounding (X diag(s)^-1 diag(s) W^T = X W^T).
    const double rel = ((after - before).abs().max() / before.abs().max()).item<double>();
    EXPECT_LT(rel, 1e-13);
    // In fp32 to fp32 rounding.
    Smoothed sf = apply_smoothing(g.to(at::kFloat), ws, s.to(at::kFloat));
    at::Tensor after32 = at::matmul(x.to(at::kFloat) * sf.norm_weight, sf.weights[i].t()).to(at::kDouble);
    EXPECT_LT(((after32 - before).abs().max() / before.abs().max()).item<double>(), 1e-5);
  }
  EXPECT_EQ(sm.norm_weight.scalar_type(), at::kDouble);
  at::Tensor hb = g.to(at::kBFloat16);
  EXPECT_EQ(apply_smoothing(hb, ws, s).norm_weight.scalar_type(), at::kBFloat16);
  test::expect_error([&] { apply_smoothing(g, ws, -s); }, {"positive"});
  test::expect_error([&] { apply_smoothing(g.slice(0, 1), ws, s); }, {"norm_weight"});
  test::expect_error([&] { apply_smoothing(g, {at::randn({4, K + 1})}, s); }, {"weights[0]"});
}

TEST(SmoothQuant, Int8FakeQuantizerRule) {
  at::manual_seed(13);
  at::Tensor v = at::randn({5, 64});
  v[2][7] = -10;
  at::Tensor f = fake_quantize_int8_rows(v);
  at::Tensor scale = std::get<0>(v.abs().max(1, true)) / 127.5;
  EXPECT_TRUE(at::equal(f, at::round(at::clamp(v / scale, -128, 127)) * scale));
  EXPECT_NEAR(f[2][7].item<double>(), -10.0, scale[2][0].item<double>() / 2);
  EXPECT_EQ(fake_quantize_int8_rows(at::zeros({2, 8})).abs().max().item<double>(), 0.0);
}

TEST(SmoothQuant, AlphaSearchPicksTheGridMinimum) {
  at::manual_seed(14);
  const int64_t K = 128;
  at::Tensor x = outlier_inputs(256, K);
  std::vector<at::Tensor> ws = {at::randn({64, K}) * 0.05, at::randn({96, K}) * 0.02};
  const std::vector<double> grid = {0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0};
  AlphaSearch r = search_smoothquant_alpha(x, ws, grid);
  ASSERT_EQ(r.tried.size(), grid.size());
  double best = INFINITY;
  for (size_t i = 0; i < grid.size(); ++i) {
    EXPECT_EQ(r.tried[i].first, grid[i]);
    best = std::min(best, r.tried[i].second);
    // Each reported MSE is the one w8a8_output_mse gives for that alpha's scales.
    at::Tensor s = smoothquant_scales(std::get<0>(x.abs().max(0)), consumer_weight_absmax(ws), grid[i]);
    EXPECT_NEAR(r.tried[i].second, w8a8_output_mse(x, ws, s), 1e-6 * r.tried[i].second);
  }
  EXPECT_EQ(r.mse, best);
  // Outlier channels: some smoothing beats none (s = 1) clearly, and the search finds an interior alpha.
  const double plain = w8a8_output_mse(x, ws, at::ones({K}));
  EXPECT_LT(r.mse, 0.5 * plain) << r.mse << " vs unsmoothed " << plain;
  EXPECT_GT(r.alpha, 0.0);
  EXPECT_LT(r.alpha, 1.0);
  // Scales from statistics of a larger calibration set: the MSEs are those of its scales on x.
  at::Tensor wide = std::get<0>(outlier_inputs(2048, K).abs().max(0));
  AlphaSearch rw = search_smoothquant_alpha(x, ws, {0.5}, wide);
  EXPECT_NEAR(rw.mse, w8a8_output_mse(x, ws, smoothquant_scales(wide, consumer_weight_absmax(ws), 0.5)),
              1e-6 * rw.mse);
  EXPECT_NE(rw.mse, r.tried[3].second);
  test::expect_error([&] { search_smoothquant_alpha(x, ws, {0.5}, wide.slice(0, 1)); }, {"act_absmax"});
  test::expect_error([&] { search_smoothquant_alpha(x, ws, {}); }, {"grid"});
  test::expect_error([&] { search_smoothquant_alpha(x, ws, {0.5, -0.1}); }, {"alpha", "[0, 1]"});
  test::expect_error([&] { search_smoothquant_alpha(x, {at::randn({4, K - 1})}, {0.5}); }, {"weights[0]"});
  test::expect_error([&] { search_smoothquant_alpha(x, {}, {0.5}); }, {"at least one consumer"});
}

}  // namespace
}  // namespace anvil::quantize
