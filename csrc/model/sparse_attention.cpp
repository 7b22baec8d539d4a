// The model-side wrapper of the sparse attention ops (include/anvil/model/sparse_attention.h): block
// selection from detached q and k (selection is a discrete choice; NSA trains it through its compressed
// branch, which anvil does not have), then the differentiable sparse_attention op.
#include "anvil/model/sparse_attention.h"

#include "anvil/ops.h"

#include <ATen/ATen.h>

namespace anvil::model {

at::Tensor cu_seqlens_from_doc_ids(const at::Tensor& doc_ids) {
  TORCH_CHECK(doc_ids.dim() == 1 || (doc_ids.dim() == 2 && doc_ids.size(0) == 1),
              "cu_seqlens_from_doc_ids: doc_ids must be (S) or (1, S), got ", doc_ids.sizes());
  const auto ids = doc_ids.reshape({-1}).to(at::kLong);
  const int64_t s = ids.numel();
  TORCH_CHECK(s > 0, "cu_seqlens_from_doc_ids: doc_ids is empty");
  // A boundary wherever the id changes: starts = {0} + {i : ids[i] != ids[i-1]}, then S.
  const auto change = at::nonzero(ids.slice(0, 1).ne(ids.slice(0, 0, s - 1))).reshape({-1}) + 1;
  const auto zero = at::zeros({1}, ids.options());
  const auto end = at::full({1}, s, ids.options());
  return at::cat({zero, change, end}).to(at::kInt);
}

at::Tensor sparse_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const SparseAttentionSettings& settings, double scale,
                         const c10::optional<at::Tensor>& cu_seqlens) {
  c10::optional<at::Tensor> block_indices;
  if (settings.top_n > 0) {
    block_indices = ops::select_blocks(q.detach(), k.detach(), settings.block_size, settings.top_n,
                                       settings.sink_blocks, settings.local_blocks, cu_seqlens, scale);
  }
  auto [o, lse] = ops::sparse_attention(q, k, v, block_indices, c10::nullopt, cu_seqlens, settings.window,
                                        settings.sink_tokens, settings.block_size, scale);
  return o;
}

}  // namespace anvil::model
