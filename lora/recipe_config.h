// The configuration of the `anvil lora` / `anvil train` recipe: a JSON file (the contract in
// docs/CLI.md, "anvil lora"), command-line overrides `--section.key=value`, defaults, and validation.
//
// The config lives in two forms: the resolved JSON (every key present, defaults filled in; what
// --print-config prints and what the output directory's config.json and every checkpoint keep, so a
// resumed run can check it is the same run) and the typed RecipeConfig the recipe reads. The schema is
// one table of defaults per section: a key missing from it is unknown, and the error lists the
// section's keys; every value is then checked by type and range, the error naming the key and the
// allowed values. Keys may be added to the table; they are never renamed (other tools write configs).
#pragma once

#include "lora/lora.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::lora {

/// Which recipe reads the config: LoRA adapters or every parameter.
enum class RecipeMode { kLora, kFull };

struct ModelSection {
  std::string path;        ///< HF folder or cached hub id
  std::string init;        ///< "pretrained" | "random" (full mode only)
  std::string config;      ///< config.json for init = random
  std::string tokenizer;   ///< folder with tokenizer files; "" = model.path or model.config's folder
  std::string dtype;       ///< "bfloat16" | "float32" | "float16"
  std::string device;      ///< "auto" | "cpu" | "cuda" | "cuda:N"
  std::string base_weights;  ///< "auto" | "dense" | "fp8" | "int8" (anvil lora: how the frozen base is held)
};

struct DataSection {
  std::string train, validation;
  double validation_fraction = 0;
  int64_t seq_len = 1024;
  std::string loss_on;  ///< "completion" | "all"
  bool add_eos = true;
};

struct TrainSection {
  int64_t batch_size = 8, grad_accum = 1, epochs = 1, steps = 0;
  double lr = 2e-4, weight_decay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  std::string schedule;  ///< "cosine" | "linear" | "constant"
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0, max_grad_norm = 1.0;
  bool grad_checkpointing = false;
  std::string mixed_precision;  ///< "none" | "bf16" (full mode: fp32 master weights, bf16 autocast)
  int64_t loss_chunk = 4096;    ///< token rows per chunk of the chunked cross-entropy
  uint64_t seed = 0;
};

struct EvalSection {
  int64_t every = 0, max_batches = 0;
  std::vector<std::string> prompts;
  int64_t max_new_tokens = 48;
};

struct OutputSection {
  std::string dir;
  int64_t save_every = 0, log_every = 1;
  bool plot = true;
  bool save_initial_adapter = false;  ///< also write the step-0 adapter to initial_adapter/ (tests, oracles)
  bool save_pissa_adapter = false;    ///< PiSSA: also write the raw (unconverted) adapter to adapter_pissa/
};

/// The typed, validated config.
struct RecipeConfig {
  RecipeMode mode = RecipeMode::kLora;
  ModelSection model;
  DataSection data;
  LoraConfig lora;  ///< lora.init "pissa" / "pissa_niter_N": PiSSA (apply_lora), written converted (save_pissa_as_lora)
  TrainSection train;
  EvalSection eval;
  OutputSection output;
  nlohmann::json resolved;  ///< every key, defaults filled in
};

/// The defaults of every section and key (the schema's key list).
nlohmann::json default_config();

/// Applies one override "section.key=value" to `config` (a JSON object). The value is parsed as JSON
/// when it parses ("8", "true", "[\"q_proj\"]", "{}"), else taken as a string ("cosine", "runs/x").
/// Throws std::invalid_argument naming the override when it has no '=' or no "section.key" form.
void apply_override(nlohmann::json& config, const std::string& assignment);

/// Merges `user` over the defaults, checks every key and value, and returns the typed config.
/// Throws std::invalid_argument: unknown section or key (the message lists the known ones), a value of
/// the wrong type or out of range (the message names the key and the allowed values), or a rule
/// between keys broken (model.path missing for init = pretrained, lora keys set for anvil train, ...).
RecipeConfig resolve_config(const nlohmann::json& user, RecipeMode mode);

/// Reads a config file as JSON (comments allowed); errors name the file.
nlohmann::json read_config_file(const std::string& path);

/// Reads a config file (JSON; errors name the file), applies the overrides in order, resolves.
RecipeConfig load_config(const std::string& path, const std::vector<std::string>& overrides, RecipeMode mode);

}  // namespace anvil::lora
