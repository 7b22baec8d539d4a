// `anvil train`: every parameter of a model trained, the model loaded from a checkpoint (full
// fine-tuning) or built from a config.json with random weights (pretraining a small model, as the demo's
// base was made), optionally in bf16 autocast over fp32 master weights; the result written as a Hugging
// Face model folder. The config is the shared training sections (anvil/train/config.h); the loop is the
// core trainer's. Every key: docs/CLI.md, "anvil train".
#pragma once

#include "anvil/train/config.h"
#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

namespace anvil::finetune {

/// The typed, validated config of `anvil train`.
struct RecipeConfig {
  train::ModelSection model;
  train::DataSection data;
  train::TrainSection train;
  train::EvalSection eval;
  train::OutputSection output;
  nlohmann::json resolved;  ///< every key, defaults filled in
};

/// The keys `anvil train` reads, with their defaults.
train::ConfigSchema config_schema();

/// Merges `user` over the defaults, checks every key and value, returns the typed config. Throws
/// std::invalid_argument naming the key and the rule (a "lora" section: that is anvil lora's).
RecipeConfig resolve_config(const nlohmann::json& user);

/// Runs the recipe; exit statuses as lora::run_recipe's (train::kExitOk, kExitFailed, kExitInterrupted).
int run_recipe(const RecipeConfig& config, const train::RunOptions& options);

}  // namespace anvil::finetune
