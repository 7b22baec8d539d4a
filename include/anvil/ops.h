// Typed C++ entry points of every anvil operator. Each calls the PyTorch dispatcher, so the CPU,
// CUDA, Meta and Autograd kernels registered in csrc/ops are chosen exactly as from Python
// (`torch.ops.anvil.<name>`). Schemas: csrc/ops/registration.cpp; formats: docs/FORMATS.md.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

namespace anvil::ops {

/// Quantizes x (..., K) (fp32, bf16 or fp16, contiguous) to float8_e4m3fn.
/// granularity: "tensor" -> scale_inv (); "row" -> (..., 1); "block1x128" -> (..., ceil(K/128));
/// "block128x128" (x 2-D (N, K)) -> (ceil(N/128), ceil(K/128)), DeepSeek-V3's weight_scale_inv.
/// scale_inv is fp32 and a dequantization multiplier: x ~= float(q) * scale_inv, where
/// scale_inv = max(amax, 1e-10) / 448 and q = round_nearest_even(clamp(x / scale_inv, -448, 448)).
/// A group holding NaN or inf gets scale_inv = NaN and q = NaN.
/// @returns (q, scale_inv)
std::tuple<at::Tensor, at::Tensor> quantize_fp8(const at::Tensor& x, const std::string& granularity);

/// float(q) * scale_inv rounded to out_dtype (fp32, bf16 or fp16); shapes as for quantize_fp8.
at::Tensor dequantize_fp8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                          at::ScalarType out_dtype);

/// Symmetric int8: scale_inv = max(amax, 1e-10) / 127, q = round_half_even(clamp(x / scale_inv, -127, 127)).
/// Same granularities and shapes as quantize_fp8; a group holding NaN or inf gets scale_inv = NaN, q = 0.
std::tuple<at::Tensor, at::Tensor> quantize_int8(const at::Tensor& x, const std::string& granularity);

/// float(q) * scale_inv rounded to out_dtype.
at::Tensor dequantize_int8(const at::Tensor& q, const at::Tensor& scale_inv, const std::string& granularity,
                           at::ScalarType out_dtype);

// ---- MoE routing (docs/FORMATS.md, "MoE routing") ----------------------------------------------

/// Top-k expert gate. logits (T, E) fp32/bf16/fp16 (fp64 on CPU, for gradcheck); bias (E) and noise
/// (T, E) fp32, added to the selection scores only. score "sigmoid" (DeepSeek-V3) or "softmax";
/// n_group > 1 limits the choice to the topk_group best groups. Ties go to the lower expert index.
/// @returns (weights (T, top_k) fp32, differentiable wrt logits; indices (T, top_k) int32)
std::tuple<at::Tensor, at::Tensor> moe_gate(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& noise, int64_t top_k,
                                            int64_t n_group = 1, int64_t topk_group = 1,
                                            const std::string& score = "softmax", bool renormalize = true,
                                            double routed_scale = 1.0);

/// Gradient of moe_gate's weights with respect to logits -> (T, E) in logits' dtype.
at::Tensor moe_gate_backward(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                             const std::string& score, bool renormalize, double routed_scale);

/// Stable routing of the (T, k) slots: (slot_rows (T, k) int32, -1 where dropped by capacity;
/// counts (E); offsets (E + 1), each expert's first row, padded to `align`; dropped ()).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route(const at::Tensor& indices, int64_t num_experts,
                                                                     int64_t align = 1, int64_t capacity = -1);

/// moe_route plus the gather: (permuted (T*k + E*(align-1), H), slot_rows, counts, offsets, dropped).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute(const at::Tensor& hidden,
                                                                                   const at::Tensor& indices,
                                                                                   int64_t num_experts,
                                                                                   int64_t align = 1,
                                                                                   int64_t capacity = -1);

/// Gradient of moe_permute with respect to hidden -> (T, H).
at::Tensor moe_permute_backward(const at::Tensor& grad_permuted, const at::Tensor& slot_rows);

/// out (T, H) = sum_j weights[t, j] * expert_out[slot_rows[t, j]] (kept slots), fp32 accumulation.
at::Tensor moe_unpermute(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights);

/// Gradients of moe_unpermute: (grad_expert_out (R, H), grad_weights (T, k)).
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward(const at::Tensor& grad_out, const at::Tensor& expert_out,
                                                          const at::Tensor& slot_rows, const at::Tensor& weights);

/// Slots per expert -> counts (E) int32.
at::Tensor moe_expert_load(const at::Tensor& indices, int64_t num_experts);

/// DeepSeek-V3 auxiliary-loss-free update, in place: bias += gamma * sign(mean(counts) - counts).
void moe_update_bias(at::Tensor& bias, const at::Tensor& counts, double gamma);

/// DeepSeek-V3's sequence-wise balance loss for one sequence, a differentiable composite of ATen ops:
/// alpha * sum_i f_i P_i, f_i = E / (k T) * #{t : i in indices[t]}, P_i = mean_t s[t, i] / sum_e s[t, e],
/// with s = sigmoid(logits) (T, E) and indices (T, k).
at::Tensor moe_sequence_balance_loss(const at::Tensor& logits, const at::Tensor& indices, double alpha);

// ---- FP8 GEMM (docs/FORMATS.md, "FP8 GEMM") ----------------------------------------------------

/// out (M, N) = dequant(a) dequant(b)^T + bias, rounded once to out_dtype (bf16, fp16 or fp32).
/// a (M, K) and b (N, K) are float8_e4m3fn, contiguous; the scales are quantize_fp8's scale_inv, fp32:
/// a_scale () per-tensor, (M, 1) per-row or (M, ceil(K/128)) 1x128 blocks; b_scale () per-tensor,
/// (N, 1) per-channel or (ceil(N/128), ceil(K/128)) 128x128 blocks. Block scales on either side need
/// K % 128 == 0. bias (N) fp32/bf16/fp16. Hopper: a CUTLASS sm_90a kernel (FP32 promotion every 128 of
/// K); other GPUs: dequantize + bf16 GEMM (warned once); CPU: dequantize + fp32 matmul (the reference).
at::Tensor fp8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                    at::ScalarType out_dtype = at::kBFloat16, const c10::optional<at::Tensor>& bias = c10::nullopt);

/// MoE grouped GEMM, contiguous layout (moe_permute's): out[r] = dequant(a[r]) dequant(b[e])^T for the
/// rows offsets[e] <= r < offsets[e+1]; rows of no expert are zero. a (R, K) e4m3 with a_scale
/// (R, K/128); b (E, N, K) e4m3 with b_scale (E, ceil(N/128), K/128); offsets (E + 1) int32,
/// non-decreasing in [0, R]. K % 128 == 0. -> (R, N) in out_dtype.
at::Tensor fp8_grouped_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                            const at::Tensor& b_scale, const at::Tensor& offsets,
                            at::ScalarType out_dtype = at::kBFloat16);

/// MoE grouped GEMM, masked layout (decode, CUDA graphs): a (E, C, K) with a_scale (E, C, K/128), expert
/// e's first masked_m[e] rows valid (masked_m (E) int32 on the device, read there: no host sync).
/// -> (E, C, N); rows at or past masked_m[e] are not written on CUDA (their contents are unspecified) and
/// zero on the CPU.
at::Tensor fp8_grouped_gemm_masked(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                   const at::Tensor& b_scale, const at::Tensor& masked_m,
                                   at::ScalarType out_dtype = at::kBFloat16);

/// y (..., N) = x W^T + bias in x's dtype, W (N, K) e4m3 frozen with weight_scale_inv (ceil(N/128), K/128);
/// x (..., K) bf16/fp16/fp32 is quantized to 1x128 blocks on the fly. Differentiable with respect to x
/// (dX = dY W, W dequantized to dY's dtype: bf16 accuracy) and bias.
at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                      const c10::optional<at::Tensor>& bias = c10::nullopt);

/// grad_out (..., N) W (N, K) -> (..., K) in grad_out's dtype: fp8_linear's gradient with respect to x.
at::Tensor fp8_linear_backward(const at::Tensor& grad_out, const at::Tensor& weight,
                               const at::Tensor& weight_scale_inv);

/// The sm_90a kernel configuration fp8_gemm would run for this problem on the current CUDA device ("" when
/// there is none: no sm_90a build or another GPU; the fallback runs then). The environment variable
/// ANVIL_FP8_GEMM_CONFIG=<name> forces one (docs/FORMATS.md, "FP8 GEMM", lists the names).
std::string fp8_gemm_config(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype = at::kBFloat16);

/// Every sm_90a configuration compiled into this build, as "name:dtype" (empty without sm_90a kernels).
std::vector<std::string> fp8_gemm_configs();

// ---- INT8 GEMM (docs/FORMATS.md, "INT8 GEMM") -------------------------------------------------

/// out (M, N) = (a b^T, exact int32) * a_scale * b_scale^T + bias: the int32 accumulator converted to fp32,
/// times a_scale[m], times b_scale[n], plus bias[n], rounded once to out_dtype (bf16, fp16 or fp32).
/// a (M, K) and b (N, K) int8, contiguous; a_scale () or (M, 1) (per token, quantize_int8 "row"), b_scale ()
/// or (N, 1) (per channel), fp32; bias (N) fp32/bf16/fp16; K <= 131071 (no int32 overflow). CUDA: the INT8
/// tensor cores (CUTLASS sm_90a kernel with the scales fused on Hopper, else cuBLASLt int32 + an epilogue
/// kernel; small or unaligned shapes a plain int32 kernel); CPU: the reference. No gradient (integer inputs).
at::Tensor int8_gemm(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                     at::ScalarType out_dtype = at::kBFloat16, const c10::optional<at::Tensor>& bias = c10::nullopt);

/// Which CUDA path int8_gemm takes for this problem on the current device: "sm90" (the fused CUTLASS kernel),
/// "int_mm" (cuBLASLt int32 + epilogue) or "simt" (the plain kernel); "cpu" without CUDA. ANVIL_INT8_GEMM_PATH
/// =sm90|int_mm|simt forces one (tests and benchmarks): "" here when the forced path cannot take the problem,
/// an error from int8_gemm itself.
std::string int8_gemm_path(int64_t m, int64_t n, int64_t k, at::ScalarType out_dtype = at::kBFloat16);

// ---- Sparse attention (docs/FORMATS.md, "Sparse attention") -----------------------------------

/// Causal block-sparse attention. q (B, Hq, S, Dqk), k (B, Hkv, S, Dqk), v (B, Hkv, S, Dv), Hq % Hkv == 0
/// (GQA; the heads of a group share the selected blocks); head dims 64 or 128 (Dqk = Dv), or 192 with
/// Dv 128 (CPU only for now). Query i attends key j when j <= i, j is in i's document (cu_seqlens
/// (ndocs + 1) int32, B = 1) and: i - j < window (window -1: unlimited), or j is among its document's
/// first sink_tokens, or block j / block_size is among the first block_counts[b, hkv, i / block_size]
/// entries of block_indices[b, hkv, i / block_size] (int32, -1 padded; absolute block numbers of the
/// packed sequence). One softmax over the union. scale defaults to 1/sqrt(Dqk). A query that attends no
/// key gets o = 0 and lse = -inf. CUDA: bf16/fp16; CPU: also fp32/fp64 (the reference).
/// Differentiable with respect to q, k, v (C++ autograd). deterministic: bit-reproducible backward.
/// @returns (o (B, Hq, S, Dv) in q's dtype, lse (B, Hq, S) fp32, natural log)
std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& block_indices = c10::nullopt,
                                                    const c10::optional<at::Tensor>& block_counts = c10::nullopt,
                                                    const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt,
                                                    int64_t window = -1, int64_t sink_tokens = 0,
                                                    int64_t block_size = 64, c10::optional<double> scale = c10::nullopt,
                                                    bool deterministic = false);

/// Gradients of sparse_attention's o: (dq, dk, dv) in the inputs' dtype, recomputed from lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const c10::optional<at::Tensor>& block_indices,
    const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
    int64_t sink_tokens, int64_t block_size, c10::optional<double> scale, bool deterministic = false);

/// NSA-style selection of key blocks for every (b, kv head, query block): keys mean-pooled per block,
/// each query's softmax over the blocks it may see (block <= its own, within its document), summed over
/// the query block and the GQA group; the first sink_blocks blocks of the document and the local_blocks
/// blocks ending at the query block are forced; then the highest scores (ties: lower block index).
/// @returns (B, Hkv, ceil(S / block_size), top_n) int32, ascending, -1 padded; no gradient.
at::Tensor select_blocks(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_n,
                         int64_t sink_blocks = 1, int64_t local_blocks = 2,
                         const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt,
                         c10::optional<double> scale = c10::nullopt);
// ---- fused training ops (docs/FORMATS.md, "Fused training ops") --------------------------------

/// transformers' LlamaRMSNorm: y = weight * (x.float() * rstd).to(x.dtype) with rstd = 1 / sqrt(mean(x^2) + eps)
/// over the last dim, in fp32. x (..., H) contiguous fp32/bf16/fp16 (fp64 on the CPU), weight (H) of x's dtype.
/// Differentiable wrt x and weight (the backward saves x and rstd; grad_weight is summed in fp32 in a fixed order).
/// @returns (y (..., H), rstd (...) fp32, fp64 for fp64 x)
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

/// Gradients of rms_norm: (grad_x (..., H), grad_weight (H)), both in x's dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd);

/// silu(gate) * up for gate, up (..., F) contiguous of one dtype: silu rounded to the dtype, then the product,
/// as PyTorch's eager `act_fn(gate) * up`. Differentiable; the backward saves only gate and up.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

/// Gradients of swiglu: (grad_gate, grad_up), computed in fp32 from grad and the inputs.
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up);

/// Rotary embedding of x (B, S, H, D), any strides with a unit stride along D (the view of a projection's
/// output), by cos and sin (B or 1, S, D) contiguous in x's dtype, as transformers applies them:
/// half layout out = x * cos + rotate_half(x) * sin; interleaved (DeepSeek) the pairs (x[2i], x[2i+1]) rotated
/// by cos[i], sin[i], output the rotated evens then the rotated odds. Every product and sum is rounded as
/// the ATen composite rounds it, so the result equals it bit for bit. Differentiable wrt x.
/// @returns a contiguous (B, S, H, D) tensor
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved = false);

/// rope's gradient wrt x: the transposed rotation of grad (B, S, H, D) -> contiguous (B, S, H, D).
at::Tensor rope_backward(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin,
                         bool interleaved = false);

/// One chunk of a causal-LM cross-entropy. logits (T, V) contiguous fp32/bf16/fp16 (fp64 on the CPU), labels (T)
/// int64. lse[t] = logsumexp(logits[t]) in fp32; loss[t] = lse[t] - logits[t, labels[t]], 0 where
/// labels[t] == ignore_index. A label outside [0, V) that is not ignore_index raises on the CPU and gives a
/// NaN loss on CUDA (no host sync). Differentiable wrt logits through loss (lse is not differentiable).
/// @returns (loss (T) fp32, lse (T) fp32; fp64 for fp64 logits)
std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk(const at::Tensor& logits, const at::Tensor& labels,
                                                       int64_t ignore_index = -100);

/// The backward of cross_entropy_chunk, in place, so a chunked loss never holds a second (T, V) buffer:
/// logits[t, v] <- (exp(logits[t, v] - lse[t]) - [v == labels[t]]) * grad_loss[t], zero rows where
/// labels[t] == ignore_index. grad_loss (T) or a scalar () fp32 (fp64 for fp64 logits); lse as returned by the
/// forward.
void cross_entropy_chunk_backward(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                  const at::Tensor& grad_loss, int64_t ignore_index = -100);

/// One chunk of the distillation loss of train/kd_loss.h and its gradient, fused (CUDA only: on the CPU the
/// composite in train/kd_loss.cpp is the implementation). student and teacher logits (R, V) contiguous, one dtype
/// (fp32/bf16/fp16); labels (R) int64 or nullopt; loss: train::KdLoss's code (0 forward_kl, 1 reverse_kl,
/// 2 skew_forward_kl, 3 skew_reverse_kl, 4 jsd, 5 tv; jsd with beta 0 or 1 passed as 0 or 1). kd[r] = the
/// divergence of softmax(teacher[r] / T) and softmax(student[r] / T); ce[r] = logsumexp(student[r]) -
/// student[r, labels[r]] (untempered; 0 without labels, NaN for a label outside [0, V)). With write_grad the
/// student's logits are overwritten by kd_weight / T * d kd[r] / dz + ce_weight * d ce[r] / dz, rounded once.
/// @returns (kd (R) fp32, ce (R) fp32)
std::tuple<at::Tensor, at::Tensor> kd_rows(at::Tensor& student, const at::Tensor& teacher,
                                           const c10::optional<at::Tensor>& labels, int64_t loss, double temperature,
                                           double skew_lambda, double jsd_beta, double kd_weight, double ce_weight,
                                           bool write_grad);

/// Whether callers run the fused ops (rms_norm, rope, swiglu, cross_entropy_chunk) on a tensor like x: on
/// CUDA for fp32/bf16/fp16, on the CPU also for fp64 (the CPU kernels reproduce transformers' arithmetic).
/// The environment variable ANVIL_FUSED_OPS=0 turns them off (the ATen composites run instead). The model
/// layer and the training loss both ask here, so one switch covers every fused path.
bool use_fused_ops(const at::Tensor& x);

}  // namespace anvil::ops
