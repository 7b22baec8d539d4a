// What the CPU, CUDA and Meta kernels of the fused training ops share: argument checks (each error
// names the op, the argument and the rule it broke) and the output shapes. The ops:
//   rms_norm / rms_norm_backward           transformers' LlamaRMSNorm, fp32 statistics
//   swiglu / swiglu_backward               silu(gate) * up, the backward recomputes silu from the inputs
//   rope / rope_backward                   rotary embedding (half-rotation or interleaved pairs) and its inverse
//   cross_entropy_chunk(+_backward)        per-row loss and log-sum-exp of a chunk of LM-head logits, the
//                                          backward writing (softmax - onehot) * grad into the logits in place
// Float64 runs on the CPU only (gradcheck); the statistics (rstd, loss, lse) are fp32, or fp64 for fp64 input.
#pragma once

#include "ops/common/checks.h"

#include <ATen/core/Tensor.h>

#include <cmath>
#include <vector>

namespace anvil::ops {

// Float dtypes of the activations: fp32, bf16, fp16 everywhere, fp64 on the CPU (gradcheck).
inline void check_float_dtype(const at::Tensor& t, const char* op, const char* arg) {
  check_dtype(t, op, arg, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

// fp32 statistics, fp64 for fp64 input.
inline at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* op, const char* arg,
                             const char* like_arg) {
  ANVIL_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", arg, " must have the dtype of ", like_arg, " (",
              like.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& like, const char* op, const char* arg,
                             const char* like_arg) {
  ANVIL_CHECK(t.sizes() == like.sizes(), op, ": ", arg, " must have the shape of ", like_arg, " ", like.sizes(),
              ", got ", t.sizes());
}

// ---- rms_norm -------------------------------------------------------------------------------------

// x (..., H) contiguous, weight (H) of x's dtype; returns H.
inline int64_t check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, const char* op) {
  check_min_rank(x, op, "x", 1);
  check_float_dtype(x, op, "x");
  check_contiguous(x, op, "x");
  const int64_t h = x.size(-1);
  ANVIL_CHECK(h >= 1, op, ": x.size(-1) (hidden) must be >= 1, got shape ", x.sizes());
  check_rank(weight, op, "weight", 1);
  ANVIL_CHECK(weight.size(0) == h, op, ": weight must have shape (", h, ") = x.size(-1), got ", weight.sizes());
  check_same_dtype(weight, x, op, "weight", "x");
  check_contiguous(weight, op, "weight");
  check_same_device(weight, x, op, "weight", "x");
  ANVIL_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  return h;
}

inline std::vector<int64_t> rstd_shape(const at::Tensor& x) {
  auto s = x.sizes().vec();
  s.pop_back();
  return s;
}

inline int64_t check_rms_norm_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                            const at::Tensor& rstd, const char* op) {
  const int64_t h = check_rms_norm_args(x, weight, 0.0, op);
  check_same_shape(grad_y, x, op, "grad_y", "x");
  check_same_dtype(grad_y, x, op, "grad_y", "x");
  check_contiguous(grad_y, op, "grad_y");
  check_same_device(grad_y, x, op, "grad_y", "x");
  ANVIL_CHECK(rstd.sizes().vec() == rstd_shape(x), op, ": rstd must have shape x.shape[:-1] ", at::IntArrayRef(rstd_shape(x)),
              ", got ", rstd.sizes());
  check_dtype(rstd, op, "rstd", {stat_dtype(x)});
  check_contiguous(rstd, op, "rstd");
  check_same_device(rstd, x, op, "rstd", "x");
  return h;
}

// ---- swiglu ---------------------------------------------------------------------------------------

inline void check_swiglu_args(const at::Tensor& gate, const at::Tensor& up, const char* op) {
  check_float_dtype(gate, op, "gate");
  check_contiguous(gate, op, "gate");
  check_same_shape(up, gate, op, "up", "gate");
  check_same_dtype(up, gate, op, "up", "gate");
  check_contiguous(up, op, "up");
  check_same_device(up, gate, op, "up", "gate");
}

inline void check_swiglu_backward_args(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up,
                                       const char* op) {
  check_swiglu_args(gate, up, op);
  check_same_shape(grad, gate, op, "grad", "gate");
  check_same_dtype(grad, gate, op, "grad", "gate");
  check_contiguous(grad, op, "grad");
  check_same_device(grad, gate, op, "grad", "gate");
}

// ---- rope -----------------------------------------------------------------------------------------

// x (B, S, H, D), any strides but a unit stride along D (a view of a projection's output); cos and sin
// (B or 1, S, D) contiguous in x's dtype. `x_arg` is "x" for rope and "grad" for rope_backward.
inline void check_rope_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op,
                            const char* x_arg) {
  check_rank(x, op, x_arg, 4);
  check_float_dtype(x, op, x_arg);
  const int64_t d = x.size(3);
  ANVIL_CHECK(d % 2 == 0 && d >= 2, op, ": ", x_arg, ".size(3) (rotary dim) must be even and >= 2, got ", d);
  ANVIL_CHECK(x.stride(3) == 1 || x.size(3) == 1, op, ": ", x_arg, " must have stride 1 along its last dim, got strides ",
              x.strides());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{cos, "cos"}, {sin, "sin"}}) {
    check_rank(t, op, name, 3);
    ANVIL_CHECK((t.size(0) == x.size(0) || t.size(0) == 1) && t.size(1) == x.size(1) && t.size(2) == d, op, ": ", name,
                " must have shape (", x.size(0), " or 1, ", x.size(1), ", ", d, ") for ", x_arg, " ", x.sizes(), ", got ",
                t.sizes());
    check_same_dtype(t, x, op, name, x_arg);
    check_contiguous(t, op, name);
    check_same_device(t, x, op, name, x_arg);
  }
  ANVIL_CHECK(cos.sizes() == sin.sizes(), op, ": sin must have the shape of cos ", cos.sizes(), ", got ", sin.sizes());
}

// ---- cross_entropy_chunk ---------------------------------------------------------------------------

inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& labels, const char* op) {
  check_rank(logits, op, "logits", 2);
  check_float_dtype(logits, op, "logits");
  check_contiguous(logits, op, "logits");
  ANVIL_CHECK(logits.size(1) >= 1, op, ": logits.size(1) (vocabulary) must be >= 1, got shape ", logits.sizes());
  check_rank(labels, op, "labels", 1);
  check_dtype(labels, op, "labels", {at::kLong});
  check_contiguous(labels, op, "labels");
  ANVIL_CHECK(labels.size(0) == logits.size(0), op, ": labels must have shape (", logits.size(0),
              ") = logits.size(0), got ", labels.sizes());
  check_same_device(labels, logits, op, "labels", "logits");
}

inline void check_cross_entropy_backward_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                              const at::Tensor& grad_loss, const char* op) {
  check_cross_entropy_args(logits, labels, op);
  const int64_t t = logits.size(0);
  check_rank(lse, op, "lse", 1);
  ANVIL_CHECK(lse.size(0) == t, op, ": lse must have shape (", t, ") = logits.size(0), got ", lse.sizes());
  check_dtype(lse, op, "lse", {stat_dtype(logits)});
  check_contiguous(lse, op, "lse");
  check_same_device(lse, logits, op, "lse", "logits");
  ANVIL_CHECK(grad_loss.dim() == 0 || (grad_loss.dim() == 1 && grad_loss.size(0) == t), op,
              ": grad_loss must be a scalar or have shape (", t, "), got ", grad_loss.sizes());
  check_dtype(grad_loss, op, "grad_loss", {stat_dtype(logits)});
  check_contiguous(grad_loss, op, "grad_loss");
  check_same_device(grad_loss, logits, op, "grad_loss", "logits");
}

}  // namespace anvil::ops
