// The command line of every recipe (cli/recipe_command.h): --config, --print-config, --dry-run, --resume
// and any number of --section.key=value overrides (cxxopts cannot declare those: they are picked out of
// argv first).
#include "cli/recipe_command.h"

#include "anvil/train/config.h"

#include <cxxopts.hpp>

#include <iostream>
#include <string>
#include <vector>

namespace anvil::cli {

namespace {

// An override is "--section.key=value" or "--section.key value": a long option whose name has a dot.
bool is_override(const std::string& arg) {
  if (arg.rfind("--", 0) != 0) return false;
  const auto name = arg.substr(2, arg.find('=') == std::string::npos ? std::string::npos : arg.find('=') - 2);
  return name.find('.') != std::string::npos;
}

}  // namespace

int run_recipe_command(int argc, char** argv, const recipes::Recipe& recipe) {
  const std::string name = argv[0];
  const auto& flags = recipe.flags;
  std::vector<std::string> overrides;
  std::vector<char*> rest = {argv[0]};
  bool used_flag = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    const recipes::Flag* flag = nullptr;  // the recipe's shorthands: --model DIR, --overwrite
    for (const auto& f : flags)
      if (arg == "--" + f.name || arg.rfind("--" + f.name + "=", 0) == 0) flag = &f;
    if (flag) {
      used_flag = true;
      const auto eq = arg.find('=');
      if (flag->boolean) {
        if (eq != std::string::npos) throw cxxopts::exceptions::exception("anvil " + name + ": --" + flag->name + " takes no value");
        overrides.push_back(flag->key + "=true");
      } else if (eq != std::string::npos) {
        overrides.push_back(flag->key + "=" + arg.substr(eq + 1));
      } else {
        if (i + 1 >= argc) throw cxxopts::exceptions::exception("anvil " + name + ": --" + flag->name + " needs a value");
        overrides.push_back(flag->key + "=" + std::string(argv[++i]));
      }
      continue;
    }
    if (!is_override(arg)) {
      rest.push_back(argv[i]);
      continue;
    }
    if (arg.find('=') == std::string::npos) {
      if (i + 1 >= argc) throw cxxopts::exceptions::exception("anvil " + name + ": " + arg + " needs a value");
      arg += "=" + std::string(argv[++i]);
    }
    overrides.push_back(arg.substr(2));
  }
  cxxopts::Options options("anvil " + name, recipe.description);
  options.add_options()
      ("config", "the JSON config (docs/CLI.md lists every key)", cxxopts::value<std::string>())
      ("print-config", "print the resolved config (defaults filled in, overrides applied) and exit")
      ("dry-run", "print the memory estimate and exit")
      ("resume", "continue the run in output.dir from its checkpoint")
      ("h,help", "show this help; any config key can be overridden with --section.key=value");
  int rest_argc = int(rest.size());
  const auto args = options.parse(rest_argc, rest.data());
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    for (const auto& f : flags)
      std::cout << "  --" << f.name << (f.boolean ? "" : " VALUE") << "   " << f.help << " (config key " << f.key << ")\n";
    std::cout << "  --section.key=value   override one config key (e.g. --train.lr=1e-4)\n";
    return 0;
  }
  if (!args.unmatched().empty())
    throw cxxopts::exceptions::exception("anvil " + name + ": unexpected argument '" + args.unmatched()[0] + "'");

  // The recipe's shorthand flags without --config start from the recipe's defaults, not from the demo's config
  // (`anvil quantize --model X --out Y` must not pick up the demo's data files).
  nlohmann::json user = nlohmann::json::object();
  if (args.count("config")) {
    user = train::read_config_file(args["config"].as<std::string>());
  } else if (!used_flag) {
    if (recipe.demo_config.empty()) throw cxxopts::exceptions::exception("anvil " + name + ": --config is required");
    user = recipes::demo_config(recipe);
  }
  for (const auto& o : overrides) train::apply_override(user, o);
  train::RunOptions run;
  run.resume = args.count("resume") > 0;
  run.dry_run = args.count("dry-run") > 0;
  if (args.count("print-config")) {
    std::cout << recipe.resolve(user).dump(2) << "\n";
    return 0;
  }
  return recipe.run(user, run);
}

}  // namespace anvil::cli
