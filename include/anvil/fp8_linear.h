// Fp8Linear: a linear layer over a frozen FP8 weight in DeepSeek-V3's checkpoint format, for the model
// layer (and LoRA over an FP8 base). It holds what such a checkpoint stores for a Linear -- weight (N, K)
// float8_e4m3fn and weight_scale_inv (ceil(N/128), ceil(K/128)) fp32, plus an optional bias -- quantizes
// the activation on the fly to 1x128 blocks and runs anvil::fp8_gemm (anvil::ops::fp8_linear). Gradients
// reach the input (and the bias), never the weight: see csrc/ops/fp8_gemm/fp8_gemm_autograd.cpp.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <c10/util/Optional.h>

#include <memory>

namespace anvil {

class Fp8LinearImpl : public torch::nn::Module {
 public:
  /// Takes a quantized weight as loaded from a checkpoint: weight (N, K) e4m3 with K % 128 == 0 and
  /// weight_scale_inv (ceil(N/128), K/128) fp32; bias (N) optional (bf16/fp16/fp32; trainable).
  Fp8LinearImpl(at::Tensor weight, at::Tensor weight_scale_inv, c10::optional<at::Tensor> bias = c10::nullopt);

  /// Quantizes a bf16/fp16/fp32 weight (N, K) to e4m3 with 128x128 block scales (anvil::ops::quantize_fp8).
  static std::shared_ptr<Fp8LinearImpl> from_float(const at::Tensor& weight, c10::optional<at::Tensor> bias = c10::nullopt);

  /// x (..., K) bf16/fp16/fp32 -> (..., N) in x's dtype.
  at::Tensor forward(const at::Tensor& x);

  int64_t in_features() const { return weight.size(1); }
  int64_t out_features() const { return weight.size(0); }

  at::Tensor weight;            // (N, K) float8_e4m3fn, a buffer (frozen)
  at::Tensor weight_scale_inv;  // (ceil(N/128), K/128) fp32, a buffer
  at::Tensor bias;              // (N) or undefined, a parameter
};

TORCH_MODULE(Fp8Linear);

}  // namespace anvil
