// CPU tests of quantize_fp8 / dequantize_fp8 / quantize_int8 / dequantize_int8: against formulas
// written independently in ATen ops (group amax by padding and reshaping, torch's own fp8 and int8
// conversions), the format's round-trip bounds, the documented edge behaviour and bad inputs.
#include "anvil/ops.h"
#include "anvil/quant_reference.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

namespace {

using anvil::test::bit_equal;
using anvil::test::expect_error;
using anvil::test::first_difference;
using anvil::test::wide_random;

const std::vector<std::string> kGranularities = {"tensor", "row", "block1x128", "block128x128"};
const std::vector<at::ScalarType> kInputDtypes = {at::kFloat, at::kBFloat16, at::kHalf};
const std::vector<std::vector<int64_t>> kShapes = {{1, 1}, {127, 129}, {300, 1000}, {256, 384}, {3, 256}};

struct FormatCase {
  const char* name;
  float qmax;
  std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::string&)> quantize;
  std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const std::string&, at::ScalarType)> dequantize;
  std::function<at::Tensor(const at::Tensor&)> round;  // scaled, clamped fp32 -> q, by torch's own conversion
};

const std::vector<FormatCase>& formats() {
  static const std::vector<FormatCase> f = {
      {"fp8", 448.0f, anvil::ops::quantize_fp8, anvil::ops::dequantize_fp8,
       [](const at::Tensor& v) { return v.to(at::kFloat8_e4m3fn); }},
      {"int8", 127.0f, anvil::ops::quantize_int8, anvil::ops::dequantize_int8,
       [](const at::Tensor& v) { return at::round(v).to(at::kChar); }},
  };
  return f;
}

// Per-group amax written independently of the op: zero-pad to whole 128-blocks, reshape, reduce.
at::Tensor group_amax(const at::Tensor& x, const std::string& g) {
  const auto a = x.to(at::kFloat).abs();
  if (g == "tensor") return a.amax();
  if (g == "row") return a.amax({-1}, true);
  const int64_t k = x.size(-1), pad_k = (128 - k % 128) % 128;
  if (g == "block1x128") {
    auto p = at::constant_pad_nd(a, {0, pad_k});
    auto shape = p.sizes().vec();
    shape.back() /= 128;
    shape.push_back(128);
    return p.reshape(shape).amax({-1});
  }
  const int64_t n = x.size(0), pad_n = (128 - n % 128) % 128;
  auto p = at::constant_pad_nd(a, {0, pad_k, 0, pad_n});
  return p.reshape({p.size(0) / 128, 128, p.size(1) / 128, 128}).amax({1, 3});
}

TEST(QuantizeCpu, MatchesIndependentFormula) {
  for (const auto& f : formats())
    for (const auto& g : kGranularities)
      for (auto dt : kInputDtypes)
        for (const auto& shape : kShapes) {
          SCOPED_TRACE(std::string(f.name) + " " + g + " " + c10::toString(dt) + " " + c10::str(at::IntArrayRef(shape)));
          const auto x = wide_random(shape, dt);
          const auto [q, s] = f.quantize(x, g);
          const auto want_s = group_amax(x, g).clamp_min(1e-10) / f.qmax;
          ASSERT_TRUE(bit_equal(s, want_s)) << first_difference(s, want_s);
          const auto scaled = (x.to(at::kFloat) / anvil::ops::expand_scale_inv(s, x.sizes(), g)).clamp(-f.qmax, f.qmax);
          const auto want_q = f.round(scaled);
          ASSERT_TRUE(bit_equal(q, want_q)) << first_difference(q, want_q);
        }
}

TEST(QuantizeCpu, RoundTripWithinFormatBounds) {
  for (const auto& f : formats())
    for (const auto& g : kGranularities)
      for (auto dt : kInputDtypes) {
        SCOPED_TRACE(std::string(f.name) + " " + g + " " + c10::toString(dt));
        const auto x = wide_random({200, 700}, dt).to(at::kFloat);
        const auto [q, s] = f.quantize(x, g);
        const auto scale = anvil::ops::expand_scale_inv(s, x.sizes(), g);
        const auto err = (anvil::ops::reference_dequantize(q, s, g) - x).abs();
        if (std::string(f.name) == "fp8") {
          // e4m3 keeps 3 mantissa bits: relative error <= 2^-4 in its normal range (|x|/scale >= 2^-6),
          // and below it the subnormal step 2^-9 gives an absolute error <= 2^-10 * scale.
          // (1 + 1e-5): a value on a rounding tie is off by exactly the bound, plus fp32 rounding.
          const auto normal = x.abs() >= scale * std::ldexp(1.0, -6);
          const double slack = 1 + 1e-5;
          EXPECT_TRUE((err <= x.abs() * std::ldexp(slack, -4)).masked_select(normal).all().item<bool>());
          EXPECT_TRUE((err <= scale * std::ldexp(slack, -10)).masked_select(normal.logical_not()).all().item<bool>());
        } else {
          // scale/2 from rounding to an integer, plus fp32 rounding of x / scale and q * scale (<= 2^-24 * 127 each)
          EXPECT_TRUE((err <= scale * (0.5 + 2e-5)).all().item<bool>());
        }
        // The largest |x| of each group lands on the format's largest value.
        const auto qmax_seen = q.to(at::kFloat).abs().max().item<float>();
        EXPECT_EQ(qmax_seen, f.qmax);
      }
}

TEST(QuantizeCpu, AllZeroGroupGetsTheFloorScale) {
  for (const auto& f : formats())
    for (const auto& g : kGranularities) {
      auto x = at::zeros({130, 260}, at::kBFloat16);
      x.select(0, 129).fill_(2.0);  // one non-zero row, so only some groups are all-zero
      const auto [q, s] = f.quantize(x, g);
      const float floor_scale = 1e-10f / f.qmax;
      EXPECT_TRUE(at::isfinite(s).all().item<bool>()) << f.name << " " << g;
      EXPECT_EQ(s.flatten()[0].item<float>(), g == "tensor" ? 2.0f / f.qmax : floor_scale) << f.name << " " << g;
      EXPECT_EQ(q.to(at::kFloat).narrow(0, 0, 128).abs().sum().item<float>(), 0.0f) << f.name << " " << g;
    }
}

TEST(QuantizeCpu, NonFiniteInputPoisonsOnlyItsGroup) {
  for (const auto& f : formats())
    for (float bad : {NAN, INFINITY, -INFINITY}) {
      auto x = at::randn({4, 256});
      x.index_put_({1, 5}, bad);  // row 1, first 128-block
      const auto [q, s] = f.quantize(x, "block1x128");
      EXPECT_TRUE(std::isnan(s.index({1, 0}).item<float>())) << f.name << " " << bad;
      EXPECT_TRUE(at::isfinite(s.index({1, 1})).item<bool>());
      EXPECT_TRUE(at::isfinite(s.index({0, 0})).item<bool>());
      const auto group = q.index({1}).narrow(0, 0, 128).to(at::kFloat);
      if (std::string(f.name) == "fp8") {
        EXPECT_TRUE(at::isnan(group).all().item<bool>());
        EXPECT_TRUE((q.index({1}).narrow(0, 0, 128).view(at::kByte) == 0x7f).all().item<bool>());
      } else {
        EXPECT_EQ(group.abs().sum().item<float>(), 0.0f);
      }
      // Dequantizing the poisoned group gives NaN, never plausible numbers.
      const auto back = f.dequantize(q, s, "block1x128", at::kFloat);
      EXPECT_TRUE(at::isnan(back.index({1}).narrow(0, 0, 128)).all().item<bool>());
      EXPECT_TRUE(at::isfinite(back.index({1}).narrow(0, 128, 128)).all().item<bool>());
      // A tensor scale is poisoned as a whole.
      const auto [qt, st] = f.quantize(x, "tensor");
      EXPECT_TRUE(std::isnan(st.item<float>()));
    }
}

TEST(QuantizeCpu, ScaleShapes) {
  const auto x = at::randn({2, 300, 1000});
  EXPECT_EQ(std::get<1>(anvil::ops::quantize_fp8(x, "tensor")).dim(), 0);
  EXPECT_EQ(std::get<1>(anvil::ops::quantize_fp8(x, "row")).sizes(), at::IntArrayRef({2, 300, 1}));
  EXPECT_EQ(std::get<1>(anvil::ops::quantize_fp8(x, "block1x128")).sizes(), at::IntArrayRef({2, 300, 8}));
  EXPECT_EQ(std::get<1>(anvil::ops::quantize_fp8(x[0], "block128x128")).sizes(), at::IntArrayRef({3, 8}));
  const auto q = std::get<0>(anvil::ops::quantize_fp8(x, "block1x128"));
  EXPECT_EQ(q.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(std::get<0>(anvil::ops::quantize_int8(x, "row")).scalar_type(), at::kChar);
}

TEST(QuantizeCpu, EmptyTensors) {
  for (const auto& f : formats())
    for (const auto& g : kGranularities) {
      const auto x = at::randn({0, 7168}, at::kBFloat16);
      const auto [q, s] = f.quantize(x, g);
      EXPECT_EQ(q.sizes(), x.sizes());
      if (g == "tensor") EXPECT_EQ(s.item<float>(), 1e-10f / f.qmax);
      if (g == "block128x128") EXPECT_EQ(s.sizes(), at::IntArrayRef({0, 56}));
      EXPECT_EQ(f.dequantize(q, s, g, at::kBFloat16).sizes(), x.sizes());
    }
}

TEST(DequantizeCpu, BitExactAgainstFormula) {
  for (const auto& f : formats())
    for (const auto& g : kGranularities)
      for (const auto& shape : kShapes) {
        const auto x = wide_random(shape, at::kFloat);
        const auto [q, s] = f.quantize(x, g);
        const auto want = anvil::ops::reference_dequantize(q, s, g);
        for (auto dt : kInputDtypes) {
          const auto got = f.dequantize(q, s, g, dt);
          ASSERT_TRUE(bit_equal(got, want.to(dt))) << f.name << " " << g << " " << dt << " " << first_difference(got, want.to(dt));
        }
      }
}

TEST(QuantizeCpu, MetaGivesShapesOnly) {
  const auto x = at::empty({5, 300, 1000}, at::TensorOptions().device(at::kMeta).dtype(at::kBFloat16));
  const auto [q, s] = anvil::ops::quantize_fp8(x, "block1x128");
  EXPECT_TRUE(q.is_meta());
  EXPECT_EQ(q.scalar_type(), at::kFloat8_e4m3fn);
  EXPECT_EQ(s.sizes(), at::IntArrayRef({5, 300, 8}));
  const auto w = at::empty({300, 1000}, x.options());
  const auto [qw, sw] = anvil::ops::quantize_int8(w, "block128x128");
  EXPECT_EQ(sw.sizes(), at::IntArrayRef({3, 8}));
  EXPECT_EQ(anvil::ops::dequantize_int8(qw, sw, "block128x128", at::kHalf).scalar_type(), at::kHalf);
  expect_error([&] { anvil::ops::quantize_fp8(x, "block128x128"); }, {"block128x128", "2-D", "x"});
}

TEST(QuantizeCpu, BadInputsNameTheArgument) {
  using anvil::ops::quantize_fp8;
  const auto x = at::randn({4, 256});
  expect_error([&] { quantize_fp8(x.to(at::kInt), "row"); }, {"quantize_fp8", "x", "dtype"});
  expect_error([&] { quantize_fp8(x.to(at::kDouble), "row"); }, {"x", "dtype"});
  expect_error([&] { quantize_fp8(at::randn({256, 4}).t(), "row"); }, {"x", "contiguous"});
  expect_error([&] { quantize_fp8(at::randn({4, 2, 256}), "block128x128"); }, {"x", "2-D"});
  expect_error([&] { quantize_fp8(at::randn({}), "row"); }, {"x", "dimension"});
  expect_error([&] { quantize_fp8(x, "block0x128"); }, {"granularity", "zero-size"});
  expect_error([&] { quantize_fp8(x, "block64x64"); }, {"granularity", "block1x128"});
  expect_error([&] { quantize_fp8(x, "channel"); }, {"granularity", "tensor, row, block1x128, block128x128"});
  expect_error([&] { quantize_fp8(at::randn({4, 0}), "block1x128"); }, {"x.size(-1) > 0"});
  expect_error([&] { anvil::ops::quantize_int8(x.to(at::kLong), "tensor"); }, {"quantize_int8", "x"});

  const auto [q, s] = quantize_fp8(x, "block1x128");
  using anvil::ops::dequantize_fp8;
  expect_error([&] { dequantize_fp8(q, s, "row", at::kFloat); }, {"scale_inv", "shape", "row"});
  expect_error([&] { dequantize_fp8(q, s.to(at::kHalf), "block1x128", at::kFloat); }, {"scale_inv", "dtype"});
  expect_error([&] { dequantize_fp8(q.view(at::kByte), s, "block1x128", at::kFloat); }, {"q", "dtype"});
  expect_error([&] { dequantize_fp8(q, s, "block1x128", at::kInt); }, {"out_dtype"});
  expect_error([&] { anvil::ops::dequantize_int8(q, s, "block1x128", at::kFloat); }, {"dequantize_int8", "q"});
}

}  // namespace
