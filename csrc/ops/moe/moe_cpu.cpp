// CPU reference of the MoE ops: a token at a time, in the plainest order. The gate computes in
// float with det_math.h (so its bits equal the CUDA kernel's, which reproduces the same summation
// order), or in double for float64 logits (gradcheck). Semantics: docs/FORMATS.md, "MoE routing".
#include "ops/common/det_math.h"
#include "ops/moe/moe_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace anvil::ops {
namespace {

// Arithmetic of the gate in F: float uses det_math (bit-equal with CUDA), double the plain operators.
template <typename F>
struct GateMath;
template <>
struct GateMath<float> {
  static float add(float a, float b) { return det::add(a, b); }
  static float mul(float a, float b) { return det::mul(a, b); }
  static float div(float a, float b) { return det::div(a, b); }
  static float exp(float x) { return det::exp(x); }
  static float sigmoid(float x) { return det::sigmoid(x); }
};
template <>
struct GateMath<double> {
  static double add(double a, double b) { return a + b; }
  static double mul(double a, double b) { return a * b; }
  static double div(double a, double b) { return a / b; }
  static double exp(double x) { return std::exp(x); }
  static double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
};

// A score as a selection key: NaN never wins (it ranks as -inf), ties go to the lower index.
template <typename F>
F key(F v) {
  return v == v ? v : -std::numeric_limits<F>::infinity();
}
// The selection key of an expert in a dropped group, as transformers 5.17 masks it: -inf for the
// sigmoid gate (DeepseekV3TopkRouter, and DeepSeek-V3's own inference code), 0.0 for the softmax gate
// (DeepseekV2Moe's group_limited_greedy). With 0.0, dropped experts outrank kept ones whose biased score
// is negative; with -inf they never win.
template <typename F>
F dropped_key(GateScore score) {
  return score == GateScore::kSigmoid ? -std::numeric_limits<F>::infinity() : F(0);
}

template <typename F>
bool beats(F a, int64_t ia, F b, int64_t ib) {
  return a > b || (a == b && ia < ib);
}

// Index of the best of v[0..n) not yet taken, by `beats`.
template <typename F>
int64_t best_untaken(const F* v, int64_t n, const std::vector<char>& taken) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; ++i)
    if (!taken[i] && (best < 0 || beats(v[i], i, v[best], best))) best = i;
  return best;
}

// Softmax over one row with the CUDA kernel's summation order (gate_layout): each of `team` lanes sums
// its contiguous chunk in order, then a butterfly over the team's partials (xor team/2, ..., 1).
template <typename F>
void softmax_row(const F* l, int64_t n, F* p) {
  using M = GateMath<F>;
  const GateLayout lay = gate_layout(n);
  F m = -std::numeric_limits<F>::infinity();
  for (int64_t e = 0; e < n; ++e) m = std::max(m, l[e]);  // NaN ignored here, as fmaxf does on the GPU
  std::array<F, 32> part{};
  for (int64_t e = 0; e < n; ++e) {
    p[e] = M::exp(M::add(l[e], -m));
    part[e / lay.chunk] = M::add(part[e / lay.chunk], p[e]);
  }
  for (int off = lay.team / 2; off > 0; off /= 2) {
    std::array<F, 32> next{};
    for (int r = 0; r < lay.team; ++r) next[r] = M::add(part[r], part[r ^ off]);
    part = next;
  }
  for (int64_t e = 0; e < n; ++e) p[e] = M::div(p[e], part[0]);
}

template <typename T, typename F>
void gate_token(const T* logit_row, const F* bias, const F* noise_row, const GateConfig& c, F* w_out, int32_t* i_out,
                std::vector<F>& s, std::vector<F>& sel, std::vector<char>& taken) {
  using M = GateMath<F>;
  const int64_t E = c.experts;
  std::vector<F> l(E);
  for (int64_t e = 0; e < E; ++e) l[e] = static_cast<F>(logit_row[e]);
  if (c.score == GateScore::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = M::sigmoid(l[e]);
  } else {
    softmax_row(l.data(), E, s.data());
  }
  for (int64_t e = 0; e < E; ++e) {
    F v = s[e];
    if (bias) v = M::add(v, bias[e]);
    if (noise_row) v = M::add(v, noise_row[e]);
    sel[e] = key(v);
  }
  if (c.n_group > 1) {
    const int64_t gs = c.group_size();
    std::vector<F> gscore(c.n_group);
    for (int64_t g = 0; g < c.n_group; ++g) {
      F top1 = -std::numeric_limits<F>::infinity(), top2 = top1;
      for (int64_t e = g * gs; e < (g + 1) * gs; ++e) {
        if (sel[e] > top1) {
          top2 = top1;
          top1 = sel[e];
        } else if (sel[e] > top2) {
          top2 = sel[e];
        }
      }
      gscore[g] = key(c.score == GateScore::kSigmoid ? M::add(top1, top2) : top1);
    }
    std::vector<char> kept(c.n_group, 0);
    for (int64_t r = 0; r < c.topk_group; ++r) kept[best_untaken(gscore.data(), c.n_group, kept)] = 1;
    for (int64_t e = 0; e < E; ++e)
      if (!kept[e / gs]) sel[e] = dropped_key<F>(c.score);
  }
  std::fill(taken.begin(), taken.end(), 0);
  F sum = 0;
  for (int64_t j = 0; j < c.top_k; ++j) {
    const int64_t e = best_untaken(sel.data(), E, taken);
    taken[e] = 1;
    i_out[j] = static_cast<int32_t>(e);
    w_out[j] = s[e];
    sum = M::add(sum, s[e]);
  }
  const F denom = M::add(sum, F(kMoeRenormEps));
  for (int64_t j = 0; j < c.top_k; ++j) {
    F w = c.renormalize ? M::div(w_out[j], denom) : w_out[j];
    w_out[j] = M::mul(w, static_cast<F>(c.routed_scale));
  }
}

template <typename T, typename F>
void gate_cpu_typed(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& noise, const GateConfig& c, at::Tensor& weights,
                    at::Tensor& indices) {
  const T* lp = logits.const_data_ptr<T>();
  const F* bp = bias ? bias->const_data_ptr<F>() : nullptr;
  const F* np = noise ? noise->const_data_ptr<F>() : nullptr;
  F* wp = weights.data_ptr<F>();
  int32_t* ip = indices.data_ptr<int32_t>();
  at::parallel_for(0, c.tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<F> s(c.experts), sel(c.experts);
    std::vector<char> taken(c.experts);
    for (int64_t t = begin; t < end; ++t)
      gate_token<T, F>(lp + t * c.experts, bp, np ? np + t * c.experts : nullptr, c, wp + t * c.top_k,
                       ip + t * c.top_k, s, sel, taken);
  });
}

std::tuple<at::Tensor, at::Tensor> moe_gate_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& bias,
                                                const c10::optional<at::Tensor>& noise, int64_t top_k, int64_t n_group,
                                                int64_t topk_group, c10::string_view score, bool renormalize,
                                                double routed_scale) {
  const GateConfig c = check_gate_args(logits, bias, noise, top_k, n_group, topk_group, score, renormalize,
                                       routed_scale, "anvil::moe_gate");
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto weights = at::empty({c.tokens, top_k}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  auto indices = at::empty({c.tokens, top_k}, logits.options().dtype(at::kInt));
  switch (logits.scalar_type()) {
    case at::kDouble: gate_cpu_typed<double, double>(logits, bias, noise, c, weights, indices); break;
    case at::kFloat: gate_cpu_typed<float, float>(logits, bias, noise, c, weights, indices); break;
    case at::kBFloat16: gate_cpu_typed<at::BFloat16, float>(logits, bias, noise, c, weights, indices); break;
    default: gate_cpu_typed<at::Half, float>(logits, bias, noise, c, weights, indices); break;
  }
  return {weights, indices};
}

// d(weights)/d(logits) for one token. g: (k) upstream gradient; idx: (k) selected experts.
// With s the scores and S = sum_j s[idx_j] + eps: w_j = a * s_j / S (renormalized) or a * s_j, so
// dL/ds_j = a * (g_j / S - sum_m g_m s_m / S^2) or a * g_j. Then sigmoid: dl = ds * s (1 - s) at the
// selected experts; softmax: dl_e = p_e (ds_e - sum_j ds_j p_j) for every expert.
template <typename T, typename F>
void gate_backward_token(const F* g, const int32_t* idx, const T* logit_row, GateScore score, bool renormalize,
                         F scale, int64_t E, int64_t k, F* out, std::vector<F>& s) {
  using M = GateMath<F>;
  std::vector<F> l(E);
  for (int64_t e = 0; e < E; ++e) l[e] = static_cast<F>(logit_row[e]);
  if (score == GateScore::kSigmoid) {
    for (int64_t e = 0; e < E; ++e) s[e] = M::sigmoid(l[e]);
  } else {
    softmax_row(l.data(), E, s.data());
  }
  F sum = 0, gs = 0;
  for (int64_t j = 0; j < k; ++j) {
    sum += s[idx[j]];
    gs += g[j] * s[idx[j]];
  }
  const F denom = sum + F(kMoeRenormEps);
  std::vector<F> ds(k);
  for (int64_t j = 0; j < k; ++j)
    ds[j] = renormalize ? scale * (g[j] / denom - gs / (denom * denom)) : scale * g[j];
  std::fill(out, out + E, F(0));
  if (score == GateScore::kSigmoid) {
    for (int64_t j = 0; j < k; ++j) out[idx[j]] = ds[j] * s[idx[j]] * (F(1) - s[idx[j]]);
  } else {
    F dot = 0;
    for (int64_t j = 0; j < k; ++j) dot += ds[j] * s[idx[j]];
    for (int64_t e = 0; e < E; ++e) out[e] = -s[e] * dot;
    for (int64_t j = 0; j < k; ++j) out[idx[j]] += s[idx[j]] * ds[j];
  }
}

at::Tensor moe_gate_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& indices,
                                 c10::string_view score, bool renormalize, double routed_scale) {
  const char* op = "anvil::moe_gate_backward";
  check_gate_backward_args(grad_weights, logits, indices, op);
  const GateScore sc = parse_gate_score(score, op);
  const int64_t T = logits.size(0), E = logits.size(1), k = indices.size(1);
  const bool dbl = logits.scalar_type() == at::kDouble;
  auto g = grad_weights.contiguous();
  auto grad = at::empty({T, E}, logits.options().dtype(dbl ? at::kDouble : at::kFloat));
  auto run = [&](auto t_tag, auto f_tag) {
    using T_ = decltype(t_tag);
    using F = decltype(f_tag);
    const T_* lp = logits.const_data_ptr<T_>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<F> s(E);
      for (int64_t t = begin; t < end; ++t)
        gate_backward_token<T_, F>(g.const_data_ptr<F>() + t * k, indices.const_data_ptr<int32_t>() + t * k,
                                   lp + t * E, sc, renormalize, static_cast<F>(routed_scale), E, k,
                                   grad.data_ptr<F>() + t * E, s);
    });
  };
  switch (logits.scalar_type()) {
    case at::kDouble: run(double{}, double{}); break;
    case at::kFloat: run(float{}, float{}); break;
    case at::kBFloat16: run(at::BFloat16{}, float{}); break;
    default: run(at::Half{}, float{}); break;
  }
  return grad.to(logits.scalar_type());
}

// ---- routing ---------------------------------------------------------------------------------------

// slot_rows (T, k), counts (E), offsets (E + 1), dropped (): the stable routing of the slots.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& indices,
                                                                          int64_t num_experts, int64_t align,
                                                                          int64_t capacity) {
  const char* op = "anvil::moe_route";
  check_indices(indices, num_experts, op);
  ANVIL_CHECK(align >= 1, op, ": align must be >= 1, got ", align);
  const int64_t n = indices.numel();
  const int32_t* ip = indices.const_data_ptr<int32_t>();
  auto opts = indices.options().dtype(at::kInt);
  auto slot_rows = at::empty(indices.sizes(), opts);
  auto counts = at::zeros({num_experts}, opts);
  auto offsets = at::empty({num_experts + 1}, opts);
  auto dropped = at::zeros({}, opts);
  int32_t* cp = counts.data_ptr<int32_t>();
  std::vector<int64_t> all(num_experts, 0);
  for (int64_t i = 0; i < n; ++i) {
    ANVIL_CHECK(ip[i] >= 0 && ip[i] < num_experts, op, ": indices must be in [0, num_experts=", num_experts,
                "), got ", ip[i], " at flat position ", i);
    all[ip[i]] += 1;
  }
  int32_t* op_ = offsets.data_ptr<int32_t>();
  op_[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t kept = capacity >= 0 ? std::min(all[e], capacity) : all[e];
    cp[e] = static_cast<int32_t>(kept);
    *dropped.data_ptr<int32_t>() += static_cast<int32_t>(all[e] - kept);
    op_[e + 1] = static_cast<int32_t>(op_[e] + round_up(kept, align));
  }
  std::vector<int64_t> cursor(num_experts, 0);
  int32_t* sp = slot_rows.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = ip[i];
    sp[i] = cursor[e] < cp[e] ? static_cast<int32_t>(op_[e] + cursor[e]) : -1;
    cursor[e] += 1;
  }
  return {slot_rows, counts, offsets, dropped};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& hidden,
                                                                                      const at::Tensor& indices,
                                                                                      int64_t num_experts,
                                                                                      int64_t align, int64_t capacity) {
  check_permute_args(hidden, indices, num_experts, align, "anvil::moe_permute");
  auto [slot_rows, counts, offsets, dropped] = moe_route_cpu(indices, num_experts, align, capacity);
  const int64_t T = hidden.size(0), k = indices.size(1);
  auto permuted = at::zeros({permuted_rows(T, k, num_experts, align), hidden.size(1)}, hidden.options());
  const int32_t* sp = slot_rows.const_data_ptr<int32_t>();
  const int64_t row_bytes = hidden.size(1) * hidden.element_size();
  const auto* src = static_cast<const char*>(hidden.const_data_ptr());
  auto* dst = static_cast<char*>(permuted.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {  // each row is written by one slot only
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < k; ++j)
        if (sp[t * k + j] >= 0) std::memcpy(dst + sp[t * k + j] * row_bytes, src + t * row_bytes, row_bytes);
  });
  return {permuted, slot_rows, counts, offsets, dropped};
}

// out[t] = sum_j w[t, j] * x[slot_rows[t, j]] over kept slots (w undefined: weight 1), accumulated in
// fp32 (fp64 for double) in j order, as the CUDA kernel sums. moe_unpermute and moe_permute_backward.
at::Tensor combine_cpu(const at::Tensor& x, const at::Tensor& slot_rows, const at::Tensor& w, const char* op) {
  const int64_t T = slot_rows.size(0), k = slot_rows.size(1), H = x.size(1);
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto xa = x.to(acc_type).contiguous();
  const auto wa = w.defined() ? w.to(acc_type).contiguous() : at::Tensor();
  auto out = at::zeros({T, H}, x.options().dtype(acc_type));
  const int32_t* sp = slot_rows.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < T * k; ++i)
    ANVIL_CHECK(sp[i] < x.size(0), op, ": slot_rows[", i / k, ", ", i % k, "] = ", sp[i], " is out of range for ",
                x.size(0), " rows");
  AT_DISPATCH_FLOATING_TYPES(acc_type, "anvil_moe_combine_cpu", [&] {
    const scalar_t* xp = xa.const_data_ptr<scalar_t>();
    const scalar_t* wp = wa.defined() ? wa.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int32_t r = sp[t * k + j];
          if (r < 0) continue;
          const scalar_t wj = wp ? wp[t * k + j] : scalar_t(1);
          for (int64_t h = 0; h < H; ++h) op_[t * H + h] += wj * xp[r * H + h];
        }
    });
  });
  return out.to(x.scalar_type());
}

// grad_hidden[t] = sum over the kept slots j of grad_permuted[slot_rows[t, j]].
at::Tensor moe_permute_backward_cpu(const at::Tensor& grad_permuted, const at::Tensor& slot_rows) {
  const char* op = "anvil::moe_permute_backward";
  check_rank(grad_permuted, op, "grad_permuted", 2);
  check_rank(slot_rows, op, "slot_rows", 2);
  check_dtype(slot_rows, op, "slot_rows", {at::kInt});
  return combine_cpu(grad_permuted, slot_rows.contiguous(), at::Tensor(), op);
}

at::Tensor moe_unpermute_cpu(const at::Tensor& expert_out, const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute");
  return combine_cpu(expert_out, slot_rows, weights, "anvil::moe_unpermute");
}

// (grad_expert_out (R, H), grad_weights (T, k)).
std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& expert_out,
                                                              const at::Tensor& slot_rows, const at::Tensor& weights) {
  check_unpermute_args(expert_out, slot_rows, weights, "anvil::moe_unpermute_backward");
  const int64_t T = slot_rows.size(0), k = slot_rows.size(1);
  const auto acc_type = expert_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto g = grad_out.to(acc_type).contiguous(), x = expert_out.to(acc_type), w = weights.to(acc_type);
  const int64_t H = x.size(1);
  auto grad_x = at::zeros(expert_out.sizes(), expert_out.options().dtype(acc_type));
  auto grad_w = at::zeros(weights.sizes(), weights.options().dtype(acc_type));
  const int32_t* sp = slot_rows.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "anvil_moe_unpermute_backward_cpu", [&] {
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *xp = x.const_data_ptr<scalar_t>(),
                   *wp = w.const_data_ptr<scalar_t>();
    scalar_t *gxp = grad_x.data_ptr<scalar_t>(), *gwp = grad_w.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {  // a kept row belongs to one slot only
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < k; ++j) {
          const int32_t r = sp[t * k + j];
          if (r < 0) continue;
          double dot = 0;  // the reference's dot products in double: H terms of either sign
          for (int64_t h = 0; h < H; ++h) {
            gxp[r * H + h] = gp[t * H + h] * wp[t * k + j];
            dot += double(gp[t * H + h]) * double(xp[r * H + h]);
          }
          gwp[t * k + j] = static_cast<scalar_t>(dot);
        }
    });
  });
  return {grad_x.to(expert_out.scalar_type()), grad_w.to(weights.scalar_type())};
}

at::Tensor moe_expert_load_cpu(const at::Tensor& indices, int64_t num_experts) {
  const char* op = "anvil::moe_expert_load";
  check_indices(indices, num_experts, op);
  auto counts = at::zeros({num_experts}, indices.options().dtype(at::kInt));
  const int32_t* ip = indices.const_data_ptr<int32_t>();
  int32_t* cp = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < indices.numel(); ++i) {
    ANVIL_CHECK(ip[i] >= 0 && ip[i] < num_experts, op, ": indices must be in [0, num_experts=", num_experts,
                "), got ", ip[i]);
    cp[ip[i]] += 1;
  }
  return counts;
}

void moe_update_bias_cpu(at::Tensor& bias, const at::Tensor& counts, double gamma) {
  check_update_bias_args(bias, counts, "anvil::moe_update_bias");
  auto c = counts.to(at::kDouble);
  const double mean = bias.size(0) ? c.mean().item<double>() : 0.0;
  const double* cp = c.const_data_ptr<double>();
  float* bp = bias.data_ptr<float>();
  for (int64_t e = 0; e < bias.size(0); ++e) {
    const double d = mean - cp[e];
    bp[e] += static_cast<float>(gamma * ((d > 0) - (d < 0)));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CPU, m) {
  m.impl("moe_gate", &moe_gate_cpu);
  m.impl("moe_gate_backward", &moe_gate_backward_cpu);
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_permute_backward", &moe_permute_backward_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cpu);
  m.impl("moe_expert_load", &moe_expert_load_cpu);
  m.impl("moe_update_bias", &moe_update_bias_cpu);
}

}  // namespace anvil::ops
