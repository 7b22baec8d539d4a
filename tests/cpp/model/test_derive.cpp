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
  // Qwen2-MoE, decoder_sparse_step 2 with layer 3 in mlp_only_layers: MoE layers {1}, dense {0, 2, 3}. Keeping
  // [1, 2, 3] lists the dense ones under their new indices; the derived model loads the kept layers' weights.
  const auto qm = load_model_config(fixture("tiny_qwen2_moe_v5.json"));
  const auto mo = nlohmann::json::parse(derived_config_json(qm, {1, 2, 3}, "keep"));
  EXPECT_EQ(mo["decoder_sparse_step"], 1);
  EXPECT_EQ(mo["mlp_only_layers"], nlohmann::json({1, 2}));
  EXPECT_EQ(mo["layer_types"], nlohmann::json({"full_attention", "sliding_attention", "full_attention"}));
  const auto mback = parse_model_config(mo.dump());
  EXPECT_TRUE(mback.is_moe_layer(0));
  EXPECT_FALSE(mback.is_moe_layer(1) || mback.is_moe_layer(2));
  at::manual_seed(1);
  const auto source = random_model(qm.json);
  const auto derived = derive_by_layers(*source, {1, 2, 3}, at::TensorOptions().dtype(at::kFloat), "keep");
  EXPECT_EQ(derived->config().num_hidden_layers, 3);
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


// ---- width pruning -------------------------------------------------------------------------------------

// A source with 8 heads in 2 KV groups (4 per group), 3 layers.
std::string gqa_source() {
  auto j = nlohmann::json::parse(load_model_config(fixture("tiny_llama3_v5.json")).json);
  j["num_hidden_layers"] = 3, j["num_attention_heads"] = 8, j["num_key_value_heads"] = 2, j["head_dim"] = 4;
  return j.dump();
}

TEST(DerivePruned, WidthRulesNameTheKey) {
  const auto c = parse_model_config(gqa_source());  // I 48, H 32, 8 heads, 2 groups
  const std::string p = "config key student.";
  const auto err = [&](WidthOptions w) { return invalid_argument_of([&] { resolve_widths(c, w, p); }); };
  EXPECT_NE(err({64, 0, 0, 0}).find("config key student.intermediate_size: 64 is larger than the source's "
                                    "intermediate_size 48"), std::string::npos) << err({64, 0, 0, 0});
  EXPECT_NE(err({0, 0, 0, 33}).find("student.hidden_size: 33 is larger"), std::string::npos);
  EXPECT_NE(err({0, 9, 0, 0}).find("student.num_attention_heads: 9 is larger"), std::string::npos);
  EXPECT_NE(err({0, 0, 3, 0}).find("student.num_key_value_heads: 3 is larger"), std::string::npos);
  EXPECT_NE(err({0, 3, 2, 0}).find("student.num_attention_heads: 3 must be a multiple of num_key_value_heads (2)"),
            std::string::npos) << err({0, 3, 2, 0});
  EXPECT_NE(err({0, 8, 1, 0}).find("student.num_attention_heads: 8 heads over 1 KV groups is 8 per group, more than "
                                   "the source's 4"), std::string::npos) << err({0, 8, 1, 0});
  EXPECT_NE(err({-1, 0, 0, 0}).find("student.intermediate_size: must be >= 1"), std::string::npos);
  // transformers' LlamaConfig wants hidden_size a multiple of the heads (Qwen's configs do not).
  EXPECT_NE(err({0, 3, 1, 0}).find("student.num_attention_heads: a Llama student's hidden_size (32) must be a "
                                   "multiple of its num_attention_heads (3)"), std::string::npos) << err({0, 3, 1, 0});
  EXPECT_NE(err({0, 0, 0, 30}).find("student.hidden_size: a Llama student's hidden_size (30)"), std::string::npos);
  // Defaults: a pruned group keeps its heads; heads alone keep the groups.
  const auto a = resolve_widths(c, {0, 0, 1, 0}, p);
  EXPECT_EQ(a.num_attention_heads, 4);
  EXPECT_EQ(a.num_key_value_heads, 1);
  EXPECT_EQ(a.intermediate_size, 48);
  const auto b = resolve_widths(c, {0, 4, 0, 0}, p);
  EXPECT_EQ(b.num_key_value_heads, 2);
  // MoE sources are refused, naming the key given.
  const auto moe = load_model_config(fixture("tiny_mixtral_v5.json"));
  EXPECT_NE(invalid_argument_of([&] { resolve_widths(moe, {0, 0, 0, 16}, p); })
                .find("config key student.hidden_size: width pruning needs a dense model"), std::string::npos);
}

TEST(DerivePruned, SelectTopKeepsTheTopScoredAndKvGroupsWhole) {
  const auto c = parse_model_config(gqa_source());
  Importance imp;
  for (int64_t l = 0; l < 3; ++l) {
    imp.mlp.push_back(at::randperm(48, at::kLong).to(at::kFloat));
    imp.heads.push_back(at::randperm(8, at::kLong).to(at::kFloat));
  }
  imp.hidden = at::randperm(32, at::kLong).to(at::kFloat);
  const auto w = resolve_widths(c, {20, 2, 1, 24}, "k.");
  const auto s = select_top(c, imp, w);
  const auto expect_top = [](const at::Tensor& scores, const at::Tensor& kept, int64_t k) {
    ASSERT_EQ(kept.numel(), k);
    const auto threshold = std::get<0>(scores.topk(k)).min().item<float>();
    for (int64_t i = 0; i < scores.numel(); ++i) {
      const bool is_kept = (kept == i).any().item<bool>();
      EXPECT_EQ(is_kept, scores[i].item<float>() >= threshold) << i;
    }
    EXPECT_TRUE(at::equal(kept, std::get<0>(kept.sort())));  // source order
  };
  expect_top(imp.hidden, s.hidden, 24);
  for (int64_t l = 0; l < 3; ++l) {
    expect_top(imp.mlp[l], s.mlp[l], 20);
    // 2 heads of 1 group: the group whose best two heads score most, and those two heads.
    const auto g = imp.heads[l].view({2, 4});
    const auto best2 = std::get<0>(g.topk(2, 1)).sum(1);  // (2)
    const int64_t group = best2[0].item<float>() >= best2[1].item<float>() ? 0 : 1;
    ASSERT_EQ(s.kv[l].numel(), 1);
    EXPECT_EQ(s.kv[l][0].item<int64_t>(), group);
    const auto want = std::get<0>((std::get<1>(g[group].topk(2)) + 4 * group).sort());
    EXPECT_TRUE(at::equal(s.heads[l], want)) << s.heads[l] << want;
  }
}

// Pruning intermediate channels, query heads and whole KV groups is exact: the pruned model's logits are the
// source's with those channels' down_proj columns and those heads' o_proj columns zeroed.
TEST(DerivePruned, ForwardEqualsTheSourceWithPrunedChannelsAndHeadsMasked) {
  at::manual_seed(3);
  const auto source = random_model(gqa_source());
  source->eval();
  const std::vector<at::Tensor> batches = {at::randint(0, 64, {2, 9}, at::kLong), at::randint(0, 64, {3, 7}, at::kLong)};
  const auto w = resolve_widths(source->config(), {30, 2, 1, 0}, "k.");  // 2 heads of 1 group, 30 of 48 channels
  const auto imp = activation_importance(*source, batches);
  EXPECT_EQ(imp.rows, 5);
  EXPECT_EQ(imp.tokens, 2 * 9 + 3 * 7);
  const auto sel = select_top(source->config(), imp, w);
  const auto pruned = derive_pruned(*source, {0, 1, 2}, w, sel, at::TensorOptions().dtype(at::kFloat), "keep");
  pruned->eval();
  const auto cfg = nlohmann::json::parse(pruned->config().json);
  EXPECT_EQ(cfg["intermediate_size"], 30);
  EXPECT_EQ(cfg["num_attention_heads"], 2);
  EXPECT_EQ(cfg["num_key_value_heads"], 1);
  EXPECT_EQ(cfg["head_dim"], 4);
  // The masked source.
  auto masked = random_model(gqa_source());
  masked->eval();
  {
    at::NoGradGuard no_grad;
    std::unordered_map<std::string, at::Tensor> t;
    for (const auto& [name, v] : source->state_tensors()) t.emplace(name, v.clone());
    for (int64_t l = 0; l < 3; ++l) {
      const auto p = "model.layers." + std::to_string(l) + ".";
      auto mlp_mask = at::zeros({48}, at::kFloat).index_fill_(0, sel.mlp[l], 1.0);
      t[p + "mlp.down_proj.weight"].mul_(mlp_mask);
      auto head_mask = at::zeros({8}, at::kFloat).index_fill_(0, sel.heads[l], 1.0).repeat_interleave(4);
      t[p + "self_attn.o_proj.weight"].mul_(head_mask);
    }
    masked->load_state(t);
  }
  const auto ids = at::randint(0, 64, {2, 11}, at::kLong);
  at::NoGradGuard no_grad;
  const auto want = masked->forward(ids), got = pruned->forward(ids);
  EXPECT_LE((got - want).abs().max().item<double>(), 1e-5 * want.abs().max().item<double>());
  // And pruning does change the model (the check is not vacuous).
  EXPECT_GT((source->forward(ids) - want).abs().max().item<double>(), 1e-4);
}

TEST(DerivePruned, HiddenChannelsSliceEveryTensorOfTheResidualStream) {
  at::manual_seed(4);
  const auto source = random_model(gqa_source());
  const auto w = resolve_widths(source->config(), {0, 0, 0, 24}, "k.");
  const auto imp = activation_importance(*source, {at::randint(0, 64, {2, 8}, at::kLong)});
  const auto sel = select_top(source->config(), imp, w);
  const auto pruned = derive_pruned(*source, {0, 2}, w, sel, at::TensorOptions().dtype(at::kFloat), "keep");
  std::unordered_map<std::string, at::Tensor> src;
  for (const auto& [name, t] : source->state_tensors()) src.emplace(name, t);
  const auto h = sel.hidden;
  for (const auto& [name, t] : pruned->state_tensors()) {
    std::string from = name;
    if (name.rfind("model.layers.1.", 0) == 0) from = "model.layers.2." + name.substr(15);
    const auto& s = src.at(from);
    at::Tensor want;
    if (name.find("embed_tokens") != std::string::npos || name == "lm_head.weight") want = s.index_select(1, h);
    else if (name.find("norm.weight") != std::string::npos && name.find("_norm") == std::string::npos) want = s.index_select(0, h);
    else if (name.find("o_proj.weight") != std::string::npos || name.find("down_proj.weight") != std::string::npos)
      want = s.index_select(0, h);
    else want = s.index_select(1, h);  // q, k, v, gate, up: the inputs
    EXPECT_TRUE(test::bit_equal(t, want)) << name;
  }
  EXPECT_EQ(pruned->config().hidden_size, 24);
  EXPECT_EQ(pruned->config().head_dim, 4);
}

}  // namespace
}  // namespace anvil::model
