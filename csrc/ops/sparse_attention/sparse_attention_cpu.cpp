// CPU reference of sparse_attention (forward and backward) and select_blocks: plain loops over
// (batch, head, query, key) with the mask rule of sparse_attention_common.h evaluated per pair, fp32
// accumulation (fp64 for fp64 inputs, for gradcheck). Quadratic in S on purpose: it is the oracle of the
// CUDA kernels and of the tests, meant for S up to a few thousand. Semantics: docs/FORMATS.md.
#include "ops/sparse_attention/sparse_attention_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace anvil::ops {
namespace {

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// doc_start[i] for every position: 0 without cu_seqlens.
std::vector<int64_t> doc_starts(int64_t seq, const c10::optional<at::Tensor>& cu_seqlens) {
  std::vector<int64_t> ds(seq, 0);
  if (!cu_seqlens.has_value()) return ds;
  const auto cu = cu_seqlens->to(at::kCPU);
  const int32_t* p = cu.const_data_ptr<int32_t>();
  for (int64_t d = 0; d + 1 < cu.numel(); ++d) {
    for (int64_t i = p[d]; i < p[d + 1]; ++i) ds[i] = p[d];
  }
  return ds;
}

// listed[((b * Hkv + h) * NB + qb) * NB + kb]: block kb is among the first block_counts entries of
// block_indices[b, h, qb] (all n entries without block_counts; -1 entries list nothing).
std::vector<char> listed_blocks(const SparseAttentionConfig& c, const c10::optional<at::Tensor>& block_indices,
                                const c10::optional<at::Tensor>& block_counts) {
  const int64_t nb = c.num_blocks;
  std::vector<char> listed(c.batch * c.heads_kv * nb * nb, 0);
  if (!block_indices.has_value()) return listed;
  const auto bi = block_indices->to(at::kCPU).contiguous();
  const int32_t* idx = bi.const_data_ptr<int32_t>();
  at::Tensor bc;
  if (block_counts.has_value()) bc = block_counts->to(at::kCPU).contiguous();
  const int64_t n = c.max_selected;
  for (int64_t row = 0; row < c.batch * c.heads_kv * nb; ++row) {
    const int64_t count = bc.defined() ? bc.const_data_ptr<int32_t>()[row] : n;
    for (int64_t s = 0; s < count; ++s) {
      const int32_t kb = idx[row * n + s];
      if (kb >= 0) listed[row * nb + kb] = 1;
    }
  }
  return listed;
}

struct MaskContext {
  const SparseAttentionConfig& c;
  std::vector<int64_t> ds;
  std::vector<char> listed;
  bool attends(int64_t b, int64_t hkv, int64_t i, int64_t j) const {
    const int64_t nb = c.num_blocks;
    const bool l = listed[((b * c.heads_kv + hkv) * nb + i / c.block_size) * nb + j / c.block_size] != 0;
    return sparse_attends(i, j, ds[i], l, c.window, c.sink_tokens);
  }
};

template <typename T>
void forward_loops(const MaskContext& m, const T* q, const T* k, const T* v, T* o, Acc<T>* lse) {
  using A = Acc<T>;
  const auto& c = m.c;
  const int64_t S = c.seq, Dk = c.dim_qk, Dv = c.dim_v;
  at::parallel_for(0, c.batch * c.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> s(S), acc(Dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / c.heads_q, h = bh % c.heads_q, hkv = h / c.group();
      const T* qh = q + bh * S * Dk;
      const T* kh = k + (b * c.heads_kv + hkv) * S * Dk;
      const T* vh = v + (b * c.heads_kv + hkv) * S * Dv;
      for (int64_t i = 0; i < S; ++i) {
        A mx = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          if (!m.attends(b, hkv, i, j)) {
            s[j] = -std::numeric_limits<A>::infinity();
            continue;
          }
          A dot = 0;
          for (int64_t d = 0; d < Dk; ++d) dot += static_cast<A>(qh[i * Dk + d]) * static_cast<A>(kh[j * Dk + d]);
          s[j] = dot * static_cast<A>(c.scale);
          mx = std::max(mx, s[j]);
        }
        std::fill(acc.begin(), acc.end(), A(0));
        A sum = 0;
        if (mx != -std::numeric_limits<A>::infinity()) {
          for (int64_t j = 0; j < S; ++j) {
            if (s[j] == -std::numeric_limits<A>::infinity()) continue;
            const A p = std::exp(s[j] - mx);
            sum += p;
            for (int64_t d = 0; d < Dv; ++d) acc[d] += p * static_cast<A>(vh[j * Dv + d]);
          }
        }
        // A query that attends no key (possible with window 0) gets o = 0 and lse = -inf.
        for (int64_t d = 0; d < Dv; ++d) o[(bh * S + i) * Dv + d] = static_cast<T>(sum > 0 ? acc[d] / sum : A(0));
        lse[bh * S + i] = sum > 0 ? mx + std::log(sum) : -std::numeric_limits<A>::infinity();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const c10::optional<at::Tensor>& block_indices,
                                                        const c10::optional<at::Tensor>& block_counts,
                                                        const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
                                                        int64_t sink_tokens, int64_t block_size,
                                                        c10::optional<double> scale, bool) {
  const char* op = "anvil::sparse_attention";
  const auto c = check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                             block_size, scale, op);
  check_index_values(c, block_indices, block_counts, cu_seqlens, op);
  const MaskContext m{c, doc_starts(c.seq, cu_seqlens), listed_blocks(c, block_indices, block_counts)};
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto o = at::empty({c.batch, c.heads_q, c.seq, c.dim_v}, q.options());
  const auto lse_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto lse = at::empty({c.batch, c.heads_q, c.seq}, q.options().dtype(lse_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_attention_cpu", [&] {
    forward_loops<scalar_t>(m, qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
                            vc.const_data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<Acc<scalar_t>>());
  });
  return {o, lse};
}

// Standard attention gradients from the saved lse: P = exp(s - lse), dP = dO V^T, Di = rowsum(dO o),
// dS = P (dP - Di); dq = scale dS K, dk = scale dS^T Q, dv = P^T dO. Keys are summed over the GQA group.
template <typename T>
void backward_loops(const MaskContext& m, const T* go, const T* q, const T* k, const T* v, const T* o,
                    const float* lse32, const double* lse64, T* dq, T* dk, T* dv) {
  using A = Acc<T>;
  const auto& c = m.c;
  const int64_t S = c.seq, Dk = c.dim_qk, Dv = c.dim_v, G = c.group();
  // Parallel over (batch, kv head): each owns its dk/dv rows and its group's dq rows.
  at::parallel_for(0, c.batch * c.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> dkacc(S * Dk), dvacc(S * Dv), dqacc(Dk);
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / c.heads_kv, hkv = bkv % c.heads_kv;
      std::fill(dkacc.begin(), dkacc.end(), A(0));
      std::fill(dvacc.begin(), dvacc.end(), A(0));
      const T* kh = k + bkv * S * Dk;
      const T* vh = v + bkv * S * Dv;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = b * c.heads_q + hkv * G + g;
        const T* qh = q + bh * S * Dk;
        const T* oh = o + bh * S * Dv;
        const T* goh = go + bh * S * Dv;
        for (int64_t i = 0; i < S; ++i) {
          const A l = lse64 ? static_cast<A>(lse64[bh * S + i]) : static_cast<A>(lse32[bh * S + i]);
          std::fill(dqacc.begin(), dqacc.end(), A(0));
          if (l != -std::numeric_limits<A>::infinity()) {
            A di = 0;
            for (int64_t d = 0; d < Dv; ++d) di += static_cast<A>(goh[i * Dv + d]) * static_cast<A>(oh[i * Dv + d]);
            for (int64_t j = 0; j <= i; ++j) {
              if (!m.attends(b, hkv, i, j)) continue;
              A dot = 0, dp = 0;
              for (int64_t d = 0; d < Dk; ++d) dot += static_cast<A>(qh[i * Dk + d]) * static_cast<A>(kh[j * Dk + d]);
              for (int64_t d = 0; d < Dv; ++d) dp += static_cast<A>(goh[i * Dv + d]) * static_cast<A>(vh[j * Dv + d]);
              const A p = std::exp(dot * static_cast<A>(c.scale) - l);
              const A ds = p * (dp - di) * static_cast<A>(c.scale);
              for (int64_t d = 0; d < Dk; ++d) {
                dqacc[d] += ds * static_cast<A>(kh[j * Dk + d]);
                dkacc[j * Dk + d] += ds * static_cast<A>(qh[i * Dk + d]);
              }
              for (int64_t d = 0; d < Dv; ++d) dvacc[j * Dv + d] += p * static_cast<A>(goh[i * Dv + d]);
            }
          }
          for (int64_t d = 0; d < Dk; ++d) dq[(bh * S + i) * Dk + d] = static_cast<T>(dqacc[d]);
        }
      }
      for (int64_t x = 0; x < S * Dk; ++x) dk[bkv * S * Dk + x] = static_cast<T>(dkacc[x]);
      for (int64_t x = 0; x < S * Dv; ++x) dv[bkv * S * Dv + x] = static_cast<T>(dvacc[x]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const c10::optional<at::Tensor>& block_indices,
    const c10::optional<at::Tensor>& block_counts, const c10::optional<at::Tensor>& cu_seqlens, int64_t window,
    int64_t sink_tokens, int64_t block_size, c10::optional<double> scale, bool) {
  const char* op = "anvil::sparse_attention_backward";
  const auto c = check_sparse_attention_args(q, k, v, block_indices, block_counts, cu_seqlens, window, sink_tokens,
                                             block_size, scale, op);
  ANVIL_CHECK(grad_o.sizes() == o.sizes() && o.sizes() == at::IntArrayRef({c.batch, c.heads_q, c.seq, c.dim_v}), op,
              ": grad_o and o must be (B, Hq, S, Dv) = (", c.batch, ", ", c.heads_q, ", ", c.seq, ", ", c.dim_v,
              "), got ", grad_o.sizes(), " and ", o.sizes());
  ANVIL_CHECK(lse.sizes() == at::IntArrayRef({c.batch, c.heads_q, c.seq}), op, ": lse must be (B, Hq, S), got ",
              lse.sizes());
  check_index_values(c, block_indices, block_counts, cu_seqlens, op);
  const MaskContext m{c, doc_starts(c.seq, cu_seqlens), listed_blocks(c, block_indices, block_counts)};
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  const auto oc = o.to(q.scalar_type()).contiguous(), goc = grad_o.to(q.scalar_type()).contiguous();
  const bool lse_double = lse.scalar_type() == at::kDouble;
  const auto lsec = lse_double ? lse.contiguous() : lse.to(at::kFloat).contiguous();
  auto dq = at::empty_like(qc), dk = at::empty_like(kc), dv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "sparse_attention_backward_cpu", [&] {
    backward_loops<scalar_t>(m, goc.const_data_ptr<scalar_t>(), qc.const_data_ptr<scalar_t>(),
                             kc.const_data_ptr<scalar_t>(), vc.const_data_ptr<scalar_t>(),
                             oc.const_data_ptr<scalar_t>(), lse_double ? nullptr : lsec.const_data_ptr<float>(),
                             lse_double ? lsec.const_data_ptr<double>() : nullptr, dq.data_ptr<scalar_t>(),
                             dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

// select_blocks, plainly: per (b, kv head, query block) the block scores summed over the group's heads and
// the block's queries, then forced blocks, then the best scores (ties: lower block index), ascending, -1 padded.
at::Tensor select_blocks_cpu(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_n,
                             int64_t sink_blocks, int64_t local_blocks, const c10::optional<at::Tensor>& cu_seqlens,
                             c10::optional<double> scale) {
  const auto c = check_select_blocks_args(q, k, block_size, top_n, sink_blocks, local_blocks, cu_seqlens, scale,
                                          "anvil::select_blocks");
  const int64_t S = c.seq, D = c.dim, NB = c.num_blocks, bs = c.block_size, G = c.heads_q / c.heads_kv;
  const auto qd = q.to(at::kDouble).contiguous(), kd = k.to(at::kDouble).contiguous();
  const double* qp = qd.const_data_ptr<double>();
  const double* kp = kd.const_data_ptr<double>();
  const auto ds = doc_starts(S, cu_seqlens);
  auto out = at::empty({c.batch, c.heads_kv, NB, top_n}, q.options().dtype(at::kInt).device(at::kCPU));
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, c.batch * c.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> kbar(NB * D), score(NB), logit(NB);
    for (int64_t bkv = begin; bkv < end; ++bkv) {
      const int64_t b = bkv / c.heads_kv, hkv = bkv % c.heads_kv;
      const double* kh = kp + bkv * S * D;
      std::fill(kbar.begin(), kbar.end(), 0.0);
      for (int64_t j = 0; j < S; ++j) {
        for (int64_t d = 0; d < D; ++d) kbar[(j / bs) * D + d] += kh[j * D + d];
      }
      for (int64_t kb = 0; kb < NB; ++kb) {
        const double n = static_cast<double>(std::min(S, (kb + 1) * bs) - kb * bs);
        for (int64_t d = 0; d < D; ++d) kbar[kb * D + d] /= n;
      }
      for (int64_t qb = 0; qb < NB; ++qb) {
        std::fill(score.begin(), score.end(), 0.0);
        for (int64_t g = 0; g < G; ++g) {
          const double* qh = qp + ((b * c.heads_q) + hkv * G + g) * S * D;
          for (int64_t i = qb * bs; i < std::min(S, (qb + 1) * bs); ++i) {
            // Softmax of query i over its eligible blocks: kb <= qb that reach into i's document.
            double mx = -std::numeric_limits<double>::infinity();
            for (int64_t kb = 0; kb <= qb; ++kb) {
              if ((kb + 1) * bs <= ds[i]) continue;
              double dot = 0;
              for (int64_t d = 0; d < D; ++d) dot += qh[i * D + d] * kbar[kb * D + d];
              logit[kb] = dot * c.scale;
              mx = std::max(mx, logit[kb]);
            }
            double sum = 0;
            for (int64_t kb = 0; kb <= qb; ++kb) {
              if ((kb + 1) * bs > ds[i]) sum += std::exp(logit[kb] - mx);
            }
            for (int64_t kb = 0; kb <= qb; ++kb) {
              if ((kb + 1) * bs > ds[i]) score[kb] += std::exp(logit[kb] - mx) / sum;
            }
          }
        }
        // Eligible blocks of the query block: kb <= qb reaching into the document of its first query.
        const int64_t first_kb = ds[qb * bs] / bs;
        std::vector<int64_t> order;
        for (int64_t kb = first_kb; kb <= qb; ++kb) order.push_back(kb);
        auto forced = [&](int64_t kb) { return kb < first_kb + c.sink_blocks || kb > qb - c.local_blocks; };
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t x) {
          if (forced(a) != forced(x)) return forced(a);
          if (forced(a)) return a < x;
          return score[a] > score[x];
        });
        if (static_cast<int64_t>(order.size()) > top_n) order.resize(top_n);
        std::sort(order.begin(), order.end());
        int32_t* row = op + (bkv * NB + qb) * top_n;
        for (int64_t s = 0; s < top_n; ++s) row[s] = s < static_cast<int64_t>(order.size()) ? int32_t(order[s]) : -1;
      }
    }
  });
  return out.to(q.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CPU, m) {
  m.impl("sparse_attention", &sparse_attention_cpu);
  m.impl("sparse_attention_backward", &sparse_attention_backward_cpu);
  m.impl("select_blocks", &select_blocks_cpu);
}

}  // namespace anvil::ops
