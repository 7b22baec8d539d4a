// CUDA tests of the MoE ops: indices exactly equal to the CPU reference and weights within 1e-6
// relative, on random logits, logits full of ties, +-inf, every dtype, T from 0 to 65536 and E not a
// power of two; routing and combining equal to the CPU. Skipped without a GPU.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

struct GateCase {
  int64_t E, k, n_group, topk_group;
  const char* score;
  bool renormalize, bias;
  double scale;
};
const GateCase kCases[] = {
    {256, 8, 8, 4, "sigmoid", true, true, 2.5},  {160, 6, 8, 3, "softmax", false, false, 16.0},
    {8, 2, 1, 1, "softmax", true, false, 1.0},   {60, 4, 1, 1, "softmax", false, false, 1.0},
    {384, 8, 1, 1, "sigmoid", true, true, 2.827}, {1024, 16, 32, 8, "sigmoid", true, true, 1.0},
    {1, 1, 1, 1, "softmax", true, false, 1.0},   {100, 16, 4, 4, "softmax", true, true, 1.0},
};

void expect_gate_equal(const at::Tensor& logits, const at::Tensor& bias, const at::Tensor& noise, const GateCase& c) {
  auto opt = [](const at::Tensor& t) { return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  const auto [w, idx] = anvil::ops::moe_gate(logits, opt(bias), opt(noise), c.k, c.n_group, c.topk_group, c.score,
                                             c.renormalize, c.scale);
  const auto [wc, ic] = anvil::ops::moe_gate(logits.cuda(), bias.defined() ? opt(bias.cuda()) : c10::nullopt,
                                             noise.defined() ? opt(noise.cuda()) : c10::nullopt, c.k, c.n_group,
                                             c.topk_group, c.score, c.renormalize, c.scale);
  ASSERT_TRUE(at::equal(ic.cpu(), idx)) << anvil::test::first_difference(ic, idx);
  EXPECT_TRUE(at::allclose(wc.cpu(), w, 1e-6, 0.0, /*equal_nan=*/true));
}

TEST(MoeGateCuda, EqualToCpuOnRandomTiedAndInfiniteLogits) {
  SKIP_WITHOUT_CUDA();
  for (const auto& c : kCases)
    for (int64_t T : {0, 1, 7, 4096, 65536})
      for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf}) {
        if (T == 65536 && dt != at::kFloat) continue;
        SCOPED_TRACE(std::string(c.score) + " E=" + std::to_string(c.E) + " T=" + std::to_string(T) + " " +
                     c10::toString(dt));
        auto logits = (at::randn({T, c.E}) * 3).to(dt);
        const auto bias = c.bias ? at::randn({c.E}) * 0.1 : at::Tensor();
        expect_gate_equal(logits, bias, at::Tensor(), c);
        if (T == 0) continue;
        expect_gate_equal(at::randint(-2, 3, {T, c.E}).to(dt), bias, at::Tensor(), c);  // ties everywhere
        auto inf = logits.clone();
        inf.select(1, 0).fill_(INFINITY);
        inf.select(1, c.E - 1).fill_(-INFINITY);
        expect_gate_equal(inf, bias, at::Tensor(), c);
        expect_gate_equal(logits, bias, at::randn({T, c.E}) * 0.01, c);  // noisy top-k
      }
}

TEST(MoeGateCuda, BackwardCloseToCpu) {
  SKIP_WITHOUT_CUDA();
  for (const auto& c : kCases) {
    const auto logits = at::randn({513, c.E});
    const auto [w, idx] = anvil::ops::moe_gate(logits, c10::nullopt, c10::nullopt, c.k, c.n_group, c.topk_group,
                                               c.score, c.renormalize, c.scale);
    const auto g = at::randn(w.sizes());
    const auto want = anvil::ops::moe_gate_backward(g, logits, idx, c.score, c.renormalize, c.scale);
    const auto got = anvil::ops::moe_gate_backward(g.cuda(), logits.cuda(), idx.cuda(), c.score, c.renormalize, c.scale);
    EXPECT_TRUE(at::allclose(got.cpu(), want, 1e-5, 1e-6)) << c.score << " E=" << c.E;
  }
}

TEST(MoeRouteCuda, PermuteUnpermuteEqualToCpu) {
  SKIP_WITHOUT_CUDA();
  for (int64_t T : {0, 1, 7, 4096})
    for (int64_t align : {1, 128})
      for (int64_t capacity : {-1, 5})
        for (auto dt : {at::kFloat, at::kBFloat16}) {
          const int64_t k = 8, E = 160, H = 72;
          SCOPED_TRACE("T=" + std::to_string(T) + " align=" + std::to_string(align) + " cap=" + std::to_string(capacity));
          const auto idx = at::randint(0, E, {T, k}).to(at::kInt);
          const auto hidden = at::randn({T, H}).to(dt);
          const auto [p, r, c, o, d] = anvil::ops::moe_permute(hidden, idx, E, align, capacity);
          const auto [pc, rc, cc, oc, dc] = anvil::ops::moe_permute(hidden.cuda(), idx.cuda(), E, align, capacity);
          ASSERT_TRUE(at::equal(rc.cpu(), r));
          EXPECT_TRUE(at::equal(cc.cpu(), c) && at::equal(oc.cpu(), o) && at::equal(dc.cpu(), d));
          EXPECT_TRUE(at::equal(pc.cpu(), p));
          const auto w = at::rand({T, k});
          const auto out = anvil::ops::moe_unpermute(p, r, w);
          const auto outc = anvil::ops::moe_unpermute(pc, rc, w.cuda());
          EXPECT_TRUE(at::allclose(outc.cpu().to(at::kFloat), out.to(at::kFloat), 1e-2, 1e-2));
          const auto gp = anvil::ops::moe_permute_backward(p, r);
          EXPECT_TRUE(at::allclose(anvil::ops::moe_permute_backward(pc, rc).cpu().to(at::kFloat), gp.to(at::kFloat),
                                   1e-2, 1e-2));
          const auto [gx, gw] = anvil::ops::moe_unpermute_backward(out, p, r, w);
          const auto [gxc, gwc] = anvil::ops::moe_unpermute_backward(outc, pc, rc, w.cuda());
          EXPECT_TRUE(at::allclose(gxc.cpu().to(at::kFloat), gx.to(at::kFloat), 1e-2, 1e-2));
          EXPECT_TRUE(at::allclose(gwc.cpu(), gw, 1e-2, 1e-1));
        }
}

TEST(MoeRouteCuda, OutOfRangeIndicesRaise) {
  SKIP_WITHOUT_CUDA();
  const auto idx = at::full({4, 2}, 9, at::TensorOptions().dtype(at::kInt).device(at::kCUDA));
  anvil::test::expect_error([&] { anvil::ops::moe_route(idx, 8); }, {"indices", "[0, num_experts=8)"});
  anvil::test::expect_error([&] { anvil::ops::moe_expert_load(idx, 8); }, {"indices"});
}

}  // namespace
