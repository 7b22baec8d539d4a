// The recipes, one table for every front end: the command line's subcommands (csrc/cli/recipe_command.h) and
// Python's pipelines (anvil.lora, anvil.train, anvil.distill, anvil.quantize: bindings/python_module.cpp) take
// each recipe's name, help, embedded demo and entry points from here, so a recipe is declared once.
//
// Arrows: the front ends -> this table -> the recipe libraries (lora/, finetune/, distill/, quantize/) -> core.
#pragma once

#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

#include <functional>
#include <string>
#include <vector>

namespace anvil::recipes {

/// A recipe's own command-line flag, a shorthand for one config key: `--model DIR` means `--model.path=DIR`;
/// a boolean flag (`--overwrite`) sets its key to true.
struct Flag {
  std::string name, key, help;
  bool boolean = false;
};

struct Recipe {
  std::string name;         ///< "lora": `anvil lora`, anvil.lora()
  std::string summary;      ///< one line for `anvil`'s usage
  std::string description;  ///< the first line of `anvil <name> --help`
  std::string demo_config;  ///< the embedded demo's config, relative to the demo root; "" when there is none
  std::vector<Flag> flags;  ///< the command line's shorthands
  /// The resolved config (every key, defaults filled in) of a user config; throws std::invalid_argument naming
  /// the key and the rule it broke.
  std::function<nlohmann::json(const nlohmann::json& user)> resolve;
  /// Resolves and runs: train::kExitOk, kExitFailed or kExitInterrupted (train/trainer.h); other errors throw.
  std::function<int(const nlohmann::json& user, const train::RunOptions& options)> run;
};

/// Every recipe, in the order `anvil` lists them.
const std::vector<Recipe>& all();

/// The recipe called `name`; throws std::invalid_argument listing the known names.
const Recipe& find(const std::string& name);

/// Where the embedded demos' files are: the source tree this anvil was built from, or where that is gone, the
/// copy an installed wheel carries beside the library (anvil/demo).
std::string default_demo_root();

/// The recipe's embedded demo config read from `root` (default_demo_root() when empty), its input paths
/// (model, teacher, student, data files) made absolute under `root` so the demo runs from any folder, while
/// output.dir stays relative to the current one. Throws naming the file when the recipe has no demo or the
/// file is missing.
nlohmann::json demo_config(const Recipe& recipe, const std::string& root = "");

}  // namespace anvil::recipes
