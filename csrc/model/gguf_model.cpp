// GGUF -> anvil model (include/anvil/model/gguf_model.h): metadata to config.json, llama.cpp tensor names
// to Hugging Face names, and the q/k un-permutation.
//
// The key mapping is llama.cpp's (gguf-py constants.py Keys.LLM / Keys.Attention / Keys.Rope, and the
// tensor names of MODEL_TENSOR_NAMES for LLM_ARCH_LLAMA); the config keys are transformers' LlamaConfig.
// Float metadata is stored as FLOAT32 in GGUF: it is written back as the shortest decimal that rounds
// to the same float (9.99999975e-06 -> 1e-05), so the config reads as the original config.json did.
#include "anvil/model/gguf_model.h"

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace anvil::model {
namespace {

using nlohmann::json;

// The shortest decimal text that parses back to the same float32.
double float32_decimal(double v) {
  const float f = static_cast<float>(v);
  char buf[64];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, static_cast<double>(f));
    if (std::strtof(buf, nullptr) == f) return std::strtod(buf, nullptr);
  }
  return v;
}

// A value that is FLOAT32 in the file is rounded as above; FLOAT64 and integers are kept as they are.
double metadata_float(const anvil::io::GgufFile& file, const std::string& key) {
  const auto& v = file.value(key);
  const double d = file.get_float(key);
  return v.element_type == anvil::io::GgufType::kFloat32 ? float32_decimal(d) : d;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void fail(const anvil::io::GgufFile& file, const std::string& rule) {
  throw std::runtime_error("gguf: '" + file.path() + "': " + rule);
}

// eos/bos/pad ids from tokenizer.ggml.*_token_id, when present.
void token_ids(const anvil::io::GgufFile& file, json& config) {
  if (file.has("tokenizer.ggml.bos_token_id")) config["bos_token_id"] = file.get_int("tokenizer.ggml.bos_token_id");
  if (file.has("tokenizer.ggml.eos_token_id")) config["eos_token_id"] = file.get_int("tokenizer.ggml.eos_token_id");
  if (file.has("tokenizer.ggml.padding_token_id"))
    config["pad_token_id"] = file.get_int("tokenizer.ggml.padding_token_id");
}

}  // namespace

std::string gguf_config_json(const anvil::io::GgufFile& file) {
  const std::string arch = file.get_string("general.architecture");
  if (arch != "llama")
    fail(file, "general.architecture is '" + arch + "'; anvil imports GGUF models of architecture 'llama' only");
  const std::string p = arch + ".";
  json c = json::object();
  c["architectures"] = json::array({"LlamaForCausalLM"});
  c["model_type"] = "llama";
  c["hidden_act"] = "silu";
  c["hidden_size"] = file.get_int(p + "embedding_length");
  c["intermediate_size"] = file.get_int(p + "feed_forward_length");
  c["num_hidden_layers"] = file.get_int(p + "block_count");
  const int64_t heads = file.get_int(p + "attention.head_count");
  c["num_attention_heads"] = heads;
  c["num_key_value_heads"] = file.has(p + "attention.head_count_kv") ? file.get_int(p + "attention.head_count_kv") : heads;
  if (file.has(p + "context_length")) c["max_position_embeddings"] = file.get_int(p + "context_length");
  c["rms_norm_eps"] = metadata_float(file, p + "attention.layer_norm_rms_epsilon");
  c["rope_theta"] = file.has(p + "rope.freq_base") ? metadata_float(file, p + "rope.freq_base") : 10000.0;

  const int64_t hidden = c["hidden_size"].get<int64_t>();
  if (heads <= 0 || hidden % heads != 0)
    fail(file, p + "attention.head_count " + std::to_string(heads) + " does not divide embedding_length " +
                   std::to_string(hidden));
  int64_t head_dim = hidden / heads;
  if (file.has(p + "attention.key_length")) {
    head_dim = file.get_int(p + "attention.key_length");
    c["head_dim"] = head_dim;
    if (file.has(p + "attention.value_length") && file.get_int(p + "attention.value_length") != head_dim)
      fail(file, p + "attention.value_length differs from key_length (unsupported)");
  }
  if (file.has(p + "rope.dimension_count") && file.get_int(p + "rope.dimension_count") != head_dim)
    fail(file, p + "rope.dimension_count " + std::to_string(file.get_int(p + "rope.dimension_count")) +
                   " differs from the head dimension " + std::to_string(head_dim) + " (partial rotary is unsupported)");
  if (file.has(p + "rope.scaling.type")) {
    const std::string type = file.get_string(p + "rope.scaling.type");
    if (type == "linear") {
      c["rope_scaling"] = {{"rope_type", "linear"}, {"factor", metadata_float(file, p + "rope.scaling.factor")}};
    } else if (type != "none") {
      fail(file, p + "rope.scaling.type '" + type + "' is not supported (none, linear)");
    }
  }
  if (file.contains("rope_freqs.weight"))
    fail(file, "tensor 'rope_freqs.weight' (per-frequency rope factors, Llama 3.1-style scaling) is not supported");

  // The vocabulary is the embedding's row count (the token list, when present, must agree with it).
  if (!file.contains("token_embd.weight")) fail(file, "tensor 'token_embd.weight' is missing");
  const auto& embd = file.info("token_embd.weight");
  if (embd.dims.size() != 2) fail(file, "tensor 'token_embd.weight' is not 2-D");
  const int64_t vocab = embd.dims[1];
  if (file.has("tokenizer.ggml.tokens")) {
    const auto& tokens = file.value("tokenizer.ggml.tokens");
    if (!tokens.is_array() || !tokens.is_string()) fail(file, "tokenizer.ggml.tokens must be an array of strings");
    if (static_cast<int64_t>(tokens.size()) > vocab)
      fail(file, "tokenizer.ggml.tokens has " + std::to_string(tokens.size()) + " tokens, more than the " +
                     std::to_string(vocab) + " rows of token_embd.weight");
  }
  c["vocab_size"] = vocab;
  c["tie_word_embeddings"] = !file.contains("output.weight");
  token_ids(file, c);
  return c.dump(2);
}

ModelConfig gguf_model_config(const anvil::io::GgufFile& file) {
  return parse_model_config(gguf_config_json(file), file.path() + " (GGUF metadata as config.json)");
}

std::string gguf_to_hf_name(const std::string& name) {
  if (name == "token_embd.weight") return "model.embed_tokens.weight";
  if (name == "output_norm.weight") return "model.norm.weight";
  if (name == "output.weight") return "lm_head.weight";
  if (name.rfind("blk.", 0) != 0) return "";
  const auto dot = name.find('.', 4);
  if (dot == std::string::npos || dot == 4) return "";
  const std::string layer = name.substr(4, dot - 4);
  for (char ch : layer)
    if (ch < '0' || ch > '9') return "";
  static const std::pair<const char*, const char*> kParts[] = {
      {"attn_norm.weight", "input_layernorm.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"attn_q.weight", "self_attn.q_proj.weight"},
      {"attn_k.weight", "self_attn.k_proj.weight"},
      {"attn_v.weight", "self_attn.v_proj.weight"},
      {"attn_output.weight", "self_attn.o_proj.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},
      {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"},
  };
  const std::string part = name.substr(dot + 1);
  for (const auto& [g, h] : kParts)
    if (part == g) return "model.layers." + layer + "." + h;
  return "";
}

at::Tensor gguf_unpermute_qk(const at::Tensor& w, int64_t n_head) {
  TORCH_CHECK(w.dim() == 2 && n_head > 0 && w.size(0) % (2 * n_head) == 0, "gguf: q/k weight of shape ",
              w.sizes(), " cannot be split into ", n_head, " heads of an even head dimension");
  const int64_t rows = w.size(0), cols = w.size(1), half = rows / n_head / 2;
  // llama.cpp stored rows as (head, half, 2); Hugging Face order is (head, 2, half).
  return w.reshape({n_head, half, 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

std::unordered_map<std::string, at::Tensor> gguf_model_tensors(const anvil::io::GgufFile& file,
                                                                const ModelConfig& config) {
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& info : file.tensors()) {
    const std::string hf = gguf_to_hf_name(info.name);
    if (hf.empty())
      fail(file, "tensor '" + info.name + "' has no Hugging Face Llama counterpart (anvil maps token_embd, "
                 "output_norm, output and blk.N.{attn_norm, ffn_norm, attn_q/k/v/output, ffn_gate/up/down})");
    at::Tensor t = file.tensor(info.name);  // fp32, PyTorch shape
    if (ends_with(hf, ".q_proj.weight")) t = gguf_unpermute_qk(t, config.num_attention_heads);
    else if (ends_with(hf, ".k_proj.weight")) t = gguf_unpermute_qk(t, config.num_key_value_heads);
    out.emplace(hf, std::move(t));
  }
  return out;
}

}  // namespace anvil::model
