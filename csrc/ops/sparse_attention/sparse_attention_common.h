// What the CPU, CUDA and Meta kernels of sparse_attention and select_blocks share: the argument checks
// (each error names the argument and the rule), the configuration they produce, and the mask rule itself
// as one host/device function, so the reference, the forward kernel and both backward kernels can never
// disagree on which (query, key) pairs attend. Semantics: docs/FORMATS.md, "Sparse attention".
//
// The mask: query i attends key j (positions in the packed sequence) when
//   j <= i  and  j >= doc_start(i)  and
//   ( i - j < window  or  j - doc_start(i) < sink_tokens  or  block(j) is listed for (b, kv head, block(i)) )
// with doc_start(i) = 0 without cu_seqlens, block(x) = x / block_size, window < 0 meaning unlimited.
#pragma once

#include "ops/common/checks.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

#if defined(__CUDACC__)
#define ANVIL_HD __host__ __device__ __forceinline__
#else
#define ANVIL_HD inline
#endif

namespace anvil::ops {

constexpr int64_t kSparseTile = 64;  // CUDA tile of queries and of keys; block_size must be a multiple

// The element rule above, given doc_start(i) and whether block(j) is listed for block(i).
ANVIL_HD bool sparse_attends(int64_t i, int64_t j, int64_t doc_start, bool listed, int64_t window,
                             int64_t sink_tokens) {
  if (j > i || j < doc_start) return false;
  return listed || (window < 0 || i - j < window) || (j - doc_start < sink_tokens);
}

struct SparseAttentionConfig {
  int64_t batch, heads_q, heads_kv, seq, dim_qk, dim_v;
  int64_t window, sink_tokens, block_size;
  int64_t num_blocks;       // ceil(seq / block_size): query blocks and key blocks alike
  int64_t max_selected;     // block_indices.size(3), 0 without block_indices
  double scale;
  bool varlen;
  int64_t group() const { return heads_q / heads_kv; }
};

// Checks every argument of sparse_attention (and of its backward, which takes the same ones) and returns
// the configuration. Bounds of block_indices' values are checked by check_block_index_values (it reads
// the tensor, so the Meta kernel cannot run it).
SparseAttentionConfig check_sparse_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const c10::optional<at::Tensor>& block_indices,
                                                  const c10::optional<at::Tensor>& block_counts,
                                                  const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                  int64_t sink_tokens, int64_t block_size,
                                                  c10::optional<double> scale, const char* op);

// block_indices in [-1, num_blocks), block_counts in [0, max_selected], cu_seqlens starting at 0,
// non-decreasing and ending at seq. Reads the values (a device sync on CUDA).
void check_index_values(const SparseAttentionConfig& c, const c10::optional<at::Tensor>& block_indices,
                        const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens,
                        const char* op);

// select_blocks' arguments.
struct SelectBlocksConfig {
  int64_t batch, heads_q, heads_kv, seq, dim, block_size, num_blocks, top_n, sink_blocks, local_blocks;
  double scale;
  bool varlen;
};
SelectBlocksConfig check_select_blocks_args(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                            int64_t top_n, int64_t sink_blocks, int64_t local_blocks,
                                            const c10::optional<at::Tensor>& cu_seqlens, c10::optional<double> scale,
                                            const char* op);

}  // namespace anvil::ops

namespace anvil::ops {
// select_blocks as ATen ops on q's device (the CUDA implementation; also runs on the CPU for tests).
at::Tensor select_blocks_aten(const at::Tensor& q, const at::Tensor& k, const SelectBlocksConfig& c,
                              const c10::optional<at::Tensor>& cu_seqlens);
}  // namespace anvil::ops
