// Hugging Face Llama-family folder -> one GGUF file, as llama.cpp's convert_hf_to_gguf.py (LlamaModel)
// writes it, plus llama-quantize's Q4_0 (which the converter does not make).
//
// The export streams: the safetensors shards are memory-mapped (io::Checkpoint) and each tensor is read,
// q/k-permuted, quantized and written before the next is touched, so host memory stays at about one
// tensor (fp32) plus its quantized bytes. The file is written to a temporary name, fsync'ed and renamed
// (io::write_gguf): an interrupted export leaves nothing at `out_path`.
//
// Names: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
// ffn_down}, output_norm, output (absent when the embeddings are tied), rope_freqs (Llama 3 rope
// scaling). q and k rows are permuted per head from transformers' (2, head_dim/2) order to ggml's
// (head_dim/2, 2) (LlamaModel.permute; the inverse of gguf_unpermute_qk). Types: see docs/FORMATS.md
// "GGUF export": 1-D tensors and norms F32; 2-D weights the chosen type; for f32/f16/bf16/q8_0 a row length
// that is not a multiple of the block size falls back to F16 (the converter's QuantError fallback); the
// quantized types are llama-quantize's mixes (gguf_tensor_type: llama_tensor_get_type's rules, the output
// matrix Q6_K, attn_v / ffn_down promoted on some layers for q4_k_m / q5_k_m, fallbacks for rows not a
// multiple of 256).
//
// The tokenizer metadata comes from anvil::data::gguf_tokenizer_metadata (data/, which model does not
// depend on) through the options.tokenizer_metadata callback; bindings and the CLI set it.
#pragma once

#include "anvil/io/gguf.h"

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace anvil::model {

struct GgufExportOptions {
  /// "f32", "f16", "bf16", "q8_0" (the converter's outtypes), "q4_0", "q4_k_m", "q5_k_m" or "q6_k" (llama-quantize's
  /// Q4_0, Q4_K_M, Q5_K_M, Q6_K mixes).
  std::string type = "q8_0";
  /// general.name; the model folder's name when empty.
  std::string name;
  /// Replace an existing out_path; refused otherwise.
  bool overwrite = false;
  /// Makes the tokenizer.* keys, appended after the model's, from config.json's vocab_size once the
  /// config has been checked: [dir](int64_t vocab) { return anvil::data::gguf_tokenizer_metadata(dir, vocab); }.
  /// Empty: the file holds no tokenizer.
  std::function<std::vector<std::pair<std::string, anvil::io::GgufValue>>(int64_t vocab_size)> tokenizer_metadata;
};

struct GgufExportReport {
  std::string path;
  std::string type;                           ///< options.type
  int64_t file_type = 0;                      ///< general.file_type (LLAMA_FTYPE)
  std::map<std::string, int64_t> tensors_per_type;  ///< "Q8_0" -> count, ...
  int64_t tensors = 0;
  int64_t parameters = 0;
  uint64_t bytes = 0;                         ///< the file's size
  uint64_t source_bytes = 0;                  ///< the safetensors tensors' bytes
  double seconds = 0.0;
  /// name -> ggml type name, in file order.
  std::vector<std::pair<std::string, std::string>> tensor_types;
};

/// The LLAMA_FTYPE value (general.file_type) of an export type; throws naming the type when unknown.
int64_t gguf_export_file_type(const std::string& type);

/// The ggml type of tensor `name` (llama.cpp name, PyTorch `shape`) in an export of `type`: the converter's
/// rules for f32/f16/bf16, llama-quantize's llama_tensor_get_type (Llama architecture, no importance matrix)
/// for the quantized types, with its fallbacks for rows that are not a whole number of blocks (docs/FORMATS.md
/// "GGUF export"). `has_output`: the file holds output.weight (else token_embd serves as it); `is_70b`: llama.cpp's
/// LLM_TYPE_70B (80 layers, grouped KV heads).
uint32_t gguf_tensor_type(const std::string& type, const std::string& name, const std::vector<int64_t>& shape,
                          int64_t n_layer, bool has_output, bool is_70b = false);

/// The llama.cpp tensor name of a Hugging Face Llama checkpoint key ("model.layers.3.mlp.up_proj.weight"
/// -> "blk.3.ffn_up.weight"), or "" when it has none. The inverse of gguf_to_hf_name.
std::string hf_to_gguf_name(const std::string& hf_name);

/// llama.cpp's q/k permutation: w (n_head * head_dim, in) with each head's rows in (2, head_dim/2)
/// order -> (head_dim/2, 2). gguf_unpermute_qk undoes it.
at::Tensor gguf_permute_qk(const at::Tensor& w, int64_t n_head);

/// The rope_freqs factors convert_hf_to_gguf computes for `rope_type: llama3` scaling (head_dim/2 fp32).
at::Tensor gguf_llama3_rope_factors(double base, int64_t head_dim, double factor, double low_freq_factor,
                                    double high_freq_factor, double original_context);

/// Exports `model_dir` (config.json + safetensors) to `out_path`. Throws c10::Error naming the file,
/// key, tensor or option and the rule broken: unsupported architecture or features, unknown type,
/// existing output without overwrite, tensors that have no GGUF name.
GgufExportReport export_gguf(const std::string& model_dir, const std::string& out_path, const GgufExportOptions& options);

}  // namespace anvil::model
