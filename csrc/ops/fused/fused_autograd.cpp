// C++ autograd of the fused training ops, registered for the Autograd key so gradients flow from the C++
// pipelines (the model's RmsNorm, SwiGLU MLP and rotary embedding) as from Python. Each forward
// redispatches below autograd to the device kernel and saves only what its *_backward op reads:
//   rms_norm             x, weight, rstd (not y)
//   swiglu               gate, up (not silu(gate): the backward recomputes it)
//   rope                 cos, sin (the backward is the transposed rotation; x is not needed)
//   cross_entropy_chunk  logits, labels, lse; its backward clones the logits and runs the in-place
//                        backward op on the copy (the chunked trainer loss calls the in-place op itself,
//                        on the chunk's own logits buffer, and never goes through this function)
// rstd and lse are returned as non-differentiable outputs.
#include "anvil/ops.h"

#include <torch/autograd.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, rstd] = rms_norm(x, weight, eps);
    ctx->save_for_backward({x, weight, rstd});
    ctx->mark_non_differentiable({rstd});
    return {y, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = rms_norm_backward(grads[0].contiguous(), saved[0], saved[1], saved[2]);
    return {dx, dw, at::Tensor()};
  }
};

class SwigluFunction : public torch::autograd::Function<SwigluFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({gate, up});
    return swiglu(gate, up);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto [dg, du] = swiglu_backward(grads[0].contiguous(), saved[0], saved[1]);
    return {dg, du};
  }
};

class RopeFunction : public torch::autograd::Function<RopeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            bool interleaved) {
    at::AutoDispatchBelowADInplaceOrView guard;
    TORCH_CHECK(!cos.requires_grad() && !sin.requires_grad(),
                "anvil::rope: cos and sin must not require grad (rope is differentiable with respect to x only)");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["interleaved"] = interleaved;
    return rope(x, cos, sin, interleaved);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto g = grads[0].stride(3) == 1 ? grads[0] : grads[0].contiguous();
    return {rope_backward(g, saved[0], saved[1], ctx->saved_data["interleaved"].toBool()), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class CrossEntropyChunkFunction : public torch::autograd::Function<CrossEntropyChunkFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               int64_t ignore_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] = cross_entropy_chunk(logits, labels, ignore_index);
    ctx->save_for_backward({logits, labels, lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->mark_non_differentiable({lse});
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    const auto saved = ctx->get_saved_variables();
    auto dlogits = saved[0].clone(at::MemoryFormat::Contiguous);
    cross_entropy_chunk_backward(dlogits, saved[1], saved[2], grads[0].contiguous(),
                                 ctx->saved_data["ignore_index"].toInt());
    return {dlogits, at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_autograd(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto out = RmsNormFunction::apply(x, weight, eps);
  return {out[0], out[1]};
}

at::Tensor swiglu_autograd(const at::Tensor& gate, const at::Tensor& up) { return SwigluFunction::apply(gate, up); }

at::Tensor rope_autograd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  return RopeFunction::apply(x, cos, sin, interleaved);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_autograd(const at::Tensor& logits, const at::Tensor& labels,
                                                                int64_t ignore_index) {
  auto out = CrossEntropyChunkFunction::apply(logits, labels, ignore_index);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Autograd, m) {
  m.impl("rms_norm", &rms_norm_autograd);
  m.impl("swiglu", &swiglu_autograd);
  m.impl("rope", &rope_autograd);
  m.impl("cross_entropy_chunk", &cross_entropy_chunk_autograd);
}

}  // namespace anvil::ops
