// `anvil lora`: LoRA / DoRA / rsLoRA / PiSSA adapters trained on a frozen base (dense, FP8 or INT8) and
// written in PEFT's format. The config is the shared training sections (anvil/train/config.h) plus a
// "lora" section and two output keys; the loop is the core trainer's (anvil/train/trainer.h). The contract
// of every key: docs/CLI.md, "anvil lora".
#pragma once

#include "anvil/lora/lora.h"
#include "anvil/train/config.h"
#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

namespace anvil::lora {

/// The typed, validated config of `anvil lora`.
struct RecipeConfig {
  train::ModelSection model;
  train::DataSection data;
  LoraConfig lora;  ///< lora.init "pissa" / "pissa_niter_N": PiSSA (apply_lora), written converted (save_pissa_as_lora)
  train::TrainSection train;
  train::EvalSection eval;
  train::OutputSection output;
  bool save_initial_adapter = false;  ///< output.save_initial_adapter: also write the step-0 adapter (tests, oracles)
  bool save_pissa_adapter = false;    ///< output.save_pissa_adapter: PiSSA's raw adapter in adapter_pissa/ too
  nlohmann::json resolved;            ///< every key, defaults filled in
};

/// The keys `anvil lora` reads, with their defaults.
train::ConfigSchema config_schema();

/// Merges `user` over the defaults, checks every key and value, and returns the typed config. Throws
/// std::invalid_argument naming the key and the rule: unknown section or key (listing the known ones), a
/// value of the wrong type or out of range, a rule between keys broken (PiSSA with DoRA, model.init "random", ...).
RecipeConfig resolve_config(const nlohmann::json& user);

/// Runs the recipe: train::kExitOk when training finished (or after a dry run), kExitInterrupted after
/// Ctrl-C (a checkpoint was saved), kExitFailed on a non-finite loss or CUDA out of memory (the message
/// says what to do). Other errors (bad data, missing files) throw.
int run_recipe(const RecipeConfig& config, const train::RunOptions& options);

}  // namespace anvil::lora
