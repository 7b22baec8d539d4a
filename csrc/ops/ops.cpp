// Typed entry points (include/anvil/ops.h): each looks its schema up once and calls the dispatcher.
#include "anvil/ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>

namespace anvil::ops {

namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const std::string& granularity) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view)>(
      "anvil::quantize_fp8");
  return op.call(x, granularity);
}

at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                          at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                              at::ScalarType)>("anvil::dequantize_fp8");
  return op.call(q, scale_inv, granularity, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, const std::string& granularity) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, c10::string_view)>(
      "anvil::quantize_int8");
  return op.call(x, granularity);
}

at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                           at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view,
                                              at::ScalarType)>("anvil::dequantize_int8");
  return op.call(q, scale_inv, granularity, out_dtype);
}

// ---- MoE ----

using Opt = c10::optional<at::Tensor>;
using T2 = std::tuple<at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> moe_gate(const at::Tensor& logits, const Opt& bias, const Opt& noise, int64_t top_k,
                                            int64_t n_group, int64_t topk_group, const std::string& score,
                                            bool renormalize, double routed_scale) {
  static const auto op = op_handle<T2(const at::Tensor&, const Opt&, const Opt&, int64_t, int64_t, int64_t,
                                      c10::string_view, bool, double)>("anvil::moe_gate");
  return op.call(logits, bias, noise, top_k, n_group, topk_group, score, renormalize, routed_scale);
}

at::Tensor moe_gate_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                             const std::string& score, bool renormalize, double routed_scale) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              c10::string_view, bool, double)>("anvil::moe_gate_backward");
  return op.call(grad_weights, logits, indices, score, renormalize, routed_scale);
}

T4 moe_route(const at::Tensor& indices, int64_t num_experts, int64_t align, int64_t capacity) {
  static const auto op = op_handle<T4(const at::Tensor&, int64_t, int64_t, int64_t)>("anvil::moe_route");
  return op.call(indices, num_experts, align, capacity);
}

T5 moe_permute(const at::Tensor& hidden, const at::Tensor& indices, int64_t num_experts, int64_t align,
               int64_t capacity) {
  static const auto op =
      op_handle<T5(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t)>("anvil::moe_permute");
  return op.call(hidden, indices, num_experts, align, capacity);
}

at::Tensor moe_permute_backward(const at::Tensor& grad_permuted, const at::Tensor& slot_rows) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("anvil::moe_permute_backward");
  return op.call(grad_permuted, slot_rows);
}

at::Tensor moe_unpermute(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("anvil::moe_unpermute");
  return op.call(expert_out, slot_rows, weights);
}

T2 moe_unpermute_backward(const at::Tensor& grad_out, const at::Tensor& expert_out, const at::Tensor& slot_rows,
                          const at::Tensor& weights) {
  static const auto op = op_handle<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "anvil::moe_unpermute_backward");
  return op.call(grad_out, expert_out, slot_rows, weights);
}

at::Tensor moe_expert_load(const at::Tensor& indices, int64_t num_experts) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, int64_t)>("anvil::moe_expert_load");
  return op.call(indices, num_experts);
}

void moe_update_bias(at::Tensor& bias, const at::Tensor& counts, double gamma) {
  static const auto op = op_handle<void(at::Tensor&, const at::Tensor&, double)>("anvil::moe_update_bias");
  op.call(bias, counts, gamma);
}

at::Tensor moe_sequence_balance_loss(const at::Tensor& logits, const at::Tensor& indices, double alpha) {
  TORCH_CHECK(logits.dim() == 2 && indices.dim() == 2 && indices.size(0) == logits.size(0),
              "anvil::moe_sequence_balance_loss: logits (T, E) and indices (T, k) must share T, got ", logits.sizes(),
              " and ", indices.sizes());
  const int64_t T = logits.size(0), E = logits.size(1), k = indices.size(1);
  const auto s = logits.to(at::kFloat).sigmoid();                       // (T, E)
  const auto p = (s / s.sum(-1, true)).mean(0);                        // (E) P_i
  const auto load = at::zeros({E}, s.options()).index_add_(0, indices.flatten().to(at::kLong),
                                                          at::ones({T * k}, s.options()));
  const auto f = load * (static_cast<double>(E) / static_cast<double>(std::max<int64_t>(k * T, 1)));  // (E) f_i
  return (f * p).sum() * alpha;
}

// ---- FP8 GEMM ----

at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                    at::ScalarType out_dtype, const Opt& bias) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, c10::optional<at::ScalarType>, const Opt&)>(
      "anvil::fp8_gemm");
  return op.call(a, a_scale, b, b_scale, out_dtype, bias);
}

at::Tensor fp8_grouped_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                            const at::Tensor& b_scale, const at::Tensor& offsets, at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, c10::optional<at::ScalarType>)>(
      "anvil::fp8_grouped_gemm");
  return op.call(a, a_scale, b, b_scale, offsets, out_dtype);
}

at::Tensor fp8_grouped_gemm_masked(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                   const at::Tensor& b_scale, const at::Tensor& masked_m, at::ScalarType out_dtype) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, c10::optional<at::ScalarType>)>(
      "anvil::fp8_grouped_gemm_masked");
  return op.call(a, a_scale, b, b_scale, masked_m, out_dtype);
}

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                      const Opt& bias) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>("anvil::fp8_linear");
  return op.call(x, weight, weight_scale_inv, bias);
}

at::Tensor fp8_linear_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                               const at::Tensor& weight_scale_inv) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "anvil::fp8_linear_backward");
  return op.call(grad_out, weight, weight_scale_inv);
}

// ---- INT8 GEMM ----

at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                     at::ScalarType out_dtype, const Opt& bias) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, c10::optional<at::ScalarType>, const Opt&)>(
      "anvil::int8_gemm");
  return op.call(a, a_scale, b, b_scale, out_dtype, bias);
}

// ---- Sparse attention ----

using OptD = c10::optional<double>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

T2 sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& block_indices,
                    const Opt& block_counts, const Opt& cu_seqlens, int64_t window, int64_t sink_tokens,
                    int64_t block_size, OptD scale, bool deterministic) {
  static const auto op = op_handle<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&,
                                      const Opt&, int64_t, int64_t, int64_t, OptD, bool)>("anvil::sparse_attention");
  return op.call(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens, block_size, scale,
                 deterministic);
}

T3 sparse_attention_backward(const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& o, const at::Tensor& lse, const Opt& block_indices,
                             const Opt& block_counts, const Opt& cu_seqlens, int64_t window, int64_t sink_tokens,
                             int64_t block_size, OptD scale, bool deterministic) {
  static const auto op =
      op_handle<T3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                   const at::Tensor&, const Opt&, const Opt&, const Opt&, int64_t, int64_t, int64_t, OptD, bool)>(
          "anvil::sparse_attention_backward");
  return op.call(grad_o, q, k, v, o, lse, block_indices, block_counts, cu_seqlens, window, sink_tokens, block_size,
                 scale, deterministic);
}

at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_n,
                         int64_t sink_blocks, int64_t local_blocks, const Opt& cu_seqlens, OptD scale) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                                              int64_t, const Opt&, OptD)>("anvil::select_blocks");
  return op.call(q, k, block_size, top_n, sink_blocks, local_blocks, cu_seqlens, scale);
}

// ---- fused training ops ----

T2 rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op = op_handle<T2(const at::Tensor&, const at::Tensor&, double)>("anvil::rms_norm");
  return op.call(x, weight, eps);
}

T2 rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& rstd) {
  static const auto op = op_handle<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
      "anvil::rms_norm_backward");
  return op.call(grad_y, x, weight, rstd);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("anvil::swiglu");
  return op.call(gate, up);
}

T2 swiglu_backward(const at::Tensor& grad, const at::Tensor& gate, const at::Tensor& up) {
  static const auto op =
      op_handle<T2(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("anvil::swiglu_backward");
  return op.call(grad, gate, up);
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("anvil::rope");
  return op.call(x, cos, sin, interleaved);
}

at::Tensor rope_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>("anvil::rope_backward");
  return op.call(grad, cos, sin, interleaved);
}

T2 cross_entropy_chunk(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  static const auto op = op_handle<T2(const at::Tensor&, const at::Tensor&, int64_t)>("anvil::cross_entropy_chunk");
  return op.call(logits, labels, ignore_index);
}

void cross_entropy_chunk_backward(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& grad_loss, int64_t ignore_index) {
  static const auto op = op_handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>(
      "anvil::cross_entropy_chunk_backward");
  op.call(logits, labels, lse, grad_loss, ignore_index);
}

T2 kd_rows(at::Tensor& student, const at::Tensor& teacher, const c10::optional<at::Tensor>& labels, int64_t loss,
           double temperature, double skew_lambda, double jsd_beta, double kd_weight, double ce_weight, bool write_grad) {
  static const auto op = op_handle<T2(at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double,
                                      double, double, double, double, bool)>("anvil::kd_rows");
  return op.call(student, teacher, labels, loss, temperature, skew_lambda, jsd_beta, kd_weight, ce_weight, write_grad);
}

bool use_fused_ops(const at::Tensor& x) {
  static const bool enabled = [] {
    const char* v = std::getenv("ANVIL_FUSED_OPS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  if (!enabled) return false;
  const auto dt = x.scalar_type();
  if (x.is_cuda()) return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
  return x.is_cpu() && (dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble);
}

}  // namespace anvil::ops
