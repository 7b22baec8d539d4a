// The causal language model: embed_tokens -> decoder layers -> norm -> lm_head, for every family of
// ModelConfig. Module names mirror transformers' <Family>ForCausalLM, so named_parameters() are the
// Hugging Face checkpoint keys ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
// "lm_head.weight"); loading, saving, LoRA targeting and PEFT export share that one naming.
//
// Checkpoints are read and written in Hugging Face layout (config.json + safetensors, sharded with
// model.safetensors.index.json) through anvil::io. Loading canonicalises the spellings checkpoints
// use (Mixtral's `mlp.` vs `block_sparse_moe.`, per-expert vs fused 3-D expert tensors) and
// dequantizes FineGrainedFP8 weights (F8_E4M3 `weight` + `weight_scale_inv` 128x128 blocks) to the
// model dtype with anvil::ops::dequantize_fp8.
#pragma once

#include "anvil/model/attention.h"
#include "anvil/model/config.h"
#include "anvil/model/moe.h"

#include <c10/util/Optional.h>
#include <torch/nn/modules/container/modulelist.h>

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace anvil::model {

/// input_layernorm -> self_attn (GQA or MLA) -> residual -> post_attention_layernorm -> MLP or MoE
/// (named "mlp", or "block_sparse_moe" for Mixtral) -> residual.
class DecoderLayer : public torch::nn::Module {
 public:
  DecoderLayer(const ModelConfig& config, int64_t layer_index, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                     LayerCache* cache);

 private:
  std::shared_ptr<RmsNorm> input_layernorm_, post_attention_layernorm_;
  std::shared_ptr<GqaAttention> gqa_;
  std::shared_ptr<MlaAttention> mla_;
  std::shared_ptr<SwiGluMlp> mlp_;
  std::shared_ptr<MoeBlock> moe_;
};

/// The base model ("model." in the checkpoint): embed_tokens, layers, norm.
class TransformerModel : public torch::nn::Module {
 public:
  TransformerModel(const ModelConfig& config, const at::TensorOptions& options);
  /// input_ids (B, S) -> final hidden states (B, S, H).
  /// doc_ids (B, S) int: packed rows; a token attends only to earlier tokens of its own document.
  /// key_mask (B, L) bool, L = cached + new tokens: false marks a pad key that no query sees (left padding).
  at::Tensor forward(const at::Tensor& input_ids, const at::Tensor& positions, KvCache* cache,
                     const at::Tensor& doc_ids = at::Tensor(), const at::Tensor& key_mask = at::Tensor());
  std::shared_ptr<Embedding> embed_tokens;

  /// Training: when on (and grad mode is on, without a cache), each decoder layer runs under
  /// anvil::train::checkpoint (activations recomputed in backward instead of stored).
  void set_gradient_checkpointing(bool on) { gradient_checkpointing_ = on; }
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

  /// One decoder layer's forward on its input (its rotary tables and mask bound): (B, S, H) -> (B, S, H).
  using LayerFn = std::function<at::Tensor(const at::Tensor& x)>;
  /// Runs layer `layer` (0-based) as `forward(x)` would, with whatever it does around it (ZeRO-3's parameter
  /// gathering, train/zero3.h). The model knows nothing of what the wrapper does; it must return the layer's
  /// output and may keep `forward` for a backward recomputation (the handles it binds stay valid).
  using LayerWrapper = std::function<at::Tensor(int64_t layer, const LayerFn& forward, const at::Tensor& x)>;
  /// When set (and without a KV cache), every decoder layer of forward() runs through `wrapper` instead of
  /// gradient checkpointing's own call; empty (the default) restores the plain loop.
  void set_layer_wrapper(LayerWrapper wrapper) { layer_wrapper_ = std::move(wrapper); }
  bool has_layer_wrapper() const { return bool(layer_wrapper_); }
  int64_t num_layers() const { return int64_t(layer_list_.size()); }

 private:
  const ModelConfig& config_;
  RotaryEmbedding rotary_;
  torch::nn::ModuleList layers_;
  std::vector<std::shared_ptr<DecoderLayer>> layer_list_;
  std::shared_ptr<RmsNorm> norm_;
  bool gradient_checkpointing_ = false;
  LayerWrapper layer_wrapper_;
};

/// <Family>ForCausalLM.
class CausalLM : public torch::nn::Module {
 public:
  /// An uninitialised model (parameters empty) in `options`' dtype and device; load weights next.
  CausalLM(ModelConfig config, const at::TensorOptions& options);

  /// input_ids (B, S) int64 -> logits (B, S, V) in the model dtype. With a cache, the tokens follow
  /// those cached (positions continue from cache->length()) and their keys/values are appended.
  /// positions (B, S) int64 overrides the default positions.
  /// doc_ids (B, S) (anvil::data::pack_examples' document ids) keeps packed documents apart: a token
  /// attends only to earlier tokens with its doc id (pass the per-document positions too). Not with a cache.
  /// attention_mask (B, L) (bool or integer, nonzero = a real token), L = the cached tokens + S: transformers'
  /// attention_mask for left-padded rows; a pad key is seen by no query (a pad query sees only itself, so that
  /// no softmax row is empty). Pass positions that start at each row's first real token. Not with doc_ids.
  at::Tensor forward(const at::Tensor& input_ids, KvCache* cache = nullptr,
                     const c10::optional<at::Tensor>& positions = c10::nullopt,
                     const c10::optional<at::Tensor>& doc_ids = c10::nullopt,
                     const c10::optional<at::Tensor>& attention_mask = c10::nullopt);

  /// The final hidden states (B, S, H), before lm_head.
  at::Tensor hidden_states(const at::Tensor& input_ids, KvCache* cache = nullptr,
                           const c10::optional<at::Tensor>& positions = c10::nullopt,
                           const c10::optional<at::Tensor>& doc_ids = c10::nullopt,
                           const c10::optional<at::Tensor>& attention_mask = c10::nullopt);

  /// An empty cache for this model.
  KvCache make_cache() const;

  const ModelConfig& config() const { return config_; }
  at::ScalarType dtype() const;
  at::Device device() const;

  /// Parameters and persistent buffers by checkpoint name, in module order: what save writes.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;

  /// Copies checkpoint tensors into the model (converting dtype and device). Names are
  /// canonicalised and FP8 weights dequantized first. Throws std::runtime_error naming the missing,
  /// unexpected or wrongly shaped tensors.
  void load_state(const std::unordered_map<std::string, at::Tensor>& tensors);

  std::shared_ptr<TransformerModel> model;
  std::shared_ptr<Linear> lm_head;  ///< null when tie_word_embeddings

 private:
  ModelConfig config_;
};

/// One decoder layer built alone, for work that streams a model a layer at a time (quantization
/// calibration in `anvil quantize`: about one layer resident). `tensors` holds checkpoint tensors by
/// checkpoint name; those of layer `index` ("model.layers.{index}.*") are canonicalised and FP8-dequantized
/// as load_state does and copied in, the rest ignored. Throws naming missing or wrongly shaped tensors.
/// The layer keeps references into `config`, which must outlive it.
std::shared_ptr<DecoderLayer> load_decoder_layer(const ModelConfig& config, int64_t index,
                                                 const std::unordered_map<std::string, at::Tensor>& tensors,
                                                 const at::TensorOptions& options);

/// What DecoderLayer::forward takes besides its input, for rows of tokens at `positions` (B, S) int64 without
/// a cache: the rotary tables (B, S, rope_dim) in `dtype` and the causal mask of layer `index` (its sliding
/// window where it has one), as TransformerModel::forward builds them.
struct DecoderLayerInputs {
  at::Tensor cos, sin;
  AttentionMask mask;
};
DecoderLayerInputs decoder_layer_inputs(const ModelConfig& config, int64_t index, const at::Tensor& positions,
                                        at::ScalarType dtype);

/// Loads a Hugging Face checkpoint directory (or a hub id in the local HF cache): config.json +
/// safetensors. dtype defaults to the config's (`dtype`/`torch_dtype`; bf16 for FP8 checkpoints;
/// fp32 when absent). The model comes back in eval mode, as from transformers' from_pretrained.
/// base_weights: how the Linear weights (lm_head excluded) are held (anvil::model::Linear, "quantized"):
///   "auto":  FP8 checkpoints keep their FP8 weights where the FP8 GEMM runs (an sm_90 GPU), else all dense
///   "dense": every weight dequantized to the model dtype
///   "fp8":   FP8 weights as stored; a dense checkpoint is quantized at load (128x128 blocks; layers whose
///            in_features is not a multiple of 128 stay dense)
///   "int8":  int8 weight-only, per-output-channel scales, quantized at load
///   "fp8-channel": e4m3 weights with per-output-channel scales, activations quantized per token (fp8_gemm)
///   "fp8-tensor":  e4m3 weights with one per-tensor scale, activations per token (fp8_gemm)
///   "w8a8":  int8 weights per output channel, activations quantized to int8 per token (int8_gemm, the INT8
///            tensor cores)
///   "int4":  int4 weight-only (unpacked in int8), symmetric, groups of 128 inputs (layers whose in_features
///            is not a multiple of 128 stay dense)
/// The quantized formats other than an FP8 checkpoint kept as "fp8" are quantized at load by round to nearest
/// (Linear::quantize_weight; docs/FORMATS.md "Linear weight formats").
/// A quantized model is for inference and LoRA over a frozen base; save_causal_lm refuses it.
std::shared_ptr<CausalLM> load_causal_lm(const std::string& path,
                                         c10::optional<at::ScalarType> dtype = c10::nullopt,
                                         at::Device device = at::kCPU, const std::string& base_weights = "auto");

/// Quantizes every dense Linear weight but lm_head's in place: "fp8", "fp8-channel", "fp8-tensor", "w8a8",
/// "int8" or "int4" (as load_causal_lm's base_weights; Linear::quantize_weight). group_size (int8 / int4 only):
/// 0 = the format's default (int8 per channel, int4 128), else the inputs per scale group; a layer whose
/// in_features the group (or fp8's 128) does not divide stays dense. Returns how many layers were quantized.
int64_t quantize_base_weights(CausalLM& model, const std::string& format, int64_t group_size = 0);

/// Writes config.json (the loaded one, `dtype` updated, `quantization_config` dropped since weights
/// are saved dequantized) and the weights as safetensors in Hugging Face layout (sharded above
/// max_shard_bytes, with model.safetensors.index.json).
void save_causal_lm(const CausalLM& model, const std::string& dir, int64_t max_shard_bytes = 5'000'000'000);

/// "float32", "bfloat16", "float16" <-> at::ScalarType; throws for other names.
at::ScalarType dtype_from_name(const std::string& name);
std::string dtype_name(at::ScalarType dtype);

/// The dtype a user names: "float32", "bfloat16", "float16", or "auto" (nullopt: the checkpoint's) when
/// allow_auto. `what` names the option or key in errors ("--dtype", "config key model.dtype").
c10::optional<at::ScalarType> parse_dtype(const std::string& name, const std::string& what, bool allow_auto);

/// The device a user names: "cpu", "cuda", "cuda:N", or "auto" / "" (cuda when a GPU is present, else cpu).
/// Throws std::invalid_argument naming `what` for another name or for cuda without a CUDA device.
at::Device parse_device(const std::string& name, const std::string& what);

}  // namespace anvil::model
