// CUDA kernels of the fused training ops (sm_80/89/90a: plain CUDA, 16-byte vector loads, warp shuffles).
// All four are memory bound; each reads its inputs once and writes its outputs once, keeping whatever a
// row needs twice in registers, and accumulates in fp32.
//
// rms_norm: a team of `team` threads per row (a power of two, 1..512 lanes): each lane holds kVecs
// vectors of kN values of its row in registers (kN = 16 bytes of the dtype, or 1 where rows are not
// 16-byte aligned), so the row is read once: sum of squares, team reduction (shuffles inside a warp,
// shared memory across warps), then y. Small rows (Qwen3's q/k norm, H = 128) pack many rows in a block.
// The backward keeps x and grad_y in registers the same way, reduces sum(g w n) per row and accumulates
// its lane's columns of grad_y * round(n) in registers over the rows the block visits (a fixed stride
// of rows per block); the teams of a block are then summed in a fixed order through shared memory and
// written as one partial row per block, which rms_norm_dw_reduce_kernel sums in block order: a
// deterministic two-stage reduction (no float atomics).
//
// swiglu: elementwise over 16-byte vectors (grid-stride); the backward recomputes sigmoid from gate.
//
// rope: one thread per kP consecutive frequencies of a (b, s, h) row: loads the two halves (or kP
// interleaved pairs) and the matching cos/sin, writes both output halves. The products and sums are
// rounded one by one (__fmul_rn/__fadd_rn, rounding to the dtype in between) exactly as the CPU
// reference and PyTorch's composite do, so the outputs are bit-equal to both.
//
// cross_entropy: a block per row. The forward is an online softmax over the row's vectors (each thread a
// running max and sum, merged across the block in a fixed order): loss = lse - x[label]. The backward
// rereads the row and overwrites it in place with (exp(x - lse) - onehot) * grad.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace anvil::ops::fused_cuda {

// At most 512 threads a block for the norm kernels: __launch_bounds__ then leaves 128 registers a
// thread, room for a lane's 8 vectors of x and grad_y (a 1024-thread block would cap it at 64).
constexpr int kMaxNormThreads = 512;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// Rounds v to T and back: what storing an intermediate in the tensor's dtype does in PyTorch.
template <typename T>
__device__ __forceinline__ float round_t(float v) { return to_f(from_f<T>(v)); }

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) { return *reinterpret_cast<const Vec<T, N>*>(p); }
template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) { *reinterpret_cast<Vec<T, N>*>(p) = v; }

// Sum of v over the `team` threads of a row, in a fixed order; every thread of the team gets it. Teams
// are aligned runs of a power-of-two size; a team wider than a warp reduces through `smem` (one float per
// warp of the block). Every thread of the block must call it (it may synchronize the block).
__device__ __forceinline__ float team_sum(float v, int team, float* smem) {
  const int width = team < 32 ? team : 32;
  for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (team <= 32) return v;
  const int warp = threadIdx.x / 32, warps = team / 32, first = warp / warps * warps;
  __syncthreads();  // smem may still be read by the previous call
  if (threadIdx.x % 32 == 0) smem[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < warps; ++w) s += smem[first + w];
  return s;
}

// ---- rms_norm ----------------------------------------------------------------------------------------

template <typename T, int kN, int kVecs>
__global__ void __launch_bounds__(kMaxNormThreads) rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                                float* __restrict__ rstd, int64_t rows, int h, int team, float eps) {
  __shared__ float smem[32];
  const int lane = threadIdx.x % team;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / team) + threadIdx.x / team;
  const bool active = row < rows;
  const int nvec = h / kN;
  Vec<T, kN> xv[kVecs];
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = lane + j * team;
    if (active && v < nvec) {
      xv[j] = load_vec<T, kN>(x + row * h + int64_t(v) * kN);
#pragma unroll
      for (int e = 0; e < kN; ++e) ss += to_f(xv[j].v[e]) * to_f(xv[j].v[e]);
    }
  }
  ss = team_sum(ss, team, smem);
  const float r = 1.0f / sqrtf(ss / float(h) + eps);
  if (!active) return;
  if (lane == 0) rstd[row] = r;
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = lane + j * team;
    if (v < nvec) {
      const Vec<T, kN> wv = load_vec<T, kN>(w + int64_t(v) * kN);
      Vec<T, kN> out;
#pragma unroll
      for (int e = 0; e < kN; ++e) out.v[e] = from_f<T>(to_f(wv.v[e]) * round_t<T>(to_f(xv[j].v[e]) * r));
      store_vec<T, kN>(y + row * h + int64_t(v) * kN, out);
    }
  }
}

// Stage 1 of the backward: grad_x for every row, and per block one partial row of grad_weight in fp32
// (dw_partial (gridDim.x, h)). Dynamic shared memory: (blockDim.x / team) * h floats when several teams
// share a block (their partials are summed in team order), else none.
template <typename T, int kN, int kVecs>
__global__ void __launch_bounds__(kMaxNormThreads) rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                                         const float* __restrict__ rstd, T* __restrict__ dx,
                                         float* __restrict__ dw_partial, int64_t rows, int h, int team) {
  __shared__ float smem[32];
  extern __shared__ float team_partial[];
  const int lane = threadIdx.x % team, teams = blockDim.x / team, t = threadIdx.x / team;
  const int nvec = h / kN;
  float wf[kVecs][kN], acc[kVecs][kN];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = lane + j * team;
    Vec<T, kN> wv;
    if (v < nvec) wv = load_vec<T, kN>(w + int64_t(v) * kN);
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      wf[j][e] = v < nvec ? to_f(wv.v[e]) : 0.0f;
      acc[j][e] = 0.0f;
    }
  }
  // Every thread runs the same number of iterations (team_sum may synchronize the block).
  for (int64_t base = int64_t(blockIdx.x) * teams; base < rows; base += int64_t(gridDim.x) * teams) {
    const int64_t row = base + t;
    const bool active = row < rows;
    const float r = active ? rstd[row] : 0.0f;
    Vec<T, kN> xv[kVecs], gv[kVecs];
    float dot = 0.0f;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int v = lane + j * team;
      if (active && v < nvec) {
        xv[j] = load_vec<T, kN>(x + row * h + int64_t(v) * kN);
        gv[j] = load_vec<T, kN>(dy + row * h + int64_t(v) * kN);
#pragma unroll
        for (int e = 0; e < kN; ++e) dot += to_f(gv[j].v[e]) * wf[j][e] * (to_f(xv[j].v[e]) * r);
      }
    }
    dot = team_sum(dot, team, smem);
    const float mean = dot / float(h);
    if (!active) continue;
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int v = lane + j * team;
      if (v < nvec) {
        Vec<T, kN> out;
#pragma unroll
        for (int e = 0; e < kN; ++e) {
          const float n = to_f(xv[j].v[e]) * r, g = to_f(gv[j].v[e]);
          out.v[e] = from_f<T>(r * (g * wf[j][e] - n * mean));
          acc[j][e] += g * round_t<T>(n);
        }
        store_vec<T, kN>(dx + row * h + int64_t(v) * kN, out);
      }
    }
  }
  float* out = dw_partial + int64_t(blockIdx.x) * h;
  if (teams == 1) {
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int v = lane + j * team;
      if (v < nvec)
#pragma unroll
        for (int e = 0; e < kN; ++e) out[v * kN + e] = acc[j][e];
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int v = lane + j * team;
    if (v < nvec)
#pragma unroll
      for (int e = 0; e < kN; ++e) team_partial[t * h + v * kN + e] = acc[j][e];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < h; c += blockDim.x) {
    float s = 0.0f;
    for (int k = 0; k < teams; ++k) s += team_partial[k * h + c];
    out[c] = s;
  }
}

// Stage 2: grad_weight[c] = sum over blocks b (in order) of dw_partial[b, c], cast to the weight's dtype.
template <typename T>
__global__ void rms_norm_dw_reduce_kernel(const float* __restrict__ dw_partial, T* __restrict__ dw, int parts, int h) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= h) return;
  float s = 0.0f;
  for (int b = 0; b < parts; ++b) s += dw_partial[int64_t(b) * h + c];
  dw[c] = from_f<T>(s);
}

// ---- swiglu ------------------------------------------------------------------------------------------

template <typename T, int kN>
__global__ void swiglu_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  const int64_t nvec = n / kN;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nvec; i += int64_t(gridDim.x) * blockDim.x) {
    const auto g = load_vec<T, kN>(gate + i * kN), u = load_vec<T, kN>(up + i * kN);
    Vec<T, kN> o;
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      const float gv = to_f(g.v[e]);
      o.v[e] = from_f<T>(round_t<T>(gv / (1.0f + expf(-gv))) * to_f(u.v[e]));
    }
    store_vec<T, kN>(out + i * kN, o);
  }
}

template <typename T, int kN>
__global__ void swiglu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ gate,
                                       const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                                       int64_t n) {
  const int64_t nvec = n / kN;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nvec; i += int64_t(gridDim.x) * blockDim.x) {
    const auto d = load_vec<T, kN>(grad + i * kN), g = load_vec<T, kN>(gate + i * kN), u = load_vec<T, kN>(up + i * kN);
    Vec<T, kN> dg, du;
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      const float gv = to_f(g.v[e]), dv = to_f(d.v[e]);
      const float sig = 1.0f / (1.0f + expf(-gv));
      dg.v[e] = from_f<T>(dv * to_f(u.v[e]) * sig * (1.0f + gv * (1.0f - sig)));
      du.v[e] = from_f<T>(dv * gv * sig);
    }
    store_vec<T, kN>(dgate + i * kN, dg);
    store_vec<T, kN>(dup + i * kN, du);
  }
}

// ---- rope --------------------------------------------------------------------------------------------

struct RopeShape {
  int64_t b, s, h;       // rows are (b, s, h)
  int d, half;           // rotary dim and its half
  int64_t xs0, xs1, xs2;  // strides of the input (x or grad) over b, s, h, in elements
  int64_t cos_b;         // stride of cos/sin over b: 0 when they broadcast (size 1), else s * d
};

// a op b with each product rounded to T and the result rounded to T (the composite's three roundings);
// __fmul_rn/__fadd_rn keep nvcc from fusing them into one FMA.
template <typename T>
__device__ __forceinline__ T rot(float a, float c, float b, float s, float sign) {
  return from_f<T>(__fadd_rn(round_t<T>(__fmul_rn(a, c)), sign * round_t<T>(__fmul_rn(b, s))));
}

// kBackward false: in = x (input layout), out in halves. kBackward true: in = grad (halves), out = grad_x
// in the input layout. One thread per kP frequencies of a row.
template <typename T, int kP, bool kInterleaved, bool kBackward>
__global__ void rope_kernel(const T* __restrict__ in, const T* __restrict__ cos, const T* __restrict__ sin,
                            T* __restrict__ out, RopeShape sh) {
  const int per_row = sh.half / kP;
  const int64_t items = sh.b * sh.s * sh.h * per_row;
  for (int64_t it = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; it < items;
       it += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = it / per_row;
    const int i0 = int(it % per_row) * kP;
    const int64_t hh = row % sh.h, ss = row / sh.h % sh.s, bb = row / (sh.h * sh.s);
    const T* ir = in + bb * sh.xs0 + ss * sh.xs1 + hh * sh.xs2;
    const T* cr = cos + bb * sh.cos_b + ss * sh.d;
    const T* sr = sin + bb * sh.cos_b + ss * sh.d;
    T* orow = out + row * sh.d;
    const int ihi = kInterleaved ? i0 : i0 + sh.half;
    const auto c_lo = load_vec<T, kP>(cr + i0), s_lo = load_vec<T, kP>(sr + i0);
    const auto c_hi = load_vec<T, kP>(cr + ihi), s_hi = load_vec<T, kP>(sr + ihi);
    Vec<T, kP> a, b;  // forward: the pair (x_a, x_b); backward: (grad_lo, grad_hi)
    if (kInterleaved && !kBackward) {
      const auto p0 = load_vec<T, kP>(ir + 2 * i0), p1 = load_vec<T, kP>(ir + 2 * i0 + kP);
#pragma unroll
      for (int k = 0; k < kP; ++k) {
        const T e0 = k * 2 < kP ? p0.v[2 * k] : p1.v[2 * k - kP];
        const T e1 = k * 2 + 1 < kP ? p0.v[2 * k + 1] : p1.v[2 * k + 1 - kP];
        a.v[k] = e0;
        b.v[k] = e1;
      }
    } else {
      a = load_vec<T, kP>(ir + i0);
      b = load_vec<T, kP>(ir + i0 + sh.half);
    }
    Vec<T, kP> r0, r1;
#pragma unroll
    for (int k = 0; k < kP; ++k) {
      const float av = to_f(a.v[k]), bv = to_f(b.v[k]);
      if (!kBackward) {
        r0.v[k] = rot<T>(av, to_f(c_lo.v[k]), bv, to_f(s_lo.v[k]), -1.0f);  // lo = a c_lo - b s_lo
        r1.v[k] = rot<T>(bv, to_f(c_hi.v[k]), av, to_f(s_hi.v[k]), 1.0f);   // hi = b c_hi + a s_hi
      } else {
        r0.v[k] = rot<T>(av, to_f(c_lo.v[k]), bv, to_f(s_hi.v[k]), 1.0f);   // dx_a = dlo c_lo + dhi s_hi
        r1.v[k] = rot<T>(bv, to_f(c_hi.v[k]), av, to_f(s_lo.v[k]), -1.0f);  // dx_b = dhi c_hi - dlo s_lo
      }
    }
    if (kInterleaved && kBackward) {
      Vec<T, kP> p0, p1;
#pragma unroll
      for (int k = 0; k < kP; ++k) {
        if (k * 2 < kP) p0.v[2 * k] = r0.v[k]; else p1.v[2 * k - kP] = r0.v[k];
        if (k * 2 + 1 < kP) p0.v[2 * k + 1] = r1.v[k]; else p1.v[2 * k + 1 - kP] = r1.v[k];
      }
      store_vec<T, kP>(orow + 2 * i0, p0);
      store_vec<T, kP>(orow + 2 * i0 + kP, p1);
    } else {
      store_vec<T, kP>(orow + i0, r0);
      store_vec<T, kP>(orow + i0 + sh.half, r1);
    }
  }
}

// ---- cross_entropy -----------------------------------------------------------------------------------

// Merges the running (max, sum of exp(x - max)) pair (m, s) with (m2, s2).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
  m = mm;
}

template <typename T, int kN>
__global__ void cross_entropy_kernel(const T* __restrict__ logits, const int64_t* __restrict__ labels,
                                     float* __restrict__ loss, float* __restrict__ lse, int64_t v, int64_t ignore_index) {
  __shared__ float sm[32], ss[32];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * v;
  float m = -INFINITY, s = 0.0f;
  const int64_t nvec = v / kN;
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const auto xv = load_vec<T, kN>(x + i * kN);
    float vm = -INFINITY;
#pragma unroll
    for (int e = 0; e < kN; ++e) vm = fmaxf(vm, to_f(xv.v[e]));
    const float mm = fmaxf(m, vm);
    if (mm == -INFINITY) continue;
    float add = 0.0f;
#pragma unroll
    for (int e = 0; e < kN; ++e) add += __expf(to_f(xv.v[e]) - mm);
    s = s * __expf(m - mm) + add;
    m = mm;
  }
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  m = sm[0];
  s = ss[0];
  for (int w = 1; w < warps; ++w) lse_merge(m, s, sm[w], ss[w]);
  const float l = m + logf(s);
  lse[row] = l;
  const int64_t label = labels[row];
  if (label == ignore_index) loss[row] = 0.0f;
  else if (label >= 0 && label < v) loss[row] = l - to_f(x[label]);
  else loss[row] = NAN;  // no host sync for a check: a bad label shows as a NaN loss
}

template <typename T, int kN>
__global__ void cross_entropy_backward_kernel(T* __restrict__ logits, const int64_t* __restrict__ labels,
                                              const float* __restrict__ lse, const float* __restrict__ grad,
                                              int64_t grad_stride, int64_t v, int64_t ignore_index) {
  const int64_t row = blockIdx.x;
  T* x = logits + row * v;
  const int64_t label = labels[row];
  const int64_t nvec = v / kN;
  if (label == ignore_index) {
    Vec<T, kN> z;
#pragma unroll
    for (int e = 0; e < kN; ++e) z.v[e] = from_f<T>(0.0f);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) store_vec<T, kN>(x + i * kN, z);
    return;
  }
  const float g = grad[row * grad_stride], l = lse[row];
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    auto xv = load_vec<T, kN>(x + i * kN);
#pragma unroll
    for (int e = 0; e < kN; ++e) {
      const float p = __expf(to_f(xv.v[e]) - l);
      xv.v[e] = from_f<T>((i * kN + e == label ? p - 1.0f : p) * g);
    }
    store_vec<T, kN>(x + i * kN, xv);
  }
}

}  // namespace anvil::ops::fused_cuda
