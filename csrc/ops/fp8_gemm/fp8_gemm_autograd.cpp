// fp8_linear: y = x W^T + bias over a frozen FP8 weight W (N, K) e4m3 with DeepSeek-V3 128x128 block
// scales, the activation quantized on the fly to 1x128 blocks (anvil's quantize_fp8) and multiplied by
// fp8_gemm; and its C++ autograd, which gives the gradient with respect to x (so LoRA adapters train over
// an FP8 base) and the bias. W gets none: it is frozen (and fp8 tensors cannot require grad).
//
// Backward: dX (M, K) = dY (M, N) W (N, K). FP8 wgmma reads only K-major operands, and here the
// contraction runs over N, along which W is not contiguous. Two ways out:
//   (1) a transposed FP8 copy of W (K, N) made once: exact for W (128x128 blocks transpose with their
//       scales), but dY would have to be quantized to e4m3 along N, whose 3 mantissa bits give a relative
//       error of ~2^-4 / sqrt(3) ~ 3.6% per element and about as much in dX: over the 1e-2 bound;
//   (2) W dequantized to dY's dtype (bf16 in training) and a bf16 GEMM on cuBLAS: dX keeps bf16 accuracy
//       (~2^-9), no weight copy stays resident.
// anvil takes (2), dequantizing W in column slices (whole 128-blocks of K) so that the transient bf16
// slice stays under kBackwardSliceElems elements whatever the layer's size; each slice gives its own
// columns of dX, so nothing is accumulated across slices.
#include "ops/fp8_gemm/fp8_gemm_common.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace anvil::ops {
namespace {

constexpr int64_t kBackwardSliceElems = int64_t(64) << 20;  // 64 Mi elements: 128 MB of bf16 per slice

at::Tensor fp8_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                           const c10::optional<at::Tensor>& bias) {
  check_linear_args(x, weight, weight_scale_inv, "anvil::fp8_linear");
  const int64_t k = weight.size(1), n = weight.size(0);
  const auto x2 = x.reshape({-1, k}).contiguous();                         // (M, K)
  const auto [q, s] = quantize_fp8(x2, "block1x128");                      // (M, K) e4m3, (M, K/128)
  const auto y = fp8_gemm(q, s, weight, weight_scale_inv, x.scalar_type(), bias);  // (M, N)
  auto shape = x.sizes().vec();
  shape.back() = n;
  return y.view(shape);
}

at::Tensor fp8_linear_backward_impl(const at::Tensor& grad_out, const at::Tensor& weight,
                                    const at::Tensor& weight_scale_inv) {
  const char* op = "anvil::fp8_linear_backward";
  check_dtype(grad_out, op, "grad_out", {at::kBFloat16, at::kHalf, at::kFloat});
  check_fp8_operand(weight, op, "weight", 2);
  const int64_t n = weight.size(0), k = weight.size(1);
  ANVIL_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == n, op, ": grad_out (..., N) must end in N = ", n,
              ", got ", grad_out.sizes());
  const auto g = grad_out.reshape({-1, n}).contiguous();  // (M, N)
  auto grad_x = at::empty({g.size(0), k}, g.options());   // (M, K)
  const int64_t step = std::max<int64_t>(kBlock, kBackwardSliceElems / std::max<int64_t>(n, 1) / kBlock * kBlock);
  for (int64_t k0 = 0; k0 < k; k0 += step) {
    const int64_t kc = std::min(step, k - k0);
    const auto w = weight.narrow(1, k0, kc).contiguous();                                       // (N, kc) e4m3
    const auto ws = weight_scale_inv.narrow(1, k0 / kBlock, ceil_div(kc, kBlock)).contiguous();  // (Nb, kc/128)
    const auto wd = dequantize_fp8(w, ws, "block128x128", g.scalar_type());                    // (N, kc)
    if (kc == k) {
      at::mm_out(grad_x, g, wd);
    } else {
      grad_x.narrow(1, k0, kc).copy_(at::mm(g, wd));
    }
  }
  auto shape = grad_out.sizes().vec();
  shape.back() = k;
  return grad_x.view(shape);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Fp8LinearFunction : public torch::autograd::Function<Fp8LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& weight_scale_inv, const c10::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({weight, weight_scale_inv});  // x is not needed: W is frozen
    ctx->saved_data["has_bias"] = bias.has_value();
    if (bias.has_value()) ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias->scalar_type());
    return fp8_linear(x, weight, weight_scale_inv, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& g = grads[0];
    at::Tensor grad_x, grad_bias;
    if (g.defined()) {
      if (ctx->needs_input_grad(0)) grad_x = fp8_linear_backward(g, saved[0], saved[1]);
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3)) {
        const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt());
        grad_bias = g.reshape({-1, g.size(-1)}).sum(0, false, at::kFloat).to(dtype);
      }
    }
    return {grad_x, at::Tensor(), at::Tensor(), grad_bias};
  }
};

at::Tensor fp8_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                               const c10::optional<at::Tensor>& bias) {
  return Fp8LinearFunction::apply(x, weight, weight_scale_inv, bias);
}

}  // namespace

// The forward and the backward are composites of anvil ops (quantize_fp8, fp8_gemm, dequantize_fp8) and
// ATen, so one registration serves CPU, CUDA and Meta.
TORCH_LIBRARY_IMPL(anvil, CompositeExplicitAutograd, m) {
  m.impl("fp8_linear", &fp8_linear_impl);
  m.impl("fp8_linear_backward", &fp8_linear_backward_impl);
}

TORCH_LIBRARY_IMPL(anvil, Autograd, m) { m.impl("fp8_linear", &fp8_linear_autograd); }

}  // namespace anvil::ops
