// CUDA tests of int8_gemm: each path (the fused sm_90a CUTLASS kernel, cuBLASLt int32 + the epilogue kernel,
// the SIMT kernel), forced in turn through ANVIL_INT8_GEMM_PATH where it can run, against the CPU reference on
// the 7B shapes, decode batches (M = 1, 16) and unaligned edges. First the int32 sums bit for bit (unit scales
// and operands whose sums stay below 2^24, fp32 output: the output is the sum itself; bf16 for the sm_90a
// kernel, whose output is bf16 only), then per-token / per-channel scales and a bias within the output dtype's
// rounding (fp32 output bit-exact on the paths whose epilogue rounds as the reference). Outputs are poisoned
// with NaN first (the op allocates them, so a pass over memory the kernel skipped would show as NaN through
// the caching allocator's reuse). Skipped without a GPU.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include <cmath>
#include <cstdlib>

namespace {

using anvil::test::bit_equal;
using anvil::test::first_difference;

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

struct PathGuard {  // sets ANVIL_INT8_GEMM_PATH for a scope
  explicit PathGuard(const char* p) { setenv("ANVIL_INT8_GEMM_PATH", p, 1); }
  ~PathGuard() { unsetenv("ANVIL_INT8_GEMM_PATH"); }
};

struct Shape {
  int64_t m, n, k;
};
const std::vector<Shape> kShapes = {{1, 4096, 4096},    {16, 11008, 4096}, {17, 4096, 11008}, {128, 256, 128},
                                    {4096, 4096, 4096}, {8192, 11008, 4096}, {8192, 4096, 11008}, {333, 264, 40},
                                    {40, 24, 13},       {64, 130, 256},    {300, 136, 1040}};

void poison_cache(int64_t m, int64_t n) {  // leaves NaN-filled blocks in the caching allocator for the op to reuse
  for (auto dt : {at::kFloat, at::kBFloat16, at::kHalf})
    at::full({m, n}, NAN, at::TensorOptions().dtype(dt).device(at::kCUDA));
}

TEST(Int8GemmCuda, Int32SumsAreBitExactOnEveryPath) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(5);
  for (const char* path : {"sm90", "int_mm", "simt"})
    for (const auto& s : kShapes) {
      const at::ScalarType dt = std::string(path) == "sm90" ? at::kBFloat16 : at::kFloat;
      {
        PathGuard g(path);
        if (anvil::ops::int8_gemm_path(s.m, s.n, s.k, dt) != path) continue;
      }
      if (std::string(path) == "simt" && s.m * s.n * s.k > (int64_t(1) << 34)) continue;  // minutes on CUDA cores
      const int64_t lim = std::max<int64_t>(1, std::min<int64_t>(127, int64_t(std::sqrt((1 << 24) / double(s.k)))));
      const auto opt = at::TensorOptions().dtype(at::kChar);
      const auto a = at::randint(-lim, lim + 1, {s.m, s.k}, opt), b = at::randint(-lim, lim + 1, {s.n, s.k}, opt);
      const auto one = at::ones({});
      const auto want = anvil::ops::int8_gemm(a, one, b, one, dt);
      poison_cache(s.m, s.n);
      PathGuard g(path);
      const auto got = anvil::ops::int8_gemm(a.cuda(), one.cuda(), b.cuda(), one.cuda(), dt);
      EXPECT_TRUE(bit_equal(got, want)) << path << " " << s.m << "x" << s.n << "x" << s.k << ": "
                                        << first_difference(got, want);
    }
}

TEST(Int8GemmCuda, ScaledEpilogueMatchesTheCpu) {
  SKIP_WITHOUT_CUDA();
  at::manual_seed(6);
  for (const char* path : {"sm90", "int_mm", "simt"})
    for (const auto& s : kShapes)
      for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat}) {
        {
          PathGuard g(path);
          if (anvil::ops::int8_gemm_path(s.m, s.n, s.k, dt) != path) continue;
        }
        if (std::string(path) == "simt" && s.m * s.n * s.k > (int64_t(1) << 34)) continue;
        const auto opt = at::TensorOptions().dtype(at::kChar);
        const auto a = at::randint(-128, 128, {s.m, s.k}, opt), b = at::randint(-128, 128, {s.n, s.k}, opt);
        const auto sa = (at::rand({s.m, 1}) + 0.1) / 127, sb = (at::rand({s.n, 1}) + 0.1) / 127;
        const auto bias = at::randn({s.n});
        const auto want = anvil::ops::int8_gemm(a, sa, b, sb, at::kFloat, bias);  // fp32, unrounded to dt
        poison_cache(s.m, s.n);
        PathGuard g(path);
        const auto got = anvil::ops::int8_gemm(a.cuda(), sa.cuda(), b.cuda(), sb.cuda(), dt, bias.cuda()).cpu();
        const double eps = dt == at::kBFloat16 ? std::ldexp(1.0, -8) : dt == at::kHalf ? std::ldexp(1.0, -11) : std::ldexp(1.0, -23);
        const auto err = (got.to(at::kFloat) - want).abs();
        // One rounding to dt (half an ulp of dt), plus for the sm90 epilogue's fused multiply-add an fp32 ulp or
        // two of the product before the bias is added (which may cancel it).
        const auto bound = want.abs() * (eps * 1.01) + (want - bias.view({1, -1})).abs() * std::ldexp(1.0, -22) + 1e-7;
        EXPECT_TRUE((err <= bound).all().item<bool>())
            << path << " " << s.m << "x" << s.n << "x" << s.k << " " << dt << ": max err " << err.max().item<float>();
        EXPECT_FALSE(at::isnan(got).any().item<bool>());
        if (dt == at::kFloat && std::string(path) != "sm90")
          EXPECT_TRUE(bit_equal(got, want)) << path << ": " << first_difference(got, want);
      }
}

TEST(Int8GemmCuda, DefaultPathsByShape) {
  SKIP_WITHOUT_CUDA();
  unsetenv("ANVIL_INT8_GEMM_PATH");
  EXPECT_EQ(anvil::ops::int8_gemm_path(8, 4096, 4096), "simt");      // M <= 16: cuBLASLt refuses
  EXPECT_EQ(anvil::ops::int8_gemm_path(64, 4096, 13), "simt");       // K not a multiple of 8
  const std::string big = anvil::ops::int8_gemm_path(8192, 4096, 4096);
  EXPECT_TRUE(big == "sm90" || big == "int_mm") << big;  // sm90 on an H100 / H200 with an sm_90a build
  EXPECT_EQ(anvil::ops::int8_gemm_path(8192, 4096, 4096, at::kHalf), "int_mm");  // sm90 is bf16 only
}

}  // namespace
