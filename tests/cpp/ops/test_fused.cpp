// CPU tests of the fused training ops against the PyTorch formulas they replace (written out here in
// ATen ops, as transformers writes them), their gradients against autograd through those formulas,
// determinism of the cross-row reduction, and errors that name the argument.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

namespace {

using anvil::test::bit_equal;
using anvil::test::expect_error;

constexpr double kRtol = 1.3e-6, kAtol = 1e-5;   // docs/ARCHITECTURE.md, fp32
constexpr double kBfRtol = 1.6e-2, kBfAtol = 1e-3;  // bf16

// transformers' LlamaRMSNorm.forward.
at::Tensor rms_norm_formula(const at::Tensor& x, const at::Tensor& w, double eps) {
  auto xf = x.to(at::kFloat);
  xf = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return w * xf.to(x.scalar_type());
}

// transformers' apply_rotary_pos_emb (half) and apply_rotary_pos_emb_interleave on x (B, S, H, D),
// cos/sin (B, S, D): the model layer's composite, in the (B, S, H, D) layout.
at::Tensor rope_formula(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  auto c = cos.unsqueeze(2), s = sin.unsqueeze(2);  // (B, S, 1, D)
  const int64_t d = x.size(-1), half = d / 2;
  if (!interleaved) {
    auto rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
    return x * c + rotated * s;
  }
  auto ch = c.narrow(-1, 0, half), sh = s.narrow(-1, 0, half);
  auto x1 = x.slice(-1, 0, d, 2), x2 = x.slice(-1, 1, d, 2);
  return at::cat({x1 * ch - x2 * sh, x2 * ch + x1 * sh}, -1);
}

std::pair<at::Tensor, at::Tensor> cos_sin(int64_t b, int64_t s, int64_t d, at::ScalarType dt) {
  auto ang = at::rand({b, s, d / 2}) * 6.28;
  auto emb = at::cat({ang, ang}, -1);
  return {emb.cos().to(dt), emb.sin().to(dt)};
}

at::Tensor grad_of(const at::Tensor& out, const at::Tensor& in, const at::Tensor& g) {
  return torch::autograd::grad({out}, {in}, {g})[0];
}

// ---- rms_norm ----------------------------------------------------------------------------------------

TEST(RmsNorm, MatchesTransformersFormulaFp32) {
  for (int64_t h : {1, 7, 128, 2048}) {
    auto x = at::randn({3, 5, h}) * 2, w = at::randn({h});
    auto [y, rstd] = anvil::ops::rms_norm(x, w, 1e-6);
    EXPECT_TRUE(at::allclose(y, rms_norm_formula(x, w, 1e-6), kRtol, kAtol)) << "h=" << h;
    EXPECT_EQ(rstd.sizes(), at::IntArrayRef({3, 5}));
    EXPECT_EQ(rstd.scalar_type(), at::kFloat);
    EXPECT_TRUE(at::allclose(rstd, at::rsqrt(x.pow(2).mean(-1) + 1e-6), kRtol, 0));
  }
}

TEST(RmsNorm, LowPrecisionRoundsLikeTransformers) {
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    auto x = (at::randn({64, 320}) * 3).to(dt), w = (at::randn({320}) * 0.5 + 1).to(dt);
    auto [y, rstd] = anvil::ops::rms_norm(x, w, 1e-5);
    const auto want = rms_norm_formula(x, w, 1e-5);
    ASSERT_EQ(y.scalar_type(), dt);
    EXPECT_TRUE(at::allclose(y.to(at::kFloat), want.to(at::kFloat), kBfRtol, kBfAtol));
    // Only a last-bit difference of rstd (summation order) can move a rounding: nearly all are equal.
    EXPECT_GT((y == want).to(at::kFloat).mean().item<double>(), 0.99) << c10::toString(dt);
  }
}

TEST(RmsNorm, GradientsMatchAutogradOfTheFormula) {
  auto x = at::randn({4, 9, 96}, at::kDouble).requires_grad_(true);
  auto w = (at::randn({96}, at::kDouble) + 1).requires_grad_(true);
  auto g = at::randn({4, 9, 96}, at::kDouble);
  auto y = std::get<0>(anvil::ops::rms_norm(x, w, 1e-6));
  auto grads = torch::autograd::grad({y}, {x, w}, {g});
  auto xr = x.detach().clone().requires_grad_(true), wr = w.detach().clone().requires_grad_(true);
  auto yr = wr * (xr * at::rsqrt(xr.pow(2).mean(-1, true) + 1e-6));
  auto want = torch::autograd::grad({yr}, {xr, wr}, {g});
  EXPECT_TRUE(at::allclose(grads[0], want[0], 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(grads[1], want[1], 1e-12, 1e-12));
  // fp32 against the fp64 reference.
  auto [dx, dw] = anvil::ops::rms_norm_backward(g.to(at::kFloat), x.detach().to(at::kFloat), w.detach().to(at::kFloat),
                                                std::get<1>(anvil::ops::rms_norm(x.detach().to(at::kFloat),
                                                                                  w.detach().to(at::kFloat), 1e-6)));
  EXPECT_TRUE(at::allclose(dx, want[0].to(at::kFloat), kRtol, kAtol));
  EXPECT_TRUE(at::allclose(dw, want[1].to(at::kFloat), kRtol, kAtol));
}

TEST(RmsNorm, WeightGradientIsDeterministicAcrossThreadCounts) {
  auto x = at::randn({1000, 64}), w = at::randn({64}), g = at::randn({1000, 64});
  auto rstd = std::get<1>(anvil::ops::rms_norm(x, w, 1e-6));
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  auto dw1 = std::get<1>(anvil::ops::rms_norm_backward(g, x, w, rstd));
  at::set_num_threads(std::max(2, threads));
  auto dw2 = std::get<1>(anvil::ops::rms_norm_backward(g, x, w, rstd));
  at::set_num_threads(threads);
  EXPECT_TRUE(bit_equal(dw1, dw2));
}

TEST(RmsNorm, EmptyRowsGiveZeroWeightGradient) {
  auto x = at::randn({0, 16}), w = at::randn({16});
  auto [y, rstd] = anvil::ops::rms_norm(x, w, 1e-6);
  auto [dx, dw] = anvil::ops::rms_norm_backward(at::randn({0, 16}), x, w, rstd);
  EXPECT_EQ(y.numel(), 0);
  EXPECT_TRUE(at::equal(dw, at::zeros({16})));
}

TEST(RmsNorm, BadInputsNameTheArgument) {
  auto x = at::randn({4, 8});
  expect_error([&] { anvil::ops::rms_norm(x, at::randn({7}), 1e-6); }, {"anvil::rms_norm", "weight", "(8)"});
  expect_error([&] { anvil::ops::rms_norm(x, at::randn({8}, at::kDouble), 1e-6); }, {"weight", "dtype"});
  expect_error([&] { anvil::ops::rms_norm(x.t(), at::randn({4}), 1e-6); }, {"x", "contiguous"});
  expect_error([&] { anvil::ops::rms_norm(x.to(at::kInt), at::randn({8}).to(at::kInt), 1e-6); }, {"x", "dtype"});
  expect_error([&] { anvil::ops::rms_norm(x, at::randn({8}), -1.0); }, {"eps"});
  auto rstd = std::get<1>(anvil::ops::rms_norm(x, at::randn({8}), 1e-6));
  expect_error([&] { anvil::ops::rms_norm_backward(at::randn({4, 9}), x, at::randn({8}), rstd); }, {"grad_y", "shape"});
  expect_error([&] { anvil::ops::rms_norm_backward(at::randn({4, 8}), x, at::randn({8}), at::randn({3})); },
               {"rstd", "shape"});
}

// ---- swiglu ------------------------------------------------------------------------------------------

TEST(Swiglu, MatchesSiluTimesUp) {
  auto g = at::randn({7, 333}) * 4, u = at::randn({7, 333});
  EXPECT_TRUE(at::allclose(anvil::ops::swiglu(g, u), at::silu(g) * u, kRtol, kAtol));
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    auto gl = g.to(dt), ul = u.to(dt);
    auto got = anvil::ops::swiglu(gl, ul);
    ASSERT_EQ(got.scalar_type(), dt);
    EXPECT_TRUE(at::allclose(got.to(at::kFloat), (at::silu(gl) * ul).to(at::kFloat), kBfRtol, kBfAtol));
  }
}

TEST(Swiglu, GradientsMatchAutograd) {
  auto g = (at::randn({5, 64}, at::kDouble) * 4).requires_grad_(true), u = at::randn({5, 64}, at::kDouble).requires_grad_(true);
  auto dy = at::randn({5, 64}, at::kDouble);
  auto got = torch::autograd::grad({anvil::ops::swiglu(g, u)}, {g, u}, {dy});
  auto want = torch::autograd::grad({at::silu(g) * u}, {g, u}, {dy});
  EXPECT_TRUE(at::allclose(got[0], want[0], 1e-12, 1e-12));
  EXPECT_TRUE(at::allclose(got[1], want[1], 1e-12, 1e-12));
  auto [dg, du] = anvil::ops::swiglu_backward(dy.to(at::kFloat), g.detach().to(at::kFloat), u.detach().to(at::kFloat));
  EXPECT_TRUE(at::allclose(dg, want[0].to(at::kFloat), kRtol, kAtol));
  EXPECT_TRUE(at::allclose(du, want[1].to(at::kFloat), kRtol, kAtol));
}

TEST(Swiglu, BadInputsNameTheArgument) {
  expect_error([&] { anvil::ops::swiglu(at::randn({4, 8}), at::randn({4, 9})); }, {"anvil::swiglu", "up", "shape"});
  expect_error([&] { anvil::ops::swiglu(at::randn({4, 8}), at::randn({4, 8}, at::kBFloat16)); }, {"up", "dtype"});
  expect_error([&] { anvil::ops::swiglu(at::randn({8, 4}).t(), at::randn({4, 8})); }, {"gate", "contiguous"});
  expect_error([&] { anvil::ops::swiglu_backward(at::randn({4, 7}), at::randn({4, 8}), at::randn({4, 8})); },
               {"grad", "shape"});
}

// ---- rope --------------------------------------------------------------------------------------------

TEST(Rope, EqualsTheCompositeBitForBit) {
  for (bool inter : {false, true})
    for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
      SCOPED_TRACE(std::string(inter ? "interleaved " : "half ") + c10::toString(dt));
      auto x = at::randn({2, 5, 3, 24}).to(dt);
      auto [c, s] = cos_sin(2, 5, 24, dt);
      auto got = anvil::ops::rope(x, c, s, inter);
      EXPECT_TRUE(got.is_contiguous());
      EXPECT_TRUE(bit_equal(got, rope_formula(x, c, s, inter))) << anvil::test::first_difference(got, rope_formula(x, c, s, inter));
      // A strided view (the heads of a (B, H, S, D) tensor seen as (B, S, H, D)) and broadcast cos/sin.
      auto xt = at::randn({2, 3, 5, 24}).to(dt).transpose(1, 2);
      auto c1 = c.narrow(0, 0, 1).contiguous(), s1 = s.narrow(0, 0, 1).contiguous();
      EXPECT_TRUE(bit_equal(anvil::ops::rope(xt, c1, s1, inter), rope_formula(xt, c1, s1, inter)));
    }
}

TEST(Rope, BackwardIsTheTransposedRotation) {
  for (bool inter : {false, true}) {
    auto x = at::randn({2, 4, 3, 16}, at::kDouble).requires_grad_(true);
    auto c = at::randn({2, 4, 16}, at::kDouble), s = at::randn({2, 4, 16}, at::kDouble);  // general, not cat(f, f)
    auto g = at::randn({2, 4, 3, 16}, at::kDouble);
    auto got = grad_of(anvil::ops::rope(x, c, s, inter), x, g);
    auto want = grad_of(rope_formula(x, c, s, inter), x, g);
    EXPECT_TRUE(at::allclose(got, want, 1e-12, 1e-12)) << inter;
    auto g32 = anvil::ops::rope_backward(g.to(at::kFloat), c.to(at::kFloat), s.to(at::kFloat), inter);
    EXPECT_TRUE(at::allclose(g32, want.to(at::kFloat), kRtol, kAtol));
  }
}

TEST(Rope, BadInputsNameTheArgument) {
  auto x = at::randn({2, 5, 3, 8});
  auto [c, s] = cos_sin(2, 5, 8, at::kFloat);
  expect_error([&] { anvil::ops::rope(at::randn({2, 5, 8}), c, s); }, {"anvil::rope", "x", "4 dimension"});
  expect_error([&] { anvil::ops::rope(at::randn({2, 5, 3, 7}), c, s); }, {"x.size(3)", "even"});
  expect_error([&] { anvil::ops::rope(x, c.narrow(1, 0, 4).contiguous(), s); }, {"cos", "shape"});
  expect_error([&] { anvil::ops::rope(x, c, s.to(at::kBFloat16)); }, {"sin", "dtype"});
  expect_error([&] { anvil::ops::rope(at::randn({2, 5, 4, 4}).transpose(2, 3), c, s); }, {"x", "stride 1"});
  auto cg = c.clone().requires_grad_(true);
  expect_error([&] { anvil::ops::rope(x.clone().requires_grad_(true), cg, s); }, {"cos and sin", "require grad"});
}

// ---- cross_entropy_chunk -----------------------------------------------------------------------------

TEST(CrossEntropyChunk, LossAndLseMatchTorch) {
  auto logits = at::randn({37, 1000}) * 3;
  auto labels = at::randint(0, 1000, {37}, at::kLong);
  labels[3] = -100;
  labels[20] = -100;
  auto [loss, lse] = anvil::ops::cross_entropy_chunk(logits, labels, -100);
  auto want = at::cross_entropy_loss(logits, labels, {}, at::Reduction::None, -100);
  EXPECT_TRUE(at::allclose(loss, want, kRtol, kAtol));
  EXPECT_EQ(loss[3].item<float>(), 0.0f);
  EXPECT_TRUE(at::allclose(lse, at::logsumexp(logits, -1), kRtol, kAtol));
  auto [lb, lseb] = anvil::ops::cross_entropy_chunk(logits.to(at::kBFloat16), labels, -100);
  auto wantb = at::cross_entropy_loss(logits.to(at::kBFloat16).to(at::kFloat), labels, {}, at::Reduction::None, -100);
  EXPECT_EQ(lb.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::allclose(lb, wantb, kRtol, kAtol));
}

// Qwen's 151936-token vocabulary with spread-out logits: the CPU reference (the GPU kernel's yardstick)
// stays within a few fp32 ulps of the fp64 log-sum-exp (a sequential fp32 sum was 3e-4 off here).
TEST(CrossEntropyChunk, LargeVocabularyLseCloseToFp64) {
  const int64_t v = 151936;
  auto logits = at::randn({5, v}) * 4;
  auto labels = at::randint(0, v, {5}, at::kLong);
  auto [loss, lse] = anvil::ops::cross_entropy_chunk(logits, labels, -100);
  const auto lse64 = at::logsumexp(logits.to(at::kDouble), {1});
  const double err = (lse.to(at::kDouble) - lse64).abs().max().item<double>();
  EXPECT_LE(err, 4 * 1.2e-7 * lse64.abs().max().item<double>()) << "max |lse - lse64| " << err;
}

TEST(CrossEntropyChunk, InPlaceBackwardIsSoftmaxMinusOnehot) {
  auto logits = at::randn({9, 50}) * 2;
  auto labels = at::randint(0, 50, {9}, at::kLong);
  labels[4] = 7;  // custom ignore_index below
  auto [loss, lse] = anvil::ops::cross_entropy_chunk(logits, labels, 7);
  auto g = at::rand({9});
  auto buf = logits.clone();
  anvil::ops::cross_entropy_chunk_backward(buf, labels, lse, g, 7);
  auto lr = logits.clone().requires_grad_(true);
  auto ref = at::cross_entropy_loss(lr, labels, {}, at::Reduction::None, 7);
  EXPECT_TRUE(at::allclose(buf, grad_of(ref, lr, g), kRtol, kAtol));
  EXPECT_TRUE(at::equal(buf[4], at::zeros({50})));
  // A scalar grad broadcasts; bf16 logits are overwritten in bf16.
  auto b16 = logits.to(at::kBFloat16);
  auto lse16 = std::get<1>(anvil::ops::cross_entropy_chunk(b16, labels, 7));
  anvil::ops::cross_entropy_chunk_backward(b16, labels, lse16, at::scalar_tensor(0.5), 7);
  auto ref2 = at::cross_entropy_loss(lr, labels, {}, at::Reduction::None, 7);
  auto want16 = grad_of(ref2, lr, at::full({9}, 0.5));
  EXPECT_TRUE(at::allclose(b16.to(at::kFloat), want16, kBfRtol, kBfAtol));
}

TEST(CrossEntropyChunk, AutogradThroughLoss) {
  auto logits = at::randn({6, 20}, at::kDouble).requires_grad_(true);
  auto labels = at::randint(0, 20, {6}, at::kLong);
  auto g = at::randn({6}, at::kDouble);
  auto got = grad_of(std::get<0>(anvil::ops::cross_entropy_chunk(logits, labels, -100)), logits, g);
  auto want = grad_of(at::cross_entropy_loss(logits, labels, {}, at::Reduction::None, -100), logits, g);
  EXPECT_TRUE(at::allclose(got, want, 1e-12, 1e-12));
}

TEST(CrossEntropyChunk, BadInputsNameTheArgument) {
  auto logits = at::randn({4, 10});
  auto labels = at::tensor(std::vector<int64_t>{1, 2, 3, 4});
  expect_error([&] { anvil::ops::cross_entropy_chunk(logits, at::tensor(std::vector<int64_t>{1, 2, 10, 4})); },
               {"labels[2] = 10", "[0, 10)", "ignore_index"});
  expect_error([&] { anvil::ops::cross_entropy_chunk(logits, labels.to(at::kInt)); }, {"labels", "dtype"});
  expect_error([&] { anvil::ops::cross_entropy_chunk(logits, labels.narrow(0, 0, 3)); }, {"labels", "shape"});
  expect_error([&] { anvil::ops::cross_entropy_chunk(at::randn({2, 4, 10}), labels); }, {"logits", "2 dimension"});
  auto lse = std::get<1>(anvil::ops::cross_entropy_chunk(logits, labels));
  expect_error([&] { anvil::ops::cross_entropy_chunk_backward(logits, labels, lse, at::ones({3})); },
               {"grad_loss", "shape"});
  expect_error([&] { anvil::ops::cross_entropy_chunk_backward(logits, labels, lse.to(at::kDouble), at::ones({4})); },
               {"lse", "dtype"});
}

}  // namespace
