// The chunked causal-LM cross-entropy (include/anvil/train/loss.h).
//
// Forward, per chunk of rows: logits = h W^T in the model dtype (what an unchunked lm_head gives),
// lse = logsumexp(logits in fp32), loss += sum over targets of lse - logits[label]. Saved for
// backward: h, W, labels and lse (N fp32). Backward, per chunk: dlogits = (softmax - onehot(label)) *
// grad / normalizer on target rows, cast to the model dtype; dh = dlogits W, dW += dlogits^T h
// (fp32 accumulation across chunks, cast at the end). Peak extra memory: one chunk of logits in fp32.
// The fused kernel (anvil::ops::cross_entropy_chunk, the default on CUDA) computes the same lse and loss
// from the model-dtype logits without the fp32 copy, and its backward turns the recomputed logits into
// dlogits in place (the same fp32 formula, rounded once to the model dtype).
#include "anvil/train/loss.h"

#include "anvil/ops.h"

#include <ATen/autocast_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>

namespace anvil::train {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Chunk logits (rows, V) in the model dtype, their fp32 copy, and the safe labels (ignored -> 0).
struct ChunkLogits {
  at::Tensor logits32;  // (rows, V) fp32
  at::Tensor labels;    // (rows) int64, ignored rows pointing at class 0
  at::Tensor mask;      // (rows) fp32, 1 on targets
};

// The reduction dtype: fp32, or fp64 for fp64 models (tests).
at::ScalarType accumulate_type(const at::Tensor& h) { return h.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

ChunkLogits chunk_logits(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels) {
  ChunkLogits c;
  c.logits32 = at::linear(h, weight).to(accumulate_type(h));  // (rows, V)
  auto valid = labels != kIgnoreIndex;
  c.labels = labels.masked_fill(~valid, 0);
  c.mask = valid.to(accumulate_type(h));
  return c;
}

// One chunk's summed loss through the fused op; writes the rows' lse into lse_out (rows).
at::Tensor fused_chunk_loss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels, at::Tensor lse_out) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inside a Function: no graph to record
  const auto logits = at::linear(h, weight);           // (rows, V) model dtype, contiguous
  auto [loss, lse] = anvil::ops::cross_entropy_chunk(logits, labels, kIgnoreIndex);  // (rows) fp32; 0 where ignored
  lse_out.copy_(lse);
  return loss.sum();
}

// One chunk's summed loss through ATen ops in fp32; writes the rows' lse into lse_out (rows).
at::Tensor aten_chunk_loss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels, at::Tensor lse_out) {
  auto c = chunk_logits(h, weight, labels);
  auto chunk_lse = at::logsumexp(c.logits32, {1});                        // (rows)
  auto target = c.logits32.gather(1, c.labels.unsqueeze(1)).squeeze(1);  // (rows)
  lse_out.copy_(chunk_lse);
  return ((chunk_lse - target) * c.mask).sum();
}

// dlogits (rows, V) in the model dtype for one chunk: (softmax - onehot(label)) * g on target rows, 0 elsewhere.
at::Tensor fused_chunk_dlogits(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels,
                               const at::Tensor& lse, const at::Tensor& g) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto logits = at::linear(h, weight);  // (rows, V) model dtype, overwritten by its gradient
  anvil::ops::cross_entropy_chunk_backward(logits, labels, lse.contiguous(), g, kIgnoreIndex);
  return logits;
}

at::Tensor aten_chunk_dlogits(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels,
                              const at::Tensor& lse, const at::Tensor& g) {
  auto c = chunk_logits(h, weight, labels);
  const int64_t rows = h.size(0);
  auto dlogits = (c.logits32 - lse.unsqueeze(1)).exp_();  // softmax (rows, V) fp32
  dlogits.scatter_add_(1, c.labels.unsqueeze(1), at::full({rows, 1}, -1.0, dlogits.options()));
  dlogits.mul_((c.mask * g).unsqueeze(1));
  return dlogits.to(h.scalar_type());  // (rows, V) model dtype
}

class ChunkedLmLoss : public torch::autograd::Function<ChunkedLmLoss> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const at::Tensor& labels, double scale, int64_t chunk, bool fused) {
    const int64_t n = hidden.size(0);
    auto lse = at::empty({n}, hidden.options().dtype(accumulate_type(hidden)));  // (N) fp32
    auto total = at::zeros({}, hidden.options().dtype(accumulate_type(hidden)));
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(n, start + chunk);
      const auto h = hidden.slice(0, start, end), l = labels.slice(0, start, end);
      total.add_(fused ? fused_chunk_loss(h, weight, l, lse.slice(0, start, end))
                       : aten_chunk_loss(h, weight, l, lse.slice(0, start, end)));
    }
    ctx->save_for_backward({hidden, weight, labels, lse});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["fused"] = fused;
    return total * scale;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto &hidden = saved[0], &weight = saved[1], &labels = saved[2], &lse = saved[3];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const bool fused = ctx->saved_data["fused"].toBool();
    const bool need_dh = ctx->needs_input_grad(0), need_dw = ctx->needs_input_grad(1);
    auto g = grad_outputs[0].to(accumulate_type(hidden)) * scale;  // () fp32
    const int64_t n = hidden.size(0);
    at::Tensor dh = need_dh ? at::empty_like(hidden) : at::Tensor();
    at::Tensor dw = need_dw ? at::zeros(weight.sizes(), weight.options().dtype(accumulate_type(hidden))) : at::Tensor();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t end = std::min(n, start + chunk);
      const auto h = hidden.slice(0, start, end), l = labels.slice(0, start, end), chunk_lse = lse.slice(0, start, end);
      const auto d = fused ? fused_chunk_dlogits(h, weight, l, chunk_lse, g)
                           : aten_chunk_dlogits(h, weight, l, chunk_lse, g);  // (rows, V) model dtype
      if (need_dh) dh.slice(0, start, end).copy_(at::matmul(d, weight));
      if (need_dw) accumulate_product(dw, d.t(), h);
    }
    return {dh, need_dw ? dw.to(weight.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// kAuto: the fused op on CUDA (its dtypes), the ATen ops on the CPU; ANVIL_FUSED_OPS=0 always ATen.
bool fused_kernel(LossKernel kernel, const at::Tensor& h) {
  if (kernel == LossKernel::kFused) return true;
  if (kernel == LossKernel::kAten) return false;
  return h.is_cuda() && anvil::ops::use_fused_ops(h);
}

}  // namespace

// acc (V, H) += a (V, rows) @ b (rows, H), the head gradient's per-chunk sum. On CUDA the GEMM adds into the
// accumulator in its epilogue (for an fp32 accumulator over half/bf16 operands, addmm's out_dtype overload):
// forming the product in the model dtype, widening it and adding moves ~20 bytes per element of the (V, H) head
// per chunk against the epilogue's 8 (a 128256 x 2048 head at 32 chunks: ~50 ms against ~20 ms of a 1B model's
// ~170 ms step on the H100). The CPU (the reference) keeps the product in the operands' dtype, then widens and
// adds.
void accumulate_product(at::Tensor acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.is_cuda() && a.scalar_type() == acc.scalar_type()) {
    acc.addmm_(a, b);
  } else if (acc.is_cuda() && acc.scalar_type() == at::kFloat &&
             (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf)) {
    at::addmm_out(acc, acc, a, b, at::kFloat);
  } else {
    acc.add_(at::matmul(a, b).to(acc.scalar_type()));
  }
}

at::Tensor causal_lm_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                          double normalizer, int64_t chunk, LossKernel kernel) {
  TORCH_CHECK(hidden.dim() >= 1 && hidden.size(-1) == weight.size(1), "causal_lm_loss: hidden (..., ",
              weight.size(1), ") must match the head weight (V, H) ", weight.sizes(), ", got ", hidden.sizes());
  TORCH_CHECK(labels.numel() * hidden.size(-1) == hidden.numel(), "causal_lm_loss: labels ", labels.sizes(),
              " must have one entry per hidden row ", hidden.sizes());
  TORCH_CHECK(chunk >= 1, "causal_lm_loss: chunk must be >= 1, got ", chunk);
  auto h = hidden.reshape({-1, hidden.size(-1)});  // (N, H)
  auto w = weight;
  const auto device_type = hidden.device().type();
  if (at::autocast::is_autocast_enabled(device_type)) {
    // Autocast does not reach into a custom Function's backward: cast here, where autograd records
    // the casts (so an fp32 master weight still gets an fp32 gradient).
    const auto dtype = at::autocast::get_autocast_dtype(device_type);
    h = h.to(dtype), w = w.to(dtype);
  } else if (h.scalar_type() != w.scalar_type()) {
    h = h.to(w.scalar_type());
  }
  auto l = labels.reshape({-1}).to(hidden.device(), at::kLong);
  const double scale = normalizer > 0 ? 1.0 / normalizer : 0.0;
  return ChunkedLmLoss::apply(h, w, l, scale, chunk, fused_kernel(kernel, h));
}

}  // namespace anvil::train
