// Hidden-state losses (anvil/train/hidden_loss.h): the uniform layer map, the layer map's range errors, each
// loss against its formula written out, the projections (present only when widths differ, seeded, trainable).
// Gradients in float64 against torch.autograd.gradcheck: tests/python/test_distill_prune.py.
#include "anvil/train/hidden_loss.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>

namespace anvil::train {
namespace {

std::string invalid_argument_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(HiddenLoss, UniformMapPairsTheLastLayers) {
  const LayerMap want = {{1, 2}, {2, 4}, {3, 6}};
  EXPECT_EQ(uniform_layer_map(3, 6), want);
  const LayerMap odd = {{1, 2}, {2, 3}};  // round(1 * 3 / 2) = 2, then 3
  EXPECT_EQ(uniform_layer_map(2, 3), odd);
}

TEST(HiddenLoss, LayerMapOutOfRangeNamesTheKeyAndThePair) {
  const std::string key = "config key distill.hidden_layers";
  auto e = invalid_argument_of([&] { check_layer_map({{1, 1}, {3, 2}}, 2, 4, key); });
  EXPECT_NE(e.find(key + ": pair [3, 2]: student index 3 is out of range 0..2"), std::string::npos) << e;
  e = invalid_argument_of([&] { check_layer_map({{1, 5}}, 2, 4, key); });
  EXPECT_NE(e.find("teacher index 5 is out of range 0..4"), std::string::npos) << e;
  EXPECT_NE(invalid_argument_of([&] { check_layer_map({}, 2, 4, key); }).find("empty"), std::string::npos);
  EXPECT_NE(invalid_argument_of([] { parse_hidden_loss("l1", "config key distill.hidden_loss"); })
                .find("config key distill.hidden_loss: unknown hidden-state loss \"l1\""), std::string::npos);
}

TEST(HiddenLoss, EqualsItsFormulaWithAndWithoutProjection) {
  at::manual_seed(1);
  const auto opt = at::TensorOptions().dtype(at::kDouble);
  // States as set_layer_outputs gives them: (B, S, H), 3 of the student (2 layers), 5 of the teacher (4).
  std::vector<at::Tensor> s6, t6, t8;
  for (int i = 0; i < 3; ++i) s6.push_back(at::randn({2, 5, 6}, opt));
  for (int i = 0; i < 5; ++i) t6.push_back(at::randn({2, 5, 6}, opt)), t8.push_back(at::randn({2, 5, 8}, opt));
  const auto rows = at::tensor(std::vector<int64_t>{0, 3, 4, 7, 9});
  const double normalizer = 6.0;
  for (const auto type : {HiddenLossType::kMse, HiddenLossType::kCosine}) {
    const LayerMap map = {{1, 2}, {2, 4}};
    const HiddenLoss same(type, 0.7, map, 6, 6, opt, 0);
    EXPECT_TRUE(same.parameters().empty());
    const HiddenLoss proj(type, 0.7, map, 6, 8, opt, 0);
    ASSERT_EQ(proj.parameters().size(), 4u);
    EXPECT_EQ(proj.parameters()[0].first, "hidden_projection.0.weight");
    EXPECT_EQ(proj.parameters()[0].second.sizes(), (at::IntArrayRef{8, 6}));
    EXPECT_TRUE(proj.parameters()[0].second.requires_grad());
    for (const auto* loss : {&same, &proj}) {
      const auto& t = loss == &same ? t6 : t8;
      double want = 0;
      for (size_t p = 0; p < map.size(); ++p) {
        auto a = s6[map[p].first].reshape({-1, 6}).index_select(0, rows);
        const auto b = t[map[p].second].reshape({-1, t[0].size(-1)}).index_select(0, rows);
        if (loss == &proj) a = at::matmul(a, proj.parameters()[2 * p].second.t()) + proj.parameters()[2 * p + 1].second;
        const auto per_row = type == HiddenLossType::kMse
                                 ? (a - b).pow(2).sum(1) / double(b.size(1))
                                 : 1 - (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt());
        want += per_row.sum().item<double>();
      }
      want *= 0.7 / (normalizer * 2);
      EXPECT_NEAR((*loss)(s6, t, rows, normalizer).item<double>(), want, 1e-12);
    }
    // The same seed draws the same projection; another seed another.
    const HiddenLoss again(type, 0.7, map, 6, 8, opt, 0), other(type, 0.7, map, 6, 8, opt, 1);
    EXPECT_TRUE(at::equal(again.parameters()[0].second, proj.parameters()[0].second));
    EXPECT_FALSE(at::equal(other.parameters()[0].second, proj.parameters()[0].second));
  }
  // 0 for equal states.
  EXPECT_NEAR(hidden_divergence(t6[0].reshape({-1, 6}), t6[0].reshape({-1, 6}), HiddenLossType::kCosine).abs().max()
                  .item<double>(), 0.0, 1e-12);
}

}  // namespace
}  // namespace anvil::train
