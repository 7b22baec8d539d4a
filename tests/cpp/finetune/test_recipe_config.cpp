// The config of `anvil train` (finetune/recipe.h): what it allows that anvil lora does not (random init,
// bf16 mixed precision), and a lora section named as anvil lora's.
#include "finetune/recipe.h"

#include "train/recipe_config_test_util.h"

#include <gtest/gtest.h>

#include <string>

namespace anvil::finetune {
namespace {

using nlohmann::json;

json minimal() { return test::minimal_recipe_config(); }

std::string error_of(const json& user) { return test::resolve_error(resolve_config, user); }

TEST(FinetuneConfig, ModeRules) {
  auto u = minimal();
  u["model"]["init"] = "random";
  u["model"]["config"] = "config.json";
  EXPECT_EQ(error_of(u), "");
  u["lora"]["r"] = 8;
  EXPECT_NE(error_of(u).find("lora.r"), std::string::npos) << error_of(u);
  u = minimal();
  u["train"]["mixed_precision"] = "bf16";
  EXPECT_EQ(error_of(u), "");
  u = minimal();
  u["model"]["base_weights"] = "fp8";
  EXPECT_NE(error_of(u).find("model.base_weights"), std::string::npos) << error_of(u);
}

TEST(FinetuneConfig, DefaultsAndUnknownKeys) {
  const auto c = resolve_config(minimal());
  EXPECT_EQ(c.output.dir, "runs/train");
  EXPECT_FALSE(c.resolved.contains("lora"));
  EXPECT_EQ(c.resolved["train"].size(), config_schema().defaults["train"].size());
  auto u = minimal();
  u["output"]["save_initial_adapter"] = true;  // anvil lora's key
  EXPECT_NE(error_of(u).find("output.save_initial_adapter"), std::string::npos) << error_of(u);
}

}  // namespace
}  // namespace anvil::finetune
