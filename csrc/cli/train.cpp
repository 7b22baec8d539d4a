// `anvil lora` and `anvil train`: the command-line side of the recipe in lora/recipe.h. Parses
// --config, --print-config, --dry-run, --resume and any number of --section.key=value overrides
// (cxxopts cannot declare those: they are picked out of argv first), then runs the recipe.
//
// `anvil lora` without --config runs the embedded demo, examples/tiny/lora.json in the source tree
// (ANVIL_SOURCE_DIR); its relative input paths are taken from the source tree, so it runs from any
// directory, while output.dir stays relative to the current directory.
#include "cli/commands.h"
#include "lora/recipe.h"

#include <cxxopts.hpp>

#include <sys/stat.h>

#include <iostream>
#include <string>
#include <vector>

#ifndef ANVIL_SOURCE_DIR
#define ANVIL_SOURCE_DIR "."
#endif

namespace anvil::cli {

namespace {

// POSIX stat, not std::filesystem (unsafe beside libtorch: docs/ARCHITECTURE.md).
bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// An override is "--section.key=value" or "--section.key value": a long option whose name has a dot.
bool is_override(const std::string& arg) {
  if (arg.rfind("--", 0) != 0) return false;
  const auto name = arg.substr(2, arg.find('=') == std::string::npos ? std::string::npos : arg.find('=') - 2);
  return name.find('.') != std::string::npos;
}

// Input paths of the embedded demo config are relative to the source tree.
void anchor_demo_paths(nlohmann::json& config) {
  const std::string root = ANVIL_SOURCE_DIR;
  auto anchor = [&](const char* section, const char* key) {
    if (!config.contains(section) || !config[section].contains(key) || !config[section][key].is_string()) return;
    const std::string p = config[section][key].get<std::string>();
    if (!p.empty() && p[0] != '/' && path_exists(root + "/" + p)) config[section][key] = root + "/" + p;
  };
  anchor("model", "path");
  anchor("model", "config");
  anchor("model", "tokenizer");
  anchor("data", "train");
  anchor("data", "validation");
}

int run(int argc, char** argv, lora::RecipeMode mode) {
  const std::string name = mode == lora::RecipeMode::kLora ? "lora" : "train";
  std::vector<std::string> overrides;
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
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
  cxxopts::Options options(
      "anvil " + name,
      mode == lora::RecipeMode::kLora
          ? "Train LoRA adapters (PEFT format) from a JSON config; without --config, the embedded demo"
          : "Train every parameter of a model (or one initialised at random) from a JSON config");
  options.add_options()
      ("config", "the JSON config (docs/CLI.md lists every key)", cxxopts::value<std::string>())
      ("print-config", "print the resolved config (defaults filled in, overrides applied) and exit")
      ("dry-run", "print the memory estimate and exit")
      ("resume", "continue the run in output.dir from its checkpoint")
      ("h,help", "show this help; any config key can be overridden with --section.key=value");
  int rest_argc = int(rest.size());
  const auto args = options.parse(rest_argc, rest.data());
  if (args.count("help")) {
    std::cout << options.help() << "\n  --section.key=value   override one config key (e.g. --train.lr=1e-4)\n";
    return 0;
  }
  if (!args.unmatched().empty())
    throw cxxopts::exceptions::exception("anvil " + name + ": unexpected argument '" + args.unmatched()[0] + "'");

  nlohmann::json user = nlohmann::json::object();
  std::string config_path;
  bool demo = false;
  if (args.count("config")) {
    config_path = args["config"].as<std::string>();
  } else if (mode == lora::RecipeMode::kLora) {
    config_path = std::string(ANVIL_SOURCE_DIR) + "/examples/tiny/lora.json";
    demo = true;
    if (!path_exists(config_path))
      throw std::runtime_error("anvil lora: no --config given and the embedded demo config " + config_path +
                               " is missing (the demo's files are made with its data; pass --config FILE to train on your own)");
  } else {
    throw cxxopts::exceptions::exception("anvil train: --config is required");
  }
  // Read the file, apply the overrides, anchor the demo's paths, resolve.
  user = lora::read_config_file(config_path);
  for (const auto& o : overrides) lora::apply_override(user, o);
  if (demo) anchor_demo_paths(user);
  const auto config = lora::resolve_config(user, mode);
  if (args.count("print-config")) {
    std::cout << config.resolved.dump(2) << "\n";
    return 0;
  }
  lora::RecipeOptions ro;
  ro.resume = args.count("resume") > 0;
  ro.dry_run = args.count("dry-run") > 0;
  return lora::run_recipe(config, ro);
}

}  // namespace

int cmd_lora(int argc, char** argv) { return run(argc, argv, lora::RecipeMode::kLora); }
int cmd_train(int argc, char** argv) { return run(argc, argv, lora::RecipeMode::kFull); }

}  // namespace anvil::cli
