// What the CPU, CUDA and Meta kernels of the MoE ops share: the gate's configuration, argument
// checks (each error names the argument and the rule), and the routing shapes. Semantics:
// docs/FORMATS.md, "MoE routing".
#pragma once

#include "ops/common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <algorithm>
#include <string>

namespace anvil::ops {

constexpr int64_t kMoeMaxExperts = 1024;  // one warp holds a token's scores: 32 per lane
constexpr int64_t kMoeMaxTopK = 16;
constexpr int64_t kMoeMaxGroups = 32;     // one group per lane in the group ranking
constexpr float kMoeRenormEps = 1e-20f;   // transformers' DeepseekV3 / DeepSeek-V2 denominator epsilon

enum class GateScore { kSigmoid = 0, kSoftmax = 1 };

// How the CUDA gate lays a token out, shared with the CPU reference (whose softmax sums in the same
// order): `team` lanes per token (a power of two, about E / 8, at most 32), lane r holding the contiguous
// experts [r * chunk, min(E, (r + 1) * chunk)). About 8 experts a lane keeps the kernel's registers few
// and its occupancy high; E = 256 gives a warp per token, E = 64 four tokens per warp.
struct GateLayout {
  int team, chunk;
};
inline GateLayout gate_layout(int64_t experts) {
  const int64_t want = (experts + 7) / 8;
  int64_t p2 = 1;
  while (p2 < want) p2 *= 2;
  const int team = static_cast<int>(std::min<int64_t>(32, p2));
  return {team, static_cast<int>((experts + team - 1) / team)};
}

// When every group of experts is a power-of-two run of whole lanes of the layout, the kernel merges
// group scores by shuffles: the lanes per group; 0 otherwise (the groups go through shared memory).
inline int gate_lanes_per_group(const GateLayout& lay, int64_t experts, int64_t n_group) {
  const int64_t gs = experts / n_group;
  if (n_group <= 1 || gs % lay.chunk != 0) return 0;
  const int64_t lanes = gs / lay.chunk;
  return (lanes & (lanes - 1)) == 0 && lanes <= lay.team ? static_cast<int>(lanes) : 0;
}

struct GateConfig {
  int64_t tokens, experts, top_k, n_group, topk_group;
  GateScore score;
  bool renormalize;
  double routed_scale;
  int64_t group_size() const { return experts / n_group; }
};

inline GateScore parse_gate_score(c10::string_view s, const char* op) {
  const std::string name(s.data(), s.size());
  if (name == "sigmoid") return GateScore::kSigmoid;
  if (name == "softmax") return GateScore::kSoftmax;
  ANVIL_CHECK(false, op, ": score must be 'sigmoid' or 'softmax', got '", name, "'");
  return GateScore::kSoftmax;
}

inline GateConfig check_gate_args(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                  const c10::optional<at::Tensor>& noise, int64_t top_k, int64_t n_group,
                                  int64_t topk_group, c10::string_view score, bool renormalize, double routed_scale,
                                  const char* op) {
  check_rank(logits, op, "logits", 2);
  check_dtype(logits, op, "logits", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_contiguous(logits, op, "logits");
  GateConfig c{logits.size(0), logits.size(1), top_k, n_group, topk_group, parse_gate_score(score, op), renormalize,
               routed_scale};
  const auto param_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  ANVIL_CHECK(c.experts >= 1 && c.experts <= kMoeMaxExperts, op, ": logits.size(1) (experts) must be in [1, ",
              kMoeMaxExperts, "], got ", c.experts);
  ANVIL_CHECK(n_group >= 1 && n_group <= kMoeMaxGroups, op, ": n_group must be in [1, ", kMoeMaxGroups, "], got ",
              n_group);
  ANVIL_CHECK(c.experts % n_group == 0, op, ": experts (", c.experts, ") must be divisible by n_group (", n_group,
              ")");
  ANVIL_CHECK(topk_group >= 1 && topk_group <= n_group, op, ": topk_group must be in [1, n_group=", n_group,
              "], got ", topk_group);
  ANVIL_CHECK(top_k >= 1 && top_k <= kMoeMaxTopK, op, ": top_k must be in [1, ", kMoeMaxTopK, "], got ", top_k);
  ANVIL_CHECK(top_k <= topk_group * c.group_size(), op, ": top_k (", top_k,
              ") exceeds the experts in the kept groups (topk_group ", topk_group, " x ", c.group_size(),
              " experts per group)");
  ANVIL_CHECK(!(c.score == GateScore::kSigmoid && n_group > 1 && c.group_size() < 2), op,
              ": score sigmoid with n_group > 1 ranks groups by their top-2 sum, so each group needs >= 2 experts, "
              "got ", c.group_size());
  ANVIL_CHECK(std::isfinite(routed_scale), op, ": routed_scale must be finite, got ", routed_scale);
  if (bias.has_value()) {
    check_rank(*bias, op, "bias", 1);
    check_dtype(*bias, op, "bias", {param_dtype});
    check_contiguous(*bias, op, "bias");
    check_same_device(*bias, logits, op, "bias", "logits");
    ANVIL_CHECK(bias->size(0) == c.experts, op, ": bias must have shape (", c.experts, "), got ", bias->sizes());
  }
  if (noise.has_value()) {
    check_dtype(*noise, op, "noise", {param_dtype});
    check_contiguous(*noise, op, "noise");
    check_same_device(*noise, logits, op, "noise", "logits");
    ANVIL_CHECK(noise->sizes() == logits.sizes(), op, ": noise must have the shape of logits ", logits.sizes(),
                ", got ", noise->sizes());
  }
  return c;
}

inline void check_gate_backward_args(const at::Tensor& grad_weights, const at::Tensor& logits,
                                     const at::Tensor& indices, const char* op) {
  check_rank(logits, op, "logits", 2);
  check_dtype(logits, op, "logits", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_contiguous(logits, op, "logits");
  check_rank(indices, op, "indices", 2);
  check_dtype(indices, op, "indices", {at::kInt});
  check_contiguous(indices, op, "indices");
  check_dtype(grad_weights, op, "grad_weights", {logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat});
  ANVIL_CHECK(grad_weights.sizes() == indices.sizes(), op, ": grad_weights must have the shape of indices ",
              indices.sizes(), ", got ", grad_weights.sizes());
  ANVIL_CHECK(indices.size(0) == logits.size(0), op, ": indices.size(0) must equal logits.size(0)");
  check_same_device(indices, logits, op, "indices", "logits");
  check_same_device(grad_weights, logits, op, "grad_weights", "logits");
}

// Routing: indices (T, k) int32 of experts in [0, E).
inline void check_indices(const at::Tensor& indices, int64_t num_experts, const char* op) {
  check_rank(indices, op, "indices", 2);
  check_dtype(indices, op, "indices", {at::kInt});
  check_contiguous(indices, op, "indices");
  ANVIL_CHECK(num_experts >= 1, op, ": num_experts must be >= 1, got ", num_experts);
}

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

inline int64_t permuted_rows(int64_t tokens, int64_t k, int64_t experts, int64_t align) {
  return tokens * k + experts * (align - 1);
}

inline void check_permute_args(const at::Tensor& hidden, const at::Tensor& indices, int64_t num_experts,
                               int64_t align, const char* op) {
  check_rank(hidden, op, "hidden", 2);
  check_dtype(hidden, op, "hidden", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_contiguous(hidden, op, "hidden");
  check_indices(indices, num_experts, op);
  check_same_device(hidden, indices, op, "hidden", "indices");
  ANVIL_CHECK(indices.size(0) == hidden.size(0), op, ": indices.size(0) (", indices.size(0),
              ") must equal hidden.size(0) (", hidden.size(0), ")");
  ANVIL_CHECK(align >= 1, op, ": align must be >= 1, got ", align);
}

inline void check_unpermute_args(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights,
                                 const char* op) {
  check_rank(expert_out, op, "expert_out", 2);
  check_dtype(expert_out, op, "expert_out", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_contiguous(expert_out, op, "expert_out");
  check_rank(slot_rows, op, "slot_rows", 2);
  check_dtype(slot_rows, op, "slot_rows", {at::kInt});
  check_contiguous(slot_rows, op, "slot_rows");
  check_rank(weights, op, "weights", 2);
  check_dtype(weights, op, "weights", {at::kFloat, at::kDouble});
  check_contiguous(weights, op, "weights");
  ANVIL_CHECK(weights.sizes() == slot_rows.sizes(), op, ": weights must have the shape of slot_rows ",
              slot_rows.sizes(), ", got ", weights.sizes());
  check_same_device(expert_out, slot_rows, op, "expert_out", "slot_rows");
  check_same_device(weights, slot_rows, op, "weights", "slot_rows");
}

inline void check_update_bias_args(const at::Tensor& bias, const at::Tensor& counts, const char* op) {
  check_rank(bias, op, "bias", 1);
  check_dtype(bias, op, "bias", {at::kFloat});
  check_contiguous(bias, op, "bias");
  check_rank(counts, op, "counts", 1);
  ANVIL_CHECK(counts.size(0) == bias.size(0), op, ": counts must have the shape of bias (", bias.size(0), "), got ",
              counts.sizes());
  check_same_device(bias, counts, op, "bias", "counts");
}

}  // namespace anvil::ops
