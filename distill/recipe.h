// `anvil distill`: knowledge distillation from a frozen teacher into a smaller student in one process
// (online). The student is loaded from a Hugging Face folder, built at random from a config.json, or derived
// from the teacher (a subset of its layers); trained fully or as LoRA adapters; written as a Hugging Face
// model folder that transformers loads. The loss is (1 - kd_ratio) CE + kd_ratio KD, KD one of the
// divergences of anvil/train/kd_loss.h over both models' LM heads in chunks. The config is the shared
// training sections (data, train, eval, output) plus "teacher", "student", "distill" and an optional "lora";
// the loop is the core trainer's. Every key: docs/CLI.md, "anvil distill".
#pragma once

#include "anvil/lora/lora.h"
#include "anvil/model/derive.h"
#include "anvil/train/config.h"
#include "anvil/train/cross_vocab.h"
#include "anvil/train/hidden_loss.h"
#include "anvil/train/kd_generation.h"
#include "anvil/train/kd_loss.h"
#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace anvil::distill {

struct TeacherSection {
  std::string path;          ///< HF folder or cached hub id; its tokenizer is the run's
  std::string dtype;         ///< "bfloat16" | "float32" | "float16"
  std::string device;        ///< "auto" | "cpu" | "cuda" | "cuda:N"
  std::string base_weights;  ///< "auto" | "dense" | "fp8" | "int8" (load_causal_lm's)
  // Offline distillation (anvil/train/teacher_cache.h): cache non-empty trains from the teacher's top-k cache
  // there, written first where absent or incomplete; cache_only writes it and exits.
  std::string cache;                   ///< a directory, "" = online
  int64_t cache_k = 64;                ///< top-k ids per position, in [1, vocab_size]
  std::string cache_dtype;             ///< "float16" | "bfloat16" | "float32": the log-probs' storage
  int64_t cache_shard_tokens = 1 << 20;  ///< packed positions per shard
  bool cache_only = false;
};

struct StudentSection {
  std::string init;             ///< "derived" | "pretrained" | "random"
  std::string path;             ///< init "pretrained": HF folder or cached hub id
  std::string config;           ///< init "random": a config.json
  std::vector<int64_t> layers;  ///< init "derived": the teacher layers to keep, strictly increasing
  int64_t every_nth = 0;        ///< init "derived": keep teacher layers 0, n, 2n, ... (when layers is empty)
  model::WidthOptions width;    ///< init "derived": intermediate_size, num_attention_heads, ... (0 = the teacher's)
  int64_t prune_calibration = 0;  ///< init "derived" with a width: training rows the teacher scores channels on
  std::string dtype, device;    ///< as model.dtype / model.device
};

/// The hidden-state loss (anvil/train/hidden_loss.h) of distill.hidden_*; type "none" = off.
struct HiddenSection {
  std::string type = "none";  ///< "none" | "mse" | "cosine"
  double weight = 1.0;        ///< the loss's weight in the total
  bool uniform = true;        ///< hidden_layers "uniform" (train::uniform_layer_map), else `layers`
  train::LayerMap layers;     ///< (student index, teacher index) pairs, checked against the models at run time
};

/// distill.mode "sequence": the teacher's completions of sequence.prompts ({"prompt"} or {"messages"} lines)
/// become the training data (SFT), written to sequence.output before training (train/kd_generation.h).
struct SequenceSection {
  std::string prompts;  ///< JSONL of {"prompt"} or {"messages"} lines; "" = data.train
  std::string output;   ///< the JSONL written; "" = <output.dir>/teacher_data.jsonl
  int64_t batch_size = 16, max_new_tokens = 128, top_k = 0;
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
};

/// distill.vocab "cross-tokenizer" (experimental): a student with its own tokenizer, distilled by TRL GOLD's
/// ULD (train/cross_vocab.h); the keys are GOLD's GOLDConfig names (uld_*).
struct CrossVocabSection {
  bool on = false;  ///< distill.vocab "cross-tokenizer" ("same": one tokenizer, padded rows mapped, the default)
  train::CrossVocabOptions options;  ///< uld_use_hybrid_loss, uld_hybrid_*_weight, temperatures, skips, merge
};

/// The typed, validated config of `anvil distill`.
struct RecipeConfig {
  TeacherSection teacher;
  StudentSection student;
  train::KdOptions kd;     ///< distill.loss, temperature, skew_lambda, jsd_beta, chunk
  double kd_ratio = 0.5;   ///< distill.kd_ratio: loss = (1 - kd_ratio) CE + kd_ratio KD
  CrossVocabSection cross;  ///< distill.vocab, distill.uld_*
  HiddenSection hidden;    ///< distill.hidden_loss, hidden_weight, hidden_layers (+ hidden_weight * hidden loss)
  bool use_lora = false;   ///< a "lora" section was given: the student trains adapters
  std::string mode = "online";  ///< distill.mode: "online" | "sequence"
  SequenceSection sequence;     ///< mode "sequence"
  bool use_on_policy = false;   ///< an "on_policy" section was given (GKD: a fraction of student generations)
  train::OnPolicyOptions on_policy;  ///< lambda, max_new_tokens, temperature, top_k, top_p, batch_size
  /// on_policy.refresh_from (offline only): "" trains; "checkpoint" (the run's output.dir checkpoint) or a model
  /// folder: that student writes a new on-policy round of teacher.cache (train/teacher_cache.h) and the run exits.
  std::string refresh_from;
  lora::LoraConfig lora;
  train::DataSection data;
  train::TrainSection train;
  train::EvalSection eval;
  train::OutputSection output;
  nlohmann::json resolved;  ///< every key, defaults filled in
};

/// The keys `anvil distill` reads, with their defaults ("lora" included; resolve_config keeps it only when the
/// user's config has one).
train::ConfigSchema config_schema();

/// Merges `user` over the defaults, checks every key and value, returns the typed config. Throws
/// std::invalid_argument naming the key and the rule.
RecipeConfig resolve_config(const nlohmann::json& user);

/// Runs the recipe; exit statuses as the other recipes' (train::kExitOk, kExitFailed, kExitInterrupted).
int run_recipe(const RecipeConfig& config, const train::RunOptions& options);

}  // namespace anvil::distill
