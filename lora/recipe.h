// The `anvil lora` / `anvil train` recipe: set up (model, adapters, tokenizer, data), train, evaluate,
// checkpoint, write the outputs. One function that reads top to bottom like a torchtune recipe
// (lora/recipe.cpp); the pieces it uses (AdamW, schedules, clipping, the chunked loss, gradient
// checkpointing, the loss plot) live in anvil::train.
#pragma once

#include "lora/recipe_config.h"

#include <string>

namespace anvil::lora {

struct RecipeOptions {
  bool resume = false;   ///< continue from output.dir/checkpoint (the config must match)
  bool dry_run = false;  ///< print the memory estimate and return 0 without training
};

/// Exit statuses of run_recipe.
constexpr int kExitOk = 0, kExitFailed = 1, kExitInterrupted = 130;

/// Runs the recipe. Returns kExitOk when training finished (or after a dry run), kExitInterrupted
/// after Ctrl-C (a checkpoint was saved), kExitFailed on a non-finite loss or CUDA out of memory
/// (the message says what to do). Other errors (bad data, missing files) throw.
int run_recipe(const RecipeConfig& config, const RecipeOptions& options);

}  // namespace anvil::lora
