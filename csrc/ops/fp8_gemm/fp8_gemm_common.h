// What the CPU, CUDA and Meta kernels of the FP8 GEMM ops share: how a scale tensor's shape names its
// granularity, and the argument checks (each error names the argument and the rule it broke). The
// formats are anvil's quantize_fp8 outputs, unchanged (docs/FORMATS.md, "FP8 GEMM"):
//
//   a (M, K) e4m3, a_scale:  ()            per-tensor         ("tensor")
//                            (M, 1)        per-row / token    ("row")
//                            (M, Kb)       1 x 128 blocks     ("block1x128"),  Kb = ceil(K / 128)
//   b (N, K) e4m3, b_scale:  ()            per-tensor         ("tensor")
//                            (N, 1)        per-channel        ("row")
//                            (Nb, Kb)      128 x 128 blocks   ("block128x128"), Nb = ceil(N / 128)
// Scales are fp32 dequantization multipliers: a ~= float(a_q) * a_scale. When either side is blocked,
// K must be a multiple of 128 (the scale blocks are then whole, as the Hopper kernels require).
#pragma once

#include "ops/common/checks.h"
#include "ops/quantize/quantize_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace anvil::ops {

enum class ScaleKind { kTensor, kRow, kBlock };

struct GemmShape {
  int64_t m, n, k;
  ScaleKind a_kind, b_kind;
  bool blocked() const { return a_kind == ScaleKind::kBlock || b_kind == ScaleKind::kBlock; }
};

// The granularity name quantize_fp8 / dequantize_fp8 use for an operand's scale kind.
inline const char* a_granularity(ScaleKind k) {
  return k == ScaleKind::kTensor ? "tensor" : k == ScaleKind::kRow ? "row" : "block1x128";
}
inline const char* b_granularity(ScaleKind k) {
  return k == ScaleKind::kTensor ? "tensor" : k == ScaleKind::kRow ? "row" : "block128x128";
}

// a_scale: () | (M, 1) | (M, ceil(K/128)). With K <= 128 the last two coincide (one block per row).
inline ScaleKind a_scale_kind(const at::Tensor& s, int64_t m, int64_t k, const char* op) {
  const int64_t kb = ceil_div(k, kBlock);
  if (s.dim() == 0) return ScaleKind::kTensor;
  if (s.dim() == 2 && s.size(0) == m && s.size(1) == kb) return kb == 1 ? ScaleKind::kRow : ScaleKind::kBlock;
  if (s.dim() == 2 && s.size(0) == m && s.size(1) == 1) return ScaleKind::kRow;
  ANVIL_CHECK(false, op, ": a_scale for a of shape (", m, ", ", k, ") must have shape () (per-tensor), (", m,
              ", 1) (per-row) or (", m, ", ", kb, ") (1x128 blocks, ceil(K/128) per row), got ", s.sizes());
  return ScaleKind::kTensor;
}

// b_scale: () | (N, 1) | (ceil(N/128), ceil(K/128)).
inline ScaleKind b_scale_kind(const at::Tensor& s, int64_t n, int64_t k, const char* op) {
  const int64_t nb = ceil_div(n, kBlock), kb = ceil_div(k, kBlock);
  if (s.dim() == 0) return ScaleKind::kTensor;
  if (s.dim() == 2 && s.size(0) == n && s.size(1) == 1) return ScaleKind::kRow;
  if (s.dim() == 2 && s.size(0) == nb && s.size(1) == kb) return ScaleKind::kBlock;
  ANVIL_CHECK(false, op, ": b_scale for b of shape (", n, ", ", k, ") must have shape () (per-tensor), (", n,
              ", 1) (per-channel) or (", nb, ", ", kb, ") (128x128 blocks: ceil(N/128), ceil(K/128)), got ",
              s.sizes());
  return ScaleKind::kTensor;
}

inline void check_fp8_operand(const at::Tensor& t, const char* op, const char* arg, int64_t rank) {
  check_rank(t, op, arg, rank);
  check_dtype(t, op, arg, {at::kFloat8_e4m3fn});
  check_contiguous(t, op, arg);
}

inline void check_scale(const at::Tensor& s, const at::Tensor& like, const char* op, const char* arg,
                        const char* like_arg) {
  check_dtype(s, op, arg, {at::kFloat});
  check_contiguous(s, op, arg);
  check_same_device(s, like, op, arg, like_arg);
}

inline void check_out_dtype(at::ScalarType out_dtype, const char* op) {
  ANVIL_CHECK(out_dtype == at::kBFloat16 || out_dtype == at::kHalf || out_dtype == at::kFloat, op,
              ": out_dtype must be one of BFloat16, Half, Float, got ", out_dtype);
}

inline void check_block_k(int64_t k, const char* op, const char* what) {
  ANVIL_CHECK(k % kBlock == 0, op, ": K (", k, ") must be a multiple of 128 when ", what,
              " are block-scaled (whole 128-wide scale blocks along K)");
}

// fp8_gemm(a (M, K), a_scale, b (N, K), b_scale, out_dtype, bias (N)?).
inline GemmShape check_gemm_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                 const at::Tensor& b_scale, at::ScalarType out_dtype,
                                 const c10::optional<at::Tensor>& bias, const char* op) {
  check_fp8_operand(a, op, "a", 2);
  check_fp8_operand(b, op, "b", 2);
  check_same_device(a, b, op, "a", "b");
  ANVIL_CHECK(a.size(1) == b.size(1), op, ": a (M, K) and b (N, K) must share K, got a ", a.sizes(), " and b ",
              b.sizes());
  check_scale(a_scale, a, op, "a_scale", "a");
  check_scale(b_scale, b, op, "b_scale", "b");
  check_out_dtype(out_dtype, op);
  GemmShape s{a.size(0), b.size(0), a.size(1), ScaleKind::kTensor, ScaleKind::kTensor};
  s.a_kind = a_scale_kind(a_scale, s.m, s.k, op);
  s.b_kind = b_scale_kind(b_scale, s.n, s.k, op);
  if (s.blocked()) check_block_k(s.k, op, "a or b");
  if (bias.has_value()) {
    check_rank(*bias, op, "bias", 1);
    check_dtype(*bias, op, "bias", {at::kFloat, at::kBFloat16, at::kHalf});
    check_contiguous(*bias, op, "bias");
    check_same_device(*bias, a, op, "bias", "a");
    ANVIL_CHECK(bias->size(0) == s.n, op, ": bias must have shape (N) = (", s.n, "), got ", bias->sizes());
  }
  return s;
}

struct GroupedShape {
  int64_t rows, experts, n, k, capacity;  // capacity: masked layout only
};

// The expert weights and their 128x128 block scales: b (E, N, K), b_scale (E, ceil(N/128), ceil(K/128)).
inline void check_grouped_b(const at::Tensor& b, const at::Tensor& b_scale, const at::Tensor& a, int64_t k,
                            const char* op) {
  check_fp8_operand(b, op, "b", 3);
  check_same_device(b, a, op, "b", "a");
  ANVIL_CHECK(b.size(2) == k, op, ": b (E, N, K) must have the K of a (", k, "), got b ", b.sizes());
  check_scale(b_scale, b, op, "b_scale", "b");
  const int64_t e = b.size(0), nb = ceil_div(b.size(1), kBlock), kb = ceil_div(k, kBlock);
  ANVIL_CHECK(b_scale.dim() == 3 && b_scale.size(0) == e && b_scale.size(1) == nb && b_scale.size(2) == kb, op,
              ": b_scale must have shape (E, ceil(N/128), ceil(K/128)) = (", e, ", ", nb, ", ", kb,
              ") (128x128 blocks per expert), got ", b_scale.sizes());
}

// fp8_grouped_gemm(a (R, K), a_scale (R, ceil(K/128)), b (E, N, K), b_scale, offsets (E + 1) int32).
inline GroupedShape check_grouped_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                       const at::Tensor& b_scale, const at::Tensor& offsets,
                                       at::ScalarType out_dtype, const char* op) {
  check_fp8_operand(a, op, "a", 2);
  const int64_t r = a.size(0), k = a.size(1);
  check_block_k(k, op, "the grouped operands (1x128 a, 128x128 b)");
  check_scale(a_scale, a, op, "a_scale", "a");
  ANVIL_CHECK(a_scale.dim() == 2 && a_scale.size(0) == r && a_scale.size(1) == k / kBlock, op,
              ": a_scale must have shape (R, K/128) = (", r, ", ", k / kBlock, ") (1x128 blocks), got ",
              a_scale.sizes());
  check_grouped_b(b, b_scale, a, k, op);
  check_rank(offsets, op, "offsets", 1);
  check_dtype(offsets, op, "offsets", {at::kInt});
  check_contiguous(offsets, op, "offsets");
  check_same_device(offsets, a, op, "offsets", "a");
  ANVIL_CHECK(offsets.size(0) == b.size(0) + 1, op, ": offsets must have shape (E + 1) = (", b.size(0) + 1,
              ") (expert e owns rows [offsets[e], offsets[e+1]) of a), got ", offsets.sizes());
  check_out_dtype(out_dtype, op);
  return {r, b.size(0), b.size(1), k, 0};
}

// fp8_grouped_gemm_masked(a (E, C, K), a_scale (E, C, ceil(K/128)), b (E, N, K), b_scale, masked_m (E) int32).
inline GroupedShape check_masked_args(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                      const at::Tensor& b_scale, const at::Tensor& masked_m,
                                      at::ScalarType out_dtype, const char* op) {
  check_fp8_operand(a, op, "a", 3);
  const int64_t e = a.size(0), c = a.size(1), k = a.size(2);
  check_block_k(k, op, "the grouped operands (1x128 a, 128x128 b)");
  check_scale(a_scale, a, op, "a_scale", "a");
  ANVIL_CHECK(a_scale.dim() == 3 && a_scale.size(0) == e && a_scale.size(1) == c && a_scale.size(2) == k / kBlock,
              op, ": a_scale must have shape (E, C, K/128) = (", e, ", ", c, ", ", k / kBlock,
              ") (1x128 blocks), got ", a_scale.sizes());
  check_grouped_b(b, b_scale, a, k, op);
  ANVIL_CHECK(b.size(0) == e, op, ": a (E, C, K) and b (E, N, K) must have the same number of experts, got ",
              e, " and ", b.size(0));
  check_rank(masked_m, op, "masked_m", 1);
  check_dtype(masked_m, op, "masked_m", {at::kInt});
  check_contiguous(masked_m, op, "masked_m");
  check_same_device(masked_m, a, op, "masked_m", "a");
  ANVIL_CHECK(masked_m.size(0) == e, op, ": masked_m must have shape (E) = (", e, "), got ", masked_m.sizes());
  check_out_dtype(out_dtype, op);
  return {e * c, e, b.size(1), k, c};
}

// fp8_linear(x (..., K), weight (N, K) e4m3, weight_scale_inv (ceil(N/128), ceil(K/128)), bias (N)?).
inline void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale_inv,
                              const char* op) {
  check_min_rank(x, op, "x", 1);
  check_dtype(x, op, "x", {at::kBFloat16, at::kHalf, at::kFloat});
  check_fp8_operand(weight, op, "weight", 2);
  check_same_device(x, weight, op, "x", "weight");
  ANVIL_CHECK(x.size(-1) == weight.size(1), op, ": x (..., K) and weight (N, K) must share K, got x ", x.sizes(),
              " and weight ", weight.sizes());
  check_block_k(weight.size(1), op, "x (1x128) and weight (128x128)");
  check_scale(weight_scale_inv, weight, op, "weight_scale_inv", "weight");
  const int64_t nb = ceil_div(weight.size(0), kBlock), kb = weight.size(1) / kBlock;
  ANVIL_CHECK(weight_scale_inv.dim() == 2 && weight_scale_inv.size(0) == nb && weight_scale_inv.size(1) == kb, op,
              ": weight_scale_inv must have shape (ceil(N/128), K/128) = (", nb, ", ", kb, "), got ",
              weight_scale_inv.sizes());
}

}  // namespace anvil::ops
