// SwiGLU MLP and the MoE block (include/anvil/model/moe.h). The routing is anvil's ops end to end:
// moe_gate (scores, groups, bias, top-k, renormalisation, scaling), moe_permute (token rows grouped
// by expert, stable), one GEMM chain per expert on its contiguous block, moe_unpermute (weighted sum
// in fp32). With align 1 and no capacity the permuted rows are exactly T*k, in expert order, so the
// experts' outputs concatenated in expert order are the unpermute input: no scatter needed, and
// autograd flows through cat, the experts and the ops' own backward functions.
#include "anvil/model/moe.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>

namespace anvil::model {

SwiGluMlp::SwiGluMlp(int64_t hidden, int64_t intermediate, bool bias, const std::array<std::string, 3>& names,
                     const at::TensorOptions& options) {
  gate_ = register_module(names[0], std::make_shared<Linear>(hidden, intermediate, bias, options));
  up_ = register_module(names[1], std::make_shared<Linear>(hidden, intermediate, bias, options));
  down_ = register_module(names[2], std::make_shared<Linear>(intermediate, hidden, bias, options));
}

at::Tensor SwiGluMlp::forward(const at::Tensor& x) {
  SharedInput in(x);  // gate and up quantize x once between them
  auto gate = gate_->forward(in), up = up_->forward(in);  // (..., I)
  // anvil::ops::swiglu saves gate and up for its backward, not silu(gate) as the composite does.
  if (ops::use_fused_ops(gate) && up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes())
    return down_->forward(anvil::ops::swiglu(gate.contiguous(), up.contiguous()));
  return down_->forward(at::silu(gate) * up);
}

MoeGate::MoeGate(const ModelConfig& c, const at::TensorOptions& options) {
  weight = register_parameter("weight", at::empty({c.num_experts, c.hidden_size}, options));
  // transformers keeps the correction bias as an fp32 buffer that the checkpoint stores; keep it fp32
  // whatever the model dtype (a bf16 bias would move the expert choice).
  if (c.router_bias)
    e_score_correction_bias = register_buffer("e_score_correction_bias", at::zeros({c.num_experts}, options.dtype(at::kFloat)));
}

MoeBlock::MoeBlock(const ModelConfig& c, const at::TensorOptions& options) : config_(c) {
  const bool mixtral = c.family == ModelFamily::kMixtral;
  const std::array<std::string, 3> names = mixtral ? std::array<std::string, 3>{"w1", "w3", "w2"}
                                                   : std::array<std::string, 3>{"gate_proj", "up_proj", "down_proj"};
  gate_ = register_module("gate", std::make_shared<MoeGate>(c, options));
  experts_ = register_module("experts", torch::nn::ModuleList());
  for (int64_t e = 0; e < c.num_experts; ++e) {
    // Routed experts carry no bias in any supported family (DeepseekV2Experts has none either).
    auto expert = std::make_shared<SwiGluMlp>(c.hidden_size, c.moe_intermediate_size, false, names, options);
    experts_->push_back(expert);
    expert_list_.push_back(expert);
  }
  if (c.n_shared_experts > 0) {
    shared_experts_ = register_module(
        "shared_experts", std::make_shared<SwiGluMlp>(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts,
                                                      c.mlp_bias, names, options));
  }
  if (c.shared_expert_intermediate_size > 0) {  // Qwen2-MoE: one shared expert, gated per token
    shared_experts_ = register_module(
        "shared_expert", std::make_shared<SwiGluMlp>(c.hidden_size, c.shared_expert_intermediate_size, false, names, options));
    shared_expert_gate_ = register_module("shared_expert_gate", std::make_shared<Linear>(c.hidden_size, 1, false, options));
  }
}

std::pair<at::Tensor, at::Tensor> MoeBlock::route(const at::Tensor& hidden) {
  // Router logits (T, E): DeepSeek casts hidden states and weight to fp32; Mixtral stays in the
  // model dtype (moe_gate computes its scores in fp32 either way).
  auto logits = config_.router_fp32 ? at::linear(hidden.to(at::kFloat), gate_->weight.to(at::kFloat))
                                    : at::linear(hidden, gate_->weight);
  c10::optional<at::Tensor> bias;
  if (config_.router_bias) bias = gate_->e_score_correction_bias.to(at::kFloat);
  auto [weights, indices] = anvil::ops::moe_gate(logits, bias, c10::nullopt, config_.num_experts_per_tok,
                                                 config_.n_group, config_.topk_group, config_.router_score,
                                                 config_.renormalize, config_.routed_scaling_factor);
  return {weights, indices};
}

at::Tensor MoeBlock::forward(const at::Tensor& x) {
  const auto shape = x.sizes().vec();
  auto hidden = x.reshape({-1, x.size(-1)});  // (T, H)
  auto [weights, indices] = route(hidden);    // (T, k) fp32, (T, k) int32
  auto [permuted, slot_rows, counts, offsets, dropped] = anvil::ops::moe_permute(hidden, indices, config_.num_experts);
  // permuted (T*k, H): expert e's tokens are rows [offsets[e], offsets[e] + counts[e]).
  auto counts_cpu = counts.to(at::kCPU, at::kLong);
  auto offsets_cpu = offsets.to(at::kCPU, at::kLong);
  const int64_t* count = counts_cpu.const_data_ptr<int64_t>();
  const int64_t* offset = offsets_cpu.const_data_ptr<int64_t>();
  std::vector<at::Tensor> outputs;
  for (int64_t e = 0; e < config_.num_experts; ++e) {
    if (count[e] == 0) continue;
    outputs.push_back(expert_list_[e]->forward(permuted.narrow(0, offset[e], count[e])));  // (count_e, H)
  }
  at::Tensor out;
  if (outputs.empty()) {
    out = at::zeros_like(hidden);
  } else {
    auto expert_out = at::cat(outputs, 0);                            // (T*k, H), permuted order
    out = anvil::ops::moe_unpermute(expert_out, slot_rows, weights);  // (T, H)
  }
  out = out.view(shape);
  if (shared_experts_) {
    auto shared = shared_experts_->forward(x);  // (B, S, H)
    // Qwen2-MoE scales it by sigmoid(shared_expert_gate(x)), (B, S, 1), in the model's dtype as transformers does.
    if (shared_expert_gate_) shared = at::sigmoid(shared_expert_gate_->forward(x)) * shared;
    out = out + shared;
  }
  return out;
}

}  // namespace anvil::model
