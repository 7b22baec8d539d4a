// The config of `anvil lora` (lora/recipe.h, on anvil/train/config.h): defaults, overrides parsed as JSON
// or strings, and the error messages for unknown keys and bad values, which must name the key and what is
// allowed.
#include "lora/recipe.h"

#include "train/recipe_config_test_util.h"

#include <gtest/gtest.h>

#include <string>

namespace anvil::lora {
namespace {

using nlohmann::json;
using train::apply_override;

json default_config() { return config_schema().defaults; }

json minimal() { return test::minimal_recipe_config(); }

std::string error_of(const json& user) { return test::resolve_error(resolve_config, user); }

TEST(RecipeConfig, DefaultsFillEveryKey) {
  const auto c = resolve_config(minimal());
  EXPECT_EQ(c.train.batch_size, 8);
  EXPECT_EQ(c.train.schedule, "cosine");
  EXPECT_DOUBLE_EQ(c.train.lr, 2e-4);
  EXPECT_EQ(c.lora.r, 16);
  EXPECT_DOUBLE_EQ(c.lora.lora_alpha, 32);
  EXPECT_EQ(c.lora.target_modules.kind, TargetModules::Kind::kAllLinear);
  EXPECT_EQ(c.output.dir, "runs/lora");
  EXPECT_EQ(c.resolved["data"]["seq_len"], 1024);
  EXPECT_EQ(c.resolved["eval"]["prompts"], json::array());
  for (const auto& section : {"model", "data", "lora", "train", "eval", "output"})
    EXPECT_EQ(c.resolved[section].size(), default_config()[section].size()) << section;
}

TEST(RecipeConfig, UnknownKeysAndSectionsAreNamedWithTheKnownOnes) {
  auto user = minimal();
  user["train"]["learning_rate"] = 1e-3;
  const auto msg = error_of(user);
  EXPECT_NE(msg.find("train.learning_rate"), std::string::npos) << msg;
  EXPECT_NE(msg.find("lr"), std::string::npos) << msg;
  EXPECT_NE(msg.find("batch_size"), std::string::npos) << msg;
  user = minimal();
  user["optim"] = json::object();
  EXPECT_NE(error_of(user).find("unknown section 'optim'"), std::string::npos) << error_of(user);
}

TEST(RecipeConfig, BadValuesNameTheKeyAndTheAllowedValues) {
  auto with = [](const char* section, const char* key, json value) {
    auto u = minimal();
    u[section][key] = value;
    return error_of(u);
  };
  auto msg = with("train", "schedule", "cos");
  EXPECT_NE(msg.find("train.schedule"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"cosine\", \"linear\", \"constant\""), std::string::npos) << msg;
  msg = with("train", "batch_size", 0);
  EXPECT_NE(msg.find("train.batch_size: must be an integer >= 1, got 0"), std::string::npos) << msg;
  msg = with("data", "validation_fraction", 1.0);
  EXPECT_NE(msg.find("data.validation_fraction: must be a number in [0, 1)"), std::string::npos) << msg;
  msg = with("lora", "dropout", "a lot");
  EXPECT_NE(msg.find("lora.dropout"), std::string::npos) << msg;
  msg = with("lora", "targets", json::array());
  EXPECT_NE(msg.find("lora.targets"), std::string::npos) << msg;
  msg = with("model", "device", "tpu");
  EXPECT_NE(msg.find("model.device"), std::string::npos) << msg;
  msg = with("output", "plot", "yes");
  EXPECT_NE(msg.find("output.plot: must be true or false"), std::string::npos) << msg;
  msg = with("lora", "rank_pattern", json{{"q_proj", 0}});
  EXPECT_NE(msg.find("lora.rank_pattern.q_proj"), std::string::npos) << msg;
  auto u = minimal();
  u["data"].erase("train");
  EXPECT_NE(error_of(u).find("data.train: is required"), std::string::npos) << error_of(u);
}

// What only anvil train allows; the other side of each rule: tests/cpp/finetune/test_recipe_config.cpp.
TEST(RecipeConfig, ModeRules) {
  auto u = minimal();
  u["model"]["init"] = "random";
  u["model"]["config"] = "config.json";
  EXPECT_NE(error_of(u).find("model.init"), std::string::npos);
  u = minimal();
  u["train"]["mixed_precision"] = "bf16";
  EXPECT_NE(error_of(u).find("train.mixed_precision"), std::string::npos);
  u = minimal();
  u["model"]["path"] = "";
  EXPECT_NE(error_of(u).find("model.path: is required"), std::string::npos);
}

TEST(RecipeConfig, OverridesParseAsJsonElseString) {
  json c = minimal();
  apply_override(c, "train.lr=1e-3");
  apply_override(c, "train.schedule=linear");
  apply_override(c, "lora.targets=[\"q_proj\",\"v_proj\"]");
  apply_override(c, "train.grad_checkpointing=true");
  apply_override(c, "output.dir=runs/x=1");  // only the first '=' separates
  apply_override(c, "eval.prompts=[\"a\"]");
  EXPECT_DOUBLE_EQ(c["train"]["lr"].get<double>(), 1e-3);
  EXPECT_EQ(c["train"]["schedule"], "linear");
  EXPECT_EQ(c["lora"]["targets"], (json{"q_proj", "v_proj"}));
  EXPECT_EQ(c["train"]["grad_checkpointing"], true);
  EXPECT_EQ(c["output"]["dir"], "runs/x=1");
  const auto r = resolve_config(c);
  EXPECT_EQ(r.lora.target_modules.kind, TargetModules::Kind::kList);
  EXPECT_EQ(r.lora.target_modules.names, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(r.eval.prompts, (std::vector<std::string>{"a"}));
  EXPECT_THROW(apply_override(c, "train.lr"), std::invalid_argument);
  EXPECT_THROW(apply_override(c, "lr=1"), std::invalid_argument);
  EXPECT_THROW(apply_override(c, "a.b.c=1"), std::invalid_argument);
  apply_override(c, "train.nope=1");
  EXPECT_THROW(resolve_config(c), std::invalid_argument);
}

}  // namespace
}  // namespace anvil::lora
