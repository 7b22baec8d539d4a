// CUDA kernels of the MoE ops.
//
// moe_gate: a team of about E / 32 lanes per token (8 for E = 256), each lane holding a contiguous chunk
// of experts in registers. Everything happens there: the score (det_math.h, the CPU's own bits), the
// softmax sum in the CPU reference's order (chunk partials, then a butterfly over the team), the group
// ranking (one lane scanning the token's scores in shared memory, as the CPU does), and top_k rounds of
// a team argmax carrying (score, expert, weight) under one total order (higher score, then lower expert),
// after which only the winning lane rescans its chunk. A first version gave each token a whole warp and
// scanned all E scores every round: 32x the bookkeeping, 10% of the bytes roofline at T = 65536
// (docs/BENCHMARKS.md).
//
// moe_route: a histogram (shared-memory atomics), a one-block scan of the counts into padded offsets, a
// stable radix sort of (expert, slot) pairs (CUB), and a pass that turns each sorted position into the
// slot's row. moe_permute then writes every row of the (R, H) buffer once: the row's token, or zeros for
// padding, so the buffer is never cleared separately. moe_unpermute reads each token's k rows and sums
// them in fp32, in slot order.
#pragma once

#include "ops/common/det_math.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

namespace anvil::ops::cuda {

constexpr int kGateWarps = 8;  // tokens per block
constexpr int kMaxTopK = 16;

__device__ __forceinline__ float load_f32(float v) { return v; }
__device__ __forceinline__ float load_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float load_f32(__half v) { return __half2float(v); }

__device__ __forceinline__ float sel_key(float v) { return v == v ? v : -INFINITY; }

__device__ __forceinline__ bool beats(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// Argmax of (v, i) with the tie rule over the `team` lanes of a token (xor offsets < team stay inside
// the team); `w` rides along, and every lane of the team ends with the same triple.
__device__ __forceinline__ void team_best(float& v, int& i, float& w, int team) {
  for (int off = team / 2; off > 0; off /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, off);
    const int oi = __shfl_xor_sync(0xffffffffu, i, off);
    const float ow = __shfl_xor_sync(0xffffffffu, w, off);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
      w = ow;
    }
  }
}

// The best untaken of a lane's kPer values: (score, expert, weight), expert 0x7fffffff when none.
template <int kPer>
__device__ __forceinline__ void lane_best(const float (&c)[kPer], const float (&s)[kPer], uint32_t taken, int e0,
                                          float& bv, int& bi, float& bw) {
  bv = -INFINITY;
  bi = 0x7fffffff;
  bw = 0.0f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (!((taken >> i) & 1u) && beats(c[i], e0 + i, bv, bi)) {
      bv = c[i];
      bi = e0 + i;
      bw = s[i];
    }
  }
}

// logits (T, E) -> weights (T, k) fp32, indices (T, k) int32. A token is handled by a team of `team`
// lanes (gate_layout: about E / 32 lanes, 32 / team tokens per warp); lane r of the team holds the
// contiguous experts [r * chunk, r * chunk + chunk), chunk <= kPer. Each lane keeps its own best
// candidate; a top-k round is a team argmax (log2(team) shuffles) after which only the winner's lane
// rescans its kPer values, so a round costs O(log team + kPer), not O(E). Dynamic shared memory, per
// token of the block: when n_group > 1 its E selection scores, 32 group scores and the kept-group mask;
// always the k winners (weights and experts).
template <typename T, int kPer>
__global__ void __launch_bounds__(kGateWarps * 32) moe_gate_kernel(
    const T* __restrict__ logits, const float* __restrict__ bias, const float* __restrict__ noise,
    float* __restrict__ weights, int32_t* __restrict__ indices, int64_t tokens, int E, int team, int chunk,
    int top_k, int n_group, int topk_group, bool sigmoid, bool renormalize, float routed_scale) {
  extern __shared__ float smem[];
  const int tokens_per_block = kGateWarps * 32 / team;
  const int slot = threadIdx.x / team;          // the token's place in the block
  const int r = threadIdx.x % team;             // the lane's place in the team
  const int64_t t_raw = int64_t(blockIdx.x) * tokens_per_block + slot;
  const bool live = t_raw < tokens;
  const int64_t t = live ? t_raw : tokens - 1;  // teams past the end compute a copy and write nothing
  const int region = (n_group > 1 ? E + 33 : 0) + 2 * kMaxTopK;  // shared floats per token
  const int e0 = r * chunk;
  const int mine = max(0, min(chunk, E - e0));
  const T* row = logits + t * E + e0;

  float s[kPer], c[kPer];
  uint32_t taken = 0;  // bit i: expert e0 + i is out of range or already chosen
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    s[i] = i < mine ? load_f32(row[i]) : -INFINITY;
    if (i >= mine) taken |= 1u << i;
  }
  if (sigmoid) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) s[i] = det::sigmoid(s[i]);
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPer; ++i) m = fmaxf(m, s[i]);
    for (int off = team / 2; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (i < mine) {
        s[i] = det::exp(det::add(s[i], -m));
        part = det::add(part, s[i]);
      }
    }
    for (int off = team / 2; off > 0; off /= 2) part = det::add(part, __shfl_xor_sync(0xffffffffu, part, off));
#pragma unroll
    for (int i = 0; i < kPer; ++i) s[i] = det::div(s[i], part);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    float v = s[i];
    if (i < mine) {
      if (bias) v = det::add(v, bias[e0 + i]);
      if (noise) v = det::add(v, noise[t * E + e0 + i]);
    }
    c[i] = sel_key(v);
  }

  if (n_group > 1) {
    // The token's shared-memory region: E selection scores, 32 group scores, the kept-group mask.
    float* sc = smem + slot * region;
    float* gscore = sc + E;
    uint32_t* kept_word = reinterpret_cast<uint32_t*>(gscore + 32);
    const int gs = E / n_group;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (i < mine) sc[e0 + i] = c[i];
    __syncwarp();
    for (int g = r; g < n_group; g += team) {  // lane r scores groups r, r + team, ... in expert order
      float top1 = -INFINITY, top2 = -INFINITY;
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        const float v = sc[e];
        if (v > top1) {
          top2 = top1;
          top1 = v;
        } else if (v > top2) {
          top2 = v;
        }
      }
      gscore[g] = sel_key(sigmoid ? det::add(top1, top2) : top1);
    }
    __syncwarp();
    if (r == 0) {  // one lane ranks the (at most 32) groups, as the CPU reference does
      uint32_t kept = 0;
      for (int q = 0; q < topk_group; ++q) {
        int best = -1;
        for (int g = 0; g < n_group; ++g)
          if (!((kept >> g) & 1u) && (best < 0 || beats(gscore[g], g, gscore[best], best))) best = g;
        kept |= 1u << best;
      }
      *kept_word = kept;
    }
    __syncwarp();
    const uint32_t kept = *kept_word;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (i < mine && !((kept >> ((e0 + i) / gs)) & 1u)) c[i] = 0.0f;  // transformers: masked_fill(~mask, 0.0)
  }

  // The k rounds stay a loop (not unrolled): unrolled, kMaxTopK copies of the kPer-wide rescan made the
  // kernel large enough to run from a thrashing instruction cache. Winners go to shared memory.
  float* wsm = smem + slot * region + (n_group > 1 ? E + 33 : 0);
  int* idsm = reinterpret_cast<int*>(wsm + kMaxTopK);
  float bv, bw;
  int bi;
  lane_best<kPer>(c, s, taken, e0, bv, bi, bw);
  float sum = 0.0f;
#pragma unroll 1
  for (int j = 0; j < top_k; ++j) {
    float v = bv, ww = bw;
    int i = bi;
    team_best(v, i, ww, team);
    if (r == 0) {
      wsm[j] = ww;
      idsm[j] = i;
    }
    sum = det::add(sum, ww);
    if (i == bi) {  // this lane supplied the winner: take it and find the lane's next best
      taken |= 1u << (i - e0);
      lane_best<kPer>(c, s, taken, e0, bv, bi, bw);
    }
  }
  __syncwarp();
  if (!live) return;
  const float denom = det::add(sum, 1e-20f);
  for (int j = r; j < top_k; j += team) {
    const float v = renormalize ? det::div(wsm[j], denom) : wsm[j];
    weights[t * top_k + j] = det::mul(v, routed_scale);
    indices[t * top_k + j] = idsm[j];
  }
}

// d weights / d logits, a warp per token; the token's scores are recomputed into shared memory
// (kGateWarps * E floats). Formulas: moe_cpu.cpp, gate_backward_token.
template <typename T, int kPer>
__global__ void __launch_bounds__(kGateWarps * 32) moe_gate_backward_kernel(
    const float* __restrict__ grad_w, const T* __restrict__ logits, const int32_t* __restrict__ indices,
    float* __restrict__ grad_logits, int64_t tokens, int E, int k, bool sigmoid, bool renormalize, float scale) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kGateWarps + warp;
  if (t >= tokens) return;
  float* s = smem + warp * E;
  const T* row = logits + t * E;
  float v[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) v[i] = lane + 32 * i < E ? load_f32(row[lane + 32 * i]) : -INFINITY;
  if (sigmoid) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[i] = det::sigmoid(v[i]);
  } else {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kPer; ++i) m = fmaxf(m, v[i]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < E) {
        v[i] = det::exp(det::add(v[i], -m));
        part = det::add(part, v[i]);
      }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) part = det::add(part, __shfl_xor_sync(0xffffffffu, part, off));
#pragma unroll
    for (int i = 0; i < kPer; ++i) v[i] = det::div(v[i], part);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (lane + 32 * i < E) s[lane + 32 * i] = v[i];
  __syncwarp();
  float sum = 0.0f, gs = 0.0f;
  for (int j = 0; j < k; ++j) {
    const float sj = s[indices[t * k + j]];
    sum += sj;
    gs += grad_w[t * k + j] * sj;
  }
  const float denom = sum + 1e-20f;
  float dot = 0.0f;  // softmax: sum_j ds_j p_j
  for (int j = 0; j < k; ++j) {
    const float g = grad_w[t * k + j];
    const float ds = renormalize ? scale * (g / denom - gs / (denom * denom)) : scale * g;
    dot += ds * s[indices[t * k + j]];
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = lane + 32 * i;
    if (e >= E) continue;
    float out = sigmoid ? 0.0f : -s[e] * dot;
    for (int j = 0; j < k; ++j) {
      if (indices[t * k + j] != e) continue;
      const float g = grad_w[t * k + j];
      const float ds = renormalize ? scale * (g / denom - gs / (denom * denom)) : scale * g;
      out += sigmoid ? ds * s[e] * (1.0f - s[e]) : s[e] * ds;
    }
    grad_logits[t * E + e] = out;
  }
}

// ---- routing -----------------------------------------------------------------------------------
// counts[e] += 1 for each slot; a slot outside [0, E) raises *bad instead.
__global__ void moe_histogram_kernel(const int32_t* __restrict__ idx, int64_t n, int E, int32_t* __restrict__ counts,
                                     int32_t* __restrict__ bad) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int32_t e = idx[i];
    if (e >= 0 && e < E) {
      atomicAdd(&hist[e], 1);
    } else {
      atomicExch(bad, 1);
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    if (hist[e]) atomicAdd(&counts[e], hist[e]);
}

// One block: all[e] (every slot) -> kept[e] = min(all, capacity), start[e] = exclusive scan of all,
// offsets[e] = exclusive scan of round_up(kept, align), dropped = sum(all - kept). In place: counts
// holds all on entry and kept on exit.
__global__ void moe_offsets_kernel(int32_t* __restrict__ counts, int32_t* __restrict__ start,
                                   int32_t* __restrict__ offsets, int32_t* __restrict__ dropped, int E, int align,
                                   int capacity) {
  __shared__ int32_t carry_start, carry_off, carry_drop;
  __shared__ int32_t scan_a[1024], scan_b[1024];
  if (threadIdx.x == 0) carry_start = carry_off = carry_drop = 0;
  __syncthreads();
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t all = e < E ? counts[e] : 0;
    const int32_t kept = capacity >= 0 ? min(all, capacity) : all;
    const int32_t padded = (kept + align - 1) / align * align;
    scan_a[threadIdx.x] = all;
    scan_b[threadIdx.x] = padded;
    __syncthreads();
    for (int off = 1; off < blockDim.x; off *= 2) {  // inclusive Hillis-Steele scans
      const int32_t a = threadIdx.x >= off ? scan_a[threadIdx.x - off] : 0;
      const int32_t b = threadIdx.x >= off ? scan_b[threadIdx.x - off] : 0;
      __syncthreads();
      scan_a[threadIdx.x] += a;
      scan_b[threadIdx.x] += b;
      __syncthreads();
    }
    if (e < E) {
      start[e] = carry_start + scan_a[threadIdx.x] - all;
      offsets[e] = carry_off + scan_b[threadIdx.x] - padded;
      counts[e] = kept;
      if (all > kept) atomicAdd(&carry_drop, all - kept);
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) {
      carry_start += scan_a[threadIdx.x];
      carry_off += scan_b[threadIdx.x];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    offsets[E] = carry_off;
    *dropped = carry_drop;
  }
}

// Sorted position p holds (expert e, slot); the slot's rank within e is p - start[e].
__global__ void moe_assign_rows_kernel(const int32_t* __restrict__ sorted_experts,
                                       const int32_t* __restrict__ sorted_slots, int64_t n,
                                       const int32_t* __restrict__ start, const int32_t* __restrict__ kept,
                                       const int32_t* __restrict__ offsets, int32_t* __restrict__ slot_rows,
                                       int32_t* __restrict__ row_slot) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n) return;
  const int32_t e = sorted_experts[p], slot = sorted_slots[p];
  const int32_t rank = int32_t(p) - start[e];
  const int32_t row = rank < kept[e] ? offsets[e] + rank : -1;
  slot_rows[slot] = row;
  if (row >= 0 && row_slot) row_slot[row] = slot;
}

// permuted[r] = hidden[row_slot[r] / k], or zeros where row_slot[r] < 0. A block per row, 16 bytes a thread.
__global__ void moe_gather_rows_kernel(const uint4* __restrict__ hidden, const int32_t* __restrict__ row_slot,
                                       uint4* __restrict__ permuted, int64_t rows, int64_t vec_per_row, int k) {
  const int64_t r = blockIdx.x;
  const int32_t slot = row_slot[r];
  uint4* dst = permuted + r * vec_per_row;
  if (slot < 0) {
    for (int64_t v = threadIdx.x; v < vec_per_row; v += blockDim.x) dst[v] = make_uint4(0, 0, 0, 0);
    return;
  }
  const uint4* src = hidden + int64_t(slot / k) * vec_per_row;
  for (int64_t v = threadIdx.x; v < vec_per_row; v += blockDim.x) dst[v] = src[v];
}

// out[t] = sum_j w[t, j] * x[slot_rows[t, j]] (w == nullptr: weight 1), fp32 accumulation in j order.
// A block per token; each thread owns 8 consecutive columns (H % 8 == 0 on this path).
template <typename T>
__global__ void moe_combine_kernel(const T* __restrict__ x, const int32_t* __restrict__ slot_rows,
                                   const float* __restrict__ w, T* __restrict__ out, int64_t H, int k) {
  const int64_t t = blockIdx.x;
  for (int64_t c0 = int64_t(threadIdx.x) * 8; c0 < H; c0 += int64_t(blockDim.x) * 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < k; ++j) {
      const int32_t r = slot_rows[t * k + j];
      if (r < 0) continue;
      const float wj = w ? w[t * k + j] : 1.0f;
      const T* src = x + int64_t(r) * H + c0;
#pragma unroll
      for (int q = 0; q < 8; ++q) acc[q] = fmaf(wj, load_f32(src[q]), acc[q]);
    }
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      if constexpr (sizeof(T) == 4) {
        out[t * H + c0 + q] = acc[q];
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        out[t * H + c0 + q] = __float2bfloat16_rn(acc[q]);
      } else {
        out[t * H + c0 + q] = __float2half_rn(acc[q]);
      }
    }
  }
}

}  // namespace anvil::ops::cuda
