// The trainer's pieces (include/anvil/train): schedules against their closed forms, AdamW against
// the update rule written out by hand, clipping, the chunked loss against at::cross_entropy on full
// logits (values and gradients), gradient checkpointing against the plain backward (with LoRA
// dropout, so the RNG replay is tested), and the loss plot. The torch.optim.AdamW oracle runs in
// tests/python/test_train.py over the whole recipe.
#include "anvil/model/transformer.h"
#include "anvil/model/checkpointing.h"
#include "anvil/train/loss.h"
#include "anvil/train/optim.h"
#include "anvil/train/plot.h"
#include "anvil/lora/lora.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include <cmath>
#include <iostream>

#if defined(ANVIL_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace anvil::train {
namespace {

TEST(Schedule, WarmupThenCosineLinearConstant) {
  ScheduleOptions o;
  o.lr = 1.0, o.warmup_steps = 4, o.total_steps = 14, o.min_lr_ratio = 0.1;
  o.kind = "cosine";
  EXPECT_DOUBLE_EQ(lr_at(o, 0), 0.0);
  EXPECT_DOUBLE_EQ(lr_at(o, 2), 0.5);
  EXPECT_DOUBLE_EQ(lr_at(o, 4), 1.0);
  EXPECT_NEAR(lr_at(o, 9), 0.1 + 0.9 * 0.5, 1e-12);  // half way through the decay
  EXPECT_NEAR(lr_at(o, 14), 0.1, 1e-12);
  o.kind = "linear";
  EXPECT_NEAR(lr_at(o, 9), 0.1 + 0.9 * 0.5, 1e-12);
  EXPECT_NEAR(lr_at(o, 6), 0.1 + 0.9 * 0.8, 1e-12);
  EXPECT_NEAR(lr_at(o, 20), 0.1, 1e-12);  // never below the floor
  o.kind = "constant";
  EXPECT_DOUBLE_EQ(lr_at(o, 1), 0.25);
  EXPECT_DOUBLE_EQ(lr_at(o, 13), 1.0);
  o.kind = "cos";
  EXPECT_THROW(lr_at(o, 1), std::invalid_argument);
}

TEST(AdamW, MatchesTheUpdateRuleWrittenOut) {
  at::manual_seed(0);
  auto p = at::randn({5, 3}, at::kDouble).set_requires_grad(true);
  auto ref = p.detach().clone();
  auto m = at::zeros_like(ref), v = at::zeros_like(ref);
  AdamWOptions o;
  o.beta1 = 0.8, o.beta2 = 0.95, o.eps = 1e-6, o.weight_decay = 0.1;
  AdamW opt({p}, o);
  const std::vector<double> lrs = {0.1, 0.05, 0.02};
  for (int t = 1; t <= 3; ++t) {
    auto g = at::randn({5, 3}, at::kDouble);
    p.mutable_grad() = g.clone();
    opt.step(lrs[t - 1]);
    // torch.optim.AdamW: decoupled decay, bias-corrected moments.
    const double lr = lrs[t - 1];
    ref.mul_(1 - lr * o.weight_decay);
    m = o.beta1 * m + (1 - o.beta1) * g;
    v = o.beta2 * v + (1 - o.beta2) * g * g;
    const double bc1 = 1 - std::pow(o.beta1, t), bc2 = 1 - std::pow(o.beta2, t);
    ref = ref - lr / bc1 * m / (at::sqrt(v) / std::sqrt(bc2) + o.eps);
    EXPECT_TRUE(at::allclose(p.detach(), ref, 1e-12, 1e-12)) << "step " << t;
  }
  opt.zero_grad();
  EXPECT_FALSE(p.grad().defined());
}

TEST(AdamW, StateRoundTripsExactly) {
  auto p = at::randn({4}).set_requires_grad(true);
  AdamW a({p}, {});
  p.mutable_grad() = at::randn({4});
  a.step(0.1);
  auto q = p.detach().clone().set_requires_grad(true);
  AdamW b({q}, {});
  b.load_state(a.state_tensors());
  const auto g = at::randn({4});
  p.mutable_grad() = g.clone();
  q.mutable_grad() = g.clone();
  a.step(0.1);
  b.step(0.1);
  EXPECT_TRUE(at::equal(p, q));
  std::vector<std::pair<std::string, at::Tensor>> bad = {{"exp_avg.0", at::zeros({3})}};
  EXPECT_THROW(b.load_state(bad), std::runtime_error);
}

TEST(ClipGradNorm, ReturnsTheNormAndScales) {
  auto a = at::zeros({2}).set_requires_grad(true), b = at::zeros({1}).set_requires_grad(true);
  a.mutable_grad() = at::tensor({3.0f, 0.0f});
  b.mutable_grad() = at::tensor({4.0f});
  auto norm = clip_grad_norm({a, b}, 1.0);
  EXPECT_FLOAT_EQ(norm.item<float>(), 5.0f);
  EXPECT_NEAR(a.grad()[0].item<float>(), 3.0 / (5.0 + 1e-6), 1e-6);
  EXPECT_NEAR(b.grad()[0].item<float>(), 4.0 / (5.0 + 1e-6), 1e-6);
  norm = clip_grad_norm({a, b}, 10.0);  // below the bound: unchanged
  EXPECT_NEAR(norm.item<float>(), 1.0, 1e-5);
  EXPECT_NEAR(b.grad()[0].item<float>(), 4.0 / (5.0 + 1e-6), 1e-6);
}

void check_loss_against_cross_entropy(at::ScalarType dtype, int64_t chunk, double tol,
                                      LossKernel kernel = LossKernel::kAuto) {
  at::manual_seed(1);
  const int64_t b = 3, s = 7, h = 16, vocab = 50;
  auto hidden = at::randn({b, s, h}).to(dtype).set_requires_grad(true);
  auto weight = (at::randn({vocab, h}) / 4).to(dtype).set_requires_grad(true);
  auto labels = at::randint(0, vocab, {b, s}, at::kLong);
  labels.index_put_({labels.remainder(4) == 0}, kIgnoreIndex);
  const double normalizer = 30.0;  // e.g. the targets of a whole accumulated step
  auto ours = causal_lm_loss(hidden, weight, labels, normalizer, chunk, kernel);
  const auto ours_grads = torch::autograd::grad({ours}, {hidden, weight});
  const auto &dh = ours_grads[0], &dw = ours_grads[1];
  auto h2 = hidden.detach().clone().set_requires_grad(true), w2 = weight.detach().clone().set_requires_grad(true);
  // The full (B, S, V) logits, reduced in fp32 (fp64 for fp64 inputs) as the chunked loss does.
  auto logits = at::linear(h2, w2).to(dtype == at::kDouble ? at::kDouble : at::kFloat);
  auto ref = at::cross_entropy_loss(logits.view({-1, vocab}), labels.view({-1}), {}, at::Reduction::Sum, kIgnoreIndex) /
             normalizer;
  auto grads = torch::autograd::grad({ref}, {h2, w2});
  EXPECT_NEAR(ours.item<double>(), ref.item<double>(), tol * std::abs(ref.item<double>()));
  EXPECT_TRUE(at::allclose(dh.to(at::kFloat), grads[0].to(at::kFloat), tol, tol)) << "dh, chunk " << chunk;
  EXPECT_TRUE(at::allclose(dw.to(at::kFloat), grads[1].to(at::kFloat), tol, tol)) << "dW, chunk " << chunk;
}

TEST(ChunkedLoss, EqualsCrossEntropyOnFullLogits) {
  for (int64_t chunk : {1, 4, 5, 21, 4096}) check_loss_against_cross_entropy(at::kFloat, chunk, 1e-5);
  check_loss_against_cross_entropy(at::kDouble, 6, 1e-10);
  check_loss_against_cross_entropy(at::kBFloat16, 8, 2e-2);
}

// The fused op (the CUDA default) on the CPU, against the same full-logits oracle.
TEST(ChunkedLoss, FusedKernelEqualsCrossEntropyOnFullLogits) {
  for (int64_t chunk : {1, 5, 4096}) check_loss_against_cross_entropy(at::kFloat, chunk, 1e-5, LossKernel::kFused);
  check_loss_against_cross_entropy(at::kDouble, 6, 1e-10, LossKernel::kFused);
  check_loss_against_cross_entropy(at::kBFloat16, 8, 2e-2, LossKernel::kFused);
}

// Fused and ATen chunk kernels side by side: the same lse/loss formula and the same fp32 dlogits
// rounded once to the model dtype, so they agree to fp32 rounding (fp32, fp64) or to an ulp of the
// rounded dlogits (bf16); an all-ignored chunk and chunk sizes that do not divide the rows included.
TEST(ChunkedLoss, FusedKernelEqualsAtenKernel) {
  struct Case {
    at::ScalarType dtype;
    int64_t chunk;
    double rtol, atol;
  };
  for (const Case c : {Case{at::kFloat, 7, 1e-5, 1e-7}, Case{at::kFloat, 64, 1e-5, 1e-7}, Case{at::kDouble, 5, 1e-12, 1e-14},
                       Case{at::kBFloat16, 9, 1.6e-2, 1e-3}}) {
    at::manual_seed(5);
    const int64_t n = 37, h = 24, vocab = 300;
    auto hidden = at::randn({n, h}).to(c.dtype);
    auto weight = (at::randn({vocab, h}) / 3).to(c.dtype);
    auto labels = at::randint(0, vocab, {n}, at::kLong);
    labels.slice(0, 0, 9).fill_(kIgnoreIndex);  // the first chunk(s) without a target
    labels[20] = kIgnoreIndex;
    auto run = [&](LossKernel kernel) {
      auto hh = hidden.clone().set_requires_grad(true), ww = weight.clone().set_requires_grad(true);
      auto loss = causal_lm_loss(hh, ww, labels, 25.0, c.chunk, kernel);
      auto grads = torch::autograd::grad({loss}, {hh, ww});
      return std::make_tuple(loss, grads[0], grads[1]);
    };
    const auto [fl, fdh, fdw] = run(LossKernel::kFused);
    const auto [al, adh, adw] = run(LossKernel::kAten);
    const std::string what = std::string(c10::toString(c.dtype)) + " chunk " + std::to_string(c.chunk);
    EXPECT_EQ(fl.scalar_type(), al.scalar_type()) << what;
    EXPECT_NEAR(fl.item<double>(), al.item<double>(), 1e-6 * std::abs(al.item<double>())) << what;
    EXPECT_GT(adh.abs().max().item<double>(), 0.0) << what;
    EXPECT_TRUE(at::allclose(fdh.to(at::kDouble), adh.to(at::kDouble), c.rtol, c.atol))
        << "dh " << what << ": max |diff| " << (fdh.to(at::kDouble) - adh.to(at::kDouble)).abs().max().item<double>();
    EXPECT_TRUE(at::allclose(fdw.to(at::kDouble), adw.to(at::kDouble), c.rtol, c.atol))
        << "dW " << what << ": max |diff| " << (fdw.to(at::kDouble) - adw.to(at::kDouble)).abs().max().item<double>();
    EXPECT_EQ(fdh.slice(0, 0, 9).abs().max().item<double>(), 0.0) << "ignored rows get no gradient, " << what;
  }
}

// On the GPU (where kAuto picks the fused op): the two kernels agree on a 32000-token vocabulary, and in
// bf16 the fused one holds less memory at its peak (no fp32 copy of the chunk's logits, an in-place
// backward). Skipped without a GPU.
TEST(ChunkedLossCuda, FusedKernelEqualsAtenKernelWithLessMemory) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (const auto dt : {at::kFloat, at::kBFloat16}) {
    at::manual_seed(8);
    const int64_t n = 2048, h = 256, vocab = 32000, chunk = 1024;
    auto hidden = at::randn({n, h}).to(dt).cuda();
    auto weight = (at::randn({vocab, h}) / 16).to(dt).cuda();
    auto labels = at::randint(0, vocab, {n}, at::kLong);
    labels.slice(0, 0, 100).fill_(kIgnoreIndex);
    labels = labels.cuda();
    auto run = [&](LossKernel kernel, int64_t* peak) {
      auto hh = hidden.clone().set_requires_grad(true), ww = weight.clone().set_requires_grad(true);
      torch::cuda::synchronize();
#if defined(ANVIL_WITH_CUDA)
      c10::cuda::CUDACachingAllocator::resetPeakStats(0);
#endif
      auto loss = causal_lm_loss(hh, ww, labels, double(n), chunk, kernel);
      auto grads = torch::autograd::grad({loss}, {hh, ww});
      torch::cuda::synchronize();
#if defined(ANVIL_WITH_CUDA)
      *peak = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak;
#else
      *peak = 0;
#endif
      return std::make_tuple(loss.cpu().to(at::kDouble), grads[0].cpu().to(at::kDouble), grads[1].cpu().to(at::kDouble));
    };
    int64_t fused_peak = 0, aten_peak = 0;
    const auto [fl, fdh, fdw] = run(LossKernel::kAuto, &fused_peak);  // kAuto = fused on CUDA
    const auto [al, adh, adw] = run(LossKernel::kAten, &aten_peak);
    const std::string what = c10::toString(dt);
    const double tol = dt == at::kFloat ? 1e-4 : 2e-2;
    auto rel = [](const at::Tensor& a, const at::Tensor& b) {
      return (a - b).abs().max().item<double>() / b.abs().max().item<double>();
    };
    EXPECT_NEAR(fl.item<double>(), al.item<double>(), 1e-5 * al.item<double>()) << what;
    EXPECT_LE(rel(fdh, adh), tol) << "dh " << what;
    EXPECT_LE(rel(fdw, adw), tol) << "dW " << what;
    std::cout << "[ChunkedLossCuda] " << what << ": peak allocated fused " << fused_peak / (1 << 20) << " MiB, ATen "
              << aten_peak / (1 << 20) << " MiB\n";
    if (dt == at::kBFloat16) EXPECT_LT(fused_peak, aten_peak) << what;
  }
}

TEST(ChunkedLoss, NoTargetsGiveZeroAndBadShapesThrow) {
  auto hidden = at::randn({2, 4}).set_requires_grad(true);
  auto weight = at::randn({6, 4});
  auto labels = at::full({2}, kIgnoreIndex, at::kLong);
  auto loss = causal_lm_loss(hidden, weight, labels, 0.0);
  EXPECT_EQ(loss.item<double>(), 0.0);
  loss.backward();
  EXPECT_EQ(hidden.grad().abs().sum().item<double>(), 0.0);
  EXPECT_THROW(causal_lm_loss(hidden, at::randn({6, 5}), labels, 1.0), c10::Error);
  EXPECT_THROW(causal_lm_loss(hidden, weight, at::zeros({3}, at::kLong), 1.0), c10::Error);
}

TEST(Checkpointing, GradientsEqualThePlainBackwardWithDropout) {
  auto w = at::randn({8, 8}).set_requires_grad(true);
  auto fn = [w](const at::Tensor& x) { return at::dropout(at::tanh(at::linear(x, w)), 0.5, true) * 2; };
  auto x = at::randn({4, 8}).set_requires_grad(true);
  at::manual_seed(11);
  auto plain = fn(x).pow(2).sum();
  auto plain_grads = torch::autograd::grad({plain}, {x, w});
  at::manual_seed(11);
  auto ckpt = anvil::model::checkpoint(fn, x).pow(2).sum();
  ckpt.backward();
  EXPECT_TRUE(at::equal(plain, ckpt));
  EXPECT_TRUE(at::allclose(x.grad(), plain_grads[0], 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(w.grad(), plain_grads[1], 1e-6, 1e-6));
}

// A whole two-layer Llama with LoRA (dropout on): gradients with gradient checkpointing equal those
// without, for every adapter tensor, including the first layer's whose input comes from the frozen
// embedding (no grad).
TEST(Checkpointing, LoraModelGradientsEqualWithoutCheckpointing) {
  const std::string json = R"({"architectures": ["LlamaForCausalLM"], "vocab_size": 40, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_theta": 10000, "max_position_embeddings": 64})";
  auto model = std::make_shared<anvil::model::CausalLM>(anvil::model::parse_model_config(json),
                                                        at::TensorOptions().dtype(at::kFloat));
  at::manual_seed(3);
  {
    at::NoGradGuard no_grad;
    for (auto& [name, t] : model->state_tensors()) t.copy_(at::randn(t.sizes()) / std::sqrt(double(t.size(-1))));
  }
  anvil::lora::LoraConfig lc;
  lc.r = 4, lc.lora_dropout = 0.2, lc.init = "gaussian";
  lc.target_modules.kind = anvil::lora::TargetModules::Kind::kAllLinear;
  auto params = anvil::lora::apply_lora(*model, lc, 5);
  {
    at::NoGradGuard no_grad;  // nonzero B so that every adapter tensor gets a gradient
    for (auto& [name, t] : params) t.copy_(at::randn(t.sizes()) * 0.1);
  }
  model->train();
  auto ids = at::randint(0, 40, {2, 9}, at::kLong);
  auto labels = at::randint(0, 40, {2, 9}, at::kLong);
  auto run = [&](bool ckpt) {
    model->model->set_gradient_checkpointing(ckpt);
    for (auto& [n, t] : params) t.mutable_grad() = at::Tensor();
    at::manual_seed(99);
    auto h = model->hidden_states(ids);
    auto loss = causal_lm_loss(h, model->lm_head->weight, labels, 18.0, 5);
    loss.backward();
    std::vector<at::Tensor> grads;
    for (auto& [n, t] : params) grads.push_back(t.grad().clone());
    return std::make_pair(loss.item<double>(), grads);
  };
  const auto [plain_loss, plain] = run(false);
  const auto [ckpt_loss, ckpt] = run(true);
  EXPECT_EQ(plain_loss, ckpt_loss);
  ASSERT_EQ(plain.size(), ckpt.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    EXPECT_GT(plain[i].abs().sum().item<double>(), 0.0) << params[i].first;
    EXPECT_TRUE(at::allclose(plain[i], ckpt[i], 1e-5, 1e-6)) << params[i].first;
  }
}

TEST(LossPlot, HasAxesSeriesAndLegend) {
  LossSeries train{"train", {{1, 3.0}, {2, 2.5}, {3, 2.0}}, false, "#1f77b4"};
  LossSeries val{"validation", {{3, 2.2}}, true, "#d62728"};
  const auto svg = loss_plot_svg({train, val}, "a <run>");
  EXPECT_NE(svg.find("<svg"), std::string::npos);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("<circle"), std::string::npos);
  EXPECT_NE(svg.find(">train</text>"), std::string::npos);
  EXPECT_NE(svg.find(">validation</text>"), std::string::npos);
  EXPECT_NE(svg.find("a &lt;run&gt;"), std::string::npos);
  EXPECT_NE(svg.find(">3</text>"), std::string::npos);  // a tick label
}

}  // namespace
}  // namespace anvil::train
