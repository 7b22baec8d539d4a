// Launchers of sparse_attention (forward, backward) and select_blocks on CUDA: the shared argument
// checks, the CUDA-only limits (bf16/fp16, head dim 64 or 128 for q, k and v), the current stream, the
// backward's precomputations (Delta = rowsum(dO * O), one kernel; the inverse block index: for each key block the
// ascending query blocks that list it, by one sort and a searchsorted, no host sync) and the dispatch
// over dtype and head dim. Kernels: sparse_attention_kernels.cuh, instantiated in
// sparse_attention_fwd.cu and sparse_attention_bwd.cu; on sm_90 the forward is the wgmma kernel of
// sparse_attention_sm90.cuh (sparse_attention_fwd_sm90.cu; ANVIL_SPARSE_SM90=0 keeps the mma.sync one).
#include "ops/sparse_attention/sparse_attention_common.h"
#include "ops/sparse_attention/sparse_attention_launch.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>

namespace anvil::ops {
namespace {

using sparse_cuda::Params;

void check_cuda_limits(const SparseAttentionConfig& c, const at::Tensor& q, const char* op) {
  ANVIL_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf, op,
              ": on CUDA q, k and v must be bfloat16 or float16, got ", q.scalar_type(),
              " (float32/float64 run on the CPU reference)");
  ANVIL_CHECK(c.dim_qk == c.dim_v && (c.dim_qk == 64 || c.dim_qk == 128), op,
              ": on CUDA the head dim must be 64 or 128 for q, k and v alike, got q/k ", c.dim_qk, " and v ", c.dim_v);
  ANVIL_CHECK(c.max_selected <= sparse_cuda::kMaxSelected, op, ": on CUDA block_indices.size(3) must be <= ",
              sparse_cuda::kMaxSelected, ", got ", c.max_selected);
  ANVIL_CHECK(c.max_selected * (c.block_size / kSparseTile) <= sparse_cuda::kMaxExtraTiles, op,
              ": on CUDA block_indices.size(3) * block_size / 64 must be <= ", sparse_cuda::kMaxExtraTiles, ", got ",
              c.max_selected, " * ", c.block_size, " / 64");
  ANVIL_CHECK(c.seq < (int64_t(1) << 30), op, ": S must be < 2^30, got ", c.seq);
}

Params make_params(const SparseAttentionConfig& c, const c10::optional<at::Tensor>& block_indices,
                   const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens) {
  Params p{};
  p.block_indices = block_indices ? block_indices->const_data_ptr<int32_t>() : nullptr;
  p.block_counts = block_counts ? block_counts->const_data_ptr<int32_t>() : nullptr;
  p.cu_seqlens = cu_seqlens ? cu_seqlens->const_data_ptr<int32_t>() : nullptr;
  p.num_docs = cu_seqlens ? static_cast<int>(cu_seqlens->numel() - 1) : 1;
  p.batch = static_cast<int>(c.batch);
  p.heads_q = static_cast<int>(c.heads_q);
  p.heads_kv = static_cast<int>(c.heads_kv);
  p.seq = static_cast<int>(c.seq);
  // A window of S or more is unlimited; keeps i - window + 1 inside int.
  p.window = c.window < 0 || c.window >= c.seq ? -1 : static_cast<int>(c.window);
  p.sink_tokens = static_cast<int>(std::min<int64_t>(c.sink_tokens, c.seq + 1));
  p.block_size = static_cast<int>(c.block_size);
  p.num_blocks = static_cast<int>(c.num_blocks);
  p.max_selected = static_cast<int>(c.max_selected);
  p.scale = static_cast<float>(c.scale);
  p.scale_log2 = static_cast<float>(c.scale * 1.4426950408889634);
  return p;
}

// 128-row query tiles need every tile inside one query block; else two heads of a group share a CTA.
sparse_cuda::TileShape tile_shape(const SparseAttentionConfig& c, const c10::optional<at::Tensor>& block_indices) {
  if (!block_indices.has_value() || c.block_size % 128 == 0) return sparse_cuda::TileShape::kRows128;
  if (c.group() % 2 == 0) return sparse_cuda::TileShape::kTwoHeads64;
  return sparse_cuda::TileShape::kRows64;
}

// The Hopper forward (wgmma) runs on sm_90 devices for the 128-row shapes, unless ANVIL_SPARSE_SM90=0
// (read on every call, so a check or benchmark can time both kernels in one process).
bool use_sm90_forward(sparse_cuda::TileShape shape) {
#if defined(ANVIL_WITH_SM90A)
  if (shape == sparse_cuda::TileShape::kRows64) return false;
  const char* env = std::getenv("ANVIL_SPARSE_SM90");
  TORCH_CHECK(env == nullptr || *env == '\0' || std::string(env) == "0" || std::string(env) == "1",
              "ANVIL_SPARSE_SM90 must be 0 (the mma.sync kernels) or 1 (the Hopper kernels, the default), got '", env,
              "'");
  if (env != nullptr && std::string(env) == "0") return false;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  return prop->major == 9 && prop->minor == 0;
#else
  (void)shape;
  return false;
#endif
}

template <typename F>
void dispatch(at::ScalarType dtype, int64_t dim, F&& f) {
  auto by_dim = [&](auto tag) {
    if (dim == 64) f(tag, std::integral_constant<int, 64>{});
    else f(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == at::kBFloat16) by_dim(__nv_bfloat16{});
  else by_dim(__half{});
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                         const c10::optional<at::Tensor>& block_indices,
                                                         const c10::optional<at::Tensor>& block_counts,
                                                         const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                         int64_t sink_tokens, int64_t block_size,
                                                         c10::optional<double> scale, bool) {
  const char* op = "anvil::sparse_attention";
  const auto c = check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                             block_size, scale, op);
  check_cuda_limits(c, q, op);
  check_index_values(c, block_indices, block_counts, cu_seqlens, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto o = at::empty({c.batch, c.heads_q, c.seq, c.dim_v}, q.options());
  auto lse = at::empty({c.batch, c.heads_q, c.seq}, q.options().dtype(at::kFloat));
  if (o.numel() == 0) return {o, lse};
  Params p = make_params(c, block_indices, block_counts, cu_seqlens);
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto shape = tile_shape(c, block_indices);
  const bool sm90 = use_sm90_forward(shape);
  (void)sm90;  // unused without ANVIL_WITH_SM90A
  dispatch(q.scalar_type(), c.dim_qk, [&](auto tag, auto dim) {
#if defined(ANVIL_WITH_SM90A)
    if (sm90) {
      sparse_cuda::launch_forward_sm90<decltype(tag), decltype(dim)::value>(p, shape, stream);
      return;
    }
#endif
    sparse_cuda::launch_forward<decltype(tag), decltype(dim)::value>(p, shape, stream);
  });
  return {o, lse};
}

// For each (b, kv head, key block) the query blocks whose listed blocks include it, ascending (a
// duplicate listing appears twice, adjacent): offsets (B * Hkv * NB + 1) int32 into qblocks int32.
std::tuple<at::Tensor, at::Tensor> inverse_block_index(const SparseAttentionConfig& c, const at::Tensor& block_indices,
                                                       const c10::optional<at::Tensor>& block_counts) {
  const int64_t NB = c.num_blocks, n = c.max_selected, R = c.batch * c.heads_kv * NB;
  const auto lopt = block_indices.options().dtype(at::kLong);
  const auto bi = block_indices.to(at::kLong);                                  // (B, Hkv, NB, n)
  auto valid = bi >= 0;
  if (block_counts.has_value()) {
    valid = valid & (at::arange(n, lopt).view({1, 1, 1, n}) < block_counts->to(at::kLong).unsqueeze(-1));
  }
  const auto row = at::arange(R, lopt).view({c.batch, c.heads_kv, NB, 1});     // (b * Hkv + h) * NB + qb
  const auto key = row.div(NB, "floor") * NB + bi.clamp_min(0);                       // (b * Hkv + h) * NB + kb
  const auto combined = at::where(valid, key * NB + row % NB, at::full({}, R * NB, lopt)).flatten();
  const auto sorted = std::get<0>(combined.sort());
  const auto qblocks = (sorted % NB).to(at::kInt);
  const auto offsets = at::searchsorted(sorted.div(NB, "floor"), at::arange(R + 1, lopt), /*out_int32=*/true);
  return {offsets, qblocks};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cuda(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const c10::optional<at::Tensor>& block_indices,
    const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
    int64_t sink_tokens, int64_t block_size, c10::optional<double> scale, bool deterministic) {
  const char* op = "anvil::sparse_attention_backward";
  const auto c = check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                             block_size, scale, op);
  check_cuda_limits(c, q, op);
  ANVIL_CHECK(grad_o.sizes() == o.sizes() && o.sizes() == at::IntArrayRef({c.batch, c.heads_q, c.seq, c.dim_v}), op,
              ": grad_o and o must be (B, Hq, S, Dv), got ", grad_o.sizes(), " and ", o.sizes());
  ANVIL_CHECK(lse.sizes() == at::IntArrayRef({c.batch, c.heads_q, c.seq}), op, ": lse must be (B, Hq, S), got ",
              lse.sizes());
  check_index_values(c, block_indices, block_counts, cu_seqlens, op);  // the kernels index with them
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto goc = grad_o.to(q.scalar_type()).contiguous();
  const auto lsec = lse.to(at::kFloat).contiguous();
  const auto oc = o.to(q.scalar_type()).contiguous();
  auto delta = at::empty({c.batch, c.heads_q, c.seq}, q.options().dtype(at::kFloat));  // (B, Hq, S) rowsum(dO * O)
  auto dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  if (q.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  Params p = make_params(c, block_indices, block_counts, cu_seqlens);
  at::Tensor inv_offsets, inv_qblocks;
  if (block_indices.has_value()) {
    std::tie(inv_offsets, inv_qblocks) = inverse_block_index(c, *block_indices, block_counts);
    p.inv_offsets = inv_offsets.const_data_ptr<int32_t>();
    p.inv_qblocks = inv_qblocks.const_data_ptr<int32_t>();
  }
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.grad_o = goc.const_data_ptr();
  p.lse_in = lsec.const_data_ptr<float>();
  p.delta = delta.const_data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  // GQA, not deterministic: the heads of a group split over CTAs that add into fp32 buffers.
  at::Tensor dk_accum, dv_accum;
  if (!deterministic && c.group() > 1) {
    dk_accum = at::zeros(kc.sizes(), kc.options().dtype(at::kFloat));
    dv_accum = at::zeros(vc.sizes(), vc.options().dtype(at::kFloat));
    p.dk_accum = dk_accum.data_ptr<float>();
    p.dv_accum = dv_accum.data_ptr<float>();
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch(q.scalar_type(), c.dim_qk, [&](auto tag, auto dim) {
    using T = decltype(tag);
    sparse_cuda::launch_delta<T>(static_cast<const T*>(p.grad_o), static_cast<const T*>(oc.const_data_ptr()),
                                 delta.data_ptr<float>(), c.batch * c.heads_q * c.seq, c.dim_v, stream);
    sparse_cuda::launch_backward<T, decltype(dim)::value>(p, tile_shape(c, block_indices), stream);
  });
  if (dk_accum.defined()) {
    dk.copy_(dk_accum);
    dv.copy_(dv_accum);
  }
  return {dq, dk, dv};
}

at::Tensor select_blocks_cuda(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_n,
                              int64_t sink_blocks, int64_t local_blocks, const c10::optional<at::Tensor>& cu_seqlens,
                              c10::optional<double> scale) {
  const auto c = check_select_blocks_args(q, k, block_size, top_n, sink_blocks, local_blocks, cu_seqlens, scale,
                                          "anvil::select_blocks");
  const c10::cuda::CUDAGuard guard(q.device());
  return select_blocks_aten(q, k, c, cu_seqlens);
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("sparse_attention", &sparse_attention_cuda);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cuda);
  m.impl("select_blocks", &select_blocks_cuda);
}

}  // namespace anvil::ops
