// GPTQ (quantize/gptq.h) without the Python oracle (tests/python/test_gptq.py has llm-compressor's own
// quantize_weight beside it): the observer's scale and zero-point rules checked element by element, the
// Hessian accumulator against 2 X^T X / n in double, GPTQ == round-to-nearest under an identity Hessian,
// the lazy block update independent of block_size, GPTQ clearly below RTN's output error on correlated inputs
// (act-order too), dead columns, a non-positive-definite Hessian, and the errors for bad shapes and options.
#include "quantize/gptq.h"

#include "test_util.h"

#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>

namespace anvil::quantize {
namespace {

// Correlated calibration inputs (T, K): a random mixing of independent sources, with uneven channel scales,
// so H is far from diagonal (the case GPTQ exists for).
at::Tensor correlated_inputs(int64_t T, int64_t K) {
  at::Tensor z = at::randn({T, K});
  at::Tensor mix = at::randn({K, K}) / std::sqrt(double(K)) + at::eye(K) * 0.3;
  at::Tensor scales = at::exp(at::randn({K}) * 0.7);
  return at::matmul(z, mix) * scales;
}

at::Tensor hessian_of(const at::Tensor& x) {
  HessianAccumulator acc(x.size(-1), x.device());
  acc.add(x);
  return acc.hessian();
}

double fraction_different(const at::Tensor& a, const at::Tensor& b) {
  return (a != b).to(at::kDouble).mean().item<double>();
}

TEST(Gptq, HessianAccumulatorIsTwoXtXOverRows) {
  at::manual_seed(1);
  at::Tensor a = at::randn({2, 5, 24}), b = at::randn({7, 24}).to(at::kBFloat16);
  HessianAccumulator acc(24, at::kCPU);
  EXPECT_EQ(acc.rows(), 0);
  EXPECT_EQ(acc.hessian().abs().max().item<double>(), 0.0);
  acc.add(a);
  acc.add(b);
  EXPECT_EQ(acc.rows(), 17);
  at::Tensor x = at::cat({a.reshape({-1, 24}), b.to(at::kFloat)}).to(at::kDouble);
  at::Tensor want = 2 * at::matmul(x.t(), x) / 17.0;
  at::Tensor got = acc.hessian();
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::allclose(got.to(at::kDouble), want, 1e-5, 1e-5));
  test::expect_error([&] { acc.add(at::randn({3, 23})); }, {"HessianAccumulator::add", "24"});
  test::expect_error([&] { acc.add(at::ones({3, 24}, at::kInt)); }, {"floating point"});
}

TEST(Gptq, SymmetricScaleRuleAndGrid) {
  at::manual_seed(2);
  at::Tensor w = at::randn({16, 256});
  // The largest magnitude of a group at exactly 7.5 (scale 1, no fp32 rounding in w / scale): negative, it
  // rounds half to even onto -8; positive, 7.5 clamps to 7 first.
  w[3][5] = -7.5;
  w[4][130] = 7.5;
  GptqOptions o;  // int4, group 128, symmetric
  GptqResult r = rtn_quantize(w, o);
  ASSERT_EQ(r.scale.sizes(), (at::IntArrayRef{16, 2}));
  EXPECT_FALSE(r.zero_point.defined());
  at::Tensor amax = std::get<0>(w.abs().reshape({16, 2, 128}).max(-1));
  EXPECT_TRUE(at::equal(r.scale, amax / 7.5));
  EXPECT_GE(r.q.min().item<int>(), -8);
  EXPECT_LE(r.q.max().item<int>(), 7);
  EXPECT_EQ(r.q[3][5].item<int>(), -8);
  EXPECT_EQ(r.scale[3][0].item<float>(), 1.0f);
  EXPECT_EQ(r.q[4][130].item<int>(), 7);
  // Dequantization is q * scale of the column's group; every other value is within half a step.
  at::Tensor s = r.scale.repeat_interleave(128, 1);
  EXPECT_TRUE(at::equal(r.dequantized, r.q.to(at::kFloat) * s));
  at::Tensor inside = (w / s).abs() <= 7;
  EXPECT_LE(((w - r.dequantized).abs() / s).masked_select(inside).max().item<double>(), 0.5 + 1e-6);
  EXPECT_TRUE(at::equal(r.g_idx, at::arange(256, at::kInt).div(128, "floor")));
  // int8: scale = max|w| / 127.5, grid [-128, 127].
  o.bits = 8;
  w[3][5] = -127.5;
  w[4][130] = 127.5;
  amax = std::get<0>(w.abs().reshape({16, 2, 128}).max(-1));
  GptqResult r8 = rtn_quantize(w, o);
  EXPECT_TRUE(at::equal(r8.scale, amax / 127.5));
  EXPECT_EQ(r8.scale[3][0].item<float>(), 1.0f);
  EXPECT_EQ(r8.q[3][5].item<int>(), -128);
  EXPECT_EQ(r8.q[4][130].item<int>(), 127);
}

TEST(Gptq, AsymmetricScaleAndZeroPointRule) {
  at::manual_seed(3);
  at::Tensor w = at::randn({8, 128}) + 0.8;
  w.slice(0, 0, 1).abs_();  // row 0 all positive: min is forced to 0
  GptqOptions o;
  o.symmetric = false;
  GptqResult r = rtn_quantize(w, o);
  ASSERT_TRUE(r.zero_point.defined());
  EXPECT_EQ(r.zero_point.scalar_type(), at::kChar);
  at::Tensor mn = at::clamp_max(std::get<0>(w.min(1, true)), 0), mx = at::clamp_min(std::get<0>(w.max(1, true)), 0);
  at::Tensor scale = (mx - mn) / 15.0;
  EXPECT_TRUE(at::equal(r.scale, scale));
  at::Tensor zp = at::round(at::clamp(-8 - mn / scale, -8, 7));
  EXPECT_TRUE(at::equal(r.zero_point.to(at::kFloat), zp));
  EXPECT_EQ(r.zero_point[0][0].item<int>(), -8);
  EXPECT_TRUE(at::equal(r.dequantized, (r.q.to(at::kFloat) - zp) * scale));
  EXPECT_LE(((w - r.dequantized).abs() / scale).max().item<double>(), 1.0);
  // An all-zero group: scale eps, every value back to 0.
  at::Tensor z = at::zeros({2, 128});
  GptqResult rz = rtn_quantize(z, o);
  EXPECT_GT(rz.scale.min().item<double>(), 0.0);
  EXPECT_EQ(rz.dequantized.abs().max().item<double>(), 0.0);
}

TEST(Gptq, IdentityHessianIsRoundToNearest) {
  at::manual_seed(4);
  at::Tensor w = at::randn({32, 256});
  for (bool sym : {true, false}) {
    GptqOptions o;
    o.symmetric = sym;
    GptqResult g = gptq_quantize(w, at::eye(256), o);
    GptqResult r = rtn_quantize(w, o);
    EXPECT_TRUE(at::equal(g.q, r.q)) << "symmetric " << sym;
    EXPECT_TRUE(at::equal(g.dequantized, r.dequantized));
    EXPECT_FALSE(g.rtn_fallback);
  }
}

TEST(Gptq, BeatsRoundToNearestOnCorrelatedInputs) {
  at::manual_seed(5);
  const int64_t N = 96, K = 384;
  at::Tensor w = at::randn({N, K});
  at::Tensor h = hessian_of(correlated_inputs(2048, K));
  for (int bits : {4, 8}) {
    GptqOptions o;
    o.bits = bits;
    const double rtn = gptq_output_error(w, rtn_quantize(w, o).dequantized, h);
    for (bool act : {false, true}) {
      o.act_order = act;
      GptqResult g = gptq_quantize(w, h, o);
      const double err = gptq_output_error(w, g.dequantized, h);
      EXPECT_LT(err, 0.7 * rtn) << "bits " << bits << " act_order " << act << ": " << err << " vs RTN " << rtn;
      EXPECT_GT(g.loss, 0.0);
      // The same groups either way: act-order changes the processing order, not the format.
      EXPECT_TRUE(at::equal(g.g_idx, at::arange(K, at::kInt).div(128, "floor")));
      EXPECT_GE(g.q.min().item<int>(), -(1 << (bits - 1)));
      EXPECT_LE(g.q.max().item<int>(), (1 << (bits - 1)) - 1);
      at::Tensor s = g.scale.repeat_interleave(128, 1);
      EXPECT_TRUE(at::equal(g.dequantized, g.q.to(at::kFloat) * s));
    }
  }
}

TEST(Gptq, LazyBlockUpdateDoesNotDependOnBlockSize) {
  at::manual_seed(6);
  const int64_t K = 256;
  at::Tensor w = at::randn({48, K});
  at::Tensor h = hessian_of(correlated_inputs(1024, K));
  GptqOptions o;
  o.block_size = K;  // one block: the paper's algorithm without lazy batching
  GptqResult ref = gptq_quantize(w, h, o);
  const double ref_err = gptq_output_error(w, ref.dequantized, h);
  for (int64_t bs : {1, 7, 64, 128, 1000}) {
    o.block_size = bs;
    GptqResult g = gptq_quantize(w, h, o);
    // Mathematically identical; fp32 sums in another order flip a rare rounding tie.
    EXPECT_LT(fraction_different(g.q, ref.q), 0.01) << "block_size " << bs;
    EXPECT_NEAR(gptq_output_error(w, g.dequantized, h), ref_err, 0.02 * ref_err) << "block_size " << bs;
  }
}

TEST(Gptq, SharedInputLayersInOneSweep) {
  at::manual_seed(12);
  const int64_t K = 256;
  at::Tensor h = hessian_of(correlated_inputs(1024, K));
  std::vector<at::Tensor> ws = {at::randn({40, K}), at::randn({16, K}) * 3, at::randn({24, K}) * 0.1};
  GptqOptions o;
  o.act_order = true;
  o.symmetric = false;
  std::vector<GptqResult> shared = gptq_quantize_shared(ws, h, o);
  ASSERT_EQ(shared.size(), ws.size());
  double loss_sum = 0;
  for (size_t i = 0; i < ws.size(); ++i) {
    GptqResult alone = gptq_quantize(ws[i], h, o);
    ASSERT_EQ(shared[i].q.sizes(), alone.q.sizes());
    EXPECT_TRUE(at::equal(shared[i].scale, alone.scale));
    EXPECT_TRUE(at::equal(shared[i].zero_point, alone.zero_point));
    EXPECT_LT(fraction_different(shared[i].q, alone.q), 0.01) << "weights[" << i << "]";
    EXPECT_NEAR(shared[i].loss, alone.loss, 0.02 * alone.loss);
    loss_sum += shared[i].loss;
  }
  EXPECT_GT(loss_sum, 0.0);
  test::expect_error([&] { gptq_quantize_shared({ws[0], at::randn({4, K + 1})}, h, o); }, {"weights[1]"});
  test::expect_error([&] { gptq_quantize_shared({}, h, o); }, {"at least one"});
}

TEST(Gptq, DeadColumnsQuantizeToZero) {
  at::manual_seed(7);
  const int64_t K = 256;
  at::Tensor x = correlated_inputs(512, K);
  x.select(1, 3).zero_();
  x.select(1, 200).zero_();
  at::Tensor h = hessian_of(x);
  ASSERT_EQ(h[3][3].item<double>(), 0.0);
  at::Tensor w = at::randn({16, K});
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    GptqResult g = gptq_quantize(w, h, o);
    EXPECT_FALSE(g.rtn_fallback);
    EXPECT_TRUE(at::isfinite(g.dequantized).all().item<bool>());
    EXPECT_EQ(g.dequantized.select(1, 3).abs().max().item<double>(), 0.0);
    EXPECT_EQ(g.dequantized.select(1, 200).abs().max().item<double>(), 0.0);
    // The scales still come from the original weights (dead columns included), as llm-compressor's observer.
    EXPECT_TRUE(at::equal(g.scale, rtn_quantize(w, o).scale));
    EXPECT_LT(gptq_output_error(w, g.dequantized, h), gptq_output_error(w, rtn_quantize(w, o).dequantized, h));
  }
}

TEST(Gptq, NonPositiveDefiniteHessianFallsBackToRoundToNearest) {
  at::manual_seed(8);
  at::Tensor w = at::randn({8, 128});
  at::Tensor h = -at::eye(128);  // dampening cannot rescue it: Cholesky fails
  GptqResult g = gptq_quantize(w, h, GptqOptions{});
  EXPECT_TRUE(g.rtn_fallback);
  EXPECT_TRUE(at::equal(g.q, rtn_quantize(w, GptqOptions{}).q));
  // A rank-deficient one (fewer calibration rows than columns) is rescued by the dampening.
  at::Tensor few = at::randn({16, 128});
  GptqResult g2 = gptq_quantize(w, hessian_of(few), GptqOptions{});
  EXPECT_FALSE(g2.rtn_fallback);
  EXPECT_TRUE(at::isfinite(g2.dequantized).all().item<bool>());
}

TEST(Gptq, ChannelWiseAndHalfPrecisionScales) {
  at::manual_seed(9);
  at::Tensor w = at::randn({24, 200});  // 200: no group of 128 fits, one group per row does
  at::Tensor h = hessian_of(correlated_inputs(512, 200));
  GptqOptions o;
  o.group_size = -1;
  o.bits = 8;
  GptqResult g = gptq_quantize(w, h, o);
  ASSERT_EQ(g.scale.sizes(), (at::IntArrayRef{24, 1}));
  EXPECT_EQ(g.g_idx.max().item<int>(), 0);
  EXPECT_TRUE(at::equal(g.scale.squeeze(1), std::get<0>(w.abs().max(1)) / 127.5));
  // bf16 weights: scales in bf16 (what the checkpoint stores) and dequantized values on the bf16 grid.
  o.group_size = 40;
  o.bits = 4;
  at::Tensor wb = w.to(at::kBFloat16);
  GptqResult gb = gptq_quantize(wb, h, o);
  EXPECT_EQ(gb.scale.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(gb.dequantized, gb.dequantized.to(at::kBFloat16).to(at::kFloat)));
  EXPECT_TRUE(at::equal(gb.dequantized.to(at::kBFloat16),
                        (gb.q.to(at::kBFloat16) * gb.scale.repeat_interleave(40, 1))));
  o.scale_dtype = at::kFloat;
  EXPECT_EQ(gptq_quantize(wb, h, o).scale.scalar_type(), at::kFloat);
}

TEST(Gptq, BadInputIsAnErrorNamingTheRule) {
  at::Tensor w = at::randn({8, 200}), h = at::eye(200);
  test::expect_error([&] { gptq_quantize(w, h, GptqOptions{}); }, {"in_features 200", "group_size 128"});
  GptqOptions o;
  o.group_size = 40;
  o.bits = 1;
  test::expect_error([&] { gptq_quantize(w, h, o); }, {"bits", "2..8"});
  o.bits = 9;
  test::expect_error([&] { rtn_quantize(w, o); }, {"bits"});
  o.bits = 4;
  o.block_size = 0;
  test::expect_error([&] { gptq_quantize(w, h, o); }, {"block_size"});
  o.block_size = 128;
  o.group_size = 0;
  test::expect_error([&] { gptq_quantize(w, h, o); }, {"group_size"});
  o.group_size = 40;
  o.dampening = -1;
  test::expect_error([&] { gptq_quantize(w, h, o); }, {"dampening"});
  o.dampening = 0.01;
  test::expect_error([&] { gptq_quantize(w, at::eye(199), o); }, {"hessian", "200"});
  test::expect_error([&] { gptq_quantize(at::randn({200}), h, o); }, {"weight", "2-D"});
  test::expect_error([&] { gptq_quantize(w.to(at::kInt), h, o); }, {"floating point"});
  at::Tensor hn = h.clone();
  hn[1][2] = NAN;
  test::expect_error([&] { gptq_quantize(w, hn, o); }, {"hessian", "non-finite"});
  test::expect_error([&] { gptq_quantize(w, at::zeros({200, 200}), o); }, {"hessian", "no calibration input"});
  at::Tensor wn = w.clone();
  wn[0][0] = INFINITY;
  test::expect_error([&] { gptq_quantize(wn, h, o); }, {"weight", "non-finite"});
}

// The GPU path: the same result as the CPU (fp32 op order aside), and a 4096 x 4096 layer in seconds.
TEST(GptqCuda, MatchesCpuAndIsFast) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(10);
  const int64_t K = 512;
  at::Tensor w = at::randn({256, K});
  at::Tensor h = hessian_of(correlated_inputs(2048, K));
  for (bool act : {false, true}) {
    GptqOptions o;
    o.act_order = act;
    GptqResult c = gptq_quantize(w, h, o);
    GptqResult g = gptq_quantize(w.cuda(), h.cuda(), o);
    EXPECT_TRUE(g.q.is_cuda());
    EXPECT_LT(fraction_different(g.q.cpu(), c.q), 0.01);
    const double ec = gptq_output_error(w, c.dequantized, h), eg = gptq_output_error(w, g.dequantized.cpu(), h);
    EXPECT_NEAR(eg, ec, 0.02 * ec);
  }
  at::Tensor big = at::randn({4096, 4096}, at::kCUDA).to(at::kBFloat16);
  HessianAccumulator acc(4096, at::kCUDA);
  acc.add(at::randn({8192, 4096}, at::kCUDA));
  GptqOptions o;
  o.act_order = true;
  at::Tensor hb = acc.hessian();
  gptq_quantize(big.slice(0, 0, 256), hb, o).q.sum().item<int64_t>();  // warm-up; .item() waits for the GPU
  const auto t0 = std::chrono::steady_clock::now();
  GptqResult r = gptq_quantize(big, hb, o);
  r.dequantized.sum().item<double>();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("gptq 4096x4096 int4 g128 act_order on CUDA: %.3f s\n", s);
  EXPECT_FALSE(r.rtn_fallback);
  EXPECT_LT(s, 10.0);
}

}  // namespace
}  // namespace anvil::quantize
