// CUDA tests of the quantization ops: the kernels must reproduce the CPU reference bit for bit on
// fresh random data of every granularity, input dtype and awkward shape (1x1, odd sizes, rows not a
// multiple of 8, misaligned storage, 3-D, empty, large), with poisoned outputs checked written.
// They skip cleanly when no GPU is present (CI); scripts/gpu-test.sh runs them on the GPU machine.
#include "anvil/ops.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>

namespace {

using anvil::test::bit_equal;
using anvil::test::expect_error;
using anvil::test::first_difference;
using anvil::test::wide_random;

#define SKIP_WITHOUT_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

const std::vector<std::string> kGranularities = {"tensor", "row", "block1x128", "block128x128"};
const std::vector<at::ScalarType> kInputDtypes = {at::kFloat, at::kBFloat16, at::kHalf};
const std::vector<std::vector<int64_t>> kShapes = {{1, 1},   {127, 129}, {129, 1000}, {64, 130}, {3, 5},
                                                   {300, 7}, {2, 3, 384}, {0, 7168},  {4096, 7168}};

using QuantizeFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const std::string&);
using DequantizeFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const std::string&, at::ScalarType);
struct Format {
  const char* name;
  QuantizeFn quantize;
  DequantizeFn dequantize;
};
const Format kFormats[] = {{"fp8", anvil::ops::quantize_fp8, anvil::ops::dequantize_fp8},
                           {"int8", anvil::ops::quantize_int8, anvil::ops::dequantize_int8}};

bool applies(const std::string& g, const std::vector<int64_t>& shape) {
  return g != "block128x128" || shape.size() == 2;
}

void expect_same_as_cpu(const Format& f, const at::Tensor& x_cpu, const at::Tensor& x_cuda, const std::string& g) {
  const auto [q, s] = f.quantize(x_cpu, g);
  const auto [qc, sc] = f.quantize(x_cuda, g);
  ASSERT_TRUE(qc.is_cuda());
  EXPECT_TRUE(bit_equal(sc, s)) << "scale_inv: " << first_difference(sc, s);
  EXPECT_TRUE(bit_equal(qc, q)) << "q: " << first_difference(qc, q);
  for (auto dt : kInputDtypes) {
    const auto back = f.dequantize(q, s, g, dt);
    const auto back_c = f.dequantize(q.cuda(), s.cuda(), g, dt);
    // NaN payloads differ between CUDA's and c10's bf16/fp16 conversions; NaN positions must not.
    const auto nan = at::isnan(back);
    EXPECT_TRUE(at::equal(nan, at::isnan(back_c.cpu())));
    EXPECT_TRUE(bit_equal(back.masked_fill(nan, 0), back_c.cpu().masked_fill(nan, 0)))
        << "dequantize to " << dt << ": " << first_difference(back, back_c);
  }
}

TEST(QuantizeCuda, BitExactAgainstCpu) {
  SKIP_WITHOUT_CUDA();
  for (const auto& f : kFormats)
    for (const auto& g : kGranularities)
      for (auto dt : kInputDtypes)
        for (const auto& shape : kShapes) {
          if (!applies(g, shape)) continue;
          SCOPED_TRACE(std::string(f.name) + " " + g + " " + c10::toString(dt) + " " + c10::str(at::IntArrayRef(shape)));
          const auto x = wide_random(shape, dt);
          expect_same_as_cpu(f, x, x.cuda(), g);
        }
}

TEST(QuantizeCuda, MisalignedStorageTakesTheScalarPath) {
  SKIP_WITHOUT_CUDA();
  for (const auto& f : kFormats)
    for (const auto& g : kGranularities) {
      // A contiguous tensor starting one element into its storage: not 16-byte aligned.
      const auto base = wide_random({1 + 256 * 384}, at::kBFloat16).cuda();
      const auto x = base.narrow(0, 1, 256 * 384).view({256, 384});
      ASSERT_TRUE(x.is_contiguous());
      SCOPED_TRACE(std::string(f.name) + " " + g);
      expect_same_as_cpu(f, x.cpu(), x, g);
    }
}

TEST(QuantizeCuda, NonFiniteGroupsMatchCpu) {
  SKIP_WITHOUT_CUDA();
  for (const auto& f : kFormats)
    for (const auto& g : kGranularities) {
      auto x = at::randn({300, 1000});
      x.index_put_({7, 3}, NAN);
      x.index_put_({200, 900}, INFINITY);
      x.index_put_({250, 10}, -INFINITY);
      SCOPED_TRACE(std::string(f.name) + " " + g);
      expect_same_as_cpu(f, x, x.cuda(), g);
    }
}

TEST(QuantizeCuda, EveryOutputIsWritten) {
  SKIP_WITHOUT_CUDA();
  // The op allocates its outputs; poison the caching allocator's next blocks of the same size so that
  // an unwritten element would show up as the poison, then compare with the CPU.
  for (const auto& g : kGranularities) {
    const auto x = wide_random({513, 1030}, at::kBFloat16);
    {
      auto poison_q = at::full({513, 1030}, 0x55, at::TensorOptions().dtype(at::kByte).device(at::kCUDA));
      auto poison_s = at::full({4096}, 12345.0f, at::TensorOptions().device(at::kCUDA));
    }  // freed into the cache; the op's allocations reuse these blocks
    SCOPED_TRACE(g);
    expect_same_as_cpu(kFormats[0], x, x.cuda(), g);
  }
}

TEST(QuantizeCuda, BadInputsRaise) {
  SKIP_WITHOUT_CUDA();
  const auto x = at::randn({4, 256}, at::kCUDA);
  expect_error([&] { anvil::ops::quantize_fp8(x.to(at::kInt), "row"); }, {"x", "dtype"});
  expect_error([&] { anvil::ops::quantize_fp8(x.t(), "row"); }, {"x", "contiguous"});
  const auto [q, s] = anvil::ops::quantize_fp8(x, "row");
  expect_error([&] { anvil::ops::dequantize_fp8(q, s.cpu(), "row", at::kFloat); }, {"same device"});
}

}  // namespace
