// The recipe table (recipes/registry.h): one entry per recipe library.
#include "recipes/registry.h"

#include "anvil/io/fs.h"
#include "anvil/train/config.h"
#include "distill/recipe.h"
#include "finetune/recipe.h"
#include "lora/recipe.h"
#include "quantize/recipe.h"

#include <dlfcn.h>

#include <stdexcept>

#ifndef ANVIL_SOURCE_DIR
#define ANVIL_SOURCE_DIR "."
#endif

namespace anvil::recipes {

namespace {

// A table entry from a recipe's typed resolve and run functions.
template <class Config>
Recipe make(std::string name, std::string summary, std::string description, std::string demo,
            Config (*resolve)(const nlohmann::json&), int (*run)(const Config&, const train::RunOptions&),
            std::vector<Flag> flags = {}) {
  Recipe r;
  r.name = std::move(name), r.summary = std::move(summary), r.description = std::move(description);
  r.demo_config = std::move(demo), r.flags = std::move(flags);
  r.resolve = [resolve](const nlohmann::json& user) { return resolve(user).resolved; };
  r.run = [resolve, run](const nlohmann::json& user, const train::RunOptions& options) {
    return run(resolve(user), options);
  };
  return r;
}

// The demo's input paths are relative to the demo root; a path that does not exist there is left as written
// (the recipe then names it).
void anchor_demo_paths(nlohmann::json& config, const std::string& root) {
  auto anchor = [&](const char* section, const char* key) {
    if (!config.contains(section) || !config[section].contains(key) || !config[section][key].is_string()) return;
    const std::string p = config[section][key].get<std::string>();
    if (!p.empty() && p[0] != '/' && io::path_exists(io::join_path(root, p))) config[section][key] = io::join_path(root, p);
  };
  for (const char* key : {"path", "config", "tokenizer"}) anchor("model", key);
  anchor("teacher", "path");  // anvil distill's two models
  for (const char* key : {"path", "config"}) anchor("student", key);
  for (const char* key : {"train", "validation", "calib", "eval"}) anchor("data", key);  // calib, eval: anvil quantize
}

}  // namespace

const std::vector<Recipe>& all() {
  static const std::vector<Recipe> table = {
      make("lora", "train LoRA adapters from a JSON config (no --config: the embedded demo)",
           "Train LoRA adapters (PEFT format) from a JSON config; without --config, the embedded demo",
           "examples/tiny/lora.json", lora::resolve_config, lora::run_recipe),
      make("train", "train every parameter of a model (or a random one) from a JSON config",
           "Train every parameter of a model (or one initialised at random) from a JSON config", "",
           finetune::resolve_config, finetune::run_recipe),
      make("distill", "distill a teacher into a smaller student from a JSON config (no --config: the embedded demo)",
           "Distill a frozen teacher into a smaller student (KD losses over both LM heads) from a JSON config; "
           "without --config, the embedded demo",
           "examples/tiny/distill.json", distill::resolve_config, distill::run_recipe),
      make("quantize", "quantize a model to FP8 / INT8 / INT4 and export it (no arguments: the embedded demo)",
           "Quantize a model layer by layer and export it as FineGrainedFP8 or compressed-tensors, with a report; "
           "without --config or --model, the embedded demo",
           "examples/tiny/quantize.json", quantize::resolve_config, quantize::run_recipe,
           {{"model", "model.path", "the model to quantize (HF folder or cached hub id)"},
            {"scheme", "quantize.scheme", "fp8-block, fp8-channel, fp8-tensor, int8-weight, w8a8-int8, "
                                          "int4-weight, gptq-int4, gptq-int8, gguf-q8_0, gguf-q4_0, gguf-q4_k_m, "
                                          "gguf-q5_k_m, gguf-q6_k"},
            {"out", "output.dir", "the quantized model's folder (gguf-*: a FILE.gguf, or a folder that gets model.gguf)"},
            {"calib", "data.calib", "calibration JSONL"},
            {"eval", "data.eval", "held-out JSONL for the report's perplexity and KL"},
            {"overwrite", "output.overwrite", "replace an existing --out", true}}),
  };
  return table;
}

const Recipe& find(const std::string& name) {
  std::string known;
  for (const auto& r : all()) {
    if (r.name == name) return r;
    known += (known.empty() ? "" : ", ") + r.name;
  }
  throw std::invalid_argument("recipe '" + name + "': no such recipe (the recipes are " + known + ")");
}

std::string default_demo_root() {
  // The source tree while it exists; an installed wheel carries the demos' files beside this library
  // (site-packages/anvil/demo: cmake/AnvilInstall.cmake).
  const std::string source = ANVIL_SOURCE_DIR;
  if (io::is_directory(io::join_path(source, "examples"))) return source;
  Dl_info info;
  if (::dladdr(reinterpret_cast<void*>(&default_demo_root), &info) && info.dli_fname) {
    const std::string beside = io::join_path(io::parent_dir(io::real_path(info.dli_fname)), "demo");
    if (io::is_directory(io::join_path(beside, "examples"))) return beside;
  }
  return source;
}

nlohmann::json demo_config(const Recipe& recipe, const std::string& root_or_empty) {
  const std::string root = root_or_empty.empty() ? default_demo_root() : root_or_empty;
  if (recipe.demo_config.empty())
    throw std::invalid_argument("anvil " + recipe.name + ": has no embedded demo: a config is required");
  const std::string path = io::join_path(root, recipe.demo_config);
  if (!io::path_exists(path))
    throw std::runtime_error("anvil " + recipe.name + ": the embedded demo config " + path +
                             " is missing (the demo's files are made with its data; give a config to train on "
                             "your own)");
  nlohmann::json config = train::read_config_file(path);
  anchor_demo_paths(config, root);
  return config;
}

}  // namespace anvil::recipes
