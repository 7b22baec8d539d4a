// C++ autograd of the differentiable MoE ops (moe_gate, moe_permute, moe_unpermute), registered for
// the Autograd key so gradients flow from the C++ pipelines as from Python. Each forward redispatches
// below autograd to the device kernel; each backward calls the op's *_backward op.
#include "anvil/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class MoeGateFunction : public torch::autograd::Function<MoeGateFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& noise, int64_t top_k, int64_t n_group,
                               int64_t topk_group, const std::string& score, bool renormalize, double routed_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weights, indices] = moe_gate(logits, bias, noise, top_k, n_group, topk_group, score, renormalize, routed_scale);
    ctx->save_for_backward({logits, indices});
    ctx->saved_data["score"] = score;
    ctx->saved_data["renormalize"] = renormalize;
    ctx->saved_data["routed_scale"] = routed_scale;
    ctx->mark_non_differentiable({indices});
    return {weights, indices};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& indices = saved[1];
    at::Tensor grad_logits;
    if (grads[0].defined()) {
      grad_logits = moe_gate_backward(grads[0].contiguous(), logits, indices, ctx->saved_data["score"].toStringRef(),
                                      ctx->saved_data["renormalize"].toBool(),
                                      ctx->saved_data["routed_scale"].toDouble());
    }
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class MoePermuteFunction : public torch::autograd::Function<MoePermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& indices,
                               int64_t num_experts, int64_t align, int64_t capacity) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [permuted, slot_rows, counts, offsets, dropped] = moe_permute(hidden, indices, num_experts, align, capacity);
    ctx->save_for_backward({slot_rows});
    ctx->mark_non_differentiable({slot_rows, counts, offsets, dropped});
    return {permuted, slot_rows, counts, offsets, dropped};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor grad_hidden;
    if (grads[0].defined()) grad_hidden = moe_permute_backward(grads[0].contiguous(), saved[0]);
    return {grad_hidden, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class MoeUnpermuteFunction : public torch::autograd::Function<MoeUnpermuteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& expert_out, const at::Tensor& slot_rows,
                               const at::Tensor& weights) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({expert_out, slot_rows, weights});
    return {moe_unpermute(expert_out, slot_rows, weights)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    auto [grad_x, grad_w] = moe_unpermute_backward(grads[0].contiguous(), saved[0], saved[1], saved[2]);
    return {grad_x, at::Tensor(), grad_w};
  }
};

std::tuple<at::Tensor, at::Tensor> moe_gate_autograd(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                                     const c10::optional<at::Tensor>& noise, int64_t top_k,
                                                     int64_t n_group, int64_t topk_group, c10::string_view score,
                                                     bool renormalize, double routed_scale) {
  auto out = MoeGateFunction::apply(logits, bias, noise, top_k, n_group, topk_group,
                                    std::string(score.data(), score.size()), renormalize, routed_scale);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_autograd(
    const at::Tensor& hidden, const at::Tensor& indices, int64_t num_experts, int64_t align, int64_t capacity) {
  auto out = MoePermuteFunction::apply(hidden, indices, num_experts, align, capacity);
  return {out[0], out[1], out[2], out[3], out[4]};
}

at::Tensor moe_unpermute_autograd(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights) {
  return MoeUnpermuteFunction::apply(expert_out, slot_rows, weights)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Autograd, m) {
  m.impl("moe_gate", &moe_gate_autograd);
  m.impl("moe_permute", &moe_permute_autograd);
  m.impl("moe_unpermute", &moe_unpermute_autograd);
}

}  // namespace anvil::ops
