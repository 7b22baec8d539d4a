// A recipe as a subcommand: `anvil <recipe> [--config FILE] [--print-config] [--dry-run] [--resume]
// [--section.key=value ...]`, the same for every recipe. main.cpp's table declares each with one line:
//   {"lora", "...", recipe_subcommand("Train LoRA adapters ...", "examples/tiny/lora.json",
//                                     lora::resolve_config, lora::run_recipe)},
// A recipe brings a resolve function (user JSON -> typed config with a .resolved JSON; throws on bad keys)
// and a run function (typed config, train::RunOptions -> exit status).
#pragma once

#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace anvil::cli {

/// A recipe's own flag, a shorthand for one config key: `--model DIR` means `--model.path=DIR`; a boolean flag
/// (`--overwrite`) sets its key to true.
struct RecipeFlag {
  std::string name, key, help;
  bool boolean = false;
};

/// What the generic part hands a recipe: the user's config (file + overrides, the demo's paths anchored),
/// whether to only print the resolved config, and the run options.
using RecipeEntry = std::function<int(const nlohmann::json& user, bool print_config, const train::RunOptions& options)>;

/// Parses the recipe command line (argv[0] is the subcommand's name) and calls `entry`. `demo_config`
/// (relative to the source tree, "" for none) is what runs without --config; its relative input paths are
/// taken from the source tree, so it runs from any directory, while output.dir stays relative to the
/// current one.
int run_recipe_command(int argc, char** argv, const std::string& description, const std::string& demo_config,
                       const RecipeEntry& entry, const std::vector<RecipeFlag>& flags = {});

/// The table's entry for a recipe.
template <class Config>
std::function<int(int, char**)> recipe_subcommand(std::string description, std::string demo_config,
                                                  Config (*resolve)(const nlohmann::json&),
                                                  int (*run)(const Config&, const train::RunOptions&),
                                                  std::vector<RecipeFlag> flags = {}) {
  const RecipeEntry entry = [resolve, run](const nlohmann::json& user, bool print_config,
                                           const train::RunOptions& options) {
    const Config config = resolve(user);
    if (print_config) {
      std::cout << config.resolved.dump(2) << "\n";
      return 0;
    }
    return run(config, options);
  };
  return [=](int argc, char** argv) { return run_recipe_command(argc, argv, description, demo_config, entry, flags); };
}

}  // namespace anvil::cli
