// A recipe as a subcommand: `anvil <recipe> [--config FILE] [--print-config] [--dry-run] [--resume]
// [--section.key=value ...]`, the same for every recipe; the recipes themselves (name, help, demo, entry
// points) are recipes/registry.h's table, which main.cpp lists as subcommands.
#pragma once

#include "recipes/registry.h"

namespace anvil::cli {

/// Parses the recipe command line (argv[0] is the subcommand's name) and runs `recipe`. Without --config (and
/// without a shorthand flag) the recipe's embedded demo runs (recipes::demo_config); a shorthand flag without
/// --config starts from the recipe's defaults.
int run_recipe_command(int argc, char** argv, const recipes::Recipe& recipe);

}  // namespace anvil::cli
