// CUDA tests of sparse_attention and select_blocks (skipped without a GPU): bf16 and fp16 outputs and
// gradients against the float64 CPU reference, each error at most 2x that of the same masked-softmax
// computation done by torch in the same dtype, plus atol; a bit-identical second backward (no atomics);
// select_blocks equal to the CPU's; CUDA-only argument limits. The wide matrix of S (up to 16384),
// windows, GQA groups and packed documents is tests/python/test_sparse_attention.py's.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>

namespace {

using anvil::test::expect_error;
using Opt = c10::optional<at::Tensor>;

// Masked softmax attention of q (1, Hq, S, D), k, v (1, Hkv, S, D) in their dtype, on their device.
at::Tensor dense_masked(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  const int64_t G = q.size(1) / k.size(1);
  auto s = at::matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  s = s.masked_fill(mask.logical_not(), -INFINITY);
  return at::matmul(at::softmax(s, -1), v.repeat_interleave(G, 1));
}

// Sliding window w with sinks, causal, no documents: (S, S) bool.
at::Tensor window_mask(int64_t S, int64_t w, int64_t sinks, const at::Device& dev) {
  const auto pos = at::arange(S, at::TensorOptions().dtype(at::kLong).device(dev));
  const auto i = pos.view({S, 1}), j = pos.view({1, S});
  return (j <= i) & ((i - j < w) | (j < sinks));
}

double max_err(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble).cpu() - b.to(at::kDouble).cpu()).abs().max().item<double>();
}

TEST(SparseAttentionCuda, BoundedByTorchsOwnErrorForwardAndBackward) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  for (auto dt : {at::kBFloat16, at::kHalf}) {
    for (int64_t D : {64, 128}) {
      for (int64_t S : {1, 63, 64, 65, 1000}) {
        SCOPED_TRACE("S=" + std::to_string(S) + " D=" + std::to_string(D));
        const int64_t W = 100, sinks = 3;
        const auto q = at::randn({1, 8, S, D}, at::kDouble), k = at::randn({1, 2, S, D}, at::kDouble),
                   v = at::randn({1, 2, S, D}, at::kDouble), go = at::randn({1, 8, S, D}, at::kDouble);
        const auto low = [&](const at::Tensor& t) { return t.to(dt).cuda(); };
        // Reference: float64 from the same rounded inputs; torch's own error: the same formula in dt.
        auto rq = low(q).to(at::kDouble).cpu().requires_grad_(), rk = low(k).to(at::kDouble).cpu().requires_grad_(),
             rv = low(v).to(at::kDouble).cpu().requires_grad_();
        const auto ro = dense_masked(rq, rk, rv, window_mask(S, W, sinks, at::kCPU));
        ro.backward(low(go).to(at::kDouble).cpu());
        auto tq = low(q).requires_grad_(), tk = low(k).requires_grad_(), tv = low(v).requires_grad_();
        const auto to = dense_masked(tq, tk, tv, window_mask(S, W, sinks, tq.device()));
        to.backward(low(go));
        auto oq = low(q).requires_grad_(), ok = low(k).requires_grad_(), ov = low(v).requires_grad_();
        const auto [o, lse] = anvil::ops::sparse_attention(oq, ok, ov, c10::nullopt, c10::nullopt, c10::nullopt, W, sinks);
        o.backward(low(go));
        EXPECT_LE(max_err(o, ro), 2 * max_err(to, ro) + 1e-3);
        EXPECT_LE(max_err(oq.grad(), rq.grad()), 2 * max_err(tq.grad(), rq.grad()) + 2e-3);
        EXPECT_LE(max_err(ok.grad(), rk.grad()), 2 * max_err(tk.grad(), rk.grad()) + 2e-3);
        EXPECT_LE(max_err(ov.grad(), rv.grad()), 2 * max_err(tv.grad(), rv.grad()) + 2e-3);
      }
    }
  }
}

TEST(SparseAttentionCuda, MatchesCpuWithBlocksAndDocumentsAndIsDeterministic) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const int64_t S = 700, NB = 11;
  const auto q = at::randn({1, 8, S, 128}).to(at::kBFloat16), k = at::randn({1, 1, S, 128}).to(at::kBFloat16),
             v = at::randn({1, 1, S, 128}).to(at::kBFloat16), go = at::randn({1, 8, S, 128}).to(at::kBFloat16);
  const auto bi = at::randint(-1, NB, {1, 1, NB, 4}, at::TensorOptions().dtype(at::kInt));
  const auto bc = at::randint(0, 5, {1, 1, NB}, at::TensorOptions().dtype(at::kInt));
  const auto cu = at::tensor({0, 250, 250, 700}, at::kInt);
  const auto [co, clse] = anvil::ops::sparse_attention(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), bi, bc, cu, 90, 2);
  const auto [o, lse] = anvil::ops::sparse_attention(q.cuda(), k.cuda(), v.cuda(), bi.cuda(), bc.cuda(), cu.cuda(), 90, 2);
  EXPECT_LT(max_err(o, co), 2e-2);
  const auto fin = at::isfinite(clse);
  EXPECT_TRUE(at::equal(at::isfinite(lse).cpu(), fin));
  EXPECT_LT(max_err(lse.cpu().masked_select(fin), clse.masked_select(fin)), 1e-2);
  const auto g1 = anvil::ops::sparse_attention_backward(go.cuda(), q.cuda(), k.cuda(), v.cuda(), o, lse, bi.cuda(),
                                                        bc.cuda(), cu.cuda(), 90, 2, 64, c10::nullopt, true);
  const auto g2 = anvil::ops::sparse_attention_backward(go.cuda(), q.cuda(), k.cuda(), v.cuda(), o, lse, bi.cuda(),
                                                        bc.cuda(), cu.cuda(), 90, 2, 64, c10::nullopt, true);
  EXPECT_TRUE(anvil::test::bit_equal(std::get<0>(g1), std::get<0>(g2)));
  EXPECT_TRUE(anvil::test::bit_equal(std::get<1>(g1), std::get<1>(g2)));
  EXPECT_TRUE(anvil::test::bit_equal(std::get<2>(g1), std::get<2>(g2)));
  const auto gc = anvil::ops::sparse_attention_backward(go.to(at::kFloat), q.to(at::kFloat), k.to(at::kFloat),
                                                        v.to(at::kFloat), co, clse, bi, bc, cu, 90, 2, 64, c10::nullopt);
  for (int t = 0; t < 3; ++t) {
    const auto a = t == 0 ? std::get<0>(g1) : t == 1 ? std::get<1>(g1) : std::get<2>(g1);
    const auto b = t == 0 ? std::get<0>(gc) : t == 1 ? std::get<1>(gc) : std::get<2>(gc);
    EXPECT_LT(max_err(a, b) / b.abs().max().item<double>(), 3e-2) << "gradient " << t;
  }
}

TEST(SparseAttentionCuda, SelectBlocksEqualsCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto q = at::randn({1, 8, 1000, 64}), k = at::randn({1, 2, 1000, 64});
  const auto cpu = anvil::ops::select_blocks(q, k, 64, 5, 1, 2);
  const auto gpu = anvil::ops::select_blocks(q.cuda(), k.cuda(), 64, 5, 1, 2);
  EXPECT_TRUE(at::equal(cpu, gpu.cpu()));
}

TEST(SparseAttentionCuda, CudaLimitsRaise) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto q = at::randn({1, 2, 64, 64}, at::TensorOptions().device(at::kCUDA));
  expect_error([&] { anvil::ops::sparse_attention(q, q, q); }, {"bfloat16 or float16"});
  const auto qk = at::randn({1, 2, 64, 192}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  const auto v = at::randn({1, 2, 64, 128}, at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16));
  expect_error([&] { anvil::ops::sparse_attention(qk, qk, v); }, {"head dim", "192"});
  const auto b = q.to(at::kBFloat16);
  expect_error([&] { anvil::ops::sparse_attention(b, b, b, at::full({1, 2, 1, 1}, 1, at::TensorOptions().dtype(at::kInt).device(at::kCUDA))); },
               {"block_indices must lie in"});
}

}  // namespace
