// CUDA kernels of the MoE ops.
//
// moe_gate: a team of lanes per token (gate_layout: about E / 8 lanes, at most a warp), each lane holding
// a contiguous chunk of about 8 experts in registers, so a block keeps many tokens in flight with few
// registers. Everything happens there: the score (det_math.h, the CPU's own bits), the softmax sum in
// the CPU reference's order (chunk partials, then a butterfly over the team), the group scores (each
// lane's top-2, merged by shuffles when a group spans a power-of-two run of whole lanes; through shared
// memory otherwise) and their ranking (each lane ranks one group against the others, a ballot collects
// the kept set), and top_k rounds of a team argmax. Each lane sorts its candidates once (a bitonic
// network on order-preserving 32-bit keys); a round is then the team's maximum head key (one redux.sync
// for a full warp, a butterfly otherwise), a ballot of the lanes holding it, whose lowest lane holds the
// lowest expert (the tie rule), and a pop of that lane's head. Earlier designs (docs/BENCHMARKS.md): a warp per token scanning all E scores each round
// (10% of the roofline); then teams of E / 32 lanes with 32 experts each (128 registers, 25%
// occupancy, 1800 instructions per token: ncu, 2026-11-22).
//
// moe_route: a stable counting sort with no host round trip until the final check: per-chunk expert
// histograms (chunks of 256 slots or more), a scan down each expert's column of chunk counts, one block for the
// padded offsets (and the -1 padding of row_slot), and a warp per chunk placing its slots in order with
// __match_any_sync. It replaced a CUB radix sort behind a mid-op host sync (1.7x argsort + bincount).
// moe_permute then writes every row of the (R, H) buffer once: the row's token, or zeros for padding,
// so the buffer is never cleared separately. moe_unpermute reads each token's k rows and sums them in
// fp32, in slot order.
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

// A selection key as an unsigned integer with the same order (and +0 == -0, as float compares say):
// larger key, larger integer. NaN never reaches here (sel_key); 0 is below every key (no candidate).
__device__ __forceinline__ uint32_t ordered_key(float k) {
  const uint32_t u = __float_as_uint(k == 0.0f ? 0.0f : k);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Max of v over the `team` lanes of a token (aligned runs of a power-of-two size); every lane of the
// team gets it. A full warp is one redux.sync.
__device__ __forceinline__ uint32_t team_max(uint32_t v, int team) {
  if (team == 32) return __reduce_max_sync(0xffffffffu, v);
  for (int off = team / 2; off > 0; off /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sorts a lane's candidates best first: larger key, then lower position (a total order, so the result
// does not depend on the network). A bitonic network on registers: every index is a constant.
template <int kPer>
__device__ __forceinline__ void sort_best_first(uint32_t (&u)[kPer], int (&p)[kPer]) {
#pragma unroll
  for (int k = 2; k <= kPer; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int l = i ^ j;
        if (l > i) {
          const bool l_first = u[l] > u[i] || (u[l] == u[i] && p[l] < p[i]);
          if ((i & k) == 0 ? l_first : !l_first) {
            const uint32_t tu = u[i];
            u[i] = u[l];
            u[l] = tu;
            const int tp = p[i];
            p[i] = p[l];
            p[l] = tp;
          }
        }
      }
    }
  }
}

// Shared floats the gate kernel needs per token: the k winners' experts, the smem group path's E
// selection scores + 32 group scores + kept mask, and the E scores the weights are read from.
__host__ __device__ inline int gate_smem_floats_per_token(int E, bool smem_groups) {
  return kMaxTopK + (smem_groups ? E + 33 : 0) + E;
}

// Loads the lane's kPer logits (those past `mine` read as -inf), 16 bytes at a time when `vec`.
template <typename T, int kPer>
__device__ __forceinline__ void load_chunk(const T* row, int mine, bool vec, float (&s)[kPer]) {
  constexpr int kVec = 16 / sizeof(T);
  if (kPer % kVec == 0 && vec) {
#pragma unroll
    for (int v = 0; v < kPer / kVec; ++v) {
      T buf[kVec];
      *reinterpret_cast<uint4*>(buf) = __ldg(reinterpret_cast<const uint4*>(row) + v);
#pragma unroll
      for (int i = 0; i < kVec; ++i) s[v * kVec + i] = load_f32(buf[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPer; ++i) s[i] = i < mine ? load_f32(row[i]) : -INFINITY;
  }
}

// logits (T, E) -> weights (T, k) fp32, indices (T, k) int32. A token is handled by a team of `team`
// lanes (gate_layout; 32 / team tokens per warp); lane r of the team holds the contiguous experts
// [r * chunk, r * chunk + chunk), chunk <= kPer. `lanes_per_group` > 0: every group is that many whole
// lanes (a power of two), so group scores merge by shuffles; 0: groups go through shared memory.
// Dynamic shared memory per token of the block: gate_smem_floats_per_token.
template <typename T, int kPer>
__global__ void __launch_bounds__(kGateWarps * 32) moe_gate_kernel(
    const T* __restrict__ logits, const float* __restrict__ bias, const float* __restrict__ noise,
    float* __restrict__ weights, int32_t* __restrict__ indices, int64_t tokens, int E, int team, int chunk,
    int top_k, int n_group, int topk_group, int lanes_per_group, bool vec, bool sigmoid, bool renormalize,
    float routed_scale) {
  extern __shared__ float smem[];
  const int tokens_per_block = kGateWarps * 32 / team;
  const int lane = threadIdx.x % 32;
  const int slot = threadIdx.x / team;          // the token's place in the block
  const int r = threadIdx.x % team;             // the lane's place in the team
  const int base = lane - r;                    // the team's first lane in the warp
  const int64_t t_raw = int64_t(blockIdx.x) * tokens_per_block + slot;
  const bool live = t_raw < tokens;
  const int64_t t = live ? t_raw : tokens - 1;  // teams past the end compute a copy and write nothing
  const bool smem_groups = n_group > 1 && lanes_per_group == 0;
  const int region = gate_smem_floats_per_token(E, smem_groups);
  const int e0 = r * chunk;
  const int mine = max(0, min(chunk, E - e0));

  float s[kPer];
  load_chunk<T, kPer>(logits + t * E + e0, mine, vec && mine == kPer, s);
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
  float c[kPer];  // selection scores: score + bias + noise, NaN as -inf
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    float v = s[i];
    if (i < mine) {
      if (bias) v = det::add(v, bias[e0 + i]);
      if (noise) v = det::add(v, noise[t * E + e0 + i]);
    }
    c[i] = i < mine ? sel_key(v) : -INFINITY;
  }

  if (n_group > 1) {
    const int gs = E / n_group;
    uint32_t kept;
    if (!smem_groups) {
      // Group = lanes_per_group whole lanes: the lane's top-2, merged over the group's lanes.
      float top1 = -INFINITY, top2 = -INFINITY;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        if (c[i] > top1) {
          top2 = top1;
          top1 = c[i];
        } else if (c[i] > top2) {
          top2 = c[i];
        }
      }
      for (int off = 1; off < lanes_per_group; off *= 2) {
        const float o1 = __shfl_xor_sync(0xffffffffu, top1, off);
        const float o2 = __shfl_xor_sync(0xffffffffu, top2, off);
        top2 = fmaxf(fminf(top1, o1), fmaxf(top2, o2));
        top1 = fmaxf(top1, o1);
      }
      const float gscore = sel_key(sigmoid ? det::add(top1, top2) : top1);
      // Lane r ranks group r against every group (a total order: higher score, then lower group).
      const float mine_g = __shfl_sync(0xffffffffu, gscore, base + min(r, n_group - 1) * lanes_per_group);
      int rank = 0;
      for (int g = 0; g < n_group; ++g) {
        const float o = __shfl_sync(0xffffffffu, gscore, base + g * lanes_per_group);
        rank += beats(o, g, mine_g, r) ? 1 : 0;
      }
      const uint32_t ball = __ballot_sync(0xffffffffu, r < n_group && rank < topk_group);
      kept = (ball >> base) & (n_group == 32 ? 0xffffffffu : (1u << n_group) - 1u);
    } else {
      // Any other group shape: the token's scores in shared memory, lane r scoring groups r, r + team, ...
      float* sc = smem + slot * region + kMaxTopK;
      float* gscore = sc + E;
      uint32_t* kept_word = reinterpret_cast<uint32_t*>(gscore + 32);
#pragma unroll
      for (int i = 0; i < kPer; ++i)
        if (i < mine) sc[e0 + i] = c[i];
      __syncwarp();
      for (int g = r; g < n_group; g += team) {
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
        uint32_t k = 0;
        for (int q = 0; q < topk_group; ++q) {
          int best = -1;
          for (int g = 0; g < n_group; ++g)
            if (!((k >> g) & 1u) && (best < 0 || beats(gscore[g], g, gscore[best], best))) best = g;
          k |= 1u << best;
        }
        *kept_word = k;
      }
      __syncwarp();
      kept = *kept_word;
    }
    // Experts of dropped groups select with 0.0 (transformers: masked_fill(~mask, 0.0)). The group
    // index is stepped along the chunk: no division per expert.
    int g = e0 / gs, in_g = e0 - g * gs;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (i < mine && !((kept >> g) & 1u)) c[i] = 0.0f;
      if (++in_g == gs) {
        in_g = 0;
        ++g;
      }
    }
  }

  // The lane's candidates as (ordered key, chunk position), best first; a round's winner lane pops its
  // head, so a round is a team max, a ballot and a shift of the winner's registers.
  uint32_t u[kPer];
  int pos[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    u[i] = i < mine ? ordered_key(c[i]) : 0u;
    pos[i] = i;
  }
  sort_best_first<kPer>(u, pos);
  // The scores wait in shared memory, where the winners' weights are read after the rounds.
  int* idsm = reinterpret_cast<int*>(smem + slot * region);
  float* ssm = smem + slot * region + kMaxTopK + (smem_groups ? E + 33 : 0);
#pragma unroll
  for (int i = 0; i < kPer; ++i)
    if (i < mine) ssm[e0 + i] = s[i];

  // The k rounds stay a loop (not unrolled), so the kernel stays small for the instruction cache.
#pragma unroll 1
  for (int j = 0; j < top_k; ++j) {
    const uint32_t best = team_max(u[0], team);
    const uint32_t holders = __ballot_sync(0xffffffffu, u[0] == best) >> base;
    const int win = base + __ffs(holders) - 1;  // lowest lane of the team holding the best key
    const int e = __shfl_sync(0xffffffffu, e0 + pos[0], win);
    if (r == 0) idsm[j] = e;
    if (lane == win) {
#pragma unroll
      for (int i = 0; i + 1 < kPer; ++i) {
        u[i] = u[i + 1];
        pos[i] = pos[i + 1];
      }
      u[kPer - 1] = 0u;
    }
  }
  __syncwarp();
  if (!live) return;
  float sum = 0.0f;
  for (int j = 0; j < top_k; ++j) sum = det::add(sum, ssm[idsm[j]]);
  const float denom = det::add(sum, 1e-20f);
  for (int j = r; j < top_k; j += team) {
    const float w = ssm[idsm[j]];
    const float v = renormalize ? det::div(w, denom) : w;
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

// ---- moe_route: a stable counting sort in four kernels, no host round trip until the end ----------
// Slots are cut into chunks of `chunk` slots, a multiple of kRouteStep (one warp's work in
// moe_place_kernel); the launcher picks the chunk so that the (chunks, E) counts stay small.
constexpr int kRouteStep = 256;

// Block b counts the experts of chunk b: chunk_counts[b][e]; chunk_bad[b] = 1 when an index of the chunk
// is outside [0, E). Shared-memory histogram.
__global__ void moe_chunk_histogram_kernel(const int32_t* __restrict__ idx, int64_t n, int64_t chunk, int E,
                                           int32_t* __restrict__ chunk_counts, int32_t* __restrict__ chunk_bad) {
  extern __shared__ int32_t hist[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[e] = 0;
  __syncthreads();
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = min(n, begin + chunk);
  int bad = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const int32_t e = idx[i];
    if (e >= 0 && e < E) {
      atomicAdd(&hist[e], 1);
    } else {
      bad = 1;
    }
  }
  bad = __syncthreads_or(bad);
  int32_t* out = chunk_counts + int64_t(blockIdx.x) * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) out[e] = hist[e];
  if (threadIdx.x == 0) chunk_bad[blockIdx.x] = bad;
}

// Block e turns column e of chunk_counts into exclusive chunk starts (the rank, within expert e, of the
// chunk's first slot of e) and writes all[e], the expert's slot count. A block-wide scan, 256 at a time.
__global__ void moe_chunk_scan_kernel(int32_t* __restrict__ chunk_counts, int64_t chunks, int E,
                                      int32_t* __restrict__ all) {
  __shared__ int32_t scan[256];
  __shared__ int32_t carry;
  const int e = blockIdx.x;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < chunks; base += blockDim.x) {
    const int64_t b = base + threadIdx.x;
    const int32_t c = b < chunks ? chunk_counts[b * E + e] : 0;
    scan[threadIdx.x] = c;
    __syncthreads();
    for (int off = 1; off < blockDim.x; off *= 2) {  // inclusive Hillis-Steele scan
      const int32_t v = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
      __syncthreads();
      scan[threadIdx.x] += v;
      __syncthreads();
    }
    if (b < chunks) chunk_counts[b * E + e] = carry + scan[threadIdx.x] - c;
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry += scan[threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.x == 0) all[e] = carry;
}

// One block: all[e] -> kept[e] = min(all, capacity) (in place), offsets[e] = exclusive scan of
// round_up(kept, align), dropped = sum(all - kept), bad = any chunk_bad; then row_slot = -1 on every
// padding row (the tail of each expert's rows and everything past offsets[E]), so the placement
// kernel writes only real rows.
__global__ void moe_offsets_kernel(int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                   int32_t* __restrict__ dropped, const int32_t* __restrict__ chunk_bad,
                                   int64_t chunks, int32_t* __restrict__ bad, int32_t* __restrict__ row_slot,
                                   int64_t rows, int E, int align, int capacity) {
  __shared__ int32_t carry_off, carry_drop;
  __shared__ int32_t scan[1024];
  if (threadIdx.x == 0) carry_off = carry_drop = 0;
  __syncthreads();
  for (int base = 0; base < E; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int32_t all = e < E ? counts[e] : 0;
    const int32_t kept = capacity >= 0 ? min(all, capacity) : all;
    const int32_t padded = (kept + align - 1) / align * align;
    scan[threadIdx.x] = padded;
    __syncthreads();
    for (int off = 1; off < blockDim.x; off *= 2) {  // inclusive Hillis-Steele scan
      const int32_t v = threadIdx.x >= off ? scan[threadIdx.x - off] : 0;
      __syncthreads();
      scan[threadIdx.x] += v;
      __syncthreads();
    }
    if (e < E) {
      offsets[e] = carry_off + scan[threadIdx.x] - padded;
      counts[e] = kept;
      if (all > kept) atomicAdd(&carry_drop, all - kept);
    }
    __syncthreads();
    if (threadIdx.x == blockDim.x - 1) carry_off += scan[threadIdx.x];
    __syncthreads();
  }
  int any_bad = 0;
  for (int64_t b = threadIdx.x; b < chunks; b += blockDim.x) any_bad |= chunk_bad[b];
  any_bad = __syncthreads_or(any_bad);
  if (threadIdx.x == 0) {
    offsets[E] = carry_off;
    *dropped = carry_drop;
    *bad = any_bad;
  }
  if (row_slot == nullptr) return;
  for (int e = threadIdx.x; e < E; e += blockDim.x)
    for (int32_t r = offsets[e] + counts[e]; r < (e + 1 < E ? offsets[e + 1] : carry_off); ++r) row_slot[r] = -1;
  for (int64_t r = int64_t(carry_off) + threadIdx.x; r < rows; r += blockDim.x) row_slot[r] = -1;
}

// A warp per chunk, kRouteStep slots at a time: their expert ids are loaded at once (8 per lane), then
// placed 32 at a time in slot order. __match_any_sync groups the lanes holding the same expert; a slot's
// rank within its expert is the chunk's start for that expert (shared memory, advanced by the group's
// highest lane) plus the number of lower lanes in its group, so the order within an expert is the slot
// order (stable). slot_rows[slot] = offsets[e] + rank when rank < kept[e], else -1 (over capacity);
// row_slot[row] = slot.
__global__ void __launch_bounds__(32) moe_place_kernel(const int32_t* __restrict__ idx, int64_t n, int64_t chunk,
                                                       int E, const int32_t* __restrict__ chunk_start,
                                                       const int32_t* __restrict__ kept,
                                                       const int32_t* __restrict__ offsets,
                                                       int32_t* __restrict__ slot_rows,
                                                       int32_t* __restrict__ row_slot) {
  extern __shared__ int32_t next_rank[];  // (E) the rank the chunk's next slot of expert e gets
  const int lane = threadIdx.x;
  const int64_t begin = int64_t(blockIdx.x) * chunk;
  const int64_t end = min(n, begin + chunk);
  const int32_t* start = chunk_start + int64_t(blockIdx.x) * E;
  for (int e = lane; e < E; e += 32) next_rank[e] = start[e];
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;
  constexpr int kSteps = kRouteStep / 32;
  for (int64_t step0 = begin; step0 < end; step0 += kRouteStep) {
    int32_t ids[kSteps];
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t i = step0 + s * 32 + lane;
      ids[s] = i < end ? idx[i] : -1;
    }
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int32_t e = ids[s];
      const bool valid = e >= 0 && e < E;
      const unsigned peers = __match_any_sync(0xffffffffu, valid ? e : -1);
      const int32_t rank = valid ? next_rank[e] + __popc(peers & below) : 0;
      __syncwarp();
      if (valid && lane == 31 - __clz(peers)) next_rank[e] += __popc(peers);  // the group's highest lane
      __syncwarp();
      const int64_t slot = step0 + s * 32 + lane;
      if (valid) {
        const int32_t row = rank < kept[e] ? offsets[e] + rank : -1;
        slot_rows[slot] = row;
        if (row >= 0 && row_slot) row_slot[row] = int32_t(slot);
      }
    }
  }
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
