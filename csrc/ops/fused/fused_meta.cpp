// Meta kernels of the fused training ops: the shared argument checks and the output shapes and dtypes,
// so the ops trace under torch.compile and FakeTensor (every output shape follows from the input shapes).
#include "ops/fused/fused_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace anvil::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> rms_norm_meta(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rms_norm_args(x, weight, eps, "anvil::rms_norm");
  return {at::empty_like(x), at::empty(rstd_shape(x), x.options().dtype(stat_dtype(x)))};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_meta(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& rstd) {
  check_rms_norm_backward_args(grad_y, x, weight, rstd, "anvil::rms_norm_backward");
  return {at::empty_like(x), at::empty_like(weight)};
}

at::Tensor swiglu_meta(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args(gate, up, "anvil::swiglu");
  return at::empty_like(gate);
}

std::tuple<at::Tensor, at::Tensor> swiglu_backward_meta(const at::Tensor& grad, const at::Tensor& gate,
                                                        const at::Tensor& up) {
  check_swiglu_backward_args(grad, gate, up, "anvil::swiglu_backward");
  return {at::empty_like(gate), at::empty_like(up)};
}

at::Tensor rope_meta(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool) {
  check_rope_args(x, cos, sin, "anvil::rope", "x");
  return at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
}

at::Tensor rope_backward_meta(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin, bool) {
  check_rope_args(grad, cos, sin, "anvil::rope_backward", "grad");
  return at::empty(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_meta(const at::Tensor& logits, const at::Tensor& labels,
                                                            int64_t) {
  check_cross_entropy_args(logits, labels, "anvil::cross_entropy_chunk");
  const auto o = logits.options().dtype(stat_dtype(logits));
  return {at::empty({logits.size(0)}, o), at::empty({logits.size(0)}, o)};
}

void cross_entropy_chunk_backward_meta(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                       const at::Tensor& grad_loss, int64_t) {
  check_cross_entropy_backward_args(logits, labels, lse, grad_loss, "anvil::cross_entropy_chunk_backward");
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("rms_norm", &rms_norm_meta);
  m.impl("rms_norm_backward", &rms_norm_backward_meta);
  m.impl("swiglu", &swiglu_meta);
  m.impl("swiglu_backward", &swiglu_backward_meta);
  m.impl("rope", &rope_meta);
  m.impl("rope_backward", &rope_backward_meta);
  m.impl("cross_entropy_chunk", &cross_entropy_chunk_meta);
  m.impl("cross_entropy_chunk_backward", &cross_entropy_chunk_backward_meta);
}

}  // namespace anvil::ops
