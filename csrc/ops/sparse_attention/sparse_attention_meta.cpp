// Meta kernels of sparse_attention, its backward and select_blocks: shapes and dtypes only (all of them
// are data independent), so the ops trace under torch.compile and FakeTensor.
#include "ops/sparse_attention/sparse_attention_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace anvil::ops {
namespace {

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> sparse_attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const c10::optional<at::Tensor>& block_indices,
                                                         const c10::optional<at::Tensor>& block_counts,
                                                         const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                         int64_t sink_tokens, int64_t block_size,
                                                         c10::optional<double> scale, bool) {
  const auto c = check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                             block_size, scale, "anvil::sparse_attention");
  return {at::empty({c.batch, c.heads_q, c.seq, c.dim_v}, q.options()),
          at::empty({c.batch, c.heads_q, c.seq}, q.options().dtype(lse_dtype(q)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_meta(
    const at::Tensor&, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor&,
    const at::Tensor&, const c10::optional<at::Tensor>& block_indices, const c10::optional<at::Tensor>& block_counts,
    const c10::optional<at::Tensor>& cu_seqlens, int64_t window, int64_t sink_tokens, int64_t block_size,
    c10::optional<double> scale, bool) {
  check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens, block_size, scale,
                              "anvil::sparse_attention_backward");
  return {at::empty(q.sizes(), q.options()), at::empty(k.sizes(), k.options()), at::empty(v.sizes(), v.options())};
}

at::Tensor select_blocks_meta(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_n,
                              int64_t sink_blocks, int64_t local_blocks, const c10::optional<at::Tensor>& cu_seqlens,
                              c10::optional<double> scale) {
  const auto c = check_select_blocks_args(q, k, block_size, top_n, sink_blocks, local_blocks, cu_seqlens, scale,
                                          "anvil::select_blocks");
  return at::empty({c.batch, c.heads_kv, c.num_blocks, top_n}, q.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, Meta, m) {
  m.impl("sparse_attention", &sparse_attention_meta);
  m.impl("sparse_attention_backward", &sparse_attention_backward_meta);
  m.impl("select_blocks", &select_blocks_meta);
}

}  // namespace anvil::ops
