// C++ autograd of sparse_attention, registered for the Autograd key so gradients flow from the C++
// pipelines as from Python. The forward redispatches below autograd to the device kernel and saves
// q, k, v, o and lse; the backward calls sparse_attention_backward (recomputation from lse, no S x S
// tensor). lse is an output for the caller's use but carries no gradient.
#include "anvil/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

c10::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t) : c10::nullopt;
}

class SparseAttentionFunction : public torch::autograd::Function<SparseAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& block_indices,
                               const c10::optional<at::Tensor>& block_counts,
                               const c10::optional<at::Tensor>& cu_seqlens, int64_t window, int64_t sink_tokens,
                               int64_t block_size, c10::optional<double> scale, bool deterministic) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [o, lse] = sparse_attention(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                     block_size, scale, deterministic);
    ctx->save_for_backward({q, k, v, o, lse, block_indices.value_or(at::Tensor()),
                            block_counts.value_or(at::Tensor()), cu_seqlens.value_or(at::Tensor())});
    ctx->saved_data["window"] = window;
    ctx->saved_data["sink_tokens"] = sink_tokens;
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["has_scale"] = scale.has_value();
    ctx->saved_data["scale"] = scale.value_or(0.0);
    ctx->saved_data["deterministic"] = deterministic;
    ctx->mark_non_differentiable({lse});
    return {o, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    variable_list out(11);
    if (!grads[0].defined()) return out;
    const auto scale = ctx->saved_data["has_scale"].toBool()
                           ? c10::optional<double>(ctx->saved_data["scale"].toDouble())
                           : c10::nullopt;
    auto [dq, dk, dv] = sparse_attention_backward(
        grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], opt(s[5]), opt(s[6]), opt(s[7]),
        ctx->saved_data["window"].toInt(), ctx->saved_data["sink_tokens"].toInt(),
        ctx->saved_data["block_size"].toInt(), scale, ctx->saved_data["deterministic"].toBool());
    out[0] = dq;
    out[1] = dk;
    out[2] = dv;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> sparse_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const c10::optional<at::Tensor>& block_indices,
                                                             const c10::optional<at::Tensor>& block_counts,
                                                             const c10::optional<at::Tensor>& cu_seqlens,
                                                             int64_t window, int64_t sink_tokens, int64_t block_size,
                                                             c10::optional<double> scale, bool deterministic) {
  auto out = SparseAttentionFunction::apply(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                            block_size, scale, deterministic);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Autograd, m) {
  m.impl("sparse_attention", &sparse_attention_autograd);
}

}  // namespace anvil::ops
