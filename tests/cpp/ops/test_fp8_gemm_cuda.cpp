// CUDA tests of the FP8 GEMM ops, the issue's matrix: every scale granularity, M in {1, 7, 64, 128, 4096,
// 8192}, (N, K) in DeepSeek-V3's shapes, against the fp32 GEMM of the dequantized inputs (on the GPU,
// TF32 off): 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-3. Every compiled sm_90a configuration forced in turn;
// grouped with 1, 8 and 64 experts including empty ones (rows of no expert must come out zero, over
// memory poisoned with NaN first); the masked layout with counts changed in place on the device (its
// CUDA-graph replay is tested from Python, tests/python/test_fp8_gemm.py); the generic fallback (shapes
// no configuration takes); fp8_linear's dX.
// Skipped without a GPU.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/cuda.h>

#include <cstdlib>

namespace {

// Without a GPU: skip. With one: a chosen sm_90a configuration that declines a problem raises instead of
// quietly running the fallback (which would pass these tests without testing the kernels).
#define SKIP_WITHOUT_CUDA()                                                 \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";       \
  setenv("ANVIL_FP8_GEMM_STRICT", "1", 1)

constexpr double kMaxDiff = 1e-3;

double gemm_diff(const at::Tensor& x, const at::Tensor& y) {
  const auto a = x.to(at::kDouble), b = y.to(at::kDouble);
  return 1.0 - 2.0 * (a * b).sum().item<double>() / (a * a + b * b).sum().item<double>();
}

const std::vector<int64_t> kMs = {1, 7, 64, 128, 4096, 8192};
const std::vector<std::pair<int64_t, int64_t>> kNKs = {{2112, 7168}, {24576, 1536}, {7168, 16384},
                                                       {4096, 7168}, {7168, 2048},  {14336, 4096}};
struct Gran {
  const char *a, *b;
};
const std::vector<Gran> kGrans = {{"block1x128", "block128x128"}, {"row", "row"}, {"tensor", "tensor"},
                                  {"block1x128", "row"}, {"row", "block128x128"}};

struct Operands {
  at::Tensor qa, sa, qb, sb;
};

Operands make_operands(int64_t m, int64_t n, int64_t k, const Gran& g) {
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({m, k}, opt), g.a);
  auto [qb, sb] = anvil::ops::quantize_fp8(at::randn({n, k}, opt) * 0.05, g.b);
  return {qa, sa, qb, sb};
}

at::Tensor reference(const Operands& o, const Gran& g, const c10::optional<at::Tensor>& bias = c10::nullopt) {
  at::globalContext().setAllowTF32CuBLAS(false);
  auto out = at::matmul(anvil::ops::dequantize_fp8(o.qa, o.sa, g.a, at::kFloat),
                        anvil::ops::dequantize_fp8(o.qb, o.sb, g.b, at::kFloat).t());
  if (bias) out.add_(bias->to(at::kFloat));
  return out;
}

TEST(Fp8GemmCuda, IssueMatrixEveryGranularity) {
  SKIP_WITHOUT_CUDA();
  for (const auto& [n, k] : kNKs)
    for (int64_t m : kMs)
      for (const auto& g : kGrans) {
        SCOPED_TRACE("M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) + " " + g.a +
                     " x " + g.b + " config '" + anvil::ops::fp8_gemm_config(m, n, k) + "'");
        const Operands o = make_operands(m, n, k, g);
        const auto got = anvil::ops::fp8_gemm(o.qa, o.sa, o.qb, o.sb, at::kBFloat16);
        ASSERT_EQ(got.sizes(), at::IntArrayRef({m, n}));
        EXPECT_LT(gemm_diff(got, reference(o, g)), kMaxDiff);
      }
}

TEST(Fp8GemmCuda, OutputDtypesAndBias) {
  SKIP_WITHOUT_CUDA();
  const Gran g{"block1x128", "block128x128"};
  for (int64_t m : {1, 300, 4096}) {
    const Operands o = make_operands(m, 2112, 7168, g);
    const auto bias = at::randn({2112}, at::TensorOptions().device(at::kCUDA));
    for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
      SCOPED_TRACE(std::string(c10::toString(dt)) + " M=" + std::to_string(m));
      const auto got = anvil::ops::fp8_gemm(o.qa, o.sa, o.qb, o.sb, dt, bias.to(at::kBFloat16));
      EXPECT_EQ(got.scalar_type(), dt);
      EXPECT_LT(gemm_diff(got, reference(o, g, bias.to(at::kBFloat16))), kMaxDiff);
    }
  }
}

// Every compiled configuration, forced, on shapes each must handle (partial tiles in M and N included).
TEST(Fp8GemmCuda, EveryCompiledConfiguration) {
  SKIP_WITHOUT_CUDA();
  const auto configs = anvil::ops::fp8_gemm_configs();
  if (configs.empty()) GTEST_SKIP() << "no sm_90a kernels in this build";
  for (const auto& entry : configs) {
    const std::string name = entry.substr(0, entry.find(':')), dtype = entry.substr(entry.find(':') + 1);
    if (name.rfind("grouped", 0) == 0) continue;
    const at::ScalarType dt = dtype == "bf16" ? at::kBFloat16 : dtype == "fp16" ? at::kHalf : at::kFloat;
    setenv("ANVIL_FP8_GEMM_CONFIG", name.c_str(), 1);
    for (const auto& g : kGrans)
      for (auto [m, n, k] : {std::tuple<int64_t, int64_t, int64_t>{1, 2112, 7168}, {200, 136, 512}, {4096, 4096, 7168},
                             {777, 24576, 1536}}) {
        SCOPED_TRACE(entry + " " + g.a + " x " + g.b + " M=" + std::to_string(m) + " N=" + std::to_string(n));
        EXPECT_EQ(anvil::ops::fp8_gemm_config(m, n, k, dt), name);
        const Operands o = make_operands(m, n, k, g);
        EXPECT_LT(gemm_diff(anvil::ops::fp8_gemm(o.qa, o.sa, o.qb, o.sb, dt), reference(o, g)), kMaxDiff);
      }
  }
  setenv("ANVIL_FP8_GEMM_CONFIG", "no_such_config", 1);
  const Operands o = make_operands(8, 256, 256, kGrans[0]);
  anvil::test::expect_error([&] { anvil::ops::fp8_gemm(o.qa, o.sa, o.qb, o.sb); },
                            {"ANVIL_FP8_GEMM_CONFIG='no_such_config'", "compiled:"});
  unsetenv("ANVIL_FP8_GEMM_CONFIG");
}

TEST(Fp8GemmCuda, FallbackShapesStillCorrect) {
  SKIP_WITHOUT_CUDA();
  // N = 100 (bf16 rows of 200 bytes: not 16-byte aligned), K = 200 per-row (not a multiple of 16).
  const Gran g{"block1x128", "block128x128"};
  const Operands o = make_operands(33, 100, 256, g);
  EXPECT_LT(gemm_diff(anvil::ops::fp8_gemm(o.qa, o.sa, o.qb, o.sb), reference(o, g)), kMaxDiff);
  const Gran r{"row", "row"};
  const Operands p = make_operands(33, 64, 200, r);
  EXPECT_LT(gemm_diff(anvil::ops::fp8_gemm(p.qa, p.sa, p.qb, p.sb), reference(p, r)), kMaxDiff);
  EXPECT_EQ(anvil::ops::fp8_gemm(p.qa.narrow(0, 0, 0), p.sa.narrow(0, 0, 0), p.qb, p.sb).size(0), 0);
}

// ---- grouped -----------------------------------------------------------------------------------------

struct Experts {
  at::Tensor qb, sb;  // (E, N, K), (E, N/128, K/128)
};

Experts make_experts(int64_t e, int64_t n, int64_t k) {
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  std::vector<at::Tensor> qs, ss;
  for (int64_t i = 0; i < e; ++i) {
    auto [q, s] = anvil::ops::quantize_fp8(at::randn({n, k}, opt) * 0.05, "block128x128");
    qs.push_back(q);
    ss.push_back(s);
  }
  return {at::stack(qs), at::stack(ss)};
}

at::Tensor expert_reference(const at::Tensor& qa, const at::Tensor& sa, const Experts& w, int64_t e) {
  return at::matmul(anvil::ops::dequantize_fp8(qa, sa, "block1x128", at::kFloat),
                    anvil::ops::dequantize_fp8(w.qb[e], w.sb[e], "block128x128", at::kFloat).t());
}

// Fills the caching allocator's free blocks with NaN so that rows a kernel should write (or zero) but does
// not show up.
void poison_allocator(int64_t bytes) { at::full({bytes / 4}, NAN, at::TensorOptions().device(at::kCUDA)); }

TEST(Fp8GroupedGemmCuda, ContiguousLayoutOneEightSixtyFourExperts) {
  SKIP_WITHOUT_CUDA();
  at::globalContext().setAllowTF32CuBLAS(false);
  struct Case {
    int64_t experts, n, k, align;
  };
  for (const Case& c : {Case{1, 4096, 7168, 128}, Case{8, 4096, 7168, 128}, Case{8, 2112, 1536, 1},
                        Case{64, 1536, 2048, 128}}) {
    SCOPED_TRACE("E=" + std::to_string(c.experts) + " N=" + std::to_string(c.n) + " K=" + std::to_string(c.k) +
                 " align=" + std::to_string(c.align));
    const Experts w = make_experts(c.experts, c.n, c.k);
    // counts: random, with every third expert empty; offsets padded to align, as moe_permute makes them
    auto counts = at::randint(0, 300, {c.experts}, at::kInt);
    for (int64_t e = 0; e < c.experts; e += 3) counts[e] = 0;
    if (c.experts == 1) counts[0] = 1000;
    std::vector<int32_t> off{0};
    for (int64_t e = 0; e < c.experts; ++e) {
      const int64_t n_e = counts[e].item<int64_t>();
      off.push_back(off.back() + int32_t((n_e + c.align - 1) / c.align * c.align));
    }
    const int64_t R = off.back() + 100;  // 100 trailing rows of no expert
    const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
    auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({R, c.k}, opt), "block1x128");
    const auto offsets = at::tensor(off, at::kInt).cuda();
    poison_allocator(R * c.n * 2);
    const auto got = anvil::ops::fp8_grouped_gemm(qa, sa, w.qb, w.sb, offsets);
    ASSERT_EQ(got.sizes(), at::IntArrayRef({R, c.n}));
    for (int64_t e = 0; e < c.experts; ++e) {
      const int64_t r0 = off[e], rows = off[e + 1] - off[e];
      if (rows == 0) continue;
      const auto want = expert_reference(qa.narrow(0, r0, rows), sa.narrow(0, r0, rows), w, e);
      EXPECT_LT(gemm_diff(got.narrow(0, r0, rows), want), kMaxDiff) << "expert " << e;
    }
    EXPECT_EQ(got.narrow(0, off.back(), 100).abs().max().item<float>(), 0.0f) << "rows of no expert are not zero";
    EXPECT_FALSE(got.isnan().any().item<bool>());
  }
}

TEST(Fp8GroupedGemmCuda, MaskedLayoutCountsReadOnTheDevice) {
  SKIP_WITHOUT_CUDA();
  at::globalContext().setAllowTF32CuBLAS(false);
  const int64_t E = 8, C = 64, N = 4096, K = 7168;
  const Experts w = make_experts(E, N, K);
  const auto opt = at::TensorOptions().device(at::kCUDA).dtype(at::kBFloat16);
  auto [qa, sa] = anvil::ops::quantize_fp8(at::randn({E, C, K}, opt), "block1x128");
  auto check = [&](const at::Tensor& out, const std::vector<int32_t>& valid) {
    for (int64_t e = 0; e < E; ++e) {
      if (valid[e] == 0) continue;
      EXPECT_LT(gemm_diff(out[e].narrow(0, 0, valid[e]),
                          expert_reference(qa[e].narrow(0, 0, valid[e]), sa[e].narrow(0, 0, valid[e]), w, e)),
                kMaxDiff)
          << "expert " << e << " valid " << valid[e];
    }
  };
  const std::vector<int32_t> first{64, 0, 1, 17, 0, 63, 5, 64};
  auto masked = at::tensor(first, at::kInt).cuda();
  check(anvil::ops::fp8_grouped_gemm_masked(qa, sa, w.qb, w.sb, masked), first);

  const std::vector<int32_t> second{3, 64, 0, 0, 40, 1, 64, 9};
  masked.copy_(at::tensor(second, at::kInt));  // new counts in the same device tensor (as a graph replay sees)
  check(anvil::ops::fp8_grouped_gemm_masked(qa, sa, w.qb, w.sb, masked), second);
}

TEST(Fp8LinearCuda, ForwardAndInputGradient) {
  SKIP_WITHOUT_CUDA();
  at::globalContext().setAllowTF32CuBLAS(false);
  const int64_t N = 2112, K = 7168;
  const auto opt = at::TensorOptions().device(at::kCUDA);
  const auto [qw, sw] = anvil::ops::quantize_fp8(at::randn({N, K}, opt) * 0.02, "block128x128");
  auto x = at::randn({4, 64, K}, opt.dtype(at::kBFloat16)).requires_grad_(true);
  const auto y = anvil::ops::fp8_linear(x, qw, sw);
  const auto gy = at::randn({4, 64, N}, opt.dtype(at::kBFloat16));
  const auto gx = torch::autograd::grad({y}, {x}, {gy})[0];
  const auto wd = anvil::ops::dequantize_fp8(qw, sw, "block128x128", at::kFloat);
  const auto gx_ref = at::matmul(gy.to(at::kFloat), wd);
  const double rel = ((gx.to(at::kFloat) - gx_ref).norm() / gx_ref.norm()).item<double>();
  EXPECT_LE(rel, 1e-2) << "dX relative error";
  const auto [qx, sx] = anvil::ops::quantize_fp8(x.detach().reshape({-1, K}), "block1x128");
  EXPECT_LT(gemm_diff(y.detach().reshape({-1, N}),
                      at::matmul(anvil::ops::dequantize_fp8(qx, sx, "block1x128", at::kFloat), wd.t())),
            kMaxDiff);
}

}  // namespace
