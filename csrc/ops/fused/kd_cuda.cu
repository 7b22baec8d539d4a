// anvil::kd_rows on CUDA: one chunk of the distillation loss of train/kd_loss.h (the divergence between the
// teacher's and the student's tempered softmax, blended with the student's cross-entropy) and its gradient wrt
// the student's logits, in one kernel over the model-dtype logits.
//
// Why fused: the ATen composite of a chunk (1024 rows x a 128k vocabulary) is a chain of fp32 elementwise
// kernels, each reading and writing a 0.5 GB buffer: on the H100 the KD step cost 1.53x (student step + teacher
// forward) with it (docs/BENCHMARKS.md "distill"). Here a block owns a row and reads it three times from the
// bf16 logits (6 bytes an element for both models, 2 more for the gradient written over the student's logits):
//   pass 1  online (max, sum exp) of z_s / T, z_t / T and, for the CE term when T != 1, of z_s: the three lse;
//   pass 2  the divergence summed over the row, and S = sum_j q_j g_j (the gradient's normalizing sum, for every
//           divergence but forward KL, whose gradient q - p needs none);
//   pass 3  dz = kd_weight / T * dKD/dz + ce_weight * (softmax(z_s) - onehot(label)), rounded once to the dtype
//           and written in place of z_s.
// The per-element formulas are those of csrc/train/kd_loss.cpp (kd_divergence and divergence_grad), in fp32 with
// the mixtures' logs in log space; a teacher probability that underflows to 0 contributes 0 (where the composite's
// 0 * -inf would give NaN). Sums are per thread in a fixed order, then merged across the block in a fixed order:
// deterministic. The loss codes are train::KdLoss's order (0 forward_kl, 1 reverse_kl, 2 skew_forward_kl,
// 3 skew_reverse_kl, 4 jsd, 5 tv); jsd with beta 0 or 1 arrives as forward/reverse KL (the caller resolves it).
// There is no CPU kernel: on the CPU the composite in kd_loss.cpp is the implementation and the reference.
#include "ops/common/checks.h"
#include "ops/fused/fused_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>

namespace anvil::ops {
namespace {

using fused_cuda::from_f;
using fused_cuda::load_vec;
using fused_cuda::lse_merge;
using fused_cuda::store_vec;
using fused_cuda::to_f;
using fused_cuda::Vec;

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct KdParams {
  int loss;
  float inv_t;      // 1 / T
  float lam, beta;  // skew lambda, JSD beta
  float kd_w;       // weight of the row's divergence in the total (the gradient gets kd_w / T)
  float ce_w;       // weight of the row's cross-entropy
  bool ce;          // labels given
  bool grad;        // write dz over the student's logits
};

// log(a e^x + b e^y) for weights a, b in [0, 1] (kd_loss.cpp's log_mixture), from log-probabilities x, y.
__device__ __forceinline__ float log_mixture(float x, float a, float y, float b) {
  if (a <= 0.0f) return y + logf(b);
  if (b <= 0.0f) return x + logf(a);
  const float u = x + logf(a), v = y + logf(b);
  const float m = fmaxf(u, v);
  if (m == -INFINITY) return -INFINITY;
  return m + log1pf(expf(-fabsf(u - v)));
}

// p * (log p - log r) with the convention 0 log 0 = 0.
__device__ __forceinline__ float plogp(float p, float lp, float lr) { return p > 0.0f ? p * (lp - lr) : 0.0f; }

// The divergence's term and q * dL/dq at one vocabulary entry, from the tempered log-probabilities.
__device__ __forceinline__ void kd_terms(const KdParams& k, float ls, float lt, float& term, float& qg) {
  const float q = expf(ls), p = expf(lt);
  switch (k.loss) {
    case 0: term = plogp(p, lt, ls); qg = -p; break;  // forward KL (its gradient q - p is formed directly)
    case 1: term = plogp(q, ls, lt); qg = q * (ls - lt); break;
    case 2: {
      const float lm = log_mixture(lt, k.lam, ls, 1.0f - k.lam);
      term = plogp(p, lt, lm);
      qg = k.lam >= 1.0f ? 0.0f : -(1.0f - k.lam) * expf(ls + lt - lm);
      break;
    }
    case 3: {
      const float lm = log_mixture(lt, 1.0f - k.lam, ls, k.lam);
      term = plogp(q, ls, lm);
      qg = q * (ls - lm) - (k.lam > 0.0f ? k.lam * expf(2.0f * ls - lm) : 0.0f);
      break;
    }
    case 4: {
      const float lm = log_mixture(lt, k.beta, ls, 1.0f - k.beta);
      term = k.beta * plogp(p, lt, lm) + (1.0f - k.beta) * plogp(q, ls, lm);
      qg = (1.0f - k.beta) * q * (ls - lm);
      break;
    }
    default: {  // total variation
      term = 0.5f * fabsf(p - q);
      const float d = q - p;
      qg = 0.5f * q * (d > 0.0f ? 1.0f : d < 0.0f ? -1.0f : 0.0f);
      break;
    }
  }
}

// Block-wide sum of v in a fixed order (warp shuffles, then warp 0 over the warps' partials); every thread gets it.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += shared[w];
  return total;
}

// Block-wide merge of (max, sum exp) pairs in a fixed order; every thread gets the row's lse.
__device__ __forceinline__ float block_lse(float m, float s, float* sm, float* ss) {
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) sm[warp] = m, ss[warp] = s;
  __syncthreads();
  m = sm[0], s = ss[0];
  for (int w = 1; w < kWarps; ++w) lse_merge(m, s, sm[w], ss[w]);
  return m + logf(s);
}

// Folds x into the running (max, sum exp(x - max)) pair.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = (m == -INFINITY ? 0.0f : s * expf(m - x)) + 1.0f;
    m = x;
  } else if (x > -INFINITY) {
    s += expf(x - m);
  }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads) kd_rows_kernel(T* __restrict__ zs_all, const T* __restrict__ zt_all,
                                                           const int64_t* __restrict__ labels, float* __restrict__ kd_out,
                                                           float* __restrict__ ce_out, int64_t v, KdParams k) {
  __shared__ float sm[kWarps], ss[kWarps];
  const int64_t row = blockIdx.x;
  T* zs = zs_all + row * v;
  const T* zt = zt_all + row * v;
  const int64_t nvec = v / kN;
  const bool untempered = k.ce && k.inv_t != 1.0f;  // the CE term needs softmax(z_s) at T = 1 too

  // ---- pass 1: the three log-sum-exps ----
  float ms = -INFINITY, s_s = 0.0f, mt = -INFINITY, s_t = 0.0f, m1 = -INFINITY, s_1 = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const auto a = load_vec<T, kN>(zs + i * kN);
    const auto b = load_vec<T, kN>(zt + i * kN);
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      const float x = to_f(a.v[e]);
      online_add(ms, s_s, x * k.inv_t);
      online_add(mt, s_t, to_f(b.v[e]) * k.inv_t);
      if (untempered) online_add(m1, s_1, x);
    }
  }
  const float lse_s = block_lse(ms, s_s, sm, ss);
  const float lse_t = block_lse(mt, s_t, sm, ss);
  const float lse_1 = untempered ? block_lse(m1, s_1, sm, ss) : lse_s;
  const int64_t label = k.ce ? labels[row] : -1;

  // ---- pass 2: the divergence and S = sum q g ----
  float term_sum = 0.0f, qg_sum = 0.0f;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const auto a = load_vec<T, kN>(zs + i * kN);
    const auto b = load_vec<T, kN>(zt + i * kN);
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      float term, qg;
      kd_terms(k, to_f(a.v[e]) * k.inv_t - lse_s, to_f(b.v[e]) * k.inv_t - lse_t, term, qg);
      term_sum += term;
      qg_sum += qg;
    }
  }
  const float kd = block_sum(term_sum, sm);
  const float S = k.loss == 0 ? 0.0f : block_sum(qg_sum, sm);
  if (threadIdx.x == 0) {
    kd_out[row] = kd;
    // A label outside [0, V) gives NaN (no host sync for a check), as cross_entropy_chunk does.
    if (ce_out) ce_out[row] = label >= 0 && label < v ? lse_1 - to_f(zs[label]) : NAN;
  }
  if (!k.grad) return;
  __syncthreads();  // zs[label] is read above before any thread overwrites the row

  // ---- pass 3: dz over z_s ----
  const float gk = k.kd_w * k.inv_t;
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    auto a = load_vec<T, kN>(zs + i * kN);
    const auto b = load_vec<T, kN>(zt + i * kN);
    Vec<T, kN> out;
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      const float x = to_f(a.v[e]);
      const float ls = x * k.inv_t - lse_s, lt = to_f(b.v[e]) * k.inv_t - lse_t;
      const float q = expf(ls);
      float g;
      if (k.loss == 0) {
        g = q - expf(lt);
      } else {
        float term, qg;
        kd_terms(k, ls, lt, term, qg);
        g = qg - q * S;
      }
      float d = gk * g;
      if (k.ce && k.ce_w != 0.0f) {
        const float q1 = untempered ? expf(x - lse_1) : q;
        d += k.ce_w * (q1 - ((i * kN + e) == label ? 1.0f : 0.0f));
      }
      out.v[e] = from_f<T>(d);
    }
    store_vec<T, kN>(zs + i * kN, out);
  }
}

template <int N>
using Int = std::integral_constant<int, N>;

std::tuple<at::Tensor, at::Tensor> kd_rows_cuda(at::Tensor& student, const at::Tensor& teacher,
                                                const c10::optional<at::Tensor>& labels, int64_t loss, double temperature,
                                                double skew_lambda, double jsd_beta, double kd_weight, double ce_weight,
                                                bool write_grad) {
  const char* op = "anvil::kd_rows";
  ANVIL_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), op, ": student (", student.sizes(),
              ") and teacher (", teacher.sizes(), ") logits must both be (R, V)");
  ANVIL_CHECK(student.scalar_type() == teacher.scalar_type(), op, ": student (", student.scalar_type(),
              ") and teacher (", teacher.scalar_type(), ") logits must have one dtype");
  ANVIL_CHECK(student.is_contiguous() && teacher.is_contiguous(), op, ": logits must be contiguous");
  ANVIL_CHECK(student.is_cuda() && teacher.device() == student.device(), op, ": logits must be on one CUDA device");
  ANVIL_CHECK(loss >= 0 && loss <= 5, op, ": loss code must be 0..5 (train::KdLoss), got ", loss);
  ANVIL_CHECK(temperature > 0 && std::isfinite(temperature), op, ": temperature must be > 0, got ", temperature);
  ANVIL_CHECK(skew_lambda >= 0 && skew_lambda <= 1 && jsd_beta >= 0 && jsd_beta <= 1, op,
              ": skew_lambda and jsd_beta must be in [0, 1]");
  const bool ce = labels.has_value() && labels->defined();
  if (ce)
    ANVIL_CHECK(labels->dim() == 1 && labels->size(0) == student.size(0) && labels->scalar_type() == at::kLong &&
                    labels->device() == student.device() && labels->is_contiguous(),
                op, ": labels must be (R) int64 contiguous on the logits' device, got ", labels->sizes());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t r = student.size(0), v = student.size(1);
  auto kd = at::empty({r}, student.options().dtype(at::kFloat));
  auto ce_rows = ce ? at::empty({r}, student.options().dtype(at::kFloat)) : at::zeros({r}, student.options().dtype(at::kFloat));
  if (r == 0 || v == 0) return {kd.zero_(), ce_rows.zero_()};
  ANVIL_CHECK(r < (int64_t(1) << 31), op, ": at most 2^31 - 1 rows per chunk, got ", r);
  KdParams k{int(loss), float(1.0 / temperature), float(skew_lambda), float(jsd_beta), float(kd_weight),
             float(ce_weight), ce, write_grad};
  auto run = [&](auto tag) {
    using T = decltype(tag);
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = v % kVec == 0 && reinterpret_cast<uintptr_t>(student.data_ptr()) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(teacher.const_data_ptr()) % 16 == 0;
    auto launch = [&](auto kn) {
      constexpr int kN = decltype(kn)::value;
      kd_rows_kernel<T, kN><<<unsigned(r), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          reinterpret_cast<T*>(student.data_ptr()), reinterpret_cast<const T*>(teacher.const_data_ptr()),
          ce ? labels->const_data_ptr<int64_t>() : nullptr, kd.data_ptr<float>(), ce ? ce_rows.data_ptr<float>() : nullptr,
          v, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(Int<kVec>{});
    else launch(Int<1>{});
  };
  switch (student.scalar_type()) {
    case at::kFloat: run(float{}); break;
    case at::kBFloat16: run(__nv_bfloat16{}); break;
    case at::kHalf: run(__half{}); break;
    default: ANVIL_CHECK(false, op, ": logits must be fp32, bf16 or fp16, got ", student.scalar_type());
  }
  return {kd, ce_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CUDA, m) { m.impl("kd_rows", &kd_rows_cuda); }

}  // namespace anvil::ops
