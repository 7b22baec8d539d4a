// The gguf-* schemes of `anvil quantize` (gguf-q8_0, gguf-q4_0, gguf-q4_k_m, gguf-q5_k_m, gguf-q6_k): the model is
// written as one GGUF file by the core export (anvil::model::export_gguf: llama-quantize's tensor types and ggml's
// reference quantizers, so llama.cpp and Ollama load it), then read back through anvil's GGUF loader and measured
// like the other schemes (per-tensor weight SQNR, sizes, perplexity and KL on --eval).
//
// Why a separate path: llama.cpp quantizes without calibration (no importance matrix here), per tensor and in the
// file's own block formats, so the layer-by-layer calibration stream and the safetensors shards of the other
// schemes do not apply; the export already streams one tensor at a time and writes atomically.
//
// --out: a path ending in ".gguf" is the file itself (its report beside it as FILE.report.json); any other path is
// a folder that receives model.gguf and report.json (written as OUT.tmp and renamed, as the other schemes do).
#pragma once

#include "anvil/model/config.h"
#include "anvil/train/trainer.h"
#include "quantize/recipe.h"
#include "quantize/schemes.h"

#include <string>

namespace anvil::quantize {

/// Whether the scheme is one of the gguf-* ones.
bool is_gguf_scheme(const Scheme& s);

/// The export type of a gguf-* scheme ("gguf-q4_k_m" -> "q4_k_m").
std::string gguf_export_type(const Scheme& s);

/// Runs a gguf-* scheme on the checked config `c` (source folder `source`, its config `config`).
int run_gguf_recipe(const RecipeConfig& c, const train::RunOptions& options, const std::string& source,
                    const model::ModelConfig& config, const Scheme& scheme);

}  // namespace anvil::quantize
