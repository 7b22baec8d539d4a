// anvil::model::Linear's quantized weight formats (include/anvil/model/attention.h): for every format, the
// forward equals the product written out here from docs/FORMATS.md "Linear weight formats" (the weight's
// round-to-nearest groups and, where the format quantizes activations, x through the quantize ops, dequantized
// with the reference formula, an fp32 / exact-integer product), dense_weight dequantizes it, dX flows through
// the frozen weight (the gradient LoRA needs) and the weight takes none. Shapes include a bias and leading dims.
#include "anvil/model/attention.h"
#include "anvil/ops.h"
#include "anvil/quant_reference.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

namespace {

using anvil::model::Linear;
using anvil::test::expect_error;

// Round to nearest in groups of `group` inputs, written out: scale = max(amax, 1e-10) / qmax, q = rne(w / scale).
std::pair<at::Tensor, at::Tensor> rtn(const at::Tensor& w, int64_t group, double qmax) {
  const int64_t out = w.size(0), in = w.size(1);
  auto x = w.view({out, in / group, group});
  auto scale = x.abs().amax(-1, true).clamp_min(1e-10) / qmax;
  auto q = at::round(at::clamp(x / scale, -qmax, qmax));
  return {q.view({out, in}), scale.view({out, in / group})};
}

at::Tensor dequant_groups(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zp = {}) {
  auto v = q.to(at::kFloat).view({q.size(0), scale.size(1), -1});
  if (zp.defined()) v = v - zp.to(at::kFloat).unsqueeze(-1);
  return (v * scale.unsqueeze(-1)).view(q.sizes());
}

// The written-out weight each format holds after quantize_weight, dequantized.
at::Tensor expected_weight(const std::string& f, const at::Tensor& w) {
  using anvil::ops::reference_dequantize;
  if (f == "fp8") {
    auto [q, s] = anvil::ops::quantize_fp8(w, "block128x128");
    return reference_dequantize(q, s, "block128x128");
  }
  if (f == "fp8-channel" || f == "fp8-tensor") {
    const char* g = f == "fp8-channel" ? "row" : "tensor";
    auto [q, s] = anvil::ops::quantize_fp8(w, g);
    return reference_dequantize(q, s, g);
  }
  auto [q, s] = rtn(w, f == "int4" ? 128 : w.size(1), f == "int4" ? 7.0 : 127.0);
  return dequant_groups(q, s);
}

// x (..., in) W^T + b as the format computes it.
at::Tensor expected_forward(const std::string& f, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  using anvil::ops::reference_dequantize;
  const auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  at::Tensor y;
  if (f == "fp8") {
    auto [q, s] = anvil::ops::quantize_fp8(x2, "block1x128");
    y = at::matmul(reference_dequantize(q, s, "block1x128"), expected_weight(f, w).t());
  } else if (f == "fp8-channel" || f == "fp8-tensor") {
    auto [q, s] = anvil::ops::quantize_fp8(x2, "row");
    y = at::matmul(reference_dequantize(q, s, "row"), expected_weight(f, w).t());
  } else if (f == "w8a8") {
    auto [q, s] = anvil::ops::quantize_int8(x2, "row");
    auto [wq, ws] = rtn(w, w.size(1), 127.0);
    y = at::matmul(q.to(at::kDouble), wq.to(at::kDouble).t()).to(at::kFloat) * s * ws.view({1, -1});
  } else {
    y = at::matmul(x2, expected_weight(f, w).t());
  }
  auto shape = x.sizes().vec();
  shape.back() = w.size(0);
  return (y + b).view(shape);
}

const std::vector<std::string> kFormats = {"fp8", "fp8-channel", "fp8-tensor", "w8a8", "int8", "int4"};

TEST(QuantizedLinear, EachFormatComputesItsFormulaAndPassesDx) {
  at::manual_seed(21);
  for (const auto& f : kFormats) {
    Linear lin(256, 96, /*bias=*/true, at::TensorOptions().dtype(at::kFloat));
    const auto w = at::randn({96, 256}) * 0.05;
    const auto b = at::randn({96}) * 0.1;
    {
      at::NoGradGuard ng;
      lin.weight.copy_(w);
      lin.bias.copy_(b);
    }
    lin.quantize_weight(f);
    EXPECT_EQ(lin.weight_format(), f);
    EXPECT_EQ(lin.group_size(), f == "int4" ? 128 : f == "int8" ? 256 : 0);
    EXPECT_TRUE(at::equal(lin.dense_weight(at::kFloat), expected_weight(f, w))) << f;

    const auto x = (at::randn({3, 5, 256})).requires_grad_(true);
    const auto y = lin.forward(x);
    const auto want = expected_forward(f, x.detach(), w, b);
    EXPECT_LE((y.detach() - want).abs().max().item<double>(), 1e-5 * want.abs().max().item<double>() + 1e-6) << f;
    const auto g = at::randn(y.sizes());
    (y * g).sum().backward();
    const auto dx = at::matmul(g, lin.dense_weight(at::kFloat));  // dY W over the dequantized weight
    EXPECT_LE((x.grad() - dx).abs().max().item<double>(), 1e-5 * dx.abs().max().item<double>()) << f;
    EXPECT_FALSE(lin.weight.grad().defined()) << f;
    EXPECT_TRUE(lin.bias.grad().defined()) << f;
    EXPECT_TRUE(at::allclose(lin.bias.grad(), g.sum(std::vector<int64_t>{0, 1}))) << f;
  }
}

TEST(QuantizedLinear, ZeroPointsAndGroups) {
  at::manual_seed(22);
  Linear lin(256, 32, false, at::TensorOptions().dtype(at::kFloat));
  const auto q = at::randint(-8, 8, {32, 256}, at::TensorOptions().dtype(at::kChar));
  const auto scale = at::rand({32, 4}) * 0.01 + 1e-3;
  const auto zp = at::randint(-8, 8, {32, 4}, at::TensorOptions().dtype(at::kChar));
  lin.set_quantized_weight("int4", q, scale, zp, 64);
  EXPECT_EQ(lin.group_size(), 64);
  EXPECT_TRUE(at::equal(lin.dense_weight(at::kFloat), dequant_groups(q, scale, zp)));
  const auto x = at::randn({7, 256});
  EXPECT_TRUE(at::allclose(lin.forward(x), at::matmul(x, dequant_groups(q, scale, zp).t()), 1e-5, 1e-5));
  EXPECT_EQ(lin.named_buffers()["weight_zero_point"].sizes(), (at::IntArrayRef{32, 4}));
  EXPECT_EQ(lin.named_buffers()["weight_scale"].sizes(), (at::IntArrayRef{32, 4}));

  Linear g8(256, 32, false, at::TensorOptions().dtype(at::kFloat));
  {
    at::NoGradGuard ng;
    g8.weight.normal_();
  }
  const auto w = g8.weight.detach().clone();
  g8.quantize_weight("int8", 32);
  auto [wq, ws] = rtn(w, 32, 127.0);
  EXPECT_TRUE(at::equal(g8.dense_weight(at::kFloat), dequant_groups(wq, ws)));
  // per-channel int8 through the grouped arithmetic equals quantize_int8 "row" bit for bit
  auto [rq, rs] = anvil::ops::quantize_int8(w, "row");
  auto [gq, gs] = rtn(w, 256, 127.0);
  EXPECT_TRUE(at::equal(rq.to(at::kFloat), gq));
  EXPECT_TRUE(at::equal(rs, gs));
}

// Linears reading one SharedInput (q/k/v, gate/up) give what each gives alone, bit for bit, values and dX (summed
// over the readers); the input is quantized once per activation kind, not once per reader.
TEST(QuantizedLinear, ASharedInputIsQuantizedOnceAndChangesNoResult) {
  at::manual_seed(23);
  for (const auto& f : kFormats) {
    std::vector<std::shared_ptr<Linear>> readers;
    for (int64_t out : {128, 64, 64}) {
      readers.push_back(std::make_shared<Linear>(256, out, /*bias=*/out == 64, at::TensorOptions().dtype(at::kFloat)));
      {
        at::NoGradGuard ng;
        readers.back()->weight.normal_(0.0, 0.05);
        if (readers.back()->bias.defined()) readers.back()->bias.normal_();
      }
      readers.back()->quantize_weight(f);
    }
    const auto x0 = at::randn({2, 9, 256});
    const auto g = at::randn({2, 9, 256});
    auto run = [&](bool shared) {
      const auto x = x0.clone().requires_grad_(true);
      anvil::model::SharedInput in(x);
      at::Tensor loss = at::zeros({});
      std::vector<at::Tensor> ys;
      for (auto& lin : readers) {
        ys.push_back(shared ? lin->forward(in) : lin->forward(x));
        loss = loss + (ys.back() * g.narrow(-1, 0, ys.back().size(-1))).sum();
      }
      loss.backward();
      ys.push_back(x.grad());
      return ys;
    };
    const auto alone = run(false), together = run(true);
    for (size_t i = 0; i < alone.size(); ++i) EXPECT_TRUE(at::equal(alone[i], together[i])) << f << " output " << i;
  }
  anvil::model::SharedInput in(at::randn({4, 256}));
  const auto& first = in.quantized("fp8-block1x128");
  EXPECT_EQ(first.first.data_ptr(), in.quantized("fp8-block1x128").first.data_ptr());  // made once
  EXPECT_EQ(first.second.sizes(), (at::IntArrayRef{4, 2}));
  EXPECT_EQ(in.quantized("int8-row").second.sizes(), (at::IntArrayRef{4, 1}));
  expect_error([&] { in.quantized("int3-row"); }, {"unknown activation quantization 'int3-row'"});
}

TEST(QuantizedLinear, BadFormatsAndShapesAreNamed) {
  Linear lin(100, 8, false, at::TensorOptions().dtype(at::kFloat));
  expect_error([&] { lin.quantize_weight("int3"); }, {"weight format 'int3'", "fp8-channel", "int4"});
  expect_error([&] { lin.quantize_weight("int4", 30); }, {"int4 group size 30 must divide in_features (100)"});
  expect_error([&] { lin.quantize_weight("fp8"); }, {"in_features % 128 == 0"});
  expect_error([&] { lin.quantize_weight("w8a8", 20); }, {"group_size applies to int8 and int4 only"});
  const auto q = at::zeros({8, 100}, at::TensorOptions().dtype(at::kChar));
  expect_error([&] { lin.set_quantized_weight("int8", q, at::ones({8, 3})); }, {"int8 weight_scale must be (out, in / group_size)"});
  expect_error([&] { lin.set_quantized_weight("w8a8", q, at::ones({8, 1}), at::zeros({8, 1}, q.options())); },
               {"a zero point applies to int8 and int4"});
  EXPECT_TRUE(lin.weight_format().empty());
}

}  // namespace
