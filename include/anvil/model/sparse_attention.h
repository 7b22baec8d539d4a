// Block-sparse attention for long-context models: the settings a config carries and one call that a
// model's attention makes in place of dense attention (select_blocks when selection is on, then the
// sparse_attention op: sliding window + sink tokens + selected blocks, one softmax over their union).
// The op is differentiable (C++ autograd), so fine-tuning runs through it; docs/FORMATS.md, "Sparse
// attention", has the mask rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace anvil::model {

/// config.json keys (with anvil_attention_backend = "sparse"), all optional:
///   anvil_sparse_window (default 4096; -1 unlimited), anvil_sparse_sink_tokens (0),
///   anvil_sparse_block_size (64; a multiple of 64), anvil_sparse_top_n (0: no selected blocks),
///   anvil_sparse_sink_blocks (1) and anvil_sparse_local_blocks (2), NSA's forced blocks.
struct SparseAttentionSettings {
  int64_t window = 4096;
  int64_t sink_tokens = 0;
  int64_t block_size = 64;
  int64_t top_n = 0;
  int64_t sink_blocks = 1;
  int64_t local_blocks = 2;
};

/// Document boundaries of one packed row: doc_ids (1, S) or (S), non-decreasing runs -> cu_seqlens
/// (docs + 1) int32 on the same device, as sparse_attention takes them.
at::Tensor cu_seqlens_from_doc_ids(const at::Tensor& doc_ids);

/// Causal sparse attention of q (B, Hq, S, D), k, v (B, Hkv, S, D) (GQA: Hq a multiple of Hkv) with
/// `settings`; cu_seqlens (B = 1) keeps packed documents apart. With top_n > 0 the blocks are chosen by
/// select_blocks from q and k (no gradient flows through the choice). -> (B, Hq, S, Dv) in q's dtype.
at::Tensor sparse_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const SparseAttentionSettings& settings, double scale,
                         const c10::optional<at::Tensor>& cu_seqlens = c10::nullopt);

}  // namespace anvil::model
