// Derived models (anvil/model/derive.h): the kept layers' weights renumbered, the rest as the source's, the
// config rewritten (num_hidden_layers, DeepSeek's dense-layer count, per-layer attention kinds), and bad layer
// lists named. That a derived model loads in transformers with anvil's logits: tests/python/test_distill.py.
#include "anvil/model/derive.h"

#include "anvil/model/config.h"
#include "test_util.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace anvil::model {
namespace {

std::string fixture(const std::string& name) { return std::string(ANVIL_MODEL_TEST_CONFIGS) + "/" + name; }

// A model of `config_text` with random weights.
std::shared_ptr<CausalLM> random_model(const std::string& config_text) {
  auto lm = std::make_shared<CausalLM>(parse_model_config(config_text), at::TensorOptions().dtype(at::kFloat));
  at::NoGradGuard no_grad;
  for (auto& p : lm->parameters(true)) p.normal_(0, 0.05);
  return lm;
}

std::string with_layers(const std::string& path, int64_t layers) {
  auto j = nlohmann::json::parse(load_model_config(path).json);
  j["num_hidden_layers"] = layers;
  return j.dump();
}

std::string invalid_argument_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

TEST(Derive, KeptLayersAreRenumberedAndTheRestIsTheSource) {
  at::manual_seed(0);
  const auto source = random_model(with_layers(fixture("tiny_llama3_v5.json"), 4));
  const auto derived = derive_by_layers(*source, {0, 3}, at::TensorOptions().dtype(at::kFloat), "keep");
  EXPECT_EQ(derived->config().num_hidden_layers, 2);
  EXPECT_EQ(nlohmann::json::parse(derived->config().json)["num_hidden_layers"], 2);
  std::unordered_map<std::string, at::Tensor> src;
  for (const auto& [name, t] : source->state_tensors()) src.emplace(name, t);
  int64_t checked = 0;
  for (const auto& [name, t] : derived->state_tensors()) {
    std::string from = name;
    if (name.rfind("model.layers.1.", 0) == 0) from = "model.layers.3." + name.substr(15);
    ASSERT_TRUE(src.count(from)) << name;
    EXPECT_TRUE(test::bit_equal(t, src.at(from))) << name << " vs " << from;
    ++checked;
  }
  int64_t per_layer = 0;
  for (const auto& [name, t] : source->state_tensors()) per_layer += name.rfind("model.layers.0.", 0) == 0 ? 1 : 0;
  EXPECT_EQ(checked, int64_t(source->state_tensors().size()) - 2 * per_layer);  // two of four layers dropped
  EXPECT_TRUE(derived->is_training());
}

TEST(Derive, ConfigKeysThatDependOnTheLayerIndex) {
  // DeepSeek: layers below first_k_dense_replace are dense; keeping [0, 2, 3] of 4 with k = 1 keeps one dense.
  const auto ds = load_model_config(fixture("tiny_deepseek_v3_v5.json"));
  auto j = nlohmann::json::parse(ds.json);
  j["num_hidden_layers"] = 4;
  j["num_nextn_predict_layers"] = 1;
  const auto ds4 = parse_model_config(j.dump());
  const auto out = nlohmann::json::parse(derived_config_json(ds4, {0, 2, 3}, "keep"));
  EXPECT_EQ(out["num_hidden_layers"], 3);
  EXPECT_EQ(out["first_k_dense_replace"], 1);
  EXPECT_EQ(out["num_nextn_predict_layers"], 0);
  EXPECT_EQ(nlohmann::json::parse(derived_config_json(ds4, {2, 3}, "keep"))["first_k_dense_replace"], 0);
  // Qwen2 with sliding windows from layer 2 on (max_window_layers): the kept layers' kinds, written out.
  auto q = nlohmann::json::parse(load_model_config(fixture("qwen2_5_7b_instruct.json")).json);
  q["num_hidden_layers"] = 4, q["use_sliding_window"] = true, q["max_window_layers"] = 2, q["sliding_window"] = 64;
  const auto qc = parse_model_config(q.dump());
  const auto qo = nlohmann::json::parse(derived_config_json(qc, {1, 3}, "keep"));
  EXPECT_EQ(qo["layer_types"], nlohmann::json({"full_attention", "sliding_attention"}));
  const auto back = parse_model_config(qo.dump());
  EXPECT_FALSE(back.layer_sliding[0]);
  EXPECT_TRUE(back.layer_sliding[1]);
}

TEST(Derive, BadLayerListsNameTheKey) {
  const auto c = parse_model_config(with_layers(fixture("tiny_llama3_v5.json"), 4));
  EXPECT_NE(invalid_argument_of([&] { derived_config_json(c, {}, "config key student.layers"); })
                .find("config key student.layers: must keep at least one layer"),
            std::string::npos);
  const auto out_of_range = invalid_argument_of([&] { derived_config_json(c, {0, 4}, "config key student.layers"); });
  EXPECT_NE(out_of_range.find("layer 4 is not one of the source's 4 layers"), std::string::npos) << out_of_range;
  const auto unordered = invalid_argument_of([&] { derived_config_json(c, {2, 1}, "config key student.layers"); });
  EXPECT_NE(unordered.find("strictly increasing"), std::string::npos) << unordered;
  EXPECT_EQ(every_nth_layer(5, 2), (std::vector<int64_t>{0, 2, 4}));
  EXPECT_EQ(every_nth_layer(4, 1), (std::vector<int64_t>{0, 1, 2, 3}));
  EXPECT_THROW(every_nth_layer(4, 0), std::invalid_argument);
}

}  // namespace
}  // namespace anvil::model
