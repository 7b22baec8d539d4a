// The attention side of a decoder layer: the small building blocks (Linear, Embedding, RmsNorm),
// rotary position embeddings, the KV cache, grouped-query attention (Llama, Mistral, Qwen2, Qwen3,
// Mixtral) and DeepSeek's multi-head latent attention (MLA).
//
// Every module is a torch::nn::Module whose parameter names are the names of the Hugging Face
// checkpoint (q_proj.weight, kv_a_proj_with_mqa.weight, ...), so a model's named_parameters() are
// the checkpoint's keys. Linear and Embedding are anvil's own, allocated empty in the requested
// dtype and device: torch::nn::Linear would first run a random initialisation that a loaded model
// throws away (minutes for a 7B model on a CPU).
//
// The numerics follow transformers 5.17's modeling files line by line (RMSNorm in fp32 then cast
// back, cos/sin computed in fp32 then cast to the model dtype, rotate_half or interleaved pairs).
#pragma once

#include "anvil/model/config.h"

#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace anvil::model {

class Linear;

/// One input read by several Linears (attention's q/k/v projections, an MLP's gate and up): the activation
/// quantization their weight formats run (fp8 1x128 blocks for "fp8", fp8 per token for "fp8-channel" and
/// "fp8-tensor", int8 per token for "w8a8") is computed once on first use and reused by the others, instead of
/// once per layer. It holds x; make one per forward, never keep it past the forward (x may change in place).
class SharedInput {
 public:
  explicit SharedInput(at::Tensor x) : x_(std::move(x)) {}
  const at::Tensor& x() const { return x_; }
  /// x as (M, K) rows quantized as `kind` ("fp8-block1x128", "fp8-row", "int8-row"): (values, scale_inv), made
  /// by the quantize ops on the first call for that kind.
  const std::pair<at::Tensor, at::Tensor>& quantized(const std::string& kind);

 private:
  at::Tensor x_;
  std::vector<std::pair<std::string, std::pair<at::Tensor, at::Tensor>>> quantized_;  // at most three kinds
};

/// A trainable side path attached to one Linear (LoRA, DoRA: lora/ implements it). The core only
/// calls it; it knows nothing of how the adapter is built, saved or merged. The adapter is not a
/// registered submodule, so the model's parameter names (the checkpoint's keys) never change; a
/// pipeline enumerates the adapter's parameters itself.
class LinearAdapter {
 public:
  virtual ~LinearAdapter() = default;
  /// The layer's output given its input x (..., in) and the base output base_out = x W^T + b
  /// (..., out): base_out + delta for LoRA, a rescaled base_out + delta for DoRA.
  virtual at::Tensor forward(const Linear& base, const at::Tensor& x, const at::Tensor& base_out) = 0;
};

/// y = x W^T + b; parameters "weight" (out, in) and, when `bias`, "bias" (out). With an adapter
/// attached, y = adapter->forward(*this, x, x W^T + b).
///
/// A frozen base weight may be held quantized (LoRA over a quantized base, quantized checkpoints kept as
/// stored). Formats (docs/FORMATS.md, "Linear weight formats"; the buffer names are the checkpoints' keys):
///   "fp8":         weight (out, in) float8_e4m3fn + buffer "weight_scale_inv" (ceil(out/128), ceil(in/128)) fp32,
///                  DeepSeek-V3's FineGrainedFP8 layout; x is quantized to 1x128 blocks on the fly and the
///                  product runs in anvil::ops::fp8_gemm (the sm_90a FP8 GEMM), as anvil::ops::fp8_linear does.
///   "fp8-channel": weight (out, in) e4m3 + "weight_scale" (out, 1) fp32 (compressed-tensors FP8 channel,
///                  llm-compressor FP8_DYNAMIC); x quantized per token (quantize_fp8 "row") -> anvil::ops::fp8_gemm.
///   "fp8-tensor":  weight (out, in) e4m3 + "weight_scale" () fp32 ((1) and (1, 1) are taken as ()); x per token
///                  as above -> fp8_gemm.
///   "w8a8":        weight (out, in) int8 + "weight_scale" (out, 1) (or ()) fp32, symmetric; x quantized per token
///                  to int8 (quantize_int8 "row") -> anvil::ops::int8_gemm (the INT8 tensor cores).
///   "int8":        weight-only: weight (out, in) int8 + "weight_scale" (out, in / group) fp32, optional
///                  "weight_zero_point" (out, in / group) int8: W = (q - zero_point) * scale per group of
///                  `group` consecutive inputs (group = in: per channel, the default) (compressed-tensors W8A16).
///   "int4":        as "int8" with q in [-8, 7] held unpacked in int8 (compressed-tensors W4A16, GPTQ); group 128
///                  by default.
/// Weight-only formats dequantize W to x's dtype for each product and never keep it dense. The weight then
/// takes no gradient (the bias still may); dX flows through W dequantized to dY's dtype, so LoRA trains over
/// every format.
class Linear : public torch::nn::Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);
  /// The same, the input's activation quantization shared with the other Linears that read it (SharedInput).
  at::Tensor forward(SharedInput& in);
  /// Quantizes the current (dense) weight in place, round to nearest with the quantize ops' arithmetic
  /// (symmetric; scale = max(amax, 1e-10) / qmax, qmax 448 for e4m3, 127 for int8, 7 for int4). group_size
  /// (int8, int4 only): 0 = the format's default (int8: in_features, int4: 128), else a divisor of in_features.
  /// Frees the dense weight.
  void quantize_weight(const std::string& format, int64_t group_size = 0);
  /// Takes an already quantized weight (straight from a checkpoint, or empty tensors of the right shapes that
  /// loading then fills); shapes and dtypes as listed above, each mismatch an error naming the tensor.
  /// zero_point: int8 / int4 only (asymmetric); group_size: 0 = implied by scale's shape, else checked against
  /// it. Frees the dense weight.
  void set_quantized_weight(const std::string& format, const at::Tensor& q, const at::Tensor& scale,
                            const at::Tensor& zero_point = {}, int64_t group_size = 0);
  /// "" (dense) or one of the formats above.
  const std::string& weight_format() const { return weight_format_; }
  /// Inputs per scale group of an int8 / int4 weight (0 for the other formats).
  int64_t group_size() const;
  /// The weight as a dense (out, in) tensor of `dtype` (dequantized when quantized, every format).
  at::Tensor dense_weight(at::ScalarType dtype) const;
  at::Tensor weight;        ///< (out, in): the model dtype, or e4m3 / int8 when quantized
  at::Tensor weight_scale;  ///< quantized only: the dequantization multipliers (see above)
  at::Tensor weight_zero_point;  ///< int8 / int4 with zero points only, else undefined
  at::Tensor bias;  ///< undefined when absent
  std::shared_ptr<LinearAdapter> adapter;  ///< null = plain linear

 private:
  std::string weight_format_;
};

/// Every Linear under `root` with its checkpoint module name ("model.layers.0.self_attn.q_proj",
/// "model.layers.1.mlp.experts.3.gate_proj", "lm_head"), in module order. LoRA targeting and the
/// PEFT adapter keys use these names.
std::vector<std::pair<std::string, std::shared_ptr<Linear>>> named_linears(torch::nn::Module& root);

/// Token embedding table, parameter "weight" (V, H).
class Embedding : public torch::nn::Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& ids);  ///< (B, S) int64 -> (B, S, H)
  at::Tensor weight;
};

/// RMSNorm as transformers computes it: x * rsqrt(mean(x^2) + eps) in fp32, cast back to x's
/// dtype, then times "weight".
class RmsNorm : public torch::nn::Module {
 public:
  RmsNorm(int64_t dim, double eps, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};

/// Rotary embedding tables: inverse frequencies per RopeConfig (default, linear, llama3, yarn),
/// computed once in fp32 as transformers' ROPE_INIT_FUNCTIONS do.
class RotaryEmbedding {
 public:
  explicit RotaryEmbedding(const RopeConfig& rope);
  /// positions (B, S) int64 -> (cos, sin), each (B, S, dim) in `dtype`, scaled by attention_factor.
  std::pair<at::Tensor, at::Tensor> cos_sin(const at::Tensor& positions, at::ScalarType dtype) const;
  const at::Tensor& inv_freq() const { return inv_freq_; }  ///< (dim / 2) fp32, CPU

 private:
  RopeConfig rope_;
  at::Tensor inv_freq_;
};

/// Rotates x (B, H, S, d) by (cos, sin) (B, S, d): halves (rotate_half) or interleaved pairs.
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleave);

/// One layer's cache: two tensors (B, H, L, D) grown along L (capacity doubles, so appending a token
/// copies only that token). GQA keeps (keys, values) after RoPE; MLA keeps its compressed latent
/// (kv_a_layernorm output, (B, 1, L, kv_lora_rank)) and the rotated shared key (B, 1, L, rope_dim),
/// as transformers' DeepSeek attention does.
class LayerCache {
 public:
  /// Appends a (B, H, S, D1) and b (B, H, S, D2); returns views of everything cached, (B, H, L, D).
  std::pair<at::Tensor, at::Tensor> append(const at::Tensor& a, const at::Tensor& b);
  int64_t length() const { return length_; }
  /// Keeps the batch rows `rows` (int64 indices, in that order) and drops the others (finished generations).
  void keep_rows(const at::Tensor& rows);

 private:
  at::Tensor a_, b_;
  int64_t length_ = 0;
};

/// The cache of a whole model: one LayerCache per decoder layer.
struct KvCache {
  std::vector<LayerCache> layers;
  /// Tokens already cached (the position of the next token).
  int64_t length() const { return layers.empty() ? 0 : layers[0].length(); }
  /// LayerCache::keep_rows on every layer.
  void keep_rows(const at::Tensor& rows) {
    for (auto& l : layers) l.keep_rows(rows);
  }
};

/// Which keys a query may see: causal (optionally within a sliding window), offset by the tokens
/// already in the cache. `mask` (S, L) bool, true = attend, is built only when `causal` alone cannot
/// say it (a cache offset with several new tokens, or a sliding window).
/// Packed documents take one of two forms: `mask` (B, 1, S, S) limited to each query's document, or,
/// on the varlen path, no mask at all but `cu_seqlens`: the document boundaries over the B * S tokens
/// flattened row after row, which anvil's sparse_attention op takes directly (no S x S tensor, and no
/// work on key tiles of other documents).
struct AttentionMask {
  at::Tensor mask;
  bool causal = true;
  at::Tensor cu_seqlens;  ///< (docs + 1) int32, on the varlen path only
  int64_t window = 0;     ///< the sliding window of the varlen path (0: none)
  /// Builds the mask for S new tokens after `offset` cached ones; window 0 = none.
  static AttentionMask make(int64_t seq_len, int64_t offset, int64_t window, const at::Device& device);
  /// The varlen form for packed rows: doc_ids (B, S), a document a run of equal ids within a row.
  static AttentionMask packed(const at::Tensor& doc_ids, int64_t window);
};

/// Whether packed rows of `seq_len` tokens take the varlen path (sparse_attention with cu_seqlens) rather
/// than a (B, 1, S, S) mask: on CUDA for bf16/fp16 and the head dims the op has kernels for (64, 128; MLA
/// 192/128), from kVarlenMinSeqLen tokens per row. ANVIL_PACKED_ATTENTION=mask or =varlen forces one
/// (varlen on the CPU runs the op's reference loops).
bool use_varlen_for_packed(const at::Device& device, at::ScalarType dtype, int64_t qk_head_dim, int64_t v_head_dim,
                           int64_t seq_len);

/// Rows this long or longer take the varlen path by default. Measured forward + backward on the H100
/// (bench/profile/packed_attention.py, 16/4 heads, D 128, bf16, 2026-11-23), SDPA's memory-efficient kernel
/// with the document mask / anvil varlen: S 1024 0.67-0.68x (documents of ~190 and ~590 tokens), S 4096
/// 1.96x / 0.95x (~220 / ~1640), S 8192 4.21x / 1.84x: below 4096 the mask's S^2 work is cheaper than
/// the sparse kernel's backward, above it the work skipped on other documents wins.
constexpr int64_t kVarlenMinSeqLen = 4096;

/// softmax(q k^T * scale + mask) v for q (B, Hq, S, D), k (B, Hk, L, D), v (B, Hk, L, Dv), Hq a
/// multiple of Hk (grouped-query: each kv head serves Hq / Hk query heads). backend "sdpa" (torch's
/// scaled_dot_product_attention) or "eager". -> (B, Hq, S, Dv)
at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionMask& mask,
                  double scale, const std::string& backend);

/// Grouped-query attention: q_proj, k_proj, v_proj, o_proj (+ q_norm, k_norm for Qwen3). `config`
/// must outlive the module (CausalLM owns it), as for every module below.
class GqaAttention : public torch::nn::Module {
 public:
  GqaAttention(const ModelConfig& config, const at::TensorOptions& options);
  /// x (B, S, H) -> (B, S, H); cos/sin (B, S, head_dim); cache may be null.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                     LayerCache* cache);

 private:
  const ModelConfig& config_;
  std::shared_ptr<Linear> q_proj_, k_proj_, v_proj_, o_proj_;
  std::shared_ptr<RmsNorm> q_norm_, k_norm_;
};

/// DeepSeek multi-head latent attention: q_proj or q_a_proj + q_a_layernorm + q_b_proj;
/// kv_a_proj_with_mqa -> (latent, shared rotary key); kv_a_layernorm; kv_b_proj expands the latent
/// into per-head k_nope and v; o_proj. Softmax scale ModelConfig::attention_scale (yarn mscale).
class MlaAttention : public torch::nn::Module {
 public:
  MlaAttention(const ModelConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const AttentionMask& mask,
                     LayerCache* cache);

 private:
  const ModelConfig& config_;
  std::shared_ptr<Linear> q_proj_, q_a_proj_, q_b_proj_, kv_a_proj_, kv_b_proj_, o_proj_;
  std::shared_ptr<RmsNorm> q_a_layernorm_, kv_a_layernorm_;
};

}  // namespace anvil::model
