// GGUF -> anvil model: the bridge from a llama.cpp model file to anvil's Hugging Face-layout CausalLM.
//
// A GGUF file carries its architecture as metadata (`general.architecture`, then `<arch>.*` keys) and
// its weights under llama.cpp's tensor names (token_embd, blk.N.attn_q, ...), dequantized here by
// anvil::io::GgufFile. Rather than a second model-construction path, the metadata is translated into
// the config.json that transformers would write for the same model (so ModelConfig parsing, defaults
// and checks stay in one place, and save_causal_lm writes a complete Hugging Face checkpoint), and the
// tensors are renamed to the Hugging Face checkpoint keys that CausalLM::load_state expects.
//
// llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.modify_tensors) permutes the rows of the q and
// k projections so that each head's rotary pairs are interleaved (ggml's "normal" RoPE rotates adjacent
// pairs; transformers' rotate_half rotates the two halves). The import undoes that permutation, so the
// weights are exactly the Hugging Face ones and the logits match transformers'.
//
// Supported: general.architecture "llama" (Llama, Mistral-style and SmolLM models that llama.cpp files
// under it), without rope scaling tables (rope_freqs) or attention biases. Anything else is an error
// naming the key or tensor.
#pragma once

#include "anvil/io/gguf.h"
#include "anvil/model/config.h"

#include <string>
#include <unordered_map>

namespace anvil::model {

/// The config.json text (transformers' LlamaConfig keys) that describes the GGUF file's model. Throws
/// naming the file and the key for an unsupported architecture or a missing/ill-typed key.
std::string gguf_config_json(const anvil::io::GgufFile& file);

/// parse_model_config(gguf_config_json(file)).
ModelConfig gguf_model_config(const anvil::io::GgufFile& file);

/// Every tensor of the file, dequantized to fp32, under its Hugging Face checkpoint name
/// ("model.layers.0.self_attn.q_proj.weight", ...), q/k projections un-permuted back to Hugging Face row
/// order. Throws naming a tensor that has no Hugging Face counterpart.
std::unordered_map<std::string, at::Tensor> gguf_model_tensors(const anvil::io::GgufFile& file,
                                                                const ModelConfig& config);

/// The Hugging Face name of a llama.cpp tensor name ("blk.3.ffn_up.weight" -> "model.layers.3.mlp.up_proj.weight"),
/// or "" when it has none.
std::string gguf_to_hf_name(const std::string& gguf_name);

/// Reverses llama.cpp's q/k row permutation: w (n_head * head_dim, in) with each head's rows in
/// (head_dim/2, 2) order -> (2, head_dim/2) order, as transformers' rotate_half expects.
at::Tensor gguf_unpermute_qk(const at::Tensor& w, int64_t n_head);

}  // namespace anvil::model
