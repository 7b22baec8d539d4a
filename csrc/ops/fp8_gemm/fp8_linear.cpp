// Fp8Linear (include/anvil/fp8_linear.h): registers the checkpoint tensors as buffers (so state_dict
// keys are "weight", "weight_scale_inv", "bias", as in DeepSeek-V3 / transformers FineGrainedFP8) and
// forwards to anvil::ops::fp8_linear, whose autograd gives the input gradient.
#include "anvil/fp8_linear.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>

namespace anvil {

Fp8LinearImpl::Fp8LinearImpl(at::Tensor w, at::Tensor w_scale_inv, c10::optional<at::Tensor> b) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat8_e4m3fn,
              "anvil::Fp8Linear: weight must be a 2-D (N, K) float8_e4m3fn tensor, got ", w.sizes(), " ",
              w.scalar_type());
  weight = register_buffer("weight", w.contiguous());
  weight_scale_inv = register_buffer("weight_scale_inv", w_scale_inv.contiguous());
  if (b.has_value()) bias = register_parameter("bias", b->contiguous());
}

std::shared_ptr<Fp8LinearImpl> Fp8LinearImpl::from_float(const at::Tensor& w, c10::optional<at::Tensor> b) {
  auto [q, s] = ops::quantize_fp8(w.contiguous(), "block128x128");
  return std::make_shared<Fp8LinearImpl>(q, s, std::move(b));
}

at::Tensor Fp8LinearImpl::forward(const at::Tensor& x) {
  return ops::fp8_linear(x, weight, weight_scale_inv, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
}

}  // namespace anvil
