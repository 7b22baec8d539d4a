// CPU tests of the MoE ops: the gate against the same selection written in ATen ops (tie-free data),
// the tie rule on data full of ties, gradients against torch autograd, routing against ATen composites,
// and bad inputs. Python's tests/python/test_moe.py adds parity with transformers' own routers.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

namespace {

using anvil::test::expect_error;

struct GateCase {
  int64_t E, k, n_group, topk_group;
  const char* score;
  bool renormalize, bias;
  double scale;
};

const std::vector<GateCase> kGateCases = {
    {256, 8, 8, 4, "sigmoid", true, true, 2.5},    // DeepSeek-V3
    {160, 6, 8, 3, "softmax", false, false, 16.0},  // DeepSeek-V2
    {8, 2, 1, 1, "softmax", true, false, 1.0},      // Mixtral
    {60, 4, 1, 1, "softmax", false, false, 1.0},    // Qwen-MoE
    {384, 8, 1, 1, "sigmoid", true, true, 2.827},   // Kimi-like
    {1024, 16, 32, 8, "sigmoid", true, true, 1.0},  // widest
};

// The selection in ATen ops (valid on tie-free inputs): scores, group mask, top-k.
std::tuple<at::Tensor, at::Tensor> reference_gate(const at::Tensor& logits, const at::Tensor& bias, const GateCase& c) {
  const int64_t T = logits.size(0);
  const auto s = std::string(c.score) == "sigmoid" ? logits.sigmoid() : logits.softmax(-1);
  auto sel = bias.defined() ? s + bias : s;
  if (c.n_group > 1) {
    const auto grouped = sel.view({T, c.n_group, c.E / c.n_group});
    const auto gscore = std::string(c.score) == "sigmoid" ? std::get<0>(grouped.topk(2, -1)).sum(-1)
                                                          : std::get<0>(grouped.max(-1));
    const auto gidx = std::get<1>(gscore.topk(c.topk_group, -1));
    const auto mask = at::zeros({T, c.n_group}).scatter_(1, gidx, 1.0).repeat_interleave(c.E / c.n_group, 1);
    sel = sel.masked_fill(mask == 0, std::string(c.score) == "sigmoid" ? -INFINITY : 0.0);
  }
  const auto idx = std::get<1>(sel.topk(c.k, -1));
  auto w = s.gather(1, idx);
  if (c.renormalize) w = w / (w.sum(1, true) + 1e-20);
  return {w * c.scale, idx.to(at::kInt)};
}

TEST(MoeGateCpu, MatchesAtenSelectionOnTieFreeData) {
  for (const auto& c : kGateCases) {
    SCOPED_TRACE(std::string(c.score) + " E=" + std::to_string(c.E));
    const auto logits = at::randn({97, c.E});
    const auto bias = c.bias ? at::randn({c.E}) * 0.1 : at::Tensor();
    const auto [w, idx] = anvil::ops::moe_gate(logits, c.bias ? c10::optional<at::Tensor>(bias) : c10::nullopt, c10::nullopt, c.k,
                                               c.n_group, c.topk_group, c.score, c.renormalize, c.scale);
    const auto [rw, ridx] = reference_gate(logits, bias, c);
    ASSERT_TRUE(at::equal(idx, ridx));
    EXPECT_TRUE(at::allclose(w, rw, 1e-6, 1e-7)) << (w - rw).abs().max().item<float>();
  }
}

TEST(MoeGateCpu, TiesGoToTheLowerExpert) {
  // Logits from three values: ties everywhere. Expected: a stable sort on (-score, index).
  const auto logits = at::randint(0, 3, {50, 64}).to(at::kFloat);
  const auto [w, idx] = anvil::ops::moe_gate(logits, c10::nullopt, c10::nullopt, 6, 1, 1, "sigmoid", false, 1.0);
  const auto order = std::get<1>(logits.sigmoid().sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  EXPECT_TRUE(at::equal(idx.to(at::kLong), order.narrow(1, 0, 6)));
}

TEST(MoeGateCpu, DroppedGroupsAreMaskedAsTransformersDoes) {
  // transformers 5.17 masks the experts of dropped groups with -inf in DeepseekV3TopkRouter (sigmoid)
  // and with 0.0 in DeepseekV2Moe (softmax). When the kept group's selection scores are negative, the
  // sigmoid gate still picks the kept group; the softmax gate picks the dropped experts (0.0).
  const auto logits = at::zeros({1, 8});  // sigmoid 0.5, softmax 0.125 everywhere
  auto bias = at::full({8}, -5.0);
  bias.narrow(0, 0, 4).fill_(-1.0);  // group 0 kept (scores - 1 > scores - 5); group 1 dropped
  const auto [w, idx] = anvil::ops::moe_gate(logits, bias, c10::nullopt, 4, 2, 1, "sigmoid", true, 1.0);
  EXPECT_TRUE(at::equal(idx, at::tensor({0, 1, 2, 3}, at::kInt).view({1, 4})));
  const auto [ws, idxs] = anvil::ops::moe_gate(logits, bias, c10::nullopt, 4, 2, 1, "softmax", true, 1.0);
  EXPECT_TRUE(at::equal(idxs, at::tensor({4, 5, 6, 7}, at::kInt).view({1, 4})));
}

TEST(MoeGateCpu, NoiseShiftsTheSelectionOnly) {
  const auto logits = at::randn({20, 32});
  auto noise = at::zeros({20, 32});
  noise.select(1, 31).fill_(100.0);  // expert 31 always selected
  const auto [w, idx] = anvil::ops::moe_gate(logits, c10::nullopt, noise, 2, 1, 1, "softmax", false, 1.0);
  EXPECT_TRUE((idx.select(1, 0) == 31).all().item<bool>());
  EXPECT_TRUE(at::allclose(w.select(1, 0), logits.softmax(-1).select(1, 31), 1e-6, 1e-7));
}

TEST(MoeGateCpu, GradientMatchesAutograd) {
  for (const auto& c : kGateCases) {
    for (bool renorm : {true, false}) {
      const auto logits = at::randn({33, c.E}, at::kDouble);
      const auto bias = at::randn({c.E}, at::kDouble) * 0.1;
      const auto [w, idx] = anvil::ops::moe_gate(logits, bias, c10::nullopt, c.k, c.n_group, c.topk_group, c.score,
                                                 renorm, c.scale);
      const auto g = at::randn(w.sizes(), at::kDouble);
      auto l = logits.clone().requires_grad_(true);
      const auto s = std::string(c.score) == "sigmoid" ? l.sigmoid() : l.softmax(-1);
      auto sw = s.gather(1, idx.to(at::kLong));
      if (renorm) sw = sw / (sw.sum(1, true) + 1e-20);
      const auto want = torch::autograd::grad({sw * c.scale}, {l}, {g})[0];
      const auto got = anvil::ops::moe_gate_backward(g, logits, idx, c.score, renorm, c.scale);
      EXPECT_TRUE(at::allclose(got, want, 1e-9, 1e-12)) << c.score << " E=" << c.E;
      // And through the registered autograd of moe_gate itself.
      auto l2 = logits.clone().requires_grad_(true);
      const auto w2 = std::get<0>(anvil::ops::moe_gate(l2, bias, c10::nullopt, c.k, c.n_group, c.topk_group, c.score,
                                                      renorm, c.scale));
      const auto got2 = torch::autograd::grad({w2}, {l2}, {g})[0];
      EXPECT_TRUE(at::allclose(got2, want, 1e-9, 1e-12));
    }
  }
}

TEST(MoeGateCpu, EmptyAndSingleToken) {
  for (int64_t T : {0, 1, 7}) {
    const auto [w, idx] = anvil::ops::moe_gate(at::randn({T, 64}), c10::nullopt, c10::nullopt, 4, 4, 2, "sigmoid",
                                               true, 1.0);
    EXPECT_EQ(w.sizes(), at::IntArrayRef({T, 4}));
    EXPECT_EQ(idx.scalar_type(), at::kInt);
  }
}

TEST(MoeGateCpu, BadInputsNameTheRule) {
  using anvil::ops::moe_gate;
  const auto l = at::randn({4, 64});
  expect_error([&] { moe_gate(l, c10::nullopt, c10::nullopt, 4, 5, 2, "sigmoid", true, 1.0); }, {"divisible by n_group"});
  expect_error([&] { moe_gate(l, c10::nullopt, c10::nullopt, 12, 8, 1, "sigmoid", true, 1.0); },
               {"top_k", "kept groups"});
  expect_error([&] { moe_gate(l, c10::nullopt, c10::nullopt, 4, 8, 9, "sigmoid", true, 1.0); }, {"topk_group"});
  expect_error([&] { moe_gate(l, c10::nullopt, c10::nullopt, 17, 1, 1, "sigmoid", true, 1.0); }, {"top_k", "16"});
  expect_error([&] { moe_gate(l, c10::nullopt, c10::nullopt, 4, 1, 1, "relu", true, 1.0); }, {"score"});
  expect_error([&] { moe_gate(l.to(at::kInt), c10::nullopt, c10::nullopt, 4, 1, 1, "sigmoid", true, 1.0); },
               {"logits", "dtype"});
  expect_error([&] { moe_gate(l.flatten(), c10::nullopt, c10::nullopt, 4, 1, 1, "sigmoid", true, 1.0); },
               {"logits", "2 dimension"});
  expect_error([&] { moe_gate(l, at::zeros({63}), c10::nullopt, 4, 1, 1, "sigmoid", true, 1.0); }, {"bias", "shape"});
  expect_error([&] { moe_gate(l, at::zeros({64}, at::kHalf), c10::nullopt, 4, 1, 1, "sigmoid", true, 1.0); },
               {"bias", "dtype"});
  expect_error([&] { moe_gate(l, c10::nullopt, at::zeros({4, 63}), 4, 1, 1, "sigmoid", true, 1.0); }, {"noise"});
  expect_error([&] { moe_gate(at::randn({4, 2048}), c10::nullopt, c10::nullopt, 4, 1, 1, "sigmoid", true, 1.0); },
               {"experts", "1024"});
}

TEST(MoeRouteCpu, MatchesStableSortComposite) {
  for (int64_t align : {1, 16, 128})
    for (int64_t capacity : {-1, 3}) {
      const int64_t T = 200, k = 4, E = 37;
      auto idx = at::randint(0, E, {T, k}).to(at::kInt);
      idx.select(1, 0).fill_(5);  // a crowded expert, and (E = 37 random) some empty ones
      const auto [rows, counts, offsets, dropped] = anvil::ops::moe_route(idx, E, align, capacity);
      const auto flat = idx.flatten().to(at::kLong);
      const auto all = at::bincount(flat, {}, E);
      const auto kept = capacity >= 0 ? all.clamp_max(capacity) : all;
      EXPECT_TRUE(at::equal(counts.to(at::kLong), kept));
      EXPECT_EQ(dropped.item<int64_t>(), (all - kept).sum().item<int64_t>());
      const auto padded = (kept + align - 1).div(align, "floor") * align;
      EXPECT_TRUE(at::equal(offsets.to(at::kLong), at::cat({at::zeros({1}, at::kLong), padded.cumsum(0)})));
      // Stable order: slot i's rank among the slots of its expert that come before it.
      const auto order = std::get<1>(at::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false));
      const auto start = at::cat({at::zeros({1}, at::kLong), all.cumsum(0)}).narrow(0, 0, E);
      auto rank = at::empty_like(flat);
      rank.index_put_({order}, at::arange(flat.numel()) - start.index_select(0, flat.index_select(0, order)));
      const auto want = at::where(rank < kept.index_select(0, flat), offsets.to(at::kLong).index_select(0, flat) + rank,
                                  at::full_like(rank, -1));
      EXPECT_TRUE(at::equal(rows.flatten().to(at::kLong), want)) << "align " << align << " capacity " << capacity;
    }
}

TEST(MoePermuteCpu, RoundTripAndPadding) {
  const int64_t T = 50, k = 3, E = 9, H = 24, align = 8;
  const auto idx = at::stack({at::randperm(E).narrow(0, 0, 3)}).to(at::kInt).expand({T, k}).contiguous();
  const auto hidden = at::randn({T, H});
  const auto [perm, rows, counts, offsets, dropped] = anvil::ops::moe_permute(hidden, idx, E, align, -1);
  EXPECT_EQ(perm.size(0), T * k + E * (align - 1));
  // Each kept slot's row holds its token; every other row is zero.
  auto used = at::zeros({perm.size(0)}, at::kBool);
  used.index_fill_(0, rows.flatten().to(at::kLong), true);
  EXPECT_TRUE(at::equal(perm.index_select(0, rows.flatten().to(at::kLong)), hidden.repeat_interleave(k, 0)));
  EXPECT_EQ(perm.index({used.logical_not()}).abs().sum().item<float>(), 0.0f);
  const auto w = at::softmax(at::randn({T, k}), -1);
  const auto back = anvil::ops::moe_unpermute(perm, rows, w);
  EXPECT_TRUE(at::allclose(back, hidden, 1e-5, 1e-6));
}

TEST(MoePermuteCpu, GradientsMatchAutogradOfComposite) {
  const int64_t T = 20, k = 2, E = 5, H = 6;
  const auto idx = at::randint(0, E, {T, k}).to(at::kInt);
  auto h = at::randn({T, H}, at::kDouble).requires_grad_(true);
  auto [perm, rows, counts, offsets, dropped] = anvil::ops::moe_permute(h, idx, E, 4, -1);
  auto w = at::randn({T, k}, at::kDouble).requires_grad_(true);
  auto x = (perm * 1.5).detach().requires_grad_(true);
  auto out = anvil::ops::moe_unpermute(x, rows, w);
  const auto g = at::randn(out.sizes(), at::kDouble);
  const auto grads = torch::autograd::grad({out}, {x, w}, {g});
  // Composite: out[t] = sum_j w[t,j] x[rows[t,j]].
  auto x2 = x.detach().clone().requires_grad_(true), w2 = w.detach().clone().requires_grad_(true);
  auto out2 = (x2.index_select(0, rows.flatten().to(at::kLong)).view({T, k, H}) * w2.unsqueeze(2)).sum(1);
  const auto want = torch::autograd::grad({out2}, {x2, w2}, {g});
  EXPECT_TRUE(at::allclose(grads[0], want[0]));
  EXPECT_TRUE(at::allclose(grads[1], want[1]));
  const auto gp = at::randn(perm.sizes(), at::kDouble);
  const auto gh = torch::autograd::grad({perm}, {h}, {gp})[0];
  EXPECT_TRUE(at::allclose(gh, gp.index_select(0, rows.flatten().to(at::kLong)).view({T, k, H}).sum(1)));
}

TEST(MoeLoadCpu, LoadAndBiasUpdate) {
  const auto idx = at::randint(0, 16, {100, 4}).to(at::kInt);
  const auto load = anvil::ops::moe_expert_load(idx, 16);
  EXPECT_TRUE(at::equal(load.to(at::kLong), at::bincount(idx.flatten().to(at::kLong), {}, 16)));
  auto bias = at::randn({16});
  const auto before = bias.clone();
  anvil::ops::moe_update_bias(bias, load, 0.01);
  const auto lf = load.to(at::kFloat);
  EXPECT_TRUE(at::allclose(bias, before + (lf.mean() - lf).sign() * 0.01));
  expect_error([&] { anvil::ops::moe_expert_load(at::full({2, 2}, 16, at::kInt), 16); }, {"indices", "[0, num_experts"});
  expect_error([&] { anvil::ops::moe_route(at::full({2, 2}, -1, at::kInt), 16); }, {"indices"});
  const auto loss = anvil::ops::moe_sequence_balance_loss(at::randn({10, 16}), idx.narrow(0, 0, 10), 1e-4);
  EXPECT_GT(loss.item<double>(), 0.0);
}

}  // namespace
