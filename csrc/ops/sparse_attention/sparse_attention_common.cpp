// Argument checks of sparse_attention, its backward and select_blocks, shared by the CPU, CUDA and Meta
// kernels. Every failure is a c10::Error naming the op, the argument and the rule it broke.
#include "ops/sparse_attention/sparse_attention_common.h"

#include <ATen/ATen.h>

#include <cmath>

namespace anvil::ops {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

void check_index_tensor(const at::Tensor& t, const char* op, const char* arg, const at::Tensor& q) {
  ANVIL_CHECK(t.scalar_type() == at::kInt, op, ": ", arg, " must be int32, got ", t.scalar_type());
  check_contiguous(t, op, arg);
  check_same_device(t, q, op, arg, "q");
}

}  // namespace

SparseAttentionConfig check_sparse_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& block_indices,
                                                  const c10::optional<at::Tensor>& block_counts,
                                                  const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                  int64_t sink_tokens, int64_t block_size,
                                                  c10::optional<double> scale, const char* op) {
  check_rank(q, op, "q", 4);
  check_rank(k, op, "k", 4);
  check_rank(v, op, "v", 4);
  ANVIL_CHECK(is_float_dtype(q.scalar_type()), op, ": q must be float32, bfloat16, float16 (or float64 on the CPU), got ",
              q.scalar_type());
  ANVIL_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, v, op, "q", "v");
  SparseAttentionConfig c{};
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.seq = q.size(2);
  c.dim_qk = q.size(3);
  c.heads_kv = k.size(1);
  c.dim_v = v.size(3);
  ANVIL_CHECK(k.size(0) == c.batch && v.size(0) == c.batch, op, ": q, k and v must share the batch size, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  ANVIL_CHECK(k.size(2) == c.seq && v.size(2) == c.seq, op, ": q, k and v must share the sequence length, got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  ANVIL_CHECK(v.size(1) == c.heads_kv, op, ": k and v must have the same number of heads, got ", k.sizes(), " and ",
              v.sizes());
  ANVIL_CHECK(c.heads_kv >= 1 && c.heads_q % c.heads_kv == 0, op,
              ": the query heads (q.size(1) = ", c.heads_q, ") must be a multiple of the key/value heads (k.size(1) = ",
              c.heads_kv, ")");
  ANVIL_CHECK(k.size(3) == c.dim_qk, op, ": q and k must share the head dim, got ", c.dim_qk, " and ", k.size(3));
  const bool equal_dims = c.dim_qk == c.dim_v && (c.dim_qk == 64 || c.dim_qk == 128);
  const bool mla_dims = c.dim_qk == 192 && c.dim_v == 128;
  ANVIL_CHECK(equal_dims || mla_dims, op, ": head dim must be 64 or 128 for q, k and v (or 192 for q and k with ",
              "128 for v), got q/k head dim ", c.dim_qk, " and v head dim ", c.dim_v);
  ANVIL_CHECK(window >= -1, op, ": window must be >= 0 (or -1: unlimited), got ", window);
  ANVIL_CHECK(sink_tokens >= 0, op, ": sink_tokens must be >= 0, got ", sink_tokens);
  ANVIL_CHECK(block_size >= kSparseTile && block_size % kSparseTile == 0 && block_size <= 1024, op,
              ": block_size must be a multiple of 64 in [64, 1024], got ", block_size);
  c.window = window;
  c.sink_tokens = sink_tokens;
  c.block_size = block_size;
  c.num_blocks = (c.seq + block_size - 1) / block_size;
  c.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(c.dim_qk));
  ANVIL_CHECK(std::isfinite(c.scale), op, ": scale must be finite, got ", c.scale);
  if (block_indices.has_value()) {
    const auto& bi = *block_indices;
    check_index_tensor(bi, op, "block_indices", q);
    ANVIL_CHECK(bi.dim() == 4 && bi.size(0) == c.batch && bi.size(1) == c.heads_kv && bi.size(2) == c.num_blocks, op,
                ": block_indices must have shape (batch, kv heads, ceil(S / block_size), n) = (", c.batch, ", ",
                c.heads_kv, ", ", c.num_blocks, ", n), got ", bi.sizes());
    c.max_selected = bi.size(3);
  } else {
    c.max_selected = 0;
  }
  if (block_counts.has_value()) {
    ANVIL_CHECK(block_indices.has_value(), op, ": block_counts needs block_indices");
    const auto& bc = *block_counts;
    check_index_tensor(bc, op, "block_counts", q);
    ANVIL_CHECK(bc.dim() == 3 && bc.size(0) == c.batch && bc.size(1) == c.heads_kv && bc.size(2) == c.num_blocks, op,
                ": block_counts must have shape (batch, kv heads, ceil(S / block_size)) = (", c.batch, ", ",
                c.heads_kv, ", ", c.num_blocks, "), got ", bc.sizes());
  }
  c.varlen = cu_seqlens.has_value();
  if (c.varlen) {
    const auto& cu = *cu_seqlens;
    check_index_tensor(cu, op, "cu_seqlens", q);
    ANVIL_CHECK(cu.dim() == 1 && cu.size(0) >= 2, op, ": cu_seqlens must be 1-D with at least 2 entries, got ",
                cu.sizes());
    ANVIL_CHECK(c.batch == 1, op, ": with cu_seqlens the batch must be 1 (packed sequences), got ", c.batch);
  }
  return c;
}

void check_index_values(const SparseAttentionConfig& c, const c10::optional<at::Tensor>& block_indices,
                        const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens,
                        const char* op) {
  if (block_indices.has_value() && block_indices->numel() > 0) {
    const auto [lo, hi] = at::aminmax(*block_indices);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    ANVIL_CHECK(l >= -1 && h < c.num_blocks, op, ": block_indices must lie in [-1, ", c.num_blocks,
                ") (-1: padding; ceil(S / block_size) blocks), got values in [", l, ", ", h, "]");
  }
  if (block_counts.has_value() && block_counts->numel() > 0) {
    const auto [lo, hi] = at::aminmax(*block_counts);
    const int64_t l = lo.item<int64_t>(), h = hi.item<int64_t>();
    ANVIL_CHECK(l >= 0 && h <= c.max_selected, op, ": block_counts must lie in [0, ", c.max_selected,
                "] (block_indices.size(3)), got values in [", l, ", ", h, "]");
  }
  if (cu_seqlens.has_value()) {
    const auto cu = cu_seqlens->to(at::kCPU);
    const int32_t* p = cu.const_data_ptr<int32_t>();
    const int64_t n = cu.numel();
    ANVIL_CHECK(p[0] == 0 && p[n - 1] == c.seq, op, ": cu_seqlens must start at 0 and end at S = ", c.seq,
                ", got ", p[0], " ... ", p[n - 1]);
    for (int64_t i = 1; i < n; ++i) {
      ANVIL_CHECK(p[i] >= p[i - 1], op, ": cu_seqlens must be non-decreasing, got ", p[i - 1], " then ", p[i],
                  " at entry ", i);
    }
  }
}

SelectBlocksConfig check_select_blocks_args(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                            int64_t top_n, int64_t sink_blocks, int64_t local_blocks,
                                            const c10::optional<at::Tensor>& cu_seqlens, c10::optional<double> scale,
                                            const char* op) {
  check_rank(q, op, "q", 4);
  check_rank(k, op, "k", 4);
  ANVIL_CHECK(is_float_dtype(q.scalar_type()) && k.scalar_type() == q.scalar_type(), op,
              ": q and k must share a floating dtype, got ", q.scalar_type(), " and ", k.scalar_type());
  check_same_device(q, k, op, "q", "k");
  SelectBlocksConfig c{};
  c.batch = q.size(0);
  c.heads_q = q.size(1);
  c.seq = q.size(2);
  c.dim = q.size(3);
  c.heads_kv = k.size(1);
  ANVIL_CHECK(k.size(0) == c.batch && k.size(2) == c.seq && k.size(3) == c.dim, op,
              ": k must be (batch, kv heads, S, D) with q's batch, S and D, got q ", q.sizes(), " and k ", k.sizes());
  ANVIL_CHECK(c.heads_kv >= 1 && c.heads_q % c.heads_kv == 0, op, ": the query heads (", c.heads_q,
              ") must be a multiple of the key/value heads (", c.heads_kv, ")");
  ANVIL_CHECK(block_size >= kSparseTile && block_size % kSparseTile == 0 && block_size <= 1024, op,
              ": block_size must be a multiple of 64 in [64, 1024], got ", block_size);
  ANVIL_CHECK(top_n >= 1, op, ": top_n must be >= 1, got ", top_n);
  ANVIL_CHECK(sink_blocks >= 0 && local_blocks >= 0, op, ": sink_blocks and local_blocks must be >= 0, got ",
              sink_blocks, " and ", local_blocks);
  c.block_size = block_size;
  c.num_blocks = (c.seq + block_size - 1) / block_size;
  c.top_n = top_n;
  c.sink_blocks = sink_blocks;
  c.local_blocks = local_blocks;
  c.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(c.dim));
  c.varlen = cu_seqlens.has_value();
  if (c.varlen) {
    check_index_tensor(*cu_seqlens, op, "cu_seqlens", q);
    ANVIL_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2, op,
                ": cu_seqlens must be 1-D with at least 2 entries, got ", cu_seqlens->sizes());
    ANVIL_CHECK(c.batch == 1, op, ": with cu_seqlens the batch must be 1 (packed sequences), got ", c.batch);
  }
  return c;
}

}  // namespace anvil::ops
