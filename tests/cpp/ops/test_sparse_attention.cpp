// CPU tests of sparse_attention and select_blocks: the op against masked softmax built from the rule in
// ATen ops (windows below and above S, sinks, listed blocks with counts and -1 padding, GQA, packed
// documents), gradients against torch autograd of that formula, the Meta shapes, the tie rule of
// select_blocks, its ATen composite (the CUDA path) against the loops, and bad inputs.
// tests/python/test_sparse_attention.py adds gradcheck, opcheck and the CUDA error bounds.
#include "anvil/ops.h"
#include "ops/sparse_attention/sparse_attention_common.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <cmath>

namespace {

using anvil::test::expect_error;
using Opt = c10::optional<at::Tensor>;

struct Case {
  int64_t S, Hq, Hkv, window, sinks, n;
  bool counts, varlen;
  int64_t bs;
};

// (Hkv, S, S) bool: the rule, written with ATen ops.
at::Tensor rule_mask(const Case& c, const Opt& bi, const Opt& bc, const Opt& cu) {
  const auto lopt = at::TensorOptions().dtype(at::kLong);
  const int64_t S = c.S, NB = (S + c.bs - 1) / c.bs;
  const auto pos = at::arange(S, lopt);
  at::Tensor ds = at::zeros({S}, lopt);
  if (cu) {
    const auto cul = cu->to(at::kLong);
    ds = cul.index_select(0, at::searchsorted(cul, pos, false, /*right=*/true) - 1);
  }
  const auto i = pos.view({S, 1}), j = pos.view({1, S}), dsi = ds.view({S, 1});
  const auto base = (j <= i) & (j >= dsi);
  const auto near = c.window < 0 ? at::ones_like(base) : (i - j < c.window);
  auto mask = (base & (near | (j - dsi < c.sinks))).unsqueeze(0).expand({c.Hkv, S, S}).clone();
  if (bi) {
    auto valid = *bi >= 0;
    if (bc) valid = valid & (at::arange(c.n, lopt).view({1, 1, 1, c.n}) < bc->to(at::kLong).unsqueeze(-1));
    auto table = at::zeros({c.Hkv, NB, NB + 1}, at::TensorOptions().dtype(at::kBool));
    table.scatter_(2, at::where(valid[0], (*bi)[0].to(at::kLong), at::full({}, NB, lopt)), true);
    const auto listed = table.narrow(2, 0, NB).index_select(1, pos.div(c.bs, "floor")).index_select(2, pos.div(c.bs, "floor"));
    mask = mask | (base.unsqueeze(0) & listed);
  }
  return mask;
}

// Masked softmax attention in float64 -> (o, lse); rows that attend nothing give o = 0, lse = -inf.
std::pair<at::Tensor, at::Tensor> formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& mask) {
  const int64_t G = q.size(1) / k.size(1);
  const auto m = mask.repeat_interleave(G, 0).unsqueeze(0);  // (1, Hq, S, S)
  auto s = at::matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  const auto lse = s.masked_fill(m.logical_not(), -INFINITY).logsumexp(-1);
  const auto empty = m.any(-1, true).logical_not();
  const auto p = at::softmax(s.masked_fill(m.logical_not() & empty.logical_not(), -INFINITY), -1) * m;
  return {at::matmul(p, v.repeat_interleave(G, 1)), lse};
}

const std::vector<Case> kCases = {
    {1, 2, 1, 16, 0, 0, false, false, 64},    {63, 4, 1, 16, 2, 3, false, false, 64},
    {64, 4, 4, 0, 0, 2, true, false, 64},     {65, 8, 2, 32, 3, 3, true, false, 64},
    {200, 4, 1, 50, 0, 4, true, true, 64},    {300, 8, 1, 1000, 0, 0, false, false, 128},
    {257, 2, 2, -1, 1, 0, false, true, 64},   {129, 4, 2, 10, 5, 2, true, true, 128},
};

struct Inputs {
  at::Tensor q, k, v;
  Opt bi, bc, cu;
};

Inputs make_inputs(const Case& c, at::ScalarType dt) {
  Inputs in;
  in.q = at::randn({1, c.Hq, c.S, 64}, dt);
  in.k = at::randn({1, c.Hkv, c.S, 64}, dt);
  in.v = at::randn({1, c.Hkv, c.S, 64}, dt);
  const int64_t NB = (c.S + c.bs - 1) / c.bs;
  if (c.n > 0) in.bi = at::randint(-1, NB, {1, c.Hkv, NB, c.n}, at::TensorOptions().dtype(at::kInt));
  if (c.n > 0 && c.counts) in.bc = at::randint(0, c.n + 1, {1, c.Hkv, NB}, at::TensorOptions().dtype(at::kInt));
  if (c.varlen) in.cu = at::tensor({0, int(c.S / 3), int(c.S / 3), int(c.S * 2 / 3), int(c.S)}, at::kInt);
  return in;
}

TEST(SparseAttentionCpu, ForwardMatchesTheMaskedFormula) {
  for (const auto& c : kCases) {
    SCOPED_TRACE("S=" + std::to_string(c.S) + " window=" + std::to_string(c.window));
    const auto in = make_inputs(c, at::kFloat);
    const auto [o, lse] = anvil::ops::sparse_attention(in.q, in.k, in.v, in.bi, in.bc, in.cu, c.window, c.sinks, c.bs);
    const auto [ro, rlse] = formula(in.q.to(at::kDouble), in.k.to(at::kDouble), in.v.to(at::kDouble),
                                    rule_mask(c, in.bi, in.bc, in.cu));
    EXPECT_TRUE(at::allclose(o.to(at::kDouble), ro, 1.3e-6, 1e-5)) << (o - ro).abs().max().item<double>();
    const auto fin = at::isfinite(rlse);
    EXPECT_TRUE(at::equal(at::isfinite(lse), fin));
    EXPECT_TRUE(at::allclose(lse.to(at::kDouble).masked_select(fin), rlse.masked_select(fin), 1.3e-6, 1e-5));
  }
}

TEST(SparseAttentionCpu, GradientsMatchAutogradOfTheFormula) {
  for (const auto& c : kCases) {
    SCOPED_TRACE("S=" + std::to_string(c.S));
    const auto in = make_inputs(c, at::kDouble);
    auto q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_(), v = in.v.clone().requires_grad_();
    const auto go = at::randn({1, c.Hq, c.S, 64}, at::kDouble);
    std::get<0>(anvil::ops::sparse_attention(q, k, v, in.bi, in.bc, in.cu, c.window, c.sinks, c.bs)).backward(go);
    auto rq = in.q.clone().requires_grad_(), rk = in.k.clone().requires_grad_(), rv = in.v.clone().requires_grad_();
    formula(rq, rk, rv, rule_mask(c, in.bi, in.bc, in.cu)).first.backward(go);
    EXPECT_TRUE(at::allclose(q.grad(), rq.grad(), 1e-9, 1e-9));
    EXPECT_TRUE(at::allclose(k.grad(), rk.grad(), 1e-9, 1e-9));
    EXPECT_TRUE(at::allclose(v.grad(), rv.grad(), 1e-9, 1e-9));
  }
}

TEST(SparseAttentionCpu, MetaShapes) {
  const auto q = at::empty({1, 8, 1000, 128}, at::TensorOptions().device(at::kMeta).dtype(at::kBFloat16));
  const auto k = at::empty({1, 2, 1000, 128}, q.options());
  const auto [o, lse] = anvil::ops::sparse_attention(q, k, k, c10::nullopt, c10::nullopt, c10::nullopt, 256);
  EXPECT_EQ(o.sizes(), q.sizes());
  EXPECT_EQ(lse.sizes(), at::IntArrayRef({1, 8, 1000}));
  EXPECT_EQ(lse.scalar_type(), at::kFloat);
  EXPECT_EQ(anvil::ops::select_blocks(q, k, 128, 4).sizes(), at::IntArrayRef({1, 2, 8, 4}));
}

TEST(SparseAttentionCpu, SelectBlocksTieRuleAndForcedBlocks) {
  const auto q = at::ones({1, 2, 640, 64}), k = at::ones({1, 1, 640, 64});
  const auto out = anvil::ops::select_blocks(q, k, 64, 4, 1, 1);
  const std::vector<int> b9 = {0, 1, 2, 9}, b1 = {0, 1, -1, -1};
  for (int s = 0; s < 4; ++s) {
    EXPECT_EQ(out[0][0][9][s].item<int>(), b9[s]);
    EXPECT_EQ(out[0][0][1][s].item<int>(), b1[s]);
  }
}

TEST(SparseAttentionCpu, SelectBlocksCompositeEqualsLoops) {
  for (bool varlen : {false, true}) {
    const auto q = at::randn({1, 8, 1000, 64}), k = at::randn({1, 2, 1000, 64});
    const Opt cu = varlen ? Opt(at::tensor({0, 300, 301, 1000}, at::kInt)) : c10::nullopt;
    const auto loops = anvil::ops::select_blocks(q, k, 64, 5, 1, 2, cu);
    const auto cfg = anvil::ops::check_select_blocks_args(q, k, 64, 5, 1, 2, cu, c10::nullopt, "test");
    const auto composite = anvil::ops::select_blocks_aten(q, k, cfg, cu);
    EXPECT_TRUE(at::equal(loops, composite)) << "varlen " << varlen;
  }
}

TEST(SparseAttentionCpu, BadInputsRaise) {
  const auto q = at::randn({1, 4, 64, 64}), k = at::randn({1, 2, 64, 64});
  expect_error([&] { anvil::ops::sparse_attention(at::randn({1, 4, 64, 96}), at::randn({1, 2, 64, 96}), at::randn({1, 2, 64, 96})); },
               {"head dim", "96"});
  expect_error([&] { anvil::ops::sparse_attention(at::randn({1, 3, 64, 64}), k, k); }, {"multiple of the key/value heads"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, at::full({1, 2, 1, 2}, 5, at::kInt)); },
               {"block_indices must lie in", "5"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, at::full({1, 2, 1, 2}, -2, at::kInt)); },
               {"block_indices must lie in"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, at::zeros({1, 2, 1, 2}, at::kLong)); }, {"block_indices", "int32"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, at::zeros({1, 2, 1, 2}, at::kInt), at::full({1, 2, 1}, 3, at::kInt)); },
               {"block_counts must lie in"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, c10::nullopt, c10::nullopt, at::tensor({0, 30, 20, 64}, at::kInt)); },
               {"cu_seqlens must be non-decreasing"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, c10::nullopt, c10::nullopt, c10::nullopt, -1, 0, 96); },
               {"block_size"});
  expect_error([&] { anvil::ops::sparse_attention(q, k, k, c10::nullopt, c10::nullopt, c10::nullopt, -2); }, {"window"});
  expect_error([&] { anvil::ops::select_blocks(q, k, 64, 0); }, {"top_n"});
}

}  // namespace
