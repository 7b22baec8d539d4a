// CPU reference of the fused training ops: plain loops, a row at a time, fp32 accumulation (fp64 for
// fp64 input). It is the oracle of the CUDA kernels and what the model runs on a machine without a GPU,
// so every forward reproduces the rounding steps of the PyTorch composite it replaces:
//   rms_norm  transformers' LlamaRMSNorm: n = x.float() * rsqrt(mean(x^2) + eps), rounded to x's dtype,
//             then weight * n rounded again (two roundings, as `weight * hidden_states.to(input_dtype)`)
//   swiglu    silu(gate) rounded to the dtype, then times up rounded (as `act_fn(gate) * up`)
//   rope      x * cos + rotate(x) * sin with each product and the sum rounded (equal bit for bit to
//             transformers' apply_rotary_pos_emb and its interleaved variant, in every dtype)
// Reductions that cross rows (rms_norm's grad_weight) use fixed chunks of rows, so the result does not
// depend on the number of threads.
#include "ops/fused/fused_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace anvil::ops {
namespace {

// The accumulation type: double for double, float otherwise.
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Rounds an accumulator value to the storage dtype and back (identity for float and double).
template <typename T>
Acc<T> round_to(Acc<T> v) {
  return static_cast<Acc<T>>(static_cast<T>(v));
}

#define ANVIL_FUSED_DISPATCH(dtype, op, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, op, __VA_ARGS__)

constexpr int64_t kRowsPerChunk = 32;  // rms_norm grad_weight: partial sums over fixed chunks of rows

// ---- rms_norm ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t h = check_rms_norm_args(x, weight, eps, "anvil::rms_norm");
  auto y = at::empty_like(x);                                             // (..., H)
  auto rstd = at::empty(rstd_shape(x), x.options().dtype(stat_dtype(x)));  // (...)
  const int64_t rows = x.numel() / h;
  ANVIL_FUSED_DISPATCH(x.scalar_type(), "anvil::rms_norm", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    A* rp = rstd.data_ptr<A>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * h;
        A ss = 0;
        for (int64_t j = 0; j < h; ++j) ss += A(xr[j]) * A(xr[j]);
        const A rs = A(1) / std::sqrt(ss / A(h) + A(eps));
        rp[r] = rs;
        for (int64_t j = 0; j < h; ++j) yp[r * h + j] = scalar_t(A(wp[j]) * round_to<scalar_t>(A(xr[j]) * rs));
      }
    });
  });
  return {y, rstd};
}

// dx = rstd * (g - n * mean(g * n)), g = grad_y * weight, n = x * rstd (the derivative with the rounding
// of n taken as the identity); grad_weight = sum over rows of grad_y * round(n), the exact derivative of
// y = weight * round(n).
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                         const at::Tensor& weight, const at::Tensor& rstd) {
  const int64_t h = check_rms_norm_backward_args(grad_y, x, weight, rstd, "anvil::rms_norm_backward");
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(weight);
  const int64_t rows = x.numel() / h;
  const int64_t chunks = (rows + kRowsPerChunk - 1) / kRowsPerChunk;
  auto partial = at::zeros({std::max<int64_t>(chunks, 1), h}, x.options().dtype(stat_dtype(x)));  // (chunks, H)
  ANVIL_FUSED_DISPATCH(x.scalar_type(), "anvil::rms_norm_backward", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    const A* rp = rstd.const_data_ptr<A>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    A* pp = partial.data_ptr<A>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        A* acc = pp + c * h;
        for (int64_t r = c * kRowsPerChunk; r < std::min(rows, (c + 1) * kRowsPerChunk); ++r) {
          const scalar_t* gr = gp + r * h;
          const scalar_t* xr = xp + r * h;
          const A rs = rp[r];
          A dot = 0;
          for (int64_t j = 0; j < h; ++j) dot += A(gr[j]) * A(wp[j]) * (A(xr[j]) * rs);
          const A mean = dot / A(h);
          for (int64_t j = 0; j < h; ++j) {
            const A n = A(xr[j]) * rs;
            dxp[r * h + j] = scalar_t(rs * (A(gr[j]) * A(wp[j]) - n * mean));
            acc[j] += A(gr[j]) * round_to<scalar_t>(n);
          }
        }
      }
    });
    scalar_t* dwp = dw.data_ptr<scalar_t>();
    at::parallel_for(0, h, 256, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        A s = 0;
        for (int64_t c = 0; c < chunks; ++c) s += pp[c * h + j];
        dwp[j] = scalar_t(s);
      }
    });
  });
  return {dx, dw};
}

// ---- swiglu -----------------------------------------------------------------------------------------

at::Tensor swiglu_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_swiglu_args(gate, up, "anvil::swiglu");
  auto out = at::empty_like(gate);
  ANVIL_FUSED_DISPATCH(gate.scalar_type(), "anvil::swiglu", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const A gv = A(g[i]);
        const A silu = round_to<scalar_t>(gv / (A(1) + std::exp(-gv)));  // torch's silu: x / (1 + exp(-x))
        o[i] = scalar_t(silu * A(u[i]));
      }
    });
  });
  return out;
}

// d/dgate = grad * up * sig * (1 + gate * (1 - sig)), d/dup = grad * silu(gate), in fp32 from the inputs.
std::tuple<at::Tensor, at::Tensor> swiglu_backward_cpu(const at::Tensor& grad, const at::Tensor& gate,
                                                       const at::Tensor& up) {
  check_swiglu_backward_args(grad, gate, up, "anvil::swiglu_backward");
  auto dgate = at::empty_like(gate);
  auto dup = at::empty_like(up);
  ANVIL_FUSED_DISPATCH(gate.scalar_type(), "anvil::swiglu_backward", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* dy = grad.const_data_ptr<scalar_t>();
    const scalar_t* g = gate.const_data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    scalar_t* dg = dgate.data_ptr<scalar_t>();
    scalar_t* du = dup.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), 4096, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const A gv = A(g[i]), d = A(dy[i]);
        const A sig = A(1) / (A(1) + std::exp(-gv));
        dg[i] = scalar_t(d * A(u[i]) * sig * (A(1) + gv * (A(1) - sig)));
        du[i] = scalar_t(d * gv * sig);
      }
    });
  });
  return {dgate, dup};
}

// ---- rope -------------------------------------------------------------------------------------------

// One row (b, s, h) of x: the pair (a, b) = (x[i], x[i + half]) (half layout) or (x[2i], x[2i + 1])
// (interleaved); c_lo/s_lo = cos/sin[i], c_hi/s_hi = cos/sin[i + half] (half) or [i] (interleaved).
//   forward   out[i] = a c_lo - b s_lo,   out[i + half] = b c_hi + a s_hi      (output always in halves)
//   backward  dx_a = dlo c_lo + dhi s_hi,  dx_b = dhi c_hi - dlo s_lo          (the transposed rotation)
// Each product and sum rounded to the dtype, as the ATen composite rounds it.
template <typename T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved, bool backward,
               at::Tensor& out) {
  using A = Acc<T>;
  const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  const int64_t cos_b = cos.size(0) == 1 ? 0 : S * D;
  const T* xp = x.const_data_ptr<T>();
  const T* cp = cos.const_data_ptr<T>();
  const T* sp = sin.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto r = [](A v) { return round_to<T>(v); };
  at::parallel_for(0, B * S * H, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t b = row / (S * H), s = row / H % S, hh = row % H;
      const T* xr = xp + b * s0 + s * s1 + hh * s2;
      const T* cr = cp + b * cos_b + s * D;
      const T* sr = sp + b * cos_b + s * D;
      T* orow = op + row * D;
      for (int64_t i = 0; i < half; ++i) {
        const int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        const int64_t ihi = interleaved ? i : i + half;
        const A c_lo = A(cr[i]), s_lo = A(sr[i]), c_hi = A(cr[ihi]), s_hi = A(sr[ihi]);
        if (!backward) {
          const A a = A(xr[ia]), bb = A(xr[ib]);
          orow[i] = T(r(a * c_lo) - r(bb * s_lo));
          orow[i + half] = T(r(bb * c_hi) + r(a * s_hi));
        } else {
          const A lo = A(xr[i]), hi = A(xr[i + half]);
          orow[ia] = T(r(lo * c_lo) + r(hi * s_hi));
          orow[ib] = T(r(hi * c_hi) - r(lo * s_lo));
        }
      }
    }
  });
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(x, cos, sin, "anvil::rope", "x");
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));  // (B, S, H, D)
  ANVIL_FUSED_DISPATCH(x.scalar_type(), "anvil::rope", [&] { rope_rows<scalar_t>(x, cos, sin, interleaved, false, out); });
  return out;
}

at::Tensor rope_backward_cpu(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  check_rope_args(grad, cos, sin, "anvil::rope_backward", "grad");
  auto out = at::empty(grad.sizes(), grad.options().memory_format(at::MemoryFormat::Contiguous));
  ANVIL_FUSED_DISPATCH(grad.scalar_type(), "anvil::rope_backward",
                       [&] { rope_rows<scalar_t>(grad, cos, sin, interleaved, true, out); });
  return out;
}

// ---- cross_entropy_chunk ------------------------------------------------------------------------------

void check_label(int64_t label, int64_t v, int64_t ignore_index, int64_t row, const char* op) {
  ANVIL_CHECK(label == ignore_index || (label >= 0 && label < v), op, ": labels[", row, "] = ", label,
              " is outside [0, ", v, ") and is not ignore_index (", ignore_index, ")");
}

// lse = max + log(sum exp(x - max)); loss = lse - x[label], 0 where label == ignore_index. The sum runs
// in fp64: a sequential fp32 sum over a 150K vocabulary drops the terms below half an ulp of the running
// sum and was 3e-4 off in lse (ATen's tree-shaped fp32 sum: 1e-6), too far to serve as the reference.
std::tuple<at::Tensor, at::Tensor> cross_entropy_chunk_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                           int64_t ignore_index) {
  const char* op = "anvil::cross_entropy_chunk";
  check_cross_entropy_args(logits, labels, op);
  const int64_t t = logits.size(0), v = logits.size(1);
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) check_label(lp[i], v, ignore_index, i, op);
  auto loss = at::empty({t}, logits.options().dtype(stat_dtype(logits)));
  auto lse = at::empty({t}, logits.options().dtype(stat_dtype(logits)));
  ANVIL_FUSED_DISPATCH(logits.scalar_type(), "anvil::cross_entropy_chunk", [&] {
    using A = Acc<scalar_t>;
    const scalar_t* xp = logits.const_data_ptr<scalar_t>();
    A* lossp = loss.data_ptr<A>();
    A* lsep = lse.data_ptr<A>();
    at::parallel_for(0, t, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * v;
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t j = 0; j < v; ++j) m = std::max(m, A(xr[j]));
        double s = 0;
        if (m != -std::numeric_limits<A>::infinity())
          for (int64_t j = 0; j < v; ++j) s += double(std::exp(A(xr[j]) - m));
        const A l = A(double(m) + std::log(s));
        lsep[r] = l;
        lossp[r] = lp[r] == ignore_index ? A(0) : l - A(xr[lp[r]]);
      }
    });
  });
  return {loss, lse};
}

// In place: logits[r, j] = (exp(logits[r, j] - lse[r]) - [j == labels[r]]) * grad_loss[r]; rows whose label
// is ignore_index become zero.
void cross_entropy_chunk_backward_cpu(at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                      const at::Tensor& grad_loss, int64_t ignore_index) {
  const char* op = "anvil::cross_entropy_chunk_backward";
  check_cross_entropy_backward_args(logits, labels, lse, grad_loss, op);
  const int64_t t = logits.size(0), v = logits.size(1);
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) check_label(lp[i], v, ignore_index, i, op);
  const int64_t g_stride = grad_loss.dim() == 0 ? 0 : 1;
  ANVIL_FUSED_DISPATCH(logits.scalar_type(), "anvil::cross_entropy_chunk", [&] {
    using A = Acc<scalar_t>;
    scalar_t* xp = logits.data_ptr<scalar_t>();
    const A* lsep = lse.const_data_ptr<A>();
    const A* gp = grad_loss.const_data_ptr<A>();
    at::parallel_for(0, t, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* xr = xp + r * v;
        if (lp[r] == ignore_index) {
          std::fill(xr, xr + v, scalar_t(0));
          continue;
        }
        const A g = gp[r * g_stride], l = lsep[r];
        for (int64_t j = 0; j < v; ++j) xr[j] = scalar_t((std::exp(A(xr[j]) - l) - A(j == lp[r] ? 1 : 0)) * g);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(anvil, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rms_norm_backward", &rms_norm_backward_cpu);
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
  m.impl("cross_entropy_chunk", &cross_entropy_chunk_cpu);
  m.impl("cross_entropy_chunk_backward", &cross_entropy_chunk_backward_cpu);
}

}  // namespace anvil::ops
