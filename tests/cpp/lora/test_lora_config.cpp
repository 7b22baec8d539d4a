// adapter_config.json parsing and PEFT's targeting rules (anvil/lora/lora.h): suffix lists, regexes
// (full match), all-linear, rank/alpha patterns (first key matching "(.*\.)?(key)$"), rsLoRA
// scaling, the JSON written back, and every unsupported option failing with the key named. The
// numerical oracle tests against PEFT itself are in tests/python/test_lora.py.
#include "anvil/lora/lora.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace anvil::lora {
namespace {

const char kMinimal[] = R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                            "target_modules": ["q_proj", "v_proj"]})";

std::string with(const std::string& key, const std::string& value_json) {
  auto j = nlohmann::json::parse(kMinimal);
  j[key] = nlohmann::json::parse(value_json);
  return j.dump();
}

void expect_error(const std::string& json, const std::vector<std::string>& words) {
  try {
    parse_adapter_config(json, "test/adapter_config.json");
    ADD_FAILURE() << "expected an error mentioning '" << words.front() << "'";
  } catch (const std::runtime_error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("test/adapter_config.json"), std::string::npos) << what;
    for (const auto& w : words) EXPECT_NE(what.find(w), std::string::npos) << "'" << w << "' not in: " << what;
  }
}

TEST(LoraConfig, ParsesMinimalConfig) {
  auto c = parse_adapter_config(kMinimal);
  EXPECT_EQ(c.r, 4);
  EXPECT_EQ(c.lora_alpha, 8);
  EXPECT_EQ(c.target_modules.kind, TargetModules::Kind::kList);
  EXPECT_EQ(c.target_modules.names, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(c.init, "kaiming");
  EXPECT_FALSE(c.use_dora);
  EXPECT_EQ(parse_adapter_config(with("init_lora_weights", "\"gaussian\"")).init, "gaussian");
  EXPECT_EQ(parse_adapter_config(with("target_modules", "\"ALL-LINEAR\"")).target_modules.kind,
            TargetModules::Kind::kAllLinear);
  EXPECT_EQ(parse_adapter_config(with("target_modules", "\".*q_proj\"")).target_modules.kind,
            TargetModules::Kind::kRegex);
}

TEST(LoraConfig, SuffixListMatchesWholeComponents) {
  auto c = parse_adapter_config(kMinimal);
  EXPECT_TRUE(is_target(c, "model.layers.0.self_attn.q_proj", false));
  EXPECT_TRUE(is_target(c, "q_proj", false));
  EXPECT_FALSE(is_target(c, "model.layers.0.self_attn.xq_proj", false));  // "." + entry, not a bare suffix
  EXPECT_FALSE(is_target(c, "model.layers.0.self_attn.k_proj", false));
  auto full = parse_adapter_config(with("target_modules", R"(["layers.1.mlp.down_proj"])"));
  EXPECT_TRUE(is_target(full, "model.layers.1.mlp.down_proj", false));
  EXPECT_FALSE(is_target(full, "model.layers.11.mlp.down_proj", false));
}

TEST(LoraConfig, RegexIsFullMatch) {
  auto c = parse_adapter_config(with("target_modules", R"(".*\\.layers\\.1\\..*_proj")"));
  EXPECT_TRUE(is_target(c, "model.layers.1.mlp.up_proj", false));
  EXPECT_FALSE(is_target(c, "model.layers.1.mlp.up_proj_x", false));
  EXPECT_FALSE(is_target(c, "model.layers.0.mlp.up_proj", false));
  auto partial = parse_adapter_config(with("target_modules", R"("q_proj")"));  // a string is a regex
  EXPECT_FALSE(is_target(partial, "model.layers.0.self_attn.q_proj", false));
}

TEST(LoraConfig, AllLinearSkipsOnlyTheOutputLayer) {
  auto c = parse_adapter_config(with("target_modules", "\"all-linear\""));
  EXPECT_TRUE(is_target(c, "model.layers.0.mlp.gate_proj", false));
  EXPECT_TRUE(is_target(c, "model.layers.1.mlp.shared_experts.up_proj", false));
  EXPECT_TRUE(is_target(c, "model.layers.1.mlp.experts.3.gate_proj", false));
  EXPECT_TRUE(is_target(c, "model.layers.1.block_sparse_moe.experts.0.w1", false));
  EXPECT_FALSE(is_target(c, "lm_head", true));
}

TEST(LoraConfig, RankAndAlphaPatternsFirstMatchWins) {
  auto c = parse_adapter_config(with("rank_pattern", R"({"k_proj": 2, "layers\\.1\\.self_attn\\.k_proj": 6})"));
  EXPECT_EQ(rank_of(c, "model.layers.1.self_attn.k_proj"), 2);  // the first key in file order
  EXPECT_EQ(rank_of(c, "model.layers.1.self_attn.q_proj"), 4);
  EXPECT_EQ(rank_of(c, "model.layers.1.self_attn.xk_proj"), 4);  // "(.*\.)?(key)$": whole components
  auto a = parse_adapter_config(with("alpha_pattern", R"({"v_proj": 1.5})"));
  EXPECT_DOUBLE_EQ(scaling_of(a, "m.v_proj"), 1.5 / 4);
  EXPECT_DOUBLE_EQ(scaling_of(a, "m.q_proj"), 8.0 / 4);
  auto rs = parse_adapter_config(with("use_rslora", "true"));
  EXPECT_DOUBLE_EQ(scaling_of(rs, "m.q_proj"), 8.0 / 2.0);  // alpha / sqrt(r)
}

TEST(LoraConfig, WritesPeftKeySet) {
  auto c = parse_adapter_config(with("rank_pattern", R"({"k_proj": 2})"));
  auto j = nlohmann::json::parse(adapter_config_json(c));
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], 4);
  EXPECT_TRUE(j["lora_alpha"].is_number_integer());
  EXPECT_EQ(j["target_modules"], nlohmann::json::parse(R"(["q_proj", "v_proj"])"));
  EXPECT_EQ(j["rank_pattern"]["k_proj"], 2);
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["fan_in_fan_out"], false);
  EXPECT_EQ(j["init_lora_weights"], true);
  EXPECT_TRUE(j["base_model_name_or_path"].is_null());
  // Round trip.
  auto back = parse_adapter_config(adapter_config_json(c));
  EXPECT_EQ(back.rank_pattern, c.rank_pattern);
  EXPECT_EQ(back.target_modules.names, c.target_modules.names);
}

TEST(LoraConfig, RejectsUnsupportedOptionsNamingTheKey) {
  expect_error("not json", {"not valid JSON"});
  expect_error("[1, 2]", {"JSON object"});
  expect_error(with("peft_type", "\"IA3\""), {"peft_type", "IA3"});
  expect_error(with("task_type", "\"SEQ_CLS\""), {"task_type"});
  expect_error(with("fan_in_fan_out", "true"), {"fan_in_fan_out"});
  expect_error(with("bias", "\"lora_only\""), {"bias"});
  expect_error(with("lora_bias", "true"), {"lora_bias"});
  expect_error(with("use_qalora", "true"), {"use_qalora"});
  expect_error(with("layers_to_transform", "[0, 1]"), {"layers_to_transform"});
  expect_error(with("layers_pattern", "\"layers\""), {"layers_pattern"});
  expect_error(with("exclude_modules", R"(["k_proj"])"), {"exclude_modules"});
  expect_error(with("modules_to_save", R"(["lm_head"])"), {"modules_to_save"});
  expect_error(with("target_parameters", R"(["experts.gate_up_proj"])"), {"target_parameters"});
  expect_error(with("trainable_token_indices", "[1, 2]"), {"trainable_token_indices"});
  expect_error(with("init_lora_weights", "\"olora\""), {"init_lora_weights", "olora"});
  expect_error(with("init_lora_weights", "\"pissa_niter_two\""), {"init", "pissa_niter_N"});
  expect_error(with("target_modules", "null"), {"target_modules", "missing"});
  expect_error(with("target_modules", "[]"), {"target_modules", "empty"});
  expect_error(with("target_modules", "5"), {"target_modules"});
  expect_error(with("target_modules", "\"(unclosed\""), {"target_modules", "regex"});
  expect_error(with("r", "0"), {"r must be > 0"});
  expect_error(with("r", "\"four\""), {"\"r\"", "wrong type"});
  expect_error(with("r", "4.5"), {"\"r\"", "integer"});
  expect_error(with("lora_dropout", "1.0"), {"lora_dropout"});
  expect_error(with("rank_pattern", R"({"k_proj": 1.5})"), {"rank_pattern.k_proj", "integer"});
  expect_error(with("rank_pattern", R"({"k_proj": -1})"), {"rank_pattern", "k_proj"});
  expect_error(with("some_new_option", R"({"on": true})"), {"some_new_option"});
  // Provenance keys and options at their "off" value pass.
  EXPECT_NO_THROW(parse_adapter_config(with("peft_version", "\"0.99.0\"")));
  EXPECT_NO_THROW(parse_adapter_config(with("some_new_option", "null")));
  EXPECT_NO_THROW(parse_adapter_config(with("loftq_config", "{}")));
}

}  // namespace
}  // namespace anvil::lora
