// CUDA kernels of sparse_attention: a FlashAttention-2-style forward and a two-kernel backward, on
// mma.sync m16n8k16 (bf16/fp16 in, fp32 accumulate), ldmatrix and cp.async, so one source runs on
// sm_80, sm_89 and sm_90a.
//
// Work is tiled by 64 queries x 64 keys (block_size is a multiple of 64, so a query tile lies in one
// query block and a key tile in one key block). A CTA of 4 warps owns 64 rows; each warp 16 rows.
// The mask never exists as a tensor: each query tile visits only the key tiles its rows can reach,
//   range A  keys [max(doc_start(i0), i0 - window + 1), i1]  (the window band; it also covers the
//            sinks of documents that start inside the tile),
//   range B  keys [doc_start(i0), doc_start(i0) + sink_tokens)  minus range A,
//   extra    the tiles of the blocks listed for the query block, minus A, B and duplicates,
// and inside a visited tile the element rule (sparse_attends, shared with the CPU reference) masks
// what the tile ranges over-approximate; tiles that are entirely visible skip the per-element test.
//
// Forward: online softmax in base 2 (scale * log2(e) folded in), O and the row max/sum in registers,
// K/V double-buffered in shared memory (cp.async), lse = (m + log2 l) * ln 2.
// Backward (recomputation from lse):
//   dq kernel   query-tile-major, the forward's tile walk: P = exp(S - lse), dP = dO V^T,
//               dS = P (dP - Delta), dQ += dS K, Delta = rowsum(dO * O) from the delta kernel;
//   dkdv kernel key-tile-major for a kv head, over the G query heads of its group and the query tiles
//               that reach the key tile: the band/sink row range [k0, hi] plus the query blocks that
//               list its block (an inverse index built by the launcher with sort + searchsorted);
//               S^T = K Q^T, dV += P^T dO, dK += dS^T Q. With GQA and deterministic = false, each
//               head of the group gets its own CTA (grid.z = G) and the CTAs add into fp32 buffers
//               with atomics: a key tile that every query block lists (NSA's forced first block) would
//               otherwise walk G * S / 64 query tiles alone. deterministic = true: one CTA, plain stores.
// Shared-memory tiles are 64 x D 16-bit elements with the 16-byte chunks XOR-swizzled by (row & 7), so
// ldmatrix of 8 rows at one column touches 8 different banks groups.
#pragma once

#include "ops/sparse_attention/sparse_attention_common.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace anvil::ops::sparse_cuda {

constexpr int kTile = 64;
constexpr int kThreads = 128;
constexpr int kMaxExtraTiles = 256;  // listed tiles per query tile (max_selected * block_size / 64)
constexpr int kMaxSelected = 128;    // block_indices.size(3)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Params {
  // forward
  const void* q;
  const void* k;
  const void* v;
  void* o;
  float* lse;  // (B, Hq, S)
  // backward
  const void* grad_o;
  const float* delta;  // (B, Hq, S) rowsum(dO * O)
  const float* lse_in;
  void* dq;
  void* dk;
  void* dv;
  float* dk_accum;  // (B, Hkv, S, D) fp32, zeroed: set when the dk/dv kernel splits a group's heads over
  float* dv_accum;  // CTAs (grid.z = G) and adds with atomics; null: one CTA per key tile stores dk/dv
  // selection and documents
  const int32_t* block_indices;  // (B, Hkv, NB, n) or null
  const int32_t* block_counts;   // (B, Hkv, NB) or null
  const int32_t* cu_seqlens;     // (docs + 1) or null
  const int32_t* inv_offsets;    // (B * Hkv * NB + 1): per key block, its range in inv_qblocks
  const int32_t* inv_qblocks;    // query blocks listing each key block, ascending per key block
  int num_docs;
  int batch, heads_q, heads_kv, seq;
  int window, sink_tokens, block_size, num_blocks, max_selected;
  float scale, scale_log2;
};

// ---- small PTX wrappers ----------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill (rows past S must be zeros, not garbage: 0 * NaN = NaN)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Element (row, col) of a swizzled 64 x D tile.
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Loads rows [row0, row0 + kRows) of a (S, D) head into a swizzled tile with kThr threads; rows at or
// past `rows` are zeros.
template <typename T, int D, int kRows = kTile, int kThr = kThreads>
__device__ __forceinline__ void load_tile(T* tile, const T* head, int row0, int rows) {
  constexpr int kChunks = kRows * D / 8;
  for (int c = threadIdx.x; c < kChunks; c += kThr) {
    const int r = c / (D / 8), col = (c % (D / 8)) * 8;
    const bool valid = row0 + r < rows;
    const T* src = valid ? head + static_cast<int64_t>(row0 + r) * D + col : head;
    cp_async16(tile + swz<D>(r, col), src, valid);
  }
}

// A fragment (16 x 16) of rows m0.., cols k0.. of a tile stored [m][k].
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const void* tile, int m0, int k0, int lane) {
  const int r = m0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = k0 + (lane >> 4) * 8;
  ldsm_x4(a, static_cast<const uint16_t*>(tile) + swz<D>(r, c));
}
// B fragments of two n8 tiles (n0.., n0+8..) x k16 (k0..) from a tile stored [n][k].
template <int D>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const void* tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8, c = k0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(b, static_cast<const uint16_t*>(tile) + swz<D>(r, c));
}
// B fragments of two n8 tiles (n0.., n0+8..) x k16 (k0..) from a tile stored [k][n] (transposing load).
template <int D>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const void* tile, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + (lane >> 4) * 8;
  ldsm_x4_t(b, static_cast<const uint16_t*>(tile) + swz<D>(r, c));
}

// ---- documents and the tile walk -----------------------------------------------------------------

__device__ __forceinline__ int doc_index(const Params& p, int i) {
  int lo = 0, hi = p.num_docs - 1;  // the last d with cu[d] <= i (empty documents are skipped over)
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(p.cu_seqlens + mid) <= i) lo = mid; else hi = mid - 1;
  }
  return lo;
}
__device__ __forceinline__ int doc_start(const Params& p, int i) {
  return p.cu_seqlens ? __ldg(p.cu_seqlens + doc_index(p, i)) : 0;
}
__device__ __forceinline__ int doc_end(const Params& p, int i) {
  return p.cu_seqlens ? __ldg(p.cu_seqlens + doc_index(p, i) + 1) : p.seq;
}

// The key tiles of one query tile (rows i0..i1), built by thread 0 into shared memory.
struct QueryPlan {
  int a_lo, a_hi, b_lo, b_hi;  // tile ranges A and B (empty when lo > hi)
  int num_extra, num_selected;
  int ds_first, ds_last;       // doc_start(i0), doc_start(i1)
  int extra[kMaxExtraTiles];   // listed tiles outside A and B, deduplicated
  int selected[kMaxSelected];  // the listed blocks (for the `listed` flag of tiles in A and B)
  __device__ int count() const {
    return max(0, a_hi - a_lo + 1) + max(0, b_hi - b_lo + 1) + num_extra;
  }
  __device__ int tile(int n) const {
    const int na = max(0, a_hi - a_lo + 1);
    if (n < na) return a_hi - n;  // the diagonal first: its tile needs the mask, later ones often not
    n -= na;
    const int nb = max(0, b_hi - b_lo + 1);
    if (n < nb) return b_lo + n;
    return extra[n - nb];
  }
  __device__ bool listed(int n, int kv_tile, int tiles_per_block) const {
    if (n >= max(0, a_hi - a_lo + 1) + max(0, b_hi - b_lo + 1)) return true;
    const int kb = kv_tile / tiles_per_block;
    for (int s = 0; s < num_selected; ++s) {
      if (selected[s] == kb) return true;
    }
    return false;
  }
};

__device__ inline void build_query_plan(QueryPlan& plan, const Params& p, int b, int hkv, int i0, int i1) {
  const int ds0 = doc_start(p, i0);
  plan.ds_first = ds0;
  plan.ds_last = doc_start(p, i1);
  const int lo_a = p.window < 0 ? ds0 : max(ds0, i0 - p.window + 1);
  plan.a_lo = lo_a / kTile;
  plan.a_hi = lo_a <= i1 ? i1 / kTile : plan.a_lo - 1;
  plan.b_lo = 0;
  plan.b_hi = -1;
  if (p.sink_tokens > 0) {
    const int hi_b = min(ds0 + p.sink_tokens - 1, i1);
    plan.b_lo = ds0 / kTile;
    plan.b_hi = hi_b / kTile;
    if (plan.a_lo <= plan.a_hi) plan.b_hi = min(plan.b_hi, plan.a_lo - 1);
  }
  plan.num_extra = 0;
  plan.num_selected = 0;
  if (p.block_indices == nullptr) return;
  const int tiles_per_block = p.block_size / kTile;
  const int64_t row = (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.num_blocks + i0 / p.block_size;
  const int count = p.block_counts ? p.block_counts[row] : p.max_selected;
  const int32_t* idx = p.block_indices + row * p.max_selected;
  for (int s = 0; s < count; ++s) {
    const int kb = idx[s];
    if (kb < 0) continue;
    plan.selected[plan.num_selected++] = kb;
    for (int t = kb * tiles_per_block; t < (kb + 1) * tiles_per_block; ++t) {
      if (t * kTile > i1) break;                   // after every row: causal
      if (t * kTile + kTile - 1 < ds0) continue;   // before every row's document
      if ((t >= plan.a_lo && t <= plan.a_hi) || (t >= plan.b_lo && t <= plan.b_hi)) continue;
      bool seen = false;
      for (int e = 0; e < plan.num_extra; ++e) seen |= plan.extra[e] == t;
      if (!seen) plan.extra[plan.num_extra++] = t;
    }
  }
}

// Every (row, key) of query rows [i0, i1] x keys [k0, k_last] attends.
__device__ __forceinline__ bool tile_fully_visible(const Params& p, int i0, int i1, int ds_first, int ds_last, int k0,
                                                   int k_last, bool listed) {
  if (k_last > i0) return false;   // causal
  if (ds_last > k0) return false;  // some row's document starts after the tile's first key
  return listed || p.window < 0 || i1 - k0 < p.window || k_last - ds_first < p.sink_tokens;
}

// ---- forward ---------------------------------------------------------------------------------------

// kWarps warps of kM x 16 query rows each, for kHeads query heads of one GQA group (they share the kv
// head and the listed blocks, so the CTA walks one plan). The launcher picks the shape: 128 rows of one
// head when a 128-row tile lies in one query block (no block_indices, or block_size a multiple of 128);
// 2 heads x 64 rows when block_size is 64 and the group is even; else 64 rows. The wide shapes load each
// K/V tile once for 128 query rows (half the L2 traffic per query of the 64-row shape); kM = 2 also
// reuses each K/V fragment for two 16-row m-tiles (half the shared-memory reads per MMA), Q being read
// from shared memory then instead of held in registers.
template <typename T, int D, int kWarps, int kHeads, int kM>
__global__ void __launch_bounds__(kWarps * 32) sparse_attention_fwd_kernel(const Params p) {
  constexpr int kRows = kWarps * 16 * kM, kThr = kWarps * 32, kRowsH = kRows / kHeads, kWarpsH = kWarps / kHeads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ QueryPlan plan;
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kHeads, kRowsH, D)
  T* sK = sQ + kRows * D;                  // (2, 64, D)
  T* sV = sK + 2 * kTile * D;              // (2, 64, D)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int qt = gridDim.x - 1 - blockIdx.x;  // the longest walks first
  const int heads_cta = p.heads_q / kHeads;
  const int b = blockIdx.y / heads_cta, h0 = (blockIdx.y % heads_cta) * kHeads, hkv = h0 / (p.heads_q / p.heads_kv);
  const int wr = warp % kWarpsH;                                                 // this warp's row slot
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h0 + warp / kWarpsH;  // this warp's head
  const int i0 = qt * kRowsH, i1 = min(i0 + kRowsH - 1, p.seq - 1);
  const int64_t S = p.seq;
  const T* kh = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.heads_kv + hkv) * S * D;
  const T* vh = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.heads_kv + hkv) * S * D;
  if (threadIdx.x == 0) build_query_plan(plan, p, b, hkv, i0, i1);
  for (int hh = 0; hh < kHeads; ++hh) {
    const T* qh = static_cast<const T*>(p.q) + (static_cast<int64_t>(b) * p.heads_q + h0 + hh) * S * D;
    load_tile<T, D, kRowsH, kThr>(sQ + hh * kRowsH * D, qh, i0, p.seq);
  }
  __syncthreads();
  const int n_tiles = plan.count();
  const int tiles_per_block = p.block_size / kTile;
  if (n_tiles > 0) {
    const int t0 = plan.tile(0);
    load_tile<T, D, kTile, kThr>(sK, kh, t0 * kTile, p.seq);
    load_tile<T, D, kTile, kThr>(sV, vh, t0 * kTile, p.seq);
  }
  cp_async_commit();

  // This thread's rows: m-tile m, half hf: r = (warp * kM + m) * 16 + lane / 4 + 8 hf in the CTA's tile.
  const int g = lane >> 2, tq = lane & 3;
  int row_i[kM][2], row_ds[kM][2];
  float acc[kM][D / 8][4], row_max[kM][2], row_sum[kM][2];
  #pragma unroll
  for (int m = 0; m < kM; ++m) {
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_i[m][hf] = i0 + (wr * kM + m) * 16 + g + hf * 8;
      row_ds[m][hf] = doc_start(p, min(row_i[m][hf], p.seq - 1));
      row_max[m][hf] = -INFINITY;
      row_sum[m][hf] = 0.f;
    }
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
  }
  uint32_t qf[kM == 1 ? D / 16 : 1][4];  // Q held in registers when one m-tile

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) {
      const int tn = plan.tile(it + 1);
      load_tile<T, D, kTile, kThr>(sK + (stage ^ 1) * kTile * D, kh, tn * kTile, p.seq);
      load_tile<T, D, kTile, kThr>(sV + (stage ^ 1) * kTile * D, vh, tn * kTile, p.seq);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (kM == 1 && it == 0) {
      #pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<D>(qf[kM == 1 ? kk : 0], sQ, warp * 16, kk * 16, lane);
    }
    const T* tK = sK + stage * kTile * D;
    const T* tV = sV + stage * kTile * D;
    const int kv_tile = plan.tile(it), k0 = kv_tile * kTile;
    const bool listed = plan.listed(it, kv_tile, tiles_per_block);

    float s[kM][8][4];
    #pragma unroll
    for (int m = 0; m < kM; ++m)
      #pragma unroll
      for (int n = 0; n < 8; ++n) s[m][n][0] = s[m][n][1] = s[m][n][2] = s[m][n][3] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[kM][4];
      #pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (kM == 1) {
          #pragma unroll
          for (int r = 0; r < 4; ++r) qa[m][r] = qf[kM == 1 ? kk : 0][r];
        } else {
          load_a<D>(qa[m], sQ, (warp * kM + m) * 16, kk * 16, lane);
        }
      }
      #pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bf[4];
        load_b_nk<D>(bf, tK, np * 16, kk * 16, lane);
        #pragma unroll
        for (int m = 0; m < kM; ++m) {
          mma16816<T>(s[m][2 * np], qa[m], bf[0], bf[1]);
          mma16816<T>(s[m][2 * np + 1], qa[m], bf[2], bf[3]);
        }
      }
    }
    const bool full = tile_fully_visible(p, i0, i1, plan.ds_first, plan.ds_last, k0, k0 + kTile - 1, listed);
    #pragma unroll
    for (int m = 0; m < kM; ++m) {
      #pragma unroll
      for (int n = 0; n < 8; ++n) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e >> 1, j = k0 + n * 8 + 2 * tq + (e & 1);
          const bool ok =
              full || sparse_attends(row_i[m][hf], j, row_ds[m][hf], listed, p.window, p.sink_tokens);
          s[m][n][e] = ok ? s[m][n][e] * p.scale_log2 : -INFINITY;
        }
      }
      // Online softmax per row (4 lanes of a quad share a row).
      #pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -INFINITY;
        #pragma unroll
        for (int n = 0; n < 8; ++n) mx = fmaxf(mx, fmaxf(s[m][n][2 * hf], s[m][n][2 * hf + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[m][hf], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float corr = exp2f(row_max[m][hf] - m_use);
        float sum = 0.f;
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
          s[m][n][2 * hf] = exp2f(s[m][n][2 * hf] - m_use);
          s[m][n][2 * hf + 1] = exp2f(s[m][n][2 * hf + 1] - m_use);
          sum += s[m][n][2 * hf] + s[m][n][2 * hf + 1];
        }
        row_sum[m][hf] = row_sum[m][hf] * corr + sum;
        row_max[m][hf] = m_new;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          acc[m][n][2 * hf] *= corr;
          acc[m][n][2 * hf + 1] *= corr;
        }
      }
    }
    // O += P V, P converted in registers from the accumulator layout to the A-operand layout.
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[kM][4];
      #pragma unroll
      for (int m = 0; m < kM; ++m) {
        a[m][0] = pack2<T>(s[m][2 * kk][0], s[m][2 * kk][1]);
        a[m][1] = pack2<T>(s[m][2 * kk][2], s[m][2 * kk][3]);
        a[m][2] = pack2<T>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
        a[m][3] = pack2<T>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
      }
      #pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bf[4];
        load_b_kn<D>(bf, tV, kk * 16, dp * 16, lane);
        #pragma unroll
        for (int m = 0; m < kM; ++m) {
          mma16816<T>(acc[m][2 * dp], a[m], bf[0], bf[1]);
          mma16816<T>(acc[m][2 * dp + 1], a[m], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites the other stage, this one two iterations on
  }
  if (n_tiles == 0) cp_async_wait<0>();

  T* oh = static_cast<T*>(p.o) + bh * S * D;
  #pragma unroll
  for (int m = 0; m < kM; ++m) {
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = row_sum[m][hf];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int i = row_i[m][hf];
      if (i >= p.seq) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      #pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(oh + static_cast<int64_t>(i) * D + n * 8 + 2 * tq) =
            pack2<T>(acc[m][n][2 * hf] * inv, acc[m][n][2 * hf + 1] * inv);
      }
      if (tq == 0) p.lse[bh * S + i] = l > 0.f ? (row_max[m][hf] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

// ---- backward: Delta = rowsum(dO * O) ----------------------------------------------------------------

// One pass over dO and O (the ATen form, two fp32 copies, a product and a sum, read them five times:
// 6 ms of a 79 ms NSA backward). A row of Dv elements is Dv / 8 lanes with one 16-byte load of each
// tensor; the lanes of a row sum with xor shuffles (Dv / 8 is a power of two <= 32, checked by the launcher).
template <typename T>
__global__ void __launch_bounds__(256) sparse_attention_delta_kernel(const T* __restrict__ grad_o,
                                                                     const T* __restrict__ o,
                                                                     float* __restrict__ delta, int64_t rows,
                                                                     int lanes_per_row) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / lanes_per_row;
  const int64_t vec = t;  // this lane's 8 elements: row * Dv + (t % lanes_per_row) * 8 = 8 t
  float sum = 0.f;
  if (row < rows) {
    const uint4 a = reinterpret_cast<const uint4*>(grad_o)[vec];
    const uint4 b = reinterpret_cast<const uint4*>(o)[vec];
    const uint32_t* a2 = reinterpret_cast<const uint32_t*>(&a);
    const uint32_t* b2 = reinterpret_cast<const uint32_t*>(&b);
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 x, y;
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&a2[i]));
        y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&b2[i]));
      } else {
        x = __half22float2(*reinterpret_cast<const __half2*>(&a2[i]));
        y = __half22float2(*reinterpret_cast<const __half2*>(&b2[i]));
      }
      sum = fmaf(x.x, y.x, sum);
      sum = fmaf(x.y, y.y, sum);
    }
  }
  for (int off = lanes_per_row / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (row < rows && t % lanes_per_row == 0) delta[row] = sum;
}

// ---- backward: dq ----------------------------------------------------------------------------------

// lse in log2 units for the exp2 recomputation; a row that attends nothing (lse = -inf) gets +inf so
// that every P of it is exp2(-inf) = 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Rows, warps and packed heads as in the forward kernel.
template <typename T, int D, int kWarps, int kHeads>
__global__ void __launch_bounds__(kWarps * 32) sparse_attention_dq_kernel(const Params p) {
  constexpr int kRows = kWarps * 16, kThr = kWarps * 32, kRowsH = kRows / kHeads, kWarpsH = kWarps / kHeads;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ QueryPlan plan;
  T* sQ = reinterpret_cast<T*>(smem_raw);  // (kHeads, kRowsH, D)
  T* sdO = sQ + kRows * D;                 // (kHeads, kRowsH, D)
  T* sK = sdO + kRows * D;                 // (2, 64, D)
  T* sV = sK + 2 * kTile * D;              // (2, 64, D)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int heads_cta = p.heads_q / kHeads;
  const int b = blockIdx.y / heads_cta, h0 = (blockIdx.y % heads_cta) * kHeads, hkv = h0 / (p.heads_q / p.heads_kv);
  const int wr = warp % kWarpsH;
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h0 + warp / kWarpsH;
  const int i0 = qt * kRowsH, i1 = min(i0 + kRowsH - 1, p.seq - 1);
  const int64_t S = p.seq;
  const T* kh = static_cast<const T*>(p.k) + (static_cast<int64_t>(b) * p.heads_kv + hkv) * S * D;
  const T* vh = static_cast<const T*>(p.v) + (static_cast<int64_t>(b) * p.heads_kv + hkv) * S * D;
  if (threadIdx.x == 0) build_query_plan(plan, p, b, hkv, i0, i1);
  for (int hh = 0; hh < kHeads; ++hh) {
    const int64_t head = (static_cast<int64_t>(b) * p.heads_q + h0 + hh) * S * D;
    load_tile<T, D, kRowsH, kThr>(sQ + hh * kRowsH * D, static_cast<const T*>(p.q) + head, i0, p.seq);
    load_tile<T, D, kRowsH, kThr>(sdO + hh * kRowsH * D, static_cast<const T*>(p.grad_o) + head, i0, p.seq);
  }
  __syncthreads();
  const int n_tiles = plan.count();
  const int tiles_per_block = p.block_size / kTile;
  if (n_tiles > 0) {
    const int t0 = plan.tile(0);
    load_tile<T, D, kTile, kThr>(sK, kh, t0 * kTile, p.seq);
    load_tile<T, D, kTile, kThr>(sV, vh, t0 * kTile, p.seq);
  }
  cp_async_commit();

  const int g = lane >> 2, tq = lane & 3;
  int row_i[2], row_ds[2];
  float row_lse[2], row_delta[2];
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    row_i[hf] = i0 + wr * 16 + g + hf * 8;
    const int ic = min(row_i[hf], p.seq - 1);
    row_ds[hf] = doc_start(p, ic);
    row_lse[hf] = lse_log2(p.lse_in[bh * S + ic]);
    row_delta[hf] = p.delta[bh * S + ic];
  }
  float dq[D / 8][4];
  #pragma unroll
  for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) {
      const int tn = plan.tile(it + 1);
      load_tile<T, D, kTile, kThr>(sK + (stage ^ 1) * kTile * D, kh, tn * kTile, p.seq);
      load_tile<T, D, kTile, kThr>(sV + (stage ^ 1) * kTile * D, vh, tn * kTile, p.seq);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tK = sK + stage * kTile * D;
    const T* tV = sV + stage * kTile * D;
    const int kv_tile = plan.tile(it), k0 = kv_tile * kTile;
    const bool listed = plan.listed(it, kv_tile, tiles_per_block);

    float s[8][4], dp[8][4];
    #pragma unroll
    for (int n = 0; n < 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], ga[4];
      load_a<D>(qa, sQ, warp * 16, kk * 16, lane);
      load_a<D>(ga, sdO, warp * 16, kk * 16, lane);
      #pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4], bv[4];
        load_b_nk<D>(bk, tK, np * 16, kk * 16, lane);
        load_b_nk<D>(bv, tV, np * 16, kk * 16, lane);
        mma16816<T>(s[2 * np], qa, bk[0], bk[1]);
        mma16816<T>(s[2 * np + 1], qa, bk[2], bk[3]);
        mma16816<T>(dp[2 * np], ga, bv[0], bv[1]);
        mma16816<T>(dp[2 * np + 1], ga, bv[2], bv[3]);
      }
    }
    const bool full = tile_fully_visible(p, i0, i1, plan.ds_first, plan.ds_last, k0, k0 + kTile - 1, listed);
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e >> 1, j = k0 + n * 8 + 2 * tq + (e & 1);
        const bool ok = full || sparse_attends(row_i[hf], j, row_ds[hf], listed, p.window, p.sink_tokens);
        const float pr = ok ? exp2f(s[n][e] * p.scale_log2 - row_lse[hf]) : 0.f;
        s[n][e] = pr * (dp[n][e] - row_delta[hf]);  // dS (without the softmax scale, applied at the end)
      }
    }
    // dQ += dS K: K as the B operand [key][d], a transposing load.
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                       pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      #pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bf[4];
        load_b_kn<D>(bf, tK, kk * 16, dd * 16, lane);
        mma16816<T>(dq[2 * dd], a, bf[0], bf[1]);
        mma16816<T>(dq[2 * dd + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }
  if (n_tiles == 0) cp_async_wait<0>();
  T* dqh = static_cast<T*>(p.dq) + bh * S * D;
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = row_i[hf];
    if (i >= p.seq) continue;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dqh + static_cast<int64_t>(i) * D + n * 8 + 2 * tq) =
          pack2<T>(dq[n][2 * hf] * p.scale, dq[n][2 * hf + 1] * p.scale);
    }
  }
}

// ---- backward: dk, dv --------------------------------------------------------------------------------

// The query tiles that reach one key tile, per query head of the group: the row range [k0, hi] (window
// band and sinks), then the query blocks listing the key block (inverse index, ascending, duplicates
// adjacent), expanded to tiles past the range.
struct KeyWalk {
  int r_lo, r_hi;         // query tile range
  int list_lo, list_hi;   // entries of inv_qblocks
  int tiles_per_block, num_q_tiles, kv_tile, group;
  const int32_t* list;
  // cursor
  int g, phase, qt, pos, sub;

  __device__ bool listed_block(int qb) const {  // binary search of the ascending list
    int lo = list_lo, hi = list_hi;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      const int v = __ldg(list + mid);
      if (v == qb) return true;
      if (v < qb) lo = mid + 1; else hi = mid;
    }
    return false;
  }
  // The next (head in group, query tile, listed); false when done.
  __device__ bool next(int& head, int& tile, bool& listed) {
    while (g < group) {
      if (phase == 0) {
        if (qt <= r_hi) {
          head = g;
          tile = qt++;
          listed = list != nullptr && listed_block(tile / tiles_per_block);
          return true;
        }
        phase = 1;
        pos = list_lo;
        sub = 0;
      }
      while (list != nullptr && pos < list_hi) {
        const int qb = __ldg(list + pos);
        if ((pos > list_lo && __ldg(list + pos - 1) == qb) || sub >= tiles_per_block) {
          ++pos;
          sub = 0;
          continue;
        }
        const int t = qb * tiles_per_block + sub++;
        if (t >= num_q_tiles || t < kv_tile || t <= r_hi) continue;
        head = g;
        tile = t;
        listed = true;
        return true;
      }
      ++g;
      phase = 0;
      qt = r_lo;
    }
    return false;
  }
};

// kWarps warps of 16 keys: 8 (128 keys per CTA, half the Q/dO traffic per key) when a 128-key tile lies
// in one key block (no block_indices, or block_size a multiple of 128), else 4.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) sparse_attention_dkdv_kernel(const Params p) {
  constexpr int kKeys = kWarps * 16, kThr = kWarps * 32;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);   // (kKeys, D)
  T* sV = sK + kKeys * D;                   // (kKeys, D)
  T* sQ = sV + kKeys * D;                   // (2, 64, D)
  T* sdO = sQ + 2 * kTile * D;              // (2, 64, D)
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kTile * D);  // (2, 64) log2 units
  float* sDelta = sLse + 2 * kTile;                             // (2, 64)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int kt = blockIdx.x;  // tile 0 first: with sinks or a forced first block it has the longest walk
  const int bkv = blockIdx.y, b = bkv / p.heads_kv, hkv = bkv % p.heads_kv, G = p.heads_q / p.heads_kv;
  const int k0 = kt * kKeys, k1 = min(k0 + kKeys - 1, p.seq - 1);
  const int64_t S = p.seq;
  const T* kh = static_cast<const T*>(p.k) + static_cast<int64_t>(bkv) * S * D;
  const T* vh = static_cast<const T*>(p.v) + static_cast<int64_t>(bkv) * S * D;

  KeyWalk walk;
  {
    const int ds0 = doc_start(p, k0), de1 = doc_end(p, k1);
    int hi = p.window < 0 ? de1 - 1 : min(k1 + p.window - 1, de1 - 1);
    if (p.sink_tokens > 0 && (k0 - ds0 < p.sink_tokens || doc_start(p, k1) > k0)) hi = de1 - 1;
    walk.r_lo = k0 / kTile;
    walk.r_hi = hi >= k0 ? hi / kTile : walk.r_lo - 1;
    walk.tiles_per_block = p.block_size / kTile;
    walk.num_q_tiles = (p.seq + kTile - 1) / kTile;
    walk.kv_tile = k0 / kTile;  // query tiles before it end before every key
    walk.group = gridDim.z == 1 ? G : static_cast<int>(blockIdx.z) + 1;  // split: this CTA's head only
    walk.list = p.inv_qblocks;
    walk.list_lo = walk.list_hi = 0;
    if (p.inv_qblocks != nullptr) {
      const int64_t key = (static_cast<int64_t>(b) * p.heads_kv + hkv) * p.num_blocks + k0 / p.block_size;
      walk.list_lo = p.inv_offsets[key];
      walk.list_hi = p.inv_offsets[key + 1];
    }
    walk.g = gridDim.z == 1 ? 0 : static_cast<int>(blockIdx.z);
    walk.phase = 0;
    walk.qt = walk.r_lo;
    walk.pos = walk.sub = 0;
  }

  load_tile<T, D, kKeys, kThr>(sK, kh, k0, p.seq);
  load_tile<T, D, kKeys, kThr>(sV, vh, k0, p.seq);
  // Loads the query-side tiles of one item into a stage; lse and Delta through plain loads.
  auto load_item = [&](int stage, int head, int tile) {
    const int64_t bh = static_cast<int64_t>(b) * p.heads_q + hkv * G + head;
    load_tile<T, D, kTile, kThr>(sQ + stage * kTile * D, static_cast<const T*>(p.q) + bh * S * D, tile * kTile, p.seq);
    load_tile<T, D, kTile, kThr>(sdO + stage * kTile * D, static_cast<const T*>(p.grad_o) + bh * S * D, tile * kTile, p.seq);
    if (threadIdx.x < kTile) {
      const int i = min(tile * kTile + static_cast<int>(threadIdx.x), p.seq - 1);
      sLse[stage * kTile + threadIdx.x] = lse_log2(p.lse_in[bh * S + i]);
      sDelta[stage * kTile + threadIdx.x] = p.delta[bh * S + i];
    }
  };
  int head = 0, tile = 0;
  bool listed = false;
  bool have = walk.next(head, tile, listed);
  if (have) load_item(0, head, tile);
  cp_async_commit();

  const int g = lane >> 2, tq = lane & 3;
  int key_j[2];
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) key_j[hf] = k0 + warp * 16 + g + hf * 8;
  float dk[D / 8][4], dv[D / 8][4];
  #pragma unroll
  for (int n = 0; n < D / 8; ++n)
    #pragma unroll
    for (int e = 0; e < 4; ++e) dk[n][e] = dv[n][e] = 0.f;

  int stage = 0;
  while (have) {
    int n_head = 0, n_tile = 0;
    bool n_listed = false;
    const bool n_have = walk.next(n_head, n_tile, n_listed);
    if (n_have) {
      load_item(stage ^ 1, n_head, n_tile);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tQ = sQ + stage * kTile * D;
    const T* tdO = sdO + stage * kTile * D;
    const float* tLse = sLse + stage * kTile;
    const float* tDelta = sDelta + stage * kTile;
    const int q0 = tile * kTile, q1 = min(q0 + kTile - 1, p.seq - 1);

    // S^T = K Q^T and dP^T = V dO^T: rows are this warp's 16 keys, columns the 64 queries.
    float st[8][4], dpt[8][4];
    #pragma unroll
    for (int n = 0; n < 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4], va[4];
      load_a<D>(ka, sK, warp * 16, kk * 16, lane);
      load_a<D>(va, sV, warp * 16, kk * 16, lane);
      #pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4], bo[4];
        load_b_nk<D>(bq, tQ, np * 16, kk * 16, lane);
        load_b_nk<D>(bo, tdO, np * 16, kk * 16, lane);
        mma16816<T>(st[2 * np], ka, bq[0], bq[1]);
        mma16816<T>(st[2 * np + 1], ka, bq[2], bq[3]);
        mma16816<T>(dpt[2 * np], va, bo[0], bo[1]);
        mma16816<T>(dpt[2 * np + 1], va, bo[2], bo[3]);
      }
    }
    // Rows of the query tile share a document start only when no document starts inside it.
    const int ds_q0 = doc_start(p, q0), ds_q1 = doc_start(p, q1);
    const bool full = tile_fully_visible(p, q0, q1, ds_q0, ds_q1, k0, k0 + kKeys - 1, listed);
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
      #pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * tq + (e & 1), i = q0 + c, j = key_j[e >> 1];
        bool ok = full && i < p.seq;  // queries past S are zero rows: keep them out all the same
        if (!full && i < p.seq) {
          const int dsi = ds_q0 == ds_q1 ? ds_q0 : doc_start(p, i);
          ok = sparse_attends(i, j, dsi, listed, p.window, p.sink_tokens);
        }
        const float pr = ok ? exp2f(st[n][e] * p.scale_log2 - tLse[c]) : 0.f;
        st[n][e] = pr;                          // P^T
        dpt[n][e] = pr * (dpt[n][e] - tDelta[c]);  // dS^T (softmax scale applied at the end)
      }
    }
    // dV += P^T dO and dK += dS^T Q: the queries are the k dimension; Q and dO as [k][n] tiles.
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t pa[4] = {pack2<T>(st[2 * kk][0], st[2 * kk][1]), pack2<T>(st[2 * kk][2], st[2 * kk][3]),
                        pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]),
                        pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3])};
      uint32_t da[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                        pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                        pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
      #pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bo[4], bq[4];
        load_b_kn<D>(bo, tdO, kk * 16, dd * 16, lane);
        load_b_kn<D>(bq, tQ, kk * 16, dd * 16, lane);
        mma16816<T>(dv[2 * dd], pa, bo[0], bo[1]);
        mma16816<T>(dv[2 * dd + 1], pa, bo[2], bo[3]);
        mma16816<T>(dk[2 * dd], da, bq[0], bq[1]);
        mma16816<T>(dk[2 * dd + 1], da, bq[2], bq[3]);
      }
    }
    __syncthreads();
    have = n_have;
    head = n_head;
    tile = n_tile;
    listed = n_listed;
    stage ^= 1;
  }
  cp_async_wait<0>();
  T* dkh = static_cast<T*>(p.dk) + static_cast<int64_t>(bkv) * S * D;
  T* dvh = static_cast<T*>(p.dv) + static_cast<int64_t>(bkv) * S * D;
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = key_j[hf];
    if (j >= p.seq) continue;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int64_t off = static_cast<int64_t>(j) * D + n * 8 + 2 * tq;
      if (p.dk_accum != nullptr) {
        float* ak = p.dk_accum + static_cast<int64_t>(bkv) * S * D + off;
        float* av = p.dv_accum + static_cast<int64_t>(bkv) * S * D + off;
        atomicAdd(ak, dk[n][2 * hf] * p.scale);
        atomicAdd(ak + 1, dk[n][2 * hf + 1] * p.scale);
        atomicAdd(av, dv[n][2 * hf]);
        atomicAdd(av + 1, dv[n][2 * hf + 1]);
      } else {
        *reinterpret_cast<uint32_t*>(dkh + off) = pack2<T>(dk[n][2 * hf] * p.scale, dk[n][2 * hf + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dvh + off) = pack2<T>(dv[n][2 * hf], dv[n][2 * hf + 1]);
      }
    }
  }
}

}  // namespace anvil::ops::sparse_cuda
