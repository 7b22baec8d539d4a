// The KD losses (anvil/train/kd_loss.h): each divergence equals its formula written out here with plain loops
// in fp64 (the definitions of kd_loss.h's table), the chunked loss's analytic gradient equals autograd through
// the formula and central differences in fp64, chunking and row order do not change the result, and bad
// options and shapes are errors naming the rule.
#include "anvil/train/kd_loss.h"

#include "test_util.h"

#include <torch/autograd.h>

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace anvil::train {
namespace {

// The definitions, element by element, in double: p teacher, q student, softmax(logits / T).
std::vector<double> softmax_row(const at::Tensor& z, double T) {
  std::vector<double> e(z.size(0));
  double mx = -1e300, sum = 0;
  for (int64_t i = 0; i < z.size(0); ++i) mx = std::max(mx, z[i].item<double>() / T);
  for (int64_t i = 0; i < z.size(0); ++i) sum += (e[i] = std::exp(z[i].item<double>() / T - mx));
  for (auto& v : e) v /= sum;
  return e;
}

double kl(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * std::log(a[i] / b[i]);
  return s;
}

std::vector<double> mix(const std::vector<double>& a, double wa, const std::vector<double>& b) {
  std::vector<double> m(a.size());
  for (size_t i = 0; i < a.size(); ++i) m[i] = wa * a[i] + (1 - wa) * b[i];
  return m;
}

double written_out(KdLoss loss, const at::Tensor& zs, const at::Tensor& zt, const KdOptions& o) {
  const auto q = softmax_row(zs, o.temperature), p = softmax_row(zt, o.temperature);
  switch (loss) {
    case KdLoss::kForwardKl: return kl(p, q);
    case KdLoss::kReverseKl: return kl(q, p);
    case KdLoss::kSkewForwardKl: return kl(p, mix(p, o.skew_lambda, q));
    case KdLoss::kSkewReverseKl: return kl(q, mix(p, 1 - o.skew_lambda, q));
    case KdLoss::kJsd: {
      const double b = o.jsd_beta;
      if (b == 0) return kl(p, q);
      if (b == 1) return kl(q, p);
      const auto m = mix(p, b, q);
      return b * kl(p, m) + (1 - b) * kl(q, m);
    }
    case KdLoss::kTv: {
      double s = 0;
      for (size_t i = 0; i < p.size(); ++i) s += std::abs(p[i] - q[i]);
      return 0.5 * s;
    }
  }
  return 0;
}

std::vector<KdOptions> all_options() {
  std::vector<KdOptions> out;
  for (const auto& name : kd_loss_names()) {
    for (const double T : {1.0, 2.0}) {
      KdOptions o;
      o.loss = parse_kd_loss(name);
      o.temperature = T;
      o.skew_lambda = 0.3;
      o.jsd_beta = 0.4;
      o.chunk = 3;
      out.push_back(o);
    }
  }
  KdOptions edge;  // jsd's special cases, skew with lambda 0 (a plain KL)
  edge.loss = KdLoss::kJsd, edge.jsd_beta = 0, edge.chunk = 3;
  out.push_back(edge);
  edge.jsd_beta = 1;
  out.push_back(edge);
  edge.loss = KdLoss::kSkewForwardKl, edge.skew_lambda = 0;
  out.push_back(edge);
  edge.loss = KdLoss::kSkewReverseKl;
  out.push_back(edge);
  return out;
}

std::string name_of(const KdOptions& o) {
  return kd_loss_names()[size_t(o.loss)] + " T=" + std::to_string(o.temperature) + " lambda=" +
         std::to_string(o.skew_lambda) + " beta=" + std::to_string(o.jsd_beta);
}

TEST(KdLoss, EachDivergenceEqualsItsFormulaWrittenOut) {
  at::manual_seed(0);
  const int64_t n = 5, v = 7;
  for (const auto& o : all_options()) {
    const auto zs = at::randn({n, v}, at::kDouble) * 2, zt = at::randn({n, v}, at::kDouble) * 2;
    const auto got = kd_divergence_from_logits(zs, zt, o);  // (n)
    for (int64_t i = 0; i < n; ++i)
      EXPECT_NEAR(got[i].item<double>(), written_out(o.loss, zs[i], zt[i], o), 1e-12) << name_of(o) << " row " << i;
    // Zero at equality, positive otherwise.
    EXPECT_LT(kd_divergence_from_logits(zt, zt, o).abs().max().item<double>(), 1e-12) << name_of(o);
    EXPECT_GT(got.min().item<double>(), 0) << name_of(o);
  }
}

TEST(KdLoss, ChunkedValueAndGradientsEqualAutogradThroughTheFormula) {
  at::manual_seed(1);
  const int64_t n = 10, h = 6, ht = 5, v = 9;
  for (const auto& o : all_options()) {
    const auto hs = at::randn({n, h}, at::kDouble).requires_grad_(true);
    const auto ws = at::randn({v, h}, at::kDouble).requires_grad_(true);
    const auto hT = at::randn({n, ht}, at::kDouble), wT = at::randn({v, ht}, at::kDouble);
    const double normalizer = 7;
    const auto got = kd_loss(hs, ws, hT, wT, normalizer, o);
    const auto ref = kd_divergence_from_logits(at::linear(hs, ws), at::linear(hT, wT), o).sum() / normalizer;
    EXPECT_NEAR(got.item<double>(), ref.item<double>(), 1e-12) << name_of(o);
    const auto g = torch::autograd::grad({got}, {hs, ws});
    const auto r = torch::autograd::grad({ref}, {hs, ws});
    EXPECT_TRUE(at::allclose(g[0], r[0], 1e-9, 1e-12)) << name_of(o) << " dh max diff " << (g[0] - r[0]).abs().max();
    EXPECT_TRUE(at::allclose(g[1], r[1], 1e-9, 1e-12)) << name_of(o) << " dW max diff " << (g[1] - r[1]).abs().max();
  }
}

// kd_ce_loss: the blend the recipe trains with, in one pass (both terms from one set of student logits, the
// gradient taken in the forward): value, both logged sums and both gradients equal autograd through
// kd_weight * sum divergence + ce_weight * sum cross_entropy, at a temperature that is not 1 (so the CE's
// untempered log-softmax and the KD's tempered one differ), chunked, and with the head frozen (no dW).
TEST(KdLoss, BlendWithCrossEntropyEqualsAutogradThroughBothFormulas) {
  at::manual_seed(5);
  const int64_t n = 11, h = 6, ht = 5, v = 9;
  for (auto o : all_options()) {
    o.temperature = 1.7, o.chunk = 4;
    const auto hs = at::randn({n, h}, at::kDouble).requires_grad_(true);
    const auto ws = at::randn({v, h}, at::kDouble).requires_grad_(true);
    const auto hT = at::randn({n, ht}, at::kDouble), wT = at::randn({v, ht}, at::kDouble);
    const auto labels = at::randint(v, {n}, at::kLong);
    const double kw = 0.3 / 7, cw = 0.7 / 7;
    const auto got = kd_ce_loss(hs, ws, hT, wT, labels, kw, cw, o);
    const auto zs = at::linear(hs, ws);
    const auto kd = kd_divergence_from_logits(zs, at::linear(hT, wT), o).sum();
    const auto ce = at::cross_entropy_loss(zs, labels, {}, at::Reduction::Sum);
    const auto ref = kw * kd + cw * ce;
    EXPECT_NEAR(got.total.item<double>(), ref.item<double>(), 1e-12) << name_of(o);
    EXPECT_NEAR(got.kd.item<double>(), kd.item<double>(), 1e-12) << name_of(o);
    EXPECT_NEAR(got.ce.item<double>(), ce.item<double>(), 1e-12) << name_of(o);
    EXPECT_FALSE(got.kd.requires_grad() || got.ce.requires_grad());
    // An upstream gradient that is not 1 (the trainer's loss scaling) scales both gradients.
    const auto g = torch::autograd::grad({got.total * 2.5}, {hs, ws});
    const auto r = torch::autograd::grad({ref * 2.5}, {hs, ws});
    EXPECT_TRUE(at::allclose(g[0], r[0], 1e-9, 1e-12)) << name_of(o) << " dh max diff " << (g[0] - r[0]).abs().max();
    EXPECT_TRUE(at::allclose(g[1], r[1], 1e-9, 1e-12)) << name_of(o) << " dW max diff " << (g[1] - r[1]).abs().max();
    // A frozen head: dh alone, the same values.
    const auto frozen = kd_ce_loss(hs, ws.detach(), hT, wT, labels, kw, cw, o);
    const auto gf = torch::autograd::grad({frozen.total * 2.5}, {hs})[0];
    EXPECT_TRUE(at::allclose(gf, r[0], 1e-9, 1e-12)) << name_of(o);
  }
  // Computed under no grad, there is no graph to run back through.
  at::NoGradGuard no_grad;
  const auto hs = at::randn({3, 4}, at::kDouble).requires_grad_(true), ws = at::randn({5, 4}, at::kDouble);
  const auto l = kd_ce_loss(hs, ws, hs.detach(), ws, at::tensor({0, 1, 2}, at::kLong), 1.0, 1.0, KdOptions{});
  EXPECT_FALSE(l.total.requires_grad());
  test::expect_error([&] { kd_ce_loss(hs, ws, hs.detach(), ws, at::tensor({0, 1}, at::kLong), 1.0, 1.0, KdOptions{}); },
                     {"labels", "3 rows"});
}

// Padded vocabularies (train/vocab.h): a teacher head of V rows against a student head of Vs > V rows compares the
// first V columns, both softmaxes renormalised over them (the reference slices the student's logits before its
// softmax), while the CE keeps all Vs columns; the student's padded rows get the CE's gradient alone. Every divergence,
// T != 1, chunked.
TEST(KdLoss, PaddedStudentRowsAreLeftOutOfTheDivergenceButNotTheCrossEntropy) {
  at::manual_seed(7);
  const int64_t n = 11, h = 6, ht = 5, v = 9, vs = 13;
  for (auto o : all_options()) {
    o.temperature = 1.7, o.chunk = 4;
    const auto hs = at::randn({n, h}, at::kDouble).requires_grad_(true);
    const auto ws = at::randn({vs, h}, at::kDouble).requires_grad_(true);
    const auto hT = at::randn({n, ht}, at::kDouble), wT = at::randn({v, ht}, at::kDouble);
    const auto labels = at::randint(v, {n}, at::kLong);  // real tokens only
    const double kw = 0.3 / 7, cw = 0.7 / 7;
    const auto got = kd_ce_loss(hs, ws, hT, wT, labels, kw, cw, o);
    const auto zs = at::linear(hs, ws);  // (n, vs)
    const auto kd = kd_divergence_from_logits(zs.slice(1, 0, v), at::linear(hT, wT), o).sum();
    const auto ce = at::cross_entropy_loss(zs, labels, {}, at::Reduction::Sum);
    const auto ref = kw * kd + cw * ce;
    EXPECT_NEAR(got.kd.item<double>(), kd.item<double>(), 1e-12) << name_of(o);
    EXPECT_NEAR(got.ce.item<double>(), ce.item<double>(), 1e-12) << name_of(o);
    EXPECT_NEAR(got.total.item<double>(), ref.item<double>(), 1e-12) << name_of(o);
    const auto g = torch::autograd::grad({got.total}, {hs, ws});
    const auto r = torch::autograd::grad({ref}, {hs, ws});
    EXPECT_TRUE(at::allclose(g[0], r[0], 1e-9, 1e-12)) << name_of(o) << " dh max diff " << (g[0] - r[0]).abs().max();
    EXPECT_TRUE(at::allclose(g[1], r[1], 1e-9, 1e-12)) << name_of(o) << " dW max diff " << (g[1] - r[1]).abs().max();
    // KD alone: the padded rows get no gradient at all.
    const auto alone = kd_loss(hs, ws, hT, wT, 7.0, o);
    EXPECT_NEAR(alone.item<double>(), kd.item<double>() / 7, 1e-12) << name_of(o);
    const auto ga = torch::autograd::grad({alone}, {ws})[0];
    EXPECT_EQ(ga.slice(0, v, vs).abs().max().item<double>(), 0.0) << name_of(o);
  }
  // A teacher with more rows than the student is refused (freeze_teacher cuts the teacher to the compared rows).
  const auto x = at::randn({3, 4}), w = at::randn({6, 4});
  test::expect_error([&] { kd_loss(x, w, x, at::randn({8, 4}), 1, KdOptions{}); }, {"teacher's head has 8 rows", "only 6"});
}

TEST(KdLoss, GradientEqualsCentralDifferencesInFloat64) {
  at::manual_seed(2);
  const int64_t n = 4, h = 3, v = 5;
  for (const auto& o : all_options()) {
    if (o.loss == KdLoss::kTv) continue;  // |x| has a kink; its gradient is checked against autograd above
    auto hs = at::randn({n, h}, at::kDouble).requires_grad_(true);
    const auto ws = at::randn({v, h}, at::kDouble), hT = at::randn({n, h}, at::kDouble), wT = at::randn({v, h}, at::kDouble);
    const auto g = torch::autograd::grad({kd_loss(hs, ws, hT, wT, 1.0, o)}, {hs})[0];
    const double eps = 1e-6;
    at::NoGradGuard no_grad;
    for (int64_t i = 0; i < hs.numel(); ++i) {
      auto plus = hs.detach().clone(), minus = hs.detach().clone();
      plus.view(-1)[i] += eps;
      minus.view(-1)[i] -= eps;
      const double fd = (kd_loss(plus, ws, hT, wT, 1.0, o).item<double>() - kd_loss(minus, ws, hT, wT, 1.0, o).item<double>()) / (2 * eps);
      EXPECT_NEAR(g.view(-1)[i].item<double>(), fd, 1e-6) << name_of(o) << " element " << i;
    }
  }
}

TEST(KdLoss, ChunkSizeDoesNotChangeTheResultAndFloat32Agrees) {
  at::manual_seed(3);
  const int64_t n = 37, h = 16, v = 50;
  const auto hs = at::randn({n, h}), ws = at::randn({v, h}) * 0.3, hT = at::randn({n, h}), wT = at::randn({v, h}) * 0.3;
  for (auto o : all_options()) {
    o.chunk = 1000;
    auto a = hs.clone().requires_grad_(true);
    const auto whole = kd_loss(a, ws, hT, wT, n, o);
    const auto ga = torch::autograd::grad({whole}, {a})[0];
    o.chunk = 8;
    auto b = hs.clone().requires_grad_(true);
    const auto chunked = kd_loss(b, ws, hT, wT, n, o);
    const auto gb = torch::autograd::grad({chunked}, {b})[0];
    EXPECT_NEAR(whole.item<double>(), chunked.item<double>(), 1e-5) << name_of(o);
    EXPECT_TRUE(at::allclose(ga, gb, 1e-4, 1e-6)) << name_of(o);
    // fp32 against the fp64 reference.
    const auto ref = kd_divergence_from_logits(at::linear(hs.to(at::kDouble), ws.to(at::kDouble)),
                                               at::linear(hT.to(at::kDouble), wT.to(at::kDouble)), o).sum() / n;
    EXPECT_NEAR(chunked.item<double>(), ref.item<double>(), 1e-5 * std::max(1.0, ref.item<double>())) << name_of(o);
  }
}

TEST(KdLoss, TargetRowsAndNoRows) {
  const auto labels = at::tensor({5, -100, 3, -100, 0}, at::kLong).view({1, 5});
  EXPECT_TRUE(at::equal(target_rows(labels), at::tensor({0, 2, 4}, at::kLong)));
  const auto hs = at::randn({0, 4}).requires_grad_(true), ws = at::randn({6, 4});
  const auto l = kd_loss(hs, ws, at::randn({0, 4}), at::randn({6, 4}), 0.0, KdOptions{});
  EXPECT_EQ(l.item<double>(), 0.0);
}

TEST(KdLoss, BadOptionsAndShapesAreErrors) {
  try {
    parse_kd_loss("kl", "config key distill.loss");
    ADD_FAILURE() << "an unknown loss name was accepted";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const char* w : {"config key distill.loss", "\"forward_kl\"", "\"tv\"", "got \"kl\""})
      EXPECT_NE(msg.find(w), std::string::npos) << msg;
  }
  KdOptions o;
  o.temperature = 0;
  const auto h = at::randn({3, 4}), w = at::randn({6, 4});
  EXPECT_THROW(kd_loss(h, w, h, w, 1, o), std::invalid_argument);
  o = KdOptions{};
  o.jsd_beta = 1.5;
  EXPECT_THROW(kd_loss(h, w, h, w, 1, o), std::invalid_argument);
  test::expect_error([&] { kd_loss(h, w, h, at::randn({7, 4}), 1, KdOptions{}); }, {"vocabulary", "7", "6"});
  test::expect_error([&] { kd_loss(h, w, at::randn({2, 4}), w, 1, KdOptions{}); }, {"teacher has 2 rows"});
}

// The fused CUDA chunk (ops::kd_rows, the default on CUDA) against the composite on the CPU in float64: every
// divergence blended with CE at T != 1, values and both gradients; the vector path (V a multiple of 4 fp32 / 8 bf16)
// and the scalar one (V odd); a chunk boundary inside the rows. fp32 within 1e-4 relative; bf16 logits within what
// their rounding allows (the gradient's cosine to the reference).
TEST(KdLossCuda, FusedChunksEqualTheCompositeOnTheCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(11);
  for (const int64_t v : {1000, 999}) {
    for (auto o : all_options()) {
      o.temperature = 1.7, o.chunk = 48, o.fused = true;
      const int64_t n = 100, h = 32, ht = 24;
      const auto hs = at::randn({n, h}, at::kDouble), ws = at::randn({v, h}, at::kDouble) * 0.3;
      const auto hT = at::randn({n, ht}, at::kDouble), wT = at::randn({v, ht}, at::kDouble) * 0.3;
      const auto labels = at::randint(v, {n}, at::kLong);
      const double kw = 0.5 / n, cw = 0.5 / n;
      auto a = hs.clone().requires_grad_(true), wa = ws.clone().requires_grad_(true);
      const auto ref = kd_ce_loss(a, wa, hT, wT, labels, kw, cw, o);
      const auto rg = torch::autograd::grad({ref.total}, {a, wa});
      for (const auto dtype : {at::kFloat, at::kBFloat16}) {
        auto b = hs.to(at::kCUDA, dtype).requires_grad_(true), wb = ws.to(at::kCUDA, dtype).requires_grad_(true);
        const auto got = kd_ce_loss(b, wb, hT.to(at::kCUDA, dtype), wT.to(at::kCUDA, dtype), labels.cuda(), kw, cw, o);
        const auto g = torch::autograd::grad({got.total}, {b, wb});
        const double tol = dtype == at::kFloat ? 1e-4 : 2e-2;
        const std::string what = name_of(o) + (dtype == at::kFloat ? " fp32" : " bf16") + " V " + std::to_string(v);
        EXPECT_NEAR(got.kd.item<double>(), ref.kd.item<double>(), tol * std::max(1.0, ref.kd.item<double>())) << what;
        EXPECT_NEAR(got.ce.item<double>(), ref.ce.item<double>(), tol * ref.ce.item<double>()) << what;
        for (int i = 0; i < 2; ++i) {
          const auto x = g[i].to(at::kCPU, at::kDouble).flatten(), y = rg[i].flatten();
          if (dtype == at::kFloat) {
            EXPECT_LE((x - y).abs().max().item<double>(), tol * y.abs().max().item<double>()) << what << " grad " << i;
          } else {
            const double cos = (x * y).sum().item<double>() / (x.norm().item<double>() * y.norm().item<double>());
            EXPECT_GE(cos, 0.995) << what << " grad " << i;
          }
        }
      }
    }
  }
}

// The fused flag with a padded student head (train/vocab.h): KD alone goes through the kernel on the compared
// columns (a copy), KD with CE through the composite; both equal the CPU composite in fp32.
TEST(KdLossCuda, FusedFlagWithPaddedStudentRowsEqualsTheComposite) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  at::manual_seed(12);
  const int64_t n = 70, h = 32, ht = 24, v = 999, vs = 1024;
  for (auto o : all_options()) {
    o.temperature = 1.7, o.chunk = 48, o.fused = true;
    const auto hs = at::randn({n, h}, at::kDouble), ws = at::randn({vs, h}, at::kDouble) * 0.3;
    const auto hT = at::randn({n, ht}, at::kDouble), wT = at::randn({v, ht}, at::kDouble) * 0.3;
    const auto labels = at::randint(v, {n}, at::kLong);
    for (const bool with_ce : {false, true}) {
      const double kw = 0.5 / n, cw = with_ce ? 0.5 / n : 0.0;
      const auto lab = with_ce ? labels : at::Tensor();
      auto a = hs.clone().requires_grad_(true), wa = ws.clone().requires_grad_(true);
      const auto ref = kd_ce_loss(a, wa, hT, wT, lab, kw, cw, o);
      const auto rg = torch::autograd::grad({ref.total}, {a, wa});
      auto b = hs.to(at::kCUDA, at::kFloat).requires_grad_(true), wb = ws.to(at::kCUDA, at::kFloat).requires_grad_(true);
      const auto got = kd_ce_loss(b, wb, hT.to(at::kCUDA, at::kFloat), wT.to(at::kCUDA, at::kFloat),
                                  with_ce ? labels.cuda() : at::Tensor(), kw, cw, o);
      const auto g = torch::autograd::grad({got.total}, {b, wb});
      const std::string what = name_of(o) + (with_ce ? " with CE" : " KD alone");
      EXPECT_NEAR(got.kd.item<double>(), ref.kd.item<double>(), 1e-4 * std::max(1.0, ref.kd.item<double>())) << what;
      for (int i = 0; i < 2; ++i) {
        const auto x = g[i].to(at::kCPU, at::kDouble).flatten(), y = rg[i].flatten();
        EXPECT_LE((x - y).abs().max().item<double>(), 1e-4 * y.abs().max().item<double>()) << what << " grad " << i;
      }
      if (!with_ce) EXPECT_EQ(g[1].slice(0, v, vs).abs().max().item<double>(), 0.0) << what;
    }
  }
}

}  // namespace
}  // namespace anvil::train
