// THE one TORCH_LIBRARY(anvil, m): every anvil operator's schema, one purpose line each.
// Kernels register per dispatch key beside their implementations (csrc/ops/<op>/<op>_{cpu,cuda,meta}).
// Scales are dequantization multipliers everywhere (x ~= q * scale_inv); see docs/FORMATS.md.
#include <torch/library.h>

TORCH_LIBRARY(anvil, m) {
  // Quantize x (..., K) fp32/bf16/fp16 to float8_e4m3fn with one scale per group:
  // granularity tensor | row | block1x128 | block128x128 (x 2-D). Saturates at +-448.
  m.def("quantize_fp8(Tensor x, str granularity) -> (Tensor q, Tensor scale_inv)");
  // q * scale_inv in out_dtype; the inverse of quantize_fp8 for the same granularity.
  m.def("dequantize_fp8(Tensor q, Tensor scale_inv, str granularity, ScalarType out_dtype) -> Tensor");
  // Symmetric int8 in [-127, 127], round half to even, same granularities as quantize_fp8.
  m.def("quantize_int8(Tensor x, str granularity) -> (Tensor q, Tensor scale_inv)");
  // q * scale_inv in out_dtype; the inverse of quantize_int8.
  m.def("dequantize_int8(Tensor q, Tensor scale_inv, str granularity, ScalarType out_dtype) -> Tensor");

  // ---- MoE routing (csrc/ops/moe; docs/FORMATS.md "MoE routing") ----
  // Top-k gate over logits (T, E): sigmoid (DeepSeek-V3 noaux_tc) or softmax, optional bias and noise in
  // the selection, group-limited; -> weights (T, top_k) fp32 (differentiable), indices (T, top_k) int32.
  m.def("moe_gate(Tensor logits, Tensor? bias, Tensor? noise, int top_k, int n_group=1, int topk_group=1, "
        "str score=\"softmax\", bool renormalize=True, float routed_scale=1.0) -> (Tensor weights, Tensor indices)");
  // Gradient of moe_gate's weights with respect to its logits -> (T, E).
  m.def("moe_gate_backward(Tensor grad_weights, Tensor logits, Tensor indices, str score, bool renormalize, "
        "float routed_scale) -> Tensor");
  // Stable routing of the (T, k) slots to expert-ordered rows padded to `align` per expert, at most
  // `capacity` per expert (-1: no limit) -> slot_rows (T, k) (-1: dropped), counts (E), offsets (E+1), dropped ().
  m.def("moe_route(Tensor indices, int num_experts, int align=1, int capacity=-1) "
        "-> (Tensor slot_rows, Tensor counts, Tensor offsets, Tensor dropped)");
  // moe_route, then hidden (T, H) gathered into permuted (T*k + E*(align-1), H); padding rows zero.
  m.def("moe_permute(Tensor hidden, Tensor indices, int num_experts, int align=1, int capacity=-1) "
        "-> (Tensor permuted, Tensor slot_rows, Tensor counts, Tensor offsets, Tensor dropped)");
  // Gradient of moe_permute with respect to hidden: each token's kept slots summed -> (T, H).
  m.def("moe_permute_backward(Tensor grad_permuted, Tensor slot_rows) -> Tensor");
  // out (T, H) = sum_j weights[t, j] * expert_out[slot_rows[t, j]] over kept slots.
  m.def("moe_unpermute(Tensor expert_out, Tensor slot_rows, Tensor weights) -> Tensor");
  // Gradients of moe_unpermute -> (grad_expert_out (R, H), grad_weights (T, k)).
  m.def("moe_unpermute_backward(Tensor grad_out, Tensor expert_out, Tensor slot_rows, Tensor weights) "
        "-> (Tensor, Tensor)");
  // Slots per expert -> counts (E) int32.
  m.def("moe_expert_load(Tensor indices, int num_experts) -> Tensor");
  // DeepSeek-V3 auxiliary-loss-free balancing: bias += gamma * sign(mean(counts) - counts), in place.
  m.def("moe_update_bias(Tensor(a!) bias, Tensor counts, float gamma) -> ()");
  // ---- FP8 GEMM (csrc/ops/fp8_gemm; docs/FORMATS.md "FP8 GEMM") ----
  // out (M, N) = (a (M, K) e4m3 * a_scale) (b (N, K) e4m3 * b_scale)^T + bias, in out_dtype; scales as
  // quantize_fp8 makes them: a per-tensor () | per-row (M, 1) | 1x128 (M, K/128); b per-tensor () |
  // per-channel (N, 1) | 128x128 (N/128, K/128). FP32 accumulation promoted every 128 of K. out_dtype None: bf16.
  m.def("fp8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType? out_dtype=None, "
        "Tensor? bias=None) -> Tensor");
  // MoE contiguous layout (moe_permute's): rows [offsets[e], offsets[e+1]) of a (R, K) times b[e] (N, K)
  // -> (R, N); 1x128 a scales (R, K/128), 128x128 b scales (E, N/128, K/128); rows of no expert are zero.
  m.def("fp8_grouped_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor offsets, "
        "ScalarType? out_dtype=None) -> Tensor");
  // MoE masked layout for decode (CUDA-graph safe): a (E, C, K), the first masked_m[e] rows of expert e
  // valid -> (E, C, N); rows at or past masked_m[e] are not written on CUDA (zero on the CPU).
  m.def("fp8_grouped_gemm_masked(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor masked_m, "
        "ScalarType? out_dtype=None) -> Tensor");
  // y (..., N) = x W^T + bias over a frozen FP8 weight (N, K) with 128x128 weight_scale_inv, x quantized
  // on the fly to 1x128 blocks; differentiable with respect to x and bias (C++ autograd).
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale_inv, Tensor? bias=None) -> Tensor");
  // Gradient of fp8_linear with respect to x: grad_out (..., N) W (N, K), W dequantized slice by slice.
  m.def("fp8_linear_backward(Tensor grad_out, Tensor weight, Tensor weight_scale_inv) -> Tensor");
  // ---- INT8 GEMM (csrc/ops/int8_gemm; docs/FORMATS.md "INT8 GEMM") ----
  // out (M, N) = (a (M, K) int8 b (N, K)^T int8, exact int32) * a_scale * b_scale^T + bias, fp32 epilogue rounded
  // once to out_dtype; a_scale () | (M, 1) per token, b_scale () | (N, 1) per channel. out_dtype None: bf16.
  m.def("int8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType? out_dtype=None, "
        "Tensor? bias=None) -> Tensor");
  // ---- Sparse attention (csrc/ops/sparse_attention; docs/FORMATS.md "Sparse attention") ----
  // Causal attention over q (B, Hq, S, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv) where query i sees key j
  // when i - window < j <= i (window -1: unlimited), j is one of its document's first sink_tokens, or j's
  // block is listed in block_indices (B, Hkv, ceil(S/block_size), n) (-1 padded, first block_counts used);
  // cu_seqlens packs documents (B = 1) that never attend across. -> o (B, Hq, S, Dv), lse (B, Hq, S) fp32.
  m.def("sparse_attention(Tensor q, Tensor k, Tensor v, Tensor? block_indices=None, Tensor? block_counts=None, "
        "Tensor? cu_seqlens=None, int window=-1, int sink_tokens=0, int block_size=64, float? scale=None, "
        "bool deterministic=False) -> (Tensor o, Tensor lse)");
  // Gradients of sparse_attention's o, recomputed from lse -> (dq, dk, dv).
  m.def("sparse_attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
        "Tensor? block_indices, Tensor? block_counts, Tensor? cu_seqlens, int window, int sink_tokens, "
        "int block_size, float? scale, bool deterministic) -> (Tensor dq, Tensor dk, Tensor dv)");
  // NSA-style block selection: mean-pooled key blocks scored by each query block (softmax per query, summed
  // over the block and the GQA group), sink and local blocks forced, top_n, ascending, -1 padded
  // -> (B, Hkv, ceil(S/block_size), top_n) int32. Ties: the lower block index.
  m.def("select_blocks(Tensor q, Tensor k, int block_size, int top_n, int sink_blocks=1, int local_blocks=2, "
        "Tensor? cu_seqlens=None, float? scale=None) -> Tensor");
  // ---- fused training ops (csrc/ops/fused; docs/FORMATS.md "Fused training ops") ----
  // transformers' LlamaRMSNorm over x (..., H): y = weight * (x.float() * rstd).to(x.dtype), rstd = rsqrt(mean(x^2)
  // + eps) (...) fp32 (fp64 for fp64 x); weight (H) in x's dtype. Differentiable wrt x and weight (C++ autograd).
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> (Tensor y, Tensor rstd)");
  // Gradients of rms_norm -> (grad_x (..., H), grad_weight (H)); grad_weight summed in fp32, deterministically.
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor grad_x, Tensor grad_weight)");
  // silu(gate) * up, gate and up (..., F) of one dtype; differentiable, the backward recomputes silu.
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor");
  // Gradients of swiglu -> (grad_gate, grad_up), from grad and the inputs.
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor grad_up)");
  // Rotary embedding of x (B, S, H, D) (unit stride along D) by cos, sin (B or 1, S, D):
  // out = x * cos + rotate_half(x) * sin, or DeepSeek's interleaved pairs (rotated evens, then odds);
  // -> contiguous (B, S, H, D). Differentiable wrt x.
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved=False) -> Tensor");
  // The transposed rotation: rope's gradient wrt x, given grad (B, S, H, D) of its output.
  m.def("rope_backward(Tensor grad, Tensor cos, Tensor sin, bool interleaved=False) -> Tensor");
  // One chunk of a causal-LM loss: logits (T, V), labels (T) int64 -> (loss (T) fp32 = lse - logits[label], 0 where
  // label == ignore_index; lse (T) fp32 = logsumexp(logits)). Differentiable wrt logits through loss.
  m.def("cross_entropy_chunk(Tensor logits, Tensor labels, int ignore_index=-100) -> (Tensor loss, Tensor lse)");
  // In place: logits <- (softmax(logits) - onehot(labels)) * grad_loss (grad_loss (T) or () fp32); ignored rows 0.
  m.def("cross_entropy_chunk_backward(Tensor(a!) logits, Tensor labels, Tensor lse, Tensor grad_loss, "
        "int ignore_index=-100) -> ()");
  // One chunk of a distillation loss (CUDA only; train/kd_loss.cpp is the CPU path): student and teacher logits
  // (R, V) of one dtype, labels (R) int64 or None, loss code (train::KdLoss order) -> (kd (R) fp32 divergence of
  // softmax(teacher / T) and softmax(student / T), ce (R) fp32 cross-entropy of the untempered student, 0 without
  // labels); write_grad overwrites the student's logits with kd_weight / T * dkd/dz + ce_weight * dce/dz.
  m.def("kd_rows(Tensor(a!) student, Tensor teacher, Tensor? labels, int loss, float temperature, float skew_lambda, "
        "float jsd_beta, float kd_weight, float ce_weight, bool write_grad) -> (Tensor kd, Tensor ce)");
}
