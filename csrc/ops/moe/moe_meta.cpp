// Meta kernels of the MoE ops: shapes and dtypes only (every output shape is data independent, the
// permuted buffer included: R = T*k + E*(align-1)), so the ops trace under torch.compile and FakeTensor.
#include "ops/moe/moe_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace anvil::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> moe_gate_meta(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                                 const c10::optional<at::Tensor>& noise, int64_t top_k,
                                                 int64_t n_group, int64_t topk_group, c10::string_view score,
                                                 bool renormalize, double routed_scale) {
  const GateConfig c = check_gate_args(logits, bias, noise, top_k, n_group, topk_group, score, renormalize,
                                       routed_scale, "anvil::moe_gate");
  const auto wt = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty({c.tokens, top_k}, logits.options().dtype(wt)),
          at::empty({c.tokens, top_k}, logits.options().dtype(at::kInt))};
}

at::Tensor moe_gate_backward_meta(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                                  c10::string_view score, bool, double) {
  check_gate_backward_args(grad_weights, logits, indices, "anvil::moe_gate_backward");
  parse_gate_score(score, "anvil::moe_gate_backward");
  return at::empty(logits.sizes(), logits.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_meta(const at::Tensor& indices,
                                                                           int64_t num_experts, int64_t align,
                                                                           int64_t) {
  check_indices(indices, num_experts, "anvil::moe_route");
  ANVIL_CHECK(align >= 1, "anvil::moe_route: align must be >= 1, got ", align);
  auto o = indices.options().dtype(at::kInt);
  return {at::empty(indices.sizes(), o), at::empty({num_experts}, o), at::empty({num_experts + 1}, o),
          at::empty({}, o)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_meta(
    const at::Tensor& hidden, const at::Tensor& indices, int64_t num_experts, int64_t align, int64_t capacity) {
  check_permute_args(hidden, indices, num_experts, align, "anvil::moe_permute");
  auto [slot_rows, counts, offsets, dropped] = moe_route_meta(indices, num_experts, align, capacity);
  const int64_t rows = permuted_rows(hidden.size(0), indices.size(1), num_experts, align);
  return {at::empty({rows, hidden.size(1)}, hidden.options()), slot_rows, counts, offsets, dropped};
}

at::Tensor moe_permute_backward_meta(const at::Tensor& grad_permuted, const at::Tensor& slot_rows) {
  return at::empty({slot_rows.size(0), grad_permuted.size(1)}, grad_permuted.options());
}

at::Tensor moe_unpermute_meta(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute");
  return at::empty({slot_rows.size(0), expert_out.size(1)}, expert_out.options());
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_meta(const at::Tensor&, const at::Tensor& expert_out,
                                                               const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute_backward");
  return {at::empty(expert_out.sizes(), expert_out.options()), at::empty(weights.sizes(), weights.options())};
}

at::Tensor moe_expert_load_meta(const at::Tensor& indices, int64_t num_experts) {
  check_indices(indices, num_experts, "anvil::moe_expert_load");
  return at::empty({num_experts}, indices.options().dtype(at::kInt));
}

void moe_update_bias_meta(at::Tensor& bias, const at::Tensor& counts, double) {
  check_update_bias_args(bias, counts, "anvil::moe_update_bias");
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("moe_gate", &moe_gate_meta);
  m.impl("moe_gate_backward", &moe_gate_backward_meta);
  m.impl("moe_route", &moe_route_meta);
  m.impl("moe_permute", &moe_permute_meta);
  m.impl("moe_permute_backward", &moe_permute_backward_meta);
  m.impl("moe_unpermute", &moe_unpermute_meta);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_meta);
  m.impl("moe_expert_load", &moe_expert_load_meta);
  m.impl("moe_update_bias", &moe_update_bias_meta);
}

}  // namespace anvil::ops
