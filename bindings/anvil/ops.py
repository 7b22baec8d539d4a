"""Typed, documented wrappers of every ``torch.ops.anvil.*`` operator (csrc/ops/registration.cpp).

Each function calls its dispatcher op unchanged: the same argument names, order and defaults as the op's
schema (tests/python/test_ops_api.py checks them against ``torch.ops.anvil``), so autograd, ``torch.compile``,
FakeTensor and ``torch.library.opcheck`` behave as with the op itself, and a wrong dtype, shape or device
raises the op's own error (``RuntimeError: anvil::<op>: <argument> must ...``). No wrapper checks or converts
anything on its own. Shapes use T tokens, E experts, K the reduction dimension; docs/FORMATS.md has the
arithmetic of each op. Scales are fp32 dequantization multipliers: ``x ~= float(q) * scale_inv``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.anvil

__all__ = [
    "quantize_fp8", "dequantize_fp8", "quantize_int8", "dequantize_int8",
    "moe_gate", "moe_gate_backward", "moe_route", "moe_permute", "moe_permute_backward", "moe_unpermute",
    "moe_unpermute_backward", "moe_expert_load", "moe_update_bias",
    "fp8_gemm", "fp8_grouped_gemm", "fp8_grouped_gemm_masked", "fp8_linear", "fp8_linear_backward", "int8_gemm",
    "sparse_attention", "sparse_attention_backward", "select_blocks",
    "rms_norm", "rms_norm_backward", "swiglu", "swiglu_backward", "rope", "rope_backward",
    "cross_entropy_chunk", "cross_entropy_chunk_backward", "kd_rows",
]


# ---- quantization (docs/FORMATS.md "Scales", "Quantization arithmetic") ----

def quantize_fp8(x: Tensor, granularity: str) -> Tuple[Tensor, Tensor]:
    """x (..., K) fp32/bf16/fp16, contiguous -> (q, scale_inv): q of x's shape in float8_e4m3fn (saturated at
    +-448, round to nearest even) and fp32 scale_inv of shape () for granularity "tensor", (..., 1) for "row",
    (..., ceil(K/128)) for "block1x128", (ceil(N/128), ceil(K/128)) for "block128x128" (x 2-D (N, K))."""
    return _ops.quantize_fp8(x, granularity)


def dequantize_fp8(q: Tensor, scale_inv: Tensor, granularity: str, out_dtype: torch.dtype) -> Tensor:
    """q float8_e4m3fn and its fp32 scale_inv (as quantize_fp8 made them for granularity) -> q * scale_inv
    of q's shape in out_dtype (fp32, bf16 or fp16)."""
    return _ops.dequantize_fp8(q, scale_inv, granularity, out_dtype)


def quantize_int8(x: Tensor, granularity: str) -> Tuple[Tensor, Tensor]:
    """x (..., K) fp32/bf16/fp16 -> (q int8 in [-127, 127], x's shape; scale_inv fp32): symmetric, round half
    to even; granularity and the scale shapes as for quantize_fp8."""
    return _ops.quantize_int8(x, granularity)


def dequantize_int8(q: Tensor, scale_inv: Tensor, granularity: str, out_dtype: torch.dtype) -> Tensor:
    """q int8 and its fp32 scale_inv (quantize_int8's, for granularity) -> q * scale_inv in out_dtype."""
    return _ops.dequantize_int8(q, scale_inv, granularity, out_dtype)


# ---- MoE routing (docs/FORMATS.md "MoE routing") ----

def moe_gate(logits: Tensor, bias: Optional[Tensor], noise: Optional[Tensor], top_k: int, n_group: int = 1,
             topk_group: int = 1, score: str = "softmax", renormalize: bool = True,
             routed_scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """Top-k router gate. logits (T, E) fp32/bf16/fp16; bias (E) fp32 and noise (T, E) fp32 enter the selection
    only; score "softmax" or "sigmoid"; n_group groups (E % n_group == 0) of which topk_group are kept
    -> (weights (T, top_k) fp32, differentiable wrt logits; indices (T, top_k) int32). Ties go to the lower
    expert; weights renormalized (if renormalize) then times routed_scale."""
    return _ops.moe_gate(logits, bias, noise, top_k, n_group, topk_group, score, renormalize, routed_scale)


def moe_gate_backward(grad_weights: Tensor, logits: Tensor, indices: Tensor, score: str, renormalize: bool,
                      routed_scale: float) -> Tensor:
    """Gradient of moe_gate's weights wrt its logits: grad_weights (T, top_k) fp32, logits (T, E), indices
    (T, top_k) int32, and the forward's score, renormalize and routed_scale -> (T, E) in logits' dtype."""
    return _ops.moe_gate_backward(grad_weights, logits, indices, score, renormalize, routed_scale)


def moe_route(indices: Tensor, num_experts: int, align: int = 1,
              capacity: int = -1) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stable routing of indices (T, k) int32 (values in [0, num_experts)) to expert-ordered rows, each expert's
    block padded to a multiple of align, at most capacity slots per expert (-1: no limit) -> (slot_rows (T, k)
    int32, -1 for a dropped slot; counts (E) int32; offsets (E + 1) int32; dropped () int32)."""
    return _ops.moe_route(indices, num_experts, align, capacity)


def moe_permute(hidden: Tensor, indices: Tensor, num_experts: int, align: int = 1,
                capacity: int = -1) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """moe_route of indices (T, k) int32 over num_experts (align, capacity as there), then hidden (T, H) gathered -> (permuted (T*k + E*(align-1), H) in hidden's dtype, padding rows
    zero; slot_rows (T, k), counts (E), offsets (E + 1), dropped () int32). Differentiable wrt hidden."""
    return _ops.moe_permute(hidden, indices, num_experts, align, capacity)


def moe_permute_backward(grad_permuted: Tensor, slot_rows: Tensor) -> Tensor:
    """Gradient of moe_permute wrt hidden: grad_permuted (R, H), slot_rows (T, k) int32 -> (T, H), each token's
    kept slots summed."""
    return _ops.moe_permute_backward(grad_permuted, slot_rows)


def moe_unpermute(expert_out: Tensor, slot_rows: Tensor, weights: Tensor) -> Tensor:
    """expert_out (R, H), slot_rows (T, k) int32, weights (T, k) fp32 -> out (T, H) in expert_out's dtype,
    out[t] = sum_j weights[t, j] * expert_out[slot_rows[t, j]] over kept slots (fp32 sums, j order).
    Differentiable wrt expert_out and weights."""
    return _ops.moe_unpermute(expert_out, slot_rows, weights)


def moe_unpermute_backward(grad_out: Tensor, expert_out: Tensor, slot_rows: Tensor,
                           weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of moe_unpermute: grad_out (T, H) and the forward's expert_out (R, H), slot_rows (T, k) int32 and
    weights (T, k) fp32 -> (grad_expert_out (R, H), grad_weights (T, k) fp32)."""
    return _ops.moe_unpermute_backward(grad_out, expert_out, slot_rows, weights)


def moe_expert_load(indices: Tensor, num_experts: int) -> Tensor:
    """Slots per expert: indices (T, k) int32 -> counts (num_experts) int32."""
    return _ops.moe_expert_load(indices, num_experts)


def moe_update_bias(bias: Tensor, counts: Tensor, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, in place: bias (E) fp32 += gamma * sign(mean(counts) -
    counts), counts (E) int32 (moe_expert_load's)."""
    return _ops.moe_update_bias(bias, counts, gamma)


# ---- FP8 and INT8 GEMMs (docs/FORMATS.md "FP8 GEMM", "INT8 GEMM") ----

def fp8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: Optional[torch.dtype] = None,
             bias: Optional[Tensor] = None) -> Tensor:
    """out (M, N) = (a * a_scale) @ (b * b_scale)^T + bias, rounded once to out_dtype (bf16 when None; fp16,
    fp32). a (M, K) and b (N, K) float8_e4m3fn, contiguous; a_scale fp32 () | (M, 1) | (M, ceil(K/128)); b_scale
    fp32 () | (N, 1) | (ceil(N/128), ceil(K/128)); K % 128 == 0 when either is block-scaled; bias (N)
    fp32/bf16/fp16. FP32 accumulation promoted every 128 of K."""
    return _ops.fp8_gemm(a, a_scale, b, b_scale, out_dtype, bias)


def fp8_grouped_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, offsets: Tensor,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """MoE contiguous layout (moe_permute's): a (R, K) e4m3 with a_scale (R, K/128) fp32, b (E, N, K) e4m3 with
    b_scale (E, ceil(N/128), K/128) fp32, offsets (E + 1) int32 non-decreasing in [0, R], K % 128 == 0
    -> (R, N) in out_dtype (bf16 when None): rows [offsets[e], offsets[e+1]) times expert e; other rows zero."""
    return _ops.fp8_grouped_gemm(a, a_scale, b, b_scale, offsets, out_dtype)


def fp8_grouped_gemm_masked(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, masked_m: Tensor,
                            out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """MoE masked layout (decode, CUDA-graph safe): a (E, C, K) e4m3 with a_scale (E, C, K/128) fp32, b (E, N, K)
    e4m3 with b_scale (E, ceil(N/128), K/128), masked_m (E) int32 in [0, C] -> (E, C, N) in out_dtype (bf16 when
    None); rows at or past masked_m[e] are not written on CUDA (zero on the CPU)."""
    return _ops.fp8_grouped_gemm_masked(a, a_scale, b, b_scale, masked_m, out_dtype)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale_inv: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y (..., N) = x W^T + bias in x's dtype (bf16, fp16, fp32): x (..., K), weight (N, K) float8_e4m3fn with
    weight_scale_inv (ceil(N/128), K/128) fp32 (DeepSeek-V3's layout; K % 128 == 0), bias (N). x is quantized to
    1x128 blocks on the fly. Differentiable wrt x and bias; the weight is frozen."""
    return _ops.fp8_linear(x, weight, weight_scale_inv, bias)


def fp8_linear_backward(grad_out: Tensor, weight: Tensor, weight_scale_inv: Tensor) -> Tensor:
    """Gradient of fp8_linear wrt x: grad_out (..., N), weight (N, K) e4m3 and weight_scale_inv (ceil(N/128), K/128)
    fp32 -> grad_out W (..., K) in grad_out's dtype, W dequantized slice by slice."""
    return _ops.fp8_linear_backward(grad_out, weight, weight_scale_inv)


def int8_gemm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: Optional[torch.dtype] = None,
              bias: Optional[Tensor] = None) -> Tensor:
    """out (M, N) = (a b^T, exact int32) * a_scale * b_scale^T + bias, fp32 epilogue rounded once to out_dtype
    (bf16 when None; fp16, fp32). a (M, K) and b (N, K) int8, contiguous; a_scale fp32 () | (M, 1); b_scale fp32
    () | (N, 1); bias (N) fp32/bf16/fp16; K <= 131071. No gradient."""
    return _ops.int8_gemm(a, a_scale, b, b_scale, out_dtype, bias)


# ---- sparse attention (docs/FORMATS.md "Sparse attention") ----

def sparse_attention(q: Tensor, k: Tensor, v: Tensor, block_indices: Optional[Tensor] = None,
                     block_counts: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None, window: int = -1,
                     sink_tokens: int = 0, block_size: int = 64, scale: Optional[float] = None,
                     deterministic: bool = False) -> Tuple[Tensor, Tensor]:
    """Causal attention over q (B, Hq, S, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) (Hq % Hkv == 0; bf16/fp16 on
    CUDA, also fp32/fp64 on the CPU; D 64 or 128, 192/128 on the CPU): query i sees key j <= i when i - j < window
    (-1: unlimited), j is among its document's first sink_tokens, or j's block (of block_size, a multiple of 64)
    is listed in block_indices (B, Hkv, ceil(S/block_size), n) int32 (-1 padded; the first block_counts
    (B, Hkv, ceil(S/block_size)) int32 used); cu_seqlens (docs + 1) int32 packs documents (B = 1). scale None:
    1/sqrt(D). -> (o (B, Hq, S, Dv) in q's dtype, lse (B, Hq, S) fp32). Differentiable wrt q, k, v; deterministic
    makes the CUDA backward's GQA dk/dv sums bit-reproducible."""
    return _ops.sparse_attention(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens, block_size,
                                 scale, deterministic)


def sparse_attention_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                              block_indices: Optional[Tensor], block_counts: Optional[Tensor],
                              cu_seqlens: Optional[Tensor], window: int, sink_tokens: int, block_size: int,
                              scale: Optional[float], deterministic: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sparse_attention, recomputed from its lse (B, Hq, S) fp32: grad_o (B, Hq, S, Dv), the forward's
    q, k, v, o and its arguments (block_indices, block_counts, cu_seqlens, window, sink_tokens, block_size, scale,
    deterministic) -> (dq (B, Hq, S, D), dk (B, Hkv, S, D), dv (B, Hkv, S, Dv)) in q's dtype."""
    return _ops.sparse_attention_backward(grad_o, q, k, v, o, lse, block_indices, block_counts, cu_seqlens, window,
                                          sink_tokens, block_size, scale, deterministic)


def select_blocks(q: Tensor, k: Tensor, block_size: int, top_n: int, sink_blocks: int = 1, local_blocks: int = 2,
                  cu_seqlens: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """NSA-style block selection for sparse_attention: q (B, Hq, S, D), k (B, Hkv, S, D); mean-pooled key blocks
    scored per query block (softmax per query, summed over the block and the GQA group), sink_blocks and
    local_blocks forced, documents packed by cu_seqlens (docs + 1) int32 kept apart, scores scaled by scale (None:
    1/sqrt(D)) -> (B, Hkv, ceil(S/block_size), top_n) int32, ascending, -1 padded; ties to the lower block."""
    return _ops.select_blocks(q, k, block_size, top_n, sink_blocks, local_blocks, cu_seqlens, scale)


# ---- fused training ops (docs/FORMATS.md "Fused training ops") ----

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """transformers' LlamaRMSNorm: x (..., H) fp32/bf16/fp16 (fp64 on the CPU), weight (H) in x's dtype
    -> (y (..., H) = weight * (x.float() * rstd).to(x.dtype), rstd (...) fp32 = rsqrt(mean(x^2) + eps)).
    Differentiable wrt x and weight."""
    return _ops.rms_norm(x, weight, eps)


def rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of rms_norm: grad_y (..., H), x (..., H), weight (H), rstd (...) fp32 -> (grad_x (..., H),
    grad_weight (H)), grad_weight summed in fp32 in a fixed order."""
    return _ops.rms_norm_backward(grad_y, x, weight, rstd)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: gate and up (..., F) of one dtype (fp32/bf16/fp16; fp64 on the CPU) -> (..., F).
    Differentiable (the backward recomputes silu)."""
    return _ops.swiglu(gate, up)


def swiglu_backward(grad: Tensor, gate: Tensor, up: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of swiglu: grad, gate, up (..., F) of one dtype -> (grad_gate, grad_up) (..., F) in that dtype
    (fp32 arithmetic, one rounding)."""
    return _ops.swiglu_backward(grad, gate, up)


def rope(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotary embedding: x (B, S, H, D) (any strides, unit stride along D), cos and sin (B or 1, S, D) of x's
    dtype -> contiguous (B, S, H, D): x * cos + rotate_half(x) * sin, or DeepSeek's interleaved pairs;
    bit-exact with transformers' apply_rotary_pos_emb. Differentiable wrt x (cos/sin must not require grad)."""
    return _ops.rope(x, cos, sin, interleaved)


def rope_backward(grad: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """rope's gradient wrt x (the transposed rotation): grad (B, S, H, D), cos and sin (B or 1, S, D) of grad's
    dtype, interleaved as in the forward -> (B, S, H, D)."""
    return _ops.rope_backward(grad, cos, sin, interleaved)


def cross_entropy_chunk(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """One chunk of a causal-LM loss: logits (T, V) fp32/bf16/fp16, labels (T) int64 -> (loss (T) fp32 =
    lse - logits[label], 0 where label == ignore_index; lse (T) fp32 = logsumexp(logits)). Differentiable wrt
    logits through loss."""
    return _ops.cross_entropy_chunk(logits, labels, ignore_index)


def cross_entropy_chunk_backward(logits: Tensor, labels: Tensor, lse: Tensor, grad_loss: Tensor,
                                 ignore_index: int = -100) -> None:
    """In place: logits (T, V) <- (softmax(logits) - onehot(labels)) * grad_loss, with labels (T) int64, lse (T)
    fp32 (cross_entropy_chunk's), grad_loss (T) or () fp32; rows whose label is ignore_index become 0."""
    return _ops.cross_entropy_chunk_backward(logits, labels, lse, grad_loss, ignore_index)


def kd_rows(student: Tensor, teacher: Tensor, labels: Optional[Tensor], loss: int, temperature: float,
            skew_lambda: float, jsd_beta: float, kd_weight: float, ce_weight: float,
            write_grad: bool) -> Tuple[Tensor, Tensor]:
    """One chunk of a distillation loss (CUDA only; anvil._C.kd_loss_names() lists the loss codes in order):
    student and teacher logits (R, V) of one dtype (fp32/bf16/fp16), labels (R) int64 or None -> (kd (R) fp32,
    the divergence of softmax(teacher / temperature) and softmax(student / temperature); ce (R) fp32, the
    untempered student's cross-entropy, 0 without labels). write_grad overwrites student in place with
    kd_weight / temperature * dkd/dz + ce_weight * dce/dz; skew_lambda and jsd_beta parameterize the skew KLs
    and the generalized JSD."""
    return _ops.kd_rows(student, teacher, labels, loss, temperature, skew_lambda, jsd_beta, kd_weight, ce_weight,
                        write_grad)
