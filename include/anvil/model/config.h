// ModelConfig: everything anvil's causal LM needs to know about an architecture, read from a
// Hugging Face config.json. One flat struct for every supported family (Llama, Mistral, Qwen2,
// Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2, DeepSeek-V3) rather than a class per family: the families differ in
// a handful of switches (q/k norm, qkv bias, MoE, MLA), and one struct keeps those switches visible.
//
// Both spellings of config.json are accepted: transformers 4.x (top-level `rope_theta`,
// `rope_scaling`) as published checkpoints write it, and transformers 5.x (`rope_parameters`,
// `rope_interleave`, `head_dim`). Keys a family cannot do without are required and their absence is
// an error naming them; optional keys take the defaults of transformers 5.17's configuration classes.
#pragma once

#include "anvil/model/sparse_attention.h"

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::model {

/// The supported architectures (config.json `architectures[0]`).
enum class ModelFamily { kLlama, kMistral, kQwen2, kQwen3, kMixtral, kQwen2Moe, kQwen3Moe, kDeepseekV2, kDeepseekV3 };

/// "LlamaForCausalLM", ... for a family.
std::string family_architecture(ModelFamily family);

/// Rotary position embedding, as transformers' modeling_rope_utils computes it.
struct RopeConfig {
  /// "default", "linear", "llama3" or "yarn" (`rope_type`, or 4.x `rope_scaling.type`).
  std::string type = "default";
  /// Base wavelength (`rope_theta`).
  double theta = 10000.0;
  /// Rotated dimensions per head: head_dim (qk_rope_head_dim for MLA).
  int64_t dim = 0;
  /// Context scaling factor (linear, llama3, yarn).
  double factor = 1.0;
  /// llama3: `low_freq_factor`, `high_freq_factor`.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  /// llama3 and yarn: `original_max_position_embeddings` (default: max_position_embeddings).
  int64_t original_max_position_embeddings = 0;
  /// yarn: `beta_fast`, `beta_slow` (defaults 32, 1), `mscale`, `mscale_all_dim` (0 = absent),
  /// `truncate` (default true).
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
  bool truncate = true;
  /// Multiplier of cos and sin (yarn's `attention_factor`, computed when absent); 1 otherwise.
  double attention_factor = 1.0;
  /// Rotate interleaved pairs (x0, x1), (x2, x3), ... (DeepSeek: V2 always, V3 `rope_interleave`,
  /// default true) instead of the two halves (Llama's rotate_half).
  bool interleave = false;
};

/// A decoder-only causal LM. Fields carry the config.json key they come from.
struct ModelConfig {
  ModelFamily family = ModelFamily::kLlama;
  /// `architectures[0]`, e.g. "LlamaForCausalLM".
  std::string architecture;
  /// `model_type`, e.g. "llama".
  std::string model_type;

  // ---- shape ----
  int64_t vocab_size = 0;            ///< `vocab_size`
  int64_t hidden_size = 0;           ///< `hidden_size`
  int64_t intermediate_size = 0;     ///< `intermediate_size`: dense MLP width (DeepSeek: dense layers)
  int64_t num_hidden_layers = 0;     ///< `num_hidden_layers`
  int64_t num_attention_heads = 0;   ///< `num_attention_heads`
  int64_t num_key_value_heads = 0;   ///< `num_key_value_heads` (default num_attention_heads)
  int64_t head_dim = 0;              ///< `head_dim` (default hidden_size / num_attention_heads; Qwen3: 128)
  int64_t max_position_embeddings = 0;  ///< `max_position_embeddings`
  double rms_norm_eps = 1e-6;        ///< `rms_norm_eps`
  bool tie_word_embeddings = false;  ///< `tie_word_embeddings`: lm_head shares embed_tokens.weight
  std::string hidden_act = "silu";   ///< `hidden_act`; only "silu" (SwiGLU) is supported

  // ---- attention ----
  bool attention_bias = false;   ///< q/k/v/o biases (Llama, Qwen3, DeepSeek `attention_bias`); Qwen2: q/k/v always
  bool qkv_bias = false;         ///< q, k, v projections carry a bias (Qwen2; or attention_bias)
  bool o_bias = false;           ///< o_proj carries a bias (attention_bias)
  bool mlp_bias = false;         ///< `mlp_bias` (Llama, DeepSeek-V2)
  bool qk_norm = false;          ///< RMSNorm over head_dim on q and k before RoPE (Qwen3, Qwen3-MoE)
  /// `sliding_window` when in force (Mistral/Mixtral: when set; the Qwen families: when
  /// `use_sliding_window`), else 0. A query at position i sees keys j with i - window < j <= i.
  int64_t sliding_window = 0;
  /// Per layer: does sliding_window apply (Qwen2/3, Qwen2-MoE `layer_types` or `max_window_layers`;
  /// Qwen3-MoE: every layer).
  std::vector<bool> layer_sliding;
  /// Softmax scale: head_dim^-0.5 (MLA: qk_head_dim^-0.5 times yarn's mscale(factor, mscale_all_dim)^2).
  double attention_scale = 1.0;
  RopeConfig rope;
  /// anvil's attention backend, config.json key `anvil_attention_backend`: "sdpa" (default: dense
  /// torch scaled_dot_product_attention) or "eager" (matmul + softmax, for debugging).
  std::string attention_backend = "sdpa";
  /// With attention_backend "sparse" (block-sparse attention for long context, GQA layers without a KV
  /// cache or an explicit mask): window, sinks and block selection, keys `anvil_sparse_*`
  /// (include/anvil/model/sparse_attention.h). Elsewhere "sparse" computes as "eager".
  SparseAttentionSettings sparse;

  // ---- MLA (DeepSeek-V2/V3) ----
  bool mla = false;
  int64_t q_lora_rank = 0;       ///< `q_lora_rank`; 0 when null (then a plain q_proj)
  int64_t kv_lora_rank = 0;      ///< `kv_lora_rank`
  int64_t qk_nope_head_dim = 0;  ///< `qk_nope_head_dim`
  int64_t qk_rope_head_dim = 0;  ///< `qk_rope_head_dim`
  int64_t v_head_dim = 0;        ///< `v_head_dim`

  // ---- MoE (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek) ----
  /// `num_local_experts` (Mixtral; Qwen3-MoE as transformers 5.17 writes it) / `num_experts` (Qwen) /
  /// `n_routed_experts` (DeepSeek); 0 = dense
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;    ///< `num_experts_per_tok`
  int64_t moe_intermediate_size = 0;  ///< expert width (`moe_intermediate_size`; Mixtral: intermediate_size)
  int64_t n_shared_experts = 0;       ///< `n_shared_experts`: one shared MLP of n * moe_intermediate_size
  int64_t first_k_dense_replace = 0;  ///< `first_k_dense_replace`: layers [0, k) use the dense MLP
  /// `shared_expert_intermediate_size` (Qwen2-MoE): one shared MLP of this width whose output is scaled
  /// by sigmoid(shared_expert_gate(x)), a Linear hidden -> 1; 0 = none.
  int64_t shared_expert_intermediate_size = 0;
  /// `decoder_sparse_step` (Qwen-MoE): layer i is MoE when (i + 1) % step == 0 (1 = every layer).
  int64_t decoder_sparse_step = 1;
  /// `mlp_only_layers` (Qwen-MoE): layers that use the dense MLP of intermediate_size whatever the step.
  std::vector<int64_t> mlp_only_layers;
  int64_t n_group = 1;                ///< `n_group` (group-limited routing), 1 = none
  int64_t topk_group = 1;             ///< `topk_group`
  /// Gate scores: "softmax" (Mixtral, DeepSeek-V2) or "sigmoid" (DeepSeek-V3, noaux_tc).
  std::string router_score = "softmax";
  /// Divide the top-k weights by their sum (Mixtral: always; Qwen-MoE, V3: `norm_topk_prob`; V2: never,
  /// as transformers 5.17's DeepseekV2TopkRouter ignores `norm_topk_prob`).
  bool renormalize = true;
  double routed_scaling_factor = 1.0;  ///< `routed_scaling_factor`
  bool router_bias = false;            ///< gate carries e_score_correction_bias (DeepSeek-V3)
  /// Router logits in fp32 (DeepSeek: hidden states and gate weight cast to fp32) or in the model's
  /// dtype (Mixtral, Qwen-MoE).
  bool router_fp32 = false;

  // ---- tokens ----
  std::vector<int64_t> eos_token_ids;  ///< `eos_token_id` (int or list)
  int64_t bos_token_id = -1;           ///< `bos_token_id`, -1 when null
  int64_t pad_token_id = -1;           ///< `pad_token_id`, -1 when null

  /// `torch_dtype` / `dtype` as written ("bfloat16", "float32", ...), "" when absent.
  std::string dtype;
  /// Whether the checkpoint is FineGrainedFP8 (`quantization_config.quant_method` "fp8").
  bool fp8_checkpoint = false;
  /// Whether the checkpoint is compressed-tensors (`quant_method` "compressed-tensors"; the config is
  /// re-read from `json` by the loader, anvil/model/compressed_tensors.h). Its schemes were checked here.
  bool compressed_tensors_checkpoint = false;
  /// The config.json text as read, written back (with dtype updated) when the model is saved.
  std::string json;

  /// True when layer `i` uses the MoE block rather than the dense MLP (DeepSeek: from first_k_dense_replace
  /// on; Qwen-MoE: every decoder_sparse_step-th layer not in mlp_only_layers).
  bool is_moe_layer(int64_t i) const {
    if (num_experts <= 0 || i < first_k_dense_replace || (i + 1) % decoder_sparse_step != 0) return false;
    for (const int64_t d : mlp_only_layers)
      if (d == i) return false;
    return true;
  }
};

/// Parses config.json text. `source` names the file in error messages. Throws std::runtime_error
/// naming the key for a missing required key, a wrong type, an unknown architecture or an
/// unsupported setting (rope type, activation).
ModelConfig parse_model_config(const std::string& json_text, const std::string& source = "config.json");

/// Reads `path`/config.json (path a directory) or the file `path`.
ModelConfig load_model_config(const std::string& path);

}  // namespace anvil::model
