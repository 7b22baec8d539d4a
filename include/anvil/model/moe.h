// The feed-forward side of a decoder layer: the SwiGLU MLP and the mixture-of-experts block.
//
// The MoE block routes with anvil's own ops (include/anvil/ops.h; docs/FORMATS.md "MoE routing"):
// moe_gate picks each token's experts and weights, moe_permute groups the token rows by expert,
// each expert runs on its contiguous block (a loop of GEMMs, in the model's dtype), and
// moe_unpermute sums each token's expert outputs with the gate weights. The same ops run the
// routing of training and of inference, on CPU and CUDA, so the model follows [moe-ops].
//
// Parameter names are those transformers 5.17's save_pretrained writes, which are also those of the
// published checkpoints: Mixtral `block_sparse_moe.gate.weight` and `block_sparse_moe.experts.{e}.
// {w1,w2,w3}.weight`; DeepSeek `mlp.gate.weight`, `mlp.gate.e_score_correction_bias` (V3),
// `mlp.experts.{e}.{gate,up,down}_proj.weight`, `mlp.shared_experts.*`; Qwen2-MoE / Qwen3-MoE `mlp.gate.weight`,
// `mlp.experts.{e}.{gate,up,down}_proj.weight`, Qwen2-MoE's `mlp.shared_expert.*` and `mlp.shared_expert_gate.weight`.
// Loading also accepts the other spellings (model/transformer.cpp canonicalises them).
#pragma once

#include "anvil/model/attention.h"
#include "anvil/model/config.h"

#include <torch/nn/modules/container/modulelist.h>

#include <array>
#include <string>

namespace anvil::model {

/// down(silu(gate(x)) * up(x)). `names` = the three projections' names, {gate, up, down}:
/// {"gate_proj", "up_proj", "down_proj"} (Llama, DeepSeek) or {"w1", "w3", "w2"} (Mixtral experts).
class SwiGluMlp : public torch::nn::Module {
 public:
  SwiGluMlp(int64_t hidden, int64_t intermediate, bool bias, const std::array<std::string, 3>& names,
            const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);  ///< (..., H) -> (..., H)

 private:
  std::shared_ptr<Linear> gate_, up_, down_;
};

/// The router: parameter "weight" (E, H); DeepSeek-V3 adds the fp32 buffer "e_score_correction_bias" (E).
class MoeGate : public torch::nn::Module {
 public:
  MoeGate(const ModelConfig& config, const at::TensorOptions& options);
  at::Tensor weight;
  at::Tensor e_score_correction_bias;  ///< undefined unless ModelConfig::router_bias
};

/// gate -> moe_gate -> moe_permute -> experts -> moe_unpermute (+ shared experts: DeepSeek's summed as they are,
/// Qwen2-MoE's one scaled by sigmoid(shared_expert_gate(x))). `config` must outlive the block (CausalLM owns it).
class MoeBlock : public torch::nn::Module {
 public:
  MoeBlock(const ModelConfig& config, const at::TensorOptions& options);
  at::Tensor forward(const at::Tensor& x);  ///< (B, S, H) -> (B, S, H)

  /// The routing of hidden (T, H): (weights (T, k) fp32, indices (T, k) int32), as forward uses it.
  std::pair<at::Tensor, at::Tensor> route(const at::Tensor& hidden);

 private:
  const ModelConfig& config_;
  std::shared_ptr<MoeGate> gate_;
  torch::nn::ModuleList experts_;
  std::vector<std::shared_ptr<SwiGluMlp>> expert_list_;
  std::shared_ptr<SwiGluMlp> shared_experts_;  ///< "shared_experts" (DeepSeek) or "shared_expert" (Qwen2-MoE)
  std::shared_ptr<Linear> shared_expert_gate_;  ///< Qwen2-MoE: (1, H), no bias
};

}  // namespace anvil::model
