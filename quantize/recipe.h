// `anvil quantize`: post-training quantization of a Hugging Face model into a checkpoint that transformers and
// vLLM load (FineGrainedFP8 or compressed-tensors), streamed a decoder layer at a time, with a report of what it
// cost (per-layer SQNR, sizes, perplexity and KL divergence to the unquantized model on held-out text).
// The config has four sections, "model", "quantize", "data" and "output"; every key: docs/CLI.md,
// "anvil quantize". The schemes are quantize/schemes.h's table.
#pragma once

#include "anvil/train/config.h"
#include "anvil/train/trainer.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace anvil::quantize {

struct RecipeConfig {
  // model
  std::string model_path;  ///< HF folder (or cached hub id) of the unquantized model
  std::string dtype;       ///< "auto" (the checkpoint's) | "float32" | "bfloat16" | "float16": the export's
                           ///< dtype for what stays in high precision, and the computation's
  std::string device;      ///< "auto" | "cpu" | "cuda" | "cuda:N": where each layer is calibrated / quantized
  // quantize
  std::string scheme;                ///< a name of schemes()
  std::vector<std::string> ignore;   ///< Linear modules kept in high precision: names, suffixes or "re:" regexes
  std::string misfit;                ///< "error" | "keep": a layer whose shape does not fit the scheme
  int64_t group_size = 128;          ///< group schemes (int4-weight, gptq-*)
  bool act_order = false;            ///< gptq-*: columns in decreasing Hessian diagonal order
  bool symmetric = true;             ///< group schemes: false = asymmetric, an int8 zero point per group
  double dampening = 0.01;           ///< gptq-*: fraction of the mean Hessian diagonal added to it
  double smoothquant_alpha = -1;     ///< w8a8-int8: migration strength in [0, 1]; -1 = searched on the calibration set
  // data
  std::string calib;           ///< JSONL (text / prompt+completion / messages / ids); "" = none
  int64_t calib_samples = 128, calib_seq_len = 512, calib_batch = 8;
  std::string eval;            ///< JSONL held-out text for the report; "" = no perplexity / KL
  int64_t eval_seq_len = 512, eval_max_tokens = 65536;
  // output
  std::string out;             ///< the quantized model's folder
  bool overwrite = false;      ///< replace an existing out
  std::string format;          ///< "auto" (the scheme's) | "fp8" (FineGrainedFP8) | "compressed-tensors"
  int64_t max_shard_bytes = 2'000'000'000;
  bool reload = true;          ///< after writing, load the export back and evaluate it (the report's "after")
  nlohmann::json resolved;
};

train::ConfigSchema config_schema();

/// Merges `user` over the defaults, checks every key and value; throws std::invalid_argument naming the key.
RecipeConfig resolve_config(const nlohmann::json& user);

/// Quantizes, writes out (atomically: out.tmp renamed), reloads and reports. Exit statuses as the other recipes'.
int run_recipe(const RecipeConfig& config, const train::RunOptions& options);

}  // namespace anvil::quantize
