// Recipe configs: a JSON file, command-line overrides `--section.key=value`, defaults, validation, and the
// sections every training recipe shares (model, data, train, eval, output).
//
// A config lives in two forms: the resolved JSON (every key present, defaults filled in; what
// --print-config prints and what the output directory's config.json and every checkpoint keep, so a
// resumed run can check it is the same run) and the typed structs the recipe reads. A recipe's schema
// is one JSON object of defaults per section: a key missing from it is unknown, and the error lists the
// section's keys; every value is then checked by type and range through ConfigReader, whose errors all
// have one shape: "config key train.schedule: must be one of \"cosine\", \"linear\", \"constant\", got \"cos\"".
// Keys may be added to a schema; they are never renamed (other tools write configs).
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

/// What a recipe accepts.
struct ConfigSchema {
  nlohmann::json defaults;  ///< {section: {key: default}}: the key list and the defaults
  /// Sections that belong to another recipe, with the reason a config for this one must leave them out
  /// (e.g. {"lora", "is for anvil lora; anvil train trains every parameter"}): a key there is named in
  /// the error with that reason instead of "unknown section".
  std::vector<std::pair<std::string, std::string>> foreign_sections;
};

/// Throws std::invalid_argument "config key <key>: <rule>, got <got>".
[[noreturn]] void config_error(const std::string& key, const std::string& rule, const nlohmann::json& got);

/// `user` over the schema's defaults. Throws std::invalid_argument for a top level that is not an
/// object, an unknown section or key (listing the known ones), a section that is not an object.
nlohmann::json merge_over_defaults(const ConfigSchema& schema, const nlohmann::json& user);

/// Applies one override "section.key=value" to `config` (a JSON object). The value is parsed as JSON
/// when it parses ("8", "true", "[\"q_proj\"]", "{}"), else taken as a string ("cosine", "runs/x").
/// Throws std::invalid_argument naming the override when it has no '=' or no "section.key" form.
void apply_override(nlohmann::json& config, const std::string& assignment);

/// Reads a config file as JSON (comments allowed); errors name the file.
nlohmann::json read_config_file(const std::string& path);

/// Typed getters over a resolved config: each checks the value and names "section.key" when it is wrong.
class ConfigReader {
 public:
  explicit ConfigReader(const nlohmann::json& config) : config_(config) {}
  const nlohmann::json& at(const std::string& key) const;  ///< "section.key"
  std::string string(const std::string& key) const;
  std::string string_in(const std::string& key, const std::vector<std::string>& allowed) const;
  bool boolean(const std::string& key) const;
  int64_t int_at_least(const std::string& key, int64_t lo) const;  ///< 8.0 is accepted as 8
  /// lo <= x (< hi when hi_open, else <= hi), finite; `range` is how the error shows it ("[0, 1)").
  double number_in(const std::string& key, double lo, double hi, bool hi_open, const std::string& range) const;
  std::vector<std::string> strings(const std::string& key) const;  ///< a list of strings

 private:
  const nlohmann::json& config_;
};

constexpr double kInf = 1e308;

// ---- the sections every training recipe shares ----------------------------------------------------------

struct ModelSection {
  std::string path;          ///< HF folder, .gguf file or cached hub id
  std::string init;          ///< "pretrained" | "random"
  std::string config;        ///< config.json for init = random
  std::string tokenizer;     ///< folder with tokenizer files; "" = model.path or model.config's folder
  std::string dtype;         ///< "bfloat16" | "float32" | "float16"
  std::string device;        ///< "auto" | "cpu" | "cuda" | "cuda:N"
  std::string base_weights;  ///< "auto" | "dense" | "fp8" | "int8": how a frozen base is held
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
  std::string mixed_precision;  ///< "none" | "bf16" (fp32 master weights, bf16 autocast)
  int64_t loss_chunk = 4096;    ///< token rows per chunk of the chunked cross-entropy
  uint64_t seed = 0;
  bool skip_nonfinite_steps = false;  ///< a step with a non-finite loss or gradient norm makes no update
  std::string dist_backend = "auto";  ///< "auto" | "gloo" | "nccl": the c10d backend of a torchrun launch
  double dist_timeout_s = 300;        ///< bound on every collective and on the rendezvous
  int64_t zero_stage = 0;             ///< 1: AdamW state sharded across ranks (ZeRO-1); 2: and gradients; 3: and parameters; 0: replicated
  double dist_bucket_mb = 25;         ///< gradient bucket size of the reduce (MiB), as DDP's bucket_cap_mb
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
};

/// The defaults of the shared sections: {"model", "data", "train", "eval", "output"}, output.dir = output_dir.
/// A recipe adds its own sections and keys to this object.
nlohmann::json training_defaults(const std::string& output_dir);

/// Readers of the shared sections: values checked one key at a time (rules between a section's keys
/// included); what only some recipes allow (model.init "random", train.mixed_precision) is for the recipe.
ModelSection read_model_section(const ConfigReader& r);
DataSection read_data_section(const ConfigReader& r);
TrainSection read_train_section(const ConfigReader& r);
/// train.zero_stage 3 shards a CausalLM's parameters by decoder layer (train/zero3.h), which only anvil train's
/// full training wires up: the other recipes refuse it naming the key ("anvil lora" in the message).
void refuse_zero_stage_3(const TrainSection& t, const std::string& recipe);
EvalSection read_eval_section(const ConfigReader& r);
OutputSection read_output_section(const ConfigReader& r);

}  // namespace anvil::train
