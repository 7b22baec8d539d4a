// Launchers of the MoE ops on CUDA: the shared argument checks, the current stream, grid sizes and the
// dispatch over logits dtype and experts per lane. Kernels and their design: moe_kernels.cuh.
#include "ops/moe/moe_common.h"
#include "ops/moe/moe_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

namespace anvil::ops {
namespace {

using cuda::kGateWarps;
template <int N>
using Int = std::integral_constant<int, N>;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}, Int<kPer>{}) for the logits dtype and kPer = `per` rounded up to a power of two (<= 32).
template <typename F>
void dispatch_gate(at::ScalarType dtype, int64_t per, const char* op, F&& f) {
  auto by_per = [&](auto type_tag) {
    if (per <= 1) return f(type_tag, Int<1>{});
    if (per <= 2) return f(type_tag, Int<2>{});
    if (per <= 4) return f(type_tag, Int<4>{});
    if (per <= 8) return f(type_tag, Int<8>{});
    if (per <= 16) return f(type_tag, Int<16>{});
    return f(type_tag, Int<32>{});
  };
  switch (dtype) {
    case at::kFloat: by_per(float{}); break;
    case at::kBFloat16: by_per(__nv_bfloat16{}); break;
    case at::kHalf: by_per(__half{}); break;
    default: TORCH_CHECK(false, op, ": float64 logits are supported on the CPU only (for gradcheck)");
  }
}

std::tuple<at::Tensor, at::Tensor> moe_gate_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                                 const c10::optional<at::Tensor>& noise, int64_t top_k,
                                                 int64_t n_group, int64_t topk_group, c10::string_view score,
                                                 bool renormalize, double routed_scale) {
  const char* op = "anvil::moe_gate";
  const GateConfig c =
      check_gate_args(logits, bias, noise, top_k, n_group, topk_group, score, renormalize, routed_scale, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({c.tokens, top_k}, logits.options().dtype(at::kFloat));
  auto indices = at::empty({c.tokens, top_k}, logits.options().dtype(at::kInt));
  if (c.tokens == 0) return {weights, indices};
  const GateLayout lay = gate_layout(c.experts);
  const int lanes_per_group = gate_lanes_per_group(lay, c.experts, n_group);
  const bool smem_groups = n_group > 1 && lanes_per_group == 0;
  const int64_t tokens_per_block = kGateWarps * 32 / lay.team;
  const size_t smem =
      tokens_per_block * cuda::gate_smem_floats_per_token(int(c.experts), smem_groups) * sizeof(float);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_gate(logits.scalar_type(), lay.chunk, op, [&](auto type_tag, auto per) {
    using T = decltype(type_tag);
    constexpr int kPer = decltype(per)::value;
    // 16-byte loads of a lane's chunk: whole chunks of kPer, rows and chunks at 16-byte boundaries.
    const bool vec = lay.chunk == kPer && (kPer * sizeof(T)) % 16 == 0 && (c.experts * sizeof(T)) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0;
    auto kernel = cuda::moe_gate_kernel<T, kPer>;
    if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<div_up(c.tokens, tokens_per_block), kGateWarps * 32, smem, stream>>>(
        reinterpret_cast<const T*>(logits.const_data_ptr()), bias ? bias->const_data_ptr<float>() : nullptr,
        noise ? noise->const_data_ptr<float>() : nullptr, weights.data_ptr<float>(), indices.data_ptr<int32_t>(),
        c.tokens, int(c.experts), lay.team, lay.chunk, int(top_k), int(n_group), int(topk_group), lanes_per_group,
        vec, c.score == GateScore::kSigmoid, renormalize, float(routed_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {weights, indices};
}

at::Tensor moe_gate_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                                  c10::string_view score, bool renormalize, double routed_scale) {
  const char* op = "anvil::moe_gate_backward";
  check_gate_backward_args(grad_weights, logits, indices, op);
  const GateScore sc = parse_gate_score(score, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), E = logits.size(1), k = indices.size(1);
  auto grad = at::empty({T, E}, logits.options().dtype(at::kFloat));
  if (T == 0) return grad.to(logits.scalar_type());
  auto g = grad_weights.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_gate(logits.scalar_type(), (E + 31) / 32, op, [&](auto type_tag, auto per) {
    using T_ = decltype(type_tag);
    cuda::moe_gate_backward_kernel<T_, decltype(per)::value>
        <<<div_up(T, kGateWarps), kGateWarps * 32, kGateWarps * E * sizeof(float), stream>>>(
            g.const_data_ptr<float>(), reinterpret_cast<const T_*>(logits.const_data_ptr()),
            indices.const_data_ptr<int32_t>(), grad.data_ptr<float>(), T, int(E), int(k), sc == GateScore::kSigmoid,
            renormalize, float(routed_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad.to(logits.scalar_type());
}

// ---- routing ---------------------------------------------------------------------------------------

struct Routing {
  at::Tensor slot_rows, counts, offsets, dropped, row_slot;
};

// The stable routing of moe_route; with `rows` > 0 also row_slot (rows): the slot of each row, -1 for padding.
Routing route(const at::Tensor& indices, int64_t E, int64_t align, int64_t capacity, int64_t rows, const char* op) {
  check_indices(indices, E, op);
  ANVIL_CHECK(align >= 1, op, ": align must be >= 1, got ", align);
  ANVIL_CHECK(indices.numel() < (int64_t(1) << 31) && rows < (int64_t(1) << 31), op,
              ": more than 2^31 slots or rows are not supported, got ", indices.numel());
  ANVIL_CHECK(E * sizeof(int32_t) <= 48 * 1024, op, ": num_experts up to 12288 are supported on CUDA, got ", E);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto o = indices.options().dtype(at::kInt);
  const int64_t n = indices.numel();
  // Chunks of 256 slots (many warps in flight), doubled while the (chunks, E) counts would pass 4M words.
  int64_t chunk = cuda::kRouteStep;
  while (div_up(n, chunk) * E > (int64_t(1) << 22)) chunk *= 2;
  const int64_t chunks = div_up(n, chunk);
  Routing r;
  r.slot_rows = at::empty(indices.sizes(), o);
  r.counts = at::empty({E}, o);
  r.offsets = at::empty({E + 1}, o);
  r.dropped = at::empty({}, o);
  r.row_slot = rows > 0 ? at::empty({rows}, o) : at::Tensor();
  // One workspace: chunk_counts (chunks, E), then chunk_bad (chunks), then the bad word.
  auto work = at::empty({chunks * E + chunks + 1}, o);
  int32_t* chunk_counts = work.data_ptr<int32_t>();
  int32_t* chunk_bad = chunk_counts + chunks * E;
  int32_t* bad = chunk_bad + chunks;
  const size_t hist_smem = E * sizeof(int32_t);
  if (chunks > 0) {
    cuda::moe_chunk_histogram_kernel<<<chunks, 256, hist_smem, stream>>>(indices.const_data_ptr<int32_t>(), n,
                                                                          chunk, int(E), chunk_counts, chunk_bad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  cuda::moe_chunk_scan_kernel<<<E, 256, 0, stream>>>(chunk_counts, chunks, int(E), r.counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::moe_offsets_kernel<<<1, 1024, 0, stream>>>(
      r.counts.data_ptr<int32_t>(), r.offsets.data_ptr<int32_t>(), r.dropped.data_ptr<int32_t>(), chunk_bad, chunks,
      bad, rows > 0 ? r.row_slot.data_ptr<int32_t>() : nullptr, rows, int(E), int(align),
      int(std::min<int64_t>(capacity, INT32_MAX)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) {
    cuda::moe_place_kernel<<<chunks, 32, hist_smem, stream>>>(
        indices.const_data_ptr<int32_t>(), n, chunk, int(E), chunk_counts, r.counts.const_data_ptr<int32_t>(),
        r.offsets.const_data_ptr<int32_t>(), r.slot_rows.data_ptr<int32_t>(),
        rows > 0 ? r.row_slot.data_ptr<int32_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // One word back to the host, after all the work is queued: an index outside [0, E) must raise, never
  // route silently.
  int32_t bad_host = 0;
  C10_CUDA_CHECK(cudaMemcpyAsync(&bad_host, bad, sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  ANVIL_CHECK(bad_host == 0, op, ": indices must be in [0, num_experts=", E, ")");
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& indices,
                                                                           int64_t num_experts, int64_t align,
                                                                           int64_t capacity) {
  const c10::cuda::CUDAGuard guard(indices.device());
  Routing r = route(indices, num_experts, align, capacity, 0, "anvil::moe_route");
  return {r.slot_rows, r.counts, r.offsets, r.dropped};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& hidden,
                                                                                       const at::Tensor& indices,
                                                                                       int64_t num_experts,
                                                                                       int64_t align, int64_t capacity) {
  const char* op = "anvil::moe_permute";
  check_permute_args(hidden, indices, num_experts, align, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t T = hidden.size(0), k = indices.size(1), H = hidden.size(1);
  const int64_t rows = permuted_rows(T, k, num_experts, align);
  Routing r = route(indices, num_experts, align, capacity, rows, op);
  auto permuted = at::empty({rows, H}, hidden.options());
  const int64_t row_bytes = H * hidden.element_size();
  if (rows > 0 && row_bytes > 0) {
    if (row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(hidden.const_data_ptr()) % 16 == 0) {
      const int64_t vec = row_bytes / 16;
      cuda::moe_gather_rows_kernel<<<rows, int(std::min<int64_t>(256, std::max<int64_t>(32, vec))), 0,
                                     at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<const uint4*>(hidden.const_data_ptr()), r.row_slot.const_data_ptr<int32_t>(),
          reinterpret_cast<uint4*>(permuted.data_ptr()), rows, vec, int(k));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {  // rows that are not whole 16-byte vectors: ATen's gather
      auto token = (r.row_slot.clamp_min(0) / k).to(at::kLong);
      permuted.copy_(hidden.index_select(0, token).masked_fill_((r.row_slot < 0).unsqueeze(1), 0));
    }
  }
  return {permuted, r.slot_rows, r.counts, r.offsets, r.dropped};
}

// out[t] = sum_j w[t, j] * x[slot_rows[t, j]] (w undefined: 1).
at::Tensor combine(const at::Tensor& x, const at::Tensor& slot_rows, const at::Tensor& w, const char* op) {
  const int64_t T = slot_rows.size(0), k = slot_rows.size(1), H = x.size(1);
  auto out = at::empty({T, H}, x.options());
  if (T == 0 || H == 0) return out.zero_();
  if (H % 8 != 0 || x.scalar_type() == at::kDouble) {  // the rare shape: ATen ops, same arithmetic order
    auto acc = at::zeros({T, H}, x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
    auto xf = x.to(acc.scalar_type());
    for (int64_t j = 0; j < k; ++j) {
      auto rows = slot_rows.select(1, j);
      auto keep = (rows >= 0).unsqueeze(1);
      auto g = xf.index_select(0, rows.clamp_min(0).to(at::kLong)).masked_fill(keep.logical_not(), 0);
      acc += w.defined() ? g * w.select(1, j).unsqueeze(1).to(acc.scalar_type()) : g;
    }
    return acc.to(x.scalar_type());
  }
  auto wf = w.defined() ? w.to(at::kFloat).contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, H / 8)));
  auto launch = [&](auto tag) {
    using T_ = decltype(tag);
    cuda::moe_combine_kernel<T_><<<T, threads, 0, stream>>>(
        reinterpret_cast<const T_*>(x.const_data_ptr()), slot_rows.const_data_ptr<int32_t>(),
        wf.defined() ? wf.const_data_ptr<float>() : nullptr, reinterpret_cast<T_*>(out.data_ptr()), H, int(k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (x.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kBFloat16: launch(__nv_bfloat16{}); break;
    case at::kHalf: launch(__half{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", x.scalar_type());
  }
  return out;
}

at::Tensor moe_permute_backward_cuda(const at::Tensor& grad_permuted, const at::Tensor& slot_rows) {
  const c10::cuda::CUDAGuard guard(grad_permuted.device());
  return combine(grad_permuted.contiguous(), slot_rows.contiguous(), at::Tensor(), "anvil::moe_permute_backward");
}

at::Tensor moe_unpermute_cuda(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  return combine(expert_out, slot_rows, weights, "anvil::moe_unpermute");
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cuda(const at::Tensor& grad_out, const at::Tensor& expert_out,
                                                               const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute_backward");
  const c10::cuda::CUDAGuard guard(expert_out.device());
  // Each kept row of expert_out belongs to exactly one slot, so the scatter needs no atomics (ATen's
  // index_copy_ on distinct rows); grad_weights is a row-wise dot product.
  const auto acc = expert_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto rows = slot_rows.flatten().to(at::kLong);            // (T k)
  auto keep = rows >= 0;
  auto kept_rows = rows.masked_select(keep);
  auto slot_tok = at::arange(rows.numel(), rows.options()).div(slot_rows.size(1), "floor").masked_select(keep);
  auto g = grad_out.to(acc);
  auto w = weights.flatten().to(acc).masked_select(keep).unsqueeze(1);
  auto grad_x = at::zeros(expert_out.sizes(), expert_out.options().dtype(acc));
  grad_x.index_copy_(0, kept_rows, g.index_select(0, slot_tok) * w);
  auto dots = (g.index_select(0, slot_tok) * expert_out.index_select(0, kept_rows).to(acc)).sum(1);
  auto grad_w = at::zeros({rows.numel()}, weights.options());
  grad_w.masked_scatter_(keep, dots.to(weights.scalar_type()));
  return {grad_x.to(expert_out.scalar_type()), grad_w.view(weights.sizes())};
}

at::Tensor moe_expert_load_cuda(const at::Tensor& indices, int64_t num_experts) {
  const char* op = "anvil::moe_expert_load";
  check_indices(indices, num_experts, op);
  const c10::cuda::CUDAGuard guard(indices.device());
  auto counts = at::zeros({num_experts}, indices.options().dtype(at::kInt));
  auto bad = at::zeros({1}, counts.options());
  const int64_t n = indices.numel();
  if (n == 0) return counts;
  ANVIL_CHECK(num_experts * 4 <= 48 * 1024, op, ": num_experts up to 12288 are supported on CUDA");
  cuda::moe_histogram_kernel<<<std::max<int64_t>(1, std::min<int64_t>(div_up(n, 256), 1024)), 256,
                               num_experts * sizeof(int32_t), at::cuda::getCurrentCUDAStream()>>>(
      indices.const_data_ptr<int32_t>(), n, int(num_experts), counts.data_ptr<int32_t>(), bad.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  ANVIL_CHECK(bad.item<int32_t>() == 0, op, ": indices must be in [0, num_experts=", num_experts, ")");
  return counts;
}

void moe_update_bias_cuda(at::Tensor& bias, const at::Tensor& counts, double gamma) {
  check_update_bias_args(bias, counts, "anvil::moe_update_bias");
  const c10::cuda::CUDAGuard guard(bias.device());
  auto c = counts.to(at::kDouble);
  bias.add_((c.mean() - c).sign().to(at::kFloat) * gamma);  // a few E-sized element-wise ops, no sync
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CUDA, m) {
  m.impl("moe_gate", &moe_gate_cuda);
  m.impl("moe_gate_backward", &moe_gate_backward_cuda);
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_permute_backward", &moe_permute_backward_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cuda);
  m.impl("moe_expert_load", &moe_expert_load_cuda);
  m.impl("moe_update_bias", &moe_update_bias_cuda);
}

}  // namespace anvil::ops
