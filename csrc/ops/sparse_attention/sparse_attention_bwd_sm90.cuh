// The Hopper (sm_90a) dk/dv kernel of sparse_attention's backward: the mma.sync dk/dv kernel of
// sparse_attention_kernels.cuh (same KeyWalk over the query tiles that reach a key tile, same element
// rule, same fp32-atomic split of a GQA group over CTAs) with its four GEMMs on wgmma and its loads on TMA.
//
// A CTA owns kKeys keys and has three warpgroups: warp 0 of warpgroup 0 produces (it walks the KeyWalk,
// writes each item's head / query tile / listed flag and its 64 lse and Delta values into a ring slot, and
// issues the TMA copies of the item's Q and dO tiles); warpgroups 1 and 2 consume. Two forms:
//   kKeys 128 (every 128-key tile in one key block: the launcher's kRows128 shape): each consumer owns 64
//     of the keys and both take every item;
//   kKeys 64 (any block size; NSA's blocks of 64): both consumers own the same 64 keys and take the items
//     in turn (even items warpgroup 1, odd ones warpgroup 2), so they drift apart and one's GEMMs run under
//     the other's softmax; at the end warpgroup 2 hands its dK, dV (fp32) to warpgroup 1 through the idle
//     ring, which adds and stores them.
// Per item (64 queries of one head):
//   S^T  = K Q^T     wgmma m64n64k16 SS (K: this warpgroup's 64 keys, K-major; Q tile K-major)
//   dP^T = V dO^T    the same with V and dO
//   P^T = exp2(S^T scale log2 e - lse), dS^T = P^T (dP^T - Delta), masked by the element rule
//   dV += P^T dO     wgmma m64nDk16 RS: P^T from registers (the accumulator layout is the A layout),
//                    dO as the MN-major B operand (queries x D, D contiguous)
//   dK += dS^T Q     the same with dS^T and Q
// dK and dV stay in registers (fp32) over the whole walk; the softmax scale is applied to dK at the end.
// Ring: kStages slots of (Q, dO, lse, Delta, item), a full barrier per slot (the producer warp's 32 lanes,
// lane 0 with the TMA bytes) and an empty one (one arrive per consumer warp). The end of the walk is an
// item with tile -1 (one per consumer that takes items in turn). K and V arrive once, on their own barrier.
#pragma once

#include "ops/sparse_attention/sparse_attention_sm90.cuh"

namespace anvil::ops::sparse_cuda::sm90 {

template <int D, int kKeys>
struct DkdvConfig {
  static constexpr int kStages = kKeys == 64 ? 4 : D == 64 ? 4 : 3;
  // K, V (kKeys each), kStages x (Q, dO) of 64 queries, and 1 KB to align the base.
  static constexpr int kSmemBytes = (2 * kKeys + 2 * kStages * kTile) * D * 2 + 1024;
  // kKeys 64: warpgroup 2's dK, dV (64 x D fp32 each) pass through the ring at the end.
  static_assert(kKeys == 128 || 2 * 64 * D * 4 <= 2 * kStages * kTile * D * 2, "the ring holds the hand-over");
};

template <typename T, int D, int kKeys>
__global__ void __launch_bounds__(kWsThreads, 1)
    sparse_attention_dkdv_sm90_kernel(const Params p, const __grid_constant__ TmaMaps maps,
                                      const __grid_constant__ CUtensorMap grad_o_map) {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  static_assert(kKeys == 64 || kKeys == 128, "64 or 128 keys per CTA");
  using Cfg = DkdvConfig<D, kKeys>;
  constexpr int kStages = Cfg::kStages;
  constexpr bool kTakeTurns = kKeys == 64;  // the two consumers share the keys and alternate items
  constexpr int kPanels = D / kPanel;
  constexpr int kBox = kTile * kPanel;
  constexpr uint32_t kBoxBytes = kBox * sizeof(T);
  constexpr int kTileElems = kTile * D;  // one (64, D) tile: kPanels boxes
  constexpr uint32_t kSbo = 8 * 128;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages], kv_bar;
  __shared__ __align__(16) float s_lse[kStages][kTile], s_delta[kStages][kTile];  // float2 reads
  __shared__ int s_head[kStages], s_tile[kStages], s_listed[kStages];
  T* sK = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  T* sV = sK + kKeys * D;       // [panel][kKeys keys][64]
  T* sQ = sV + kKeys * D;       // [stage][panel][64 queries][64]
  T* sdO = sQ + kStages * kTileElems;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2;
  const int kt = blockIdx.x;
  const int bkv = blockIdx.y, b = bkv / p.heads_kv, hkv = bkv % p.heads_kv, G = p.heads_q / p.heads_kv;
  const int k0 = kt * kKeys, k1 = min(k0 + kKeys - 1, p.seq - 1);
  const int64_t S = p.seq;
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full_bar[st], 32);  // the producer warp's lanes (lane 0 with the TMA bytes)
      mbar_init(&empty_bar[st], kTakeTurns ? 4 : 8);  // one arrive per warp of the slot's consumer(s)
    }
    mbar_init(&kv_bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async_smem();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer: warp 0 ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp != 0) return;
    if (lane == 0) {
      mbar_arrive_expect_tx(&kv_bar, 2 * (kKeys / 64) * kPanels * kBoxBytes);
      for (int half = 0; half < kKeys / 64; ++half) {
        for (int pn = 0; pn < kPanels; ++pn) {
          T* dk = sK + pn * kKeys * kPanel + half * kBox;
          T* dv = sV + pn * kKeys * kPanel + half * kBox;
          tma_load_box(dk, &maps.k, &kv_bar, pn * kPanel, k0 + 64 * half, bkv);
          tma_load_box(dv, &maps.v, &kv_bar, pn * kPanel, k0 + 64 * half, bkv);
        }
      }
    }
    // The walk, as in the mma.sync kernel (every lane walks it; lane 0 issues the copies).
    KeyWalk walk;
    {
      const int ds0 = doc_start(p, k0), de1 = doc_end(p, k1);
      int hi = p.window < 0 ? de1 - 1 : min(k1 + p.window - 1, de1 - 1);
      if (p.sink_tokens > 0 && (k0 - ds0 < p.sink_tokens || doc_start(p, k1) > k0)) hi = de1 - 1;
      walk.r_lo = k0 / kTile;
      walk.r_hi = hi >= k0 ? hi / kTile : walk.r_lo - 1;
      walk.tiles_per_block = p.block_size / kTile;
      walk.num_q_tiles = (p.seq + kTile - 1) / kTile;
      walk.kv_tile = k0 / kTile;
      walk.group = gridDim.z == 1 ? G : static_cast<int>(blockIdx.z) + 1;
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
    int ends = 0;  // end items published: one per consumer that takes items in turn, else one for both
    for (int item = 0;; ++item) {
      const int st = item % kStages;
      if (item >= kStages) mbar_wait(&empty_bar[st], ((item / kStages) - 1) & 1);
      int head = 0, tile = 0;
      bool listed = false;
      const bool have = ends == 0 && walk.next(head, tile, listed);
      if (!have) {
        if (lane == 0) s_tile[st] = -1;
        mbar_arrive(&full_bar[st]);
        if (++ends == (kTakeTurns ? 2 : 1)) break;
        continue;
      }
      const int64_t bh = static_cast<int64_t>(b) * p.heads_q + hkv * G + head;
      for (int r = lane; r < kTile; r += 32) {
        const int i = min(tile * kTile + r, p.seq - 1);
        s_lse[st][r] = lse_log2(p.lse_in[bh * S + i]);
        s_delta[st][r] = p.delta[bh * S + i];
      }
      if (lane == 0) {
        s_head[st] = head;
        s_tile[st] = tile;
        s_listed[st] = listed ? 1 : 0;
        mbar_arrive_expect_tx(&full_bar[st], 2 * kPanels * kBoxBytes);
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_box(sQ + st * kTileElems + pn * kBox, &maps.q, &full_bar[st], pn * kPanel, tile * kTile,
                       static_cast<int>(bh));
          tma_load_box(sdO + st * kTileElems + pn * kBox, &grad_o_map, &full_bar[st], pn * kPanel, tile * kTile,
                       static_cast<int>(bh));
        }
      } else {
        mbar_arrive(&full_bar[st]);
      }
    }
    return;
  }

  // ---- consumers: warpgroup cw owns keys k0 + key_off .. + 63 ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = __shfl_sync(0xffffffffu, wg - 1, 0), wq = warp & 3;  // cw warp-uniform for the compiler
  const int key_off = kTakeTurns ? 0 : cw * 64;
  const int g = lane >> 2, tq = lane & 3;
  int key_j[2];
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) key_j[hf] = k0 + key_off + wq * 16 + g + hf * 8;
  float dk[D / 2], dv[D / 2], st_acc[32], dpt[32];
  #pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  #pragma unroll
  for (int i = 0; i < 32; ++i) st_acc[i] = dpt[i] = 0.f;
  const SwDesc<T> ka(sK + key_off * kPanel, 16, kSbo), va(sV + key_off * kPanel, 16, kSbo);  // this warpgroup's keys

  mbar_wait(&kv_bar, 0);
  for (int item = kTakeTurns ? cw : 0;; item += kTakeTurns ? 2 : 1) {
    const int st = item % kStages;
    mbar_wait(&full_bar[st], (item / kStages) & 1);
    const int tile = s_tile[st];
    if (tile < 0) break;
    const bool listed = s_listed[st] != 0;
    const T* tQ = sQ + st * kTileElems;
    const T* tdO = sdO + st * kTileElems;

    // S^T = K Q^T and dP^T = V dO^T (64 keys x 64 queries each).
    fence_regs(st_acc);
    fence_regs(dpt);
    const SwDesc<T> qb(tQ, 16, kSbo), dob(tdO, 16, kSbo);
    cute::warpgroup_arrive();
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int pn = kk / 4, within = (kk % 4) * 16;
      const uint64_t da = ka.at(pn * kKeys * kPanel + within);
      const uint64_t db = qb.at(pn * kBox + within);
      gmma_ss<typename Gmma<T, 64>::SS>(da, db, st_acc, kk > 0, std::make_index_sequence<32>{});
    }
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int pn = kk / 4, within = (kk % 4) * 16;
      const uint64_t da = va.at(pn * kKeys * kPanel + within);
      const uint64_t db = dob.at(pn * kBox + within);
      gmma_ss<typename Gmma<T, 64>::SS>(da, db, dpt, kk > 0, std::make_index_sequence<32>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_regs(st_acc);
    fence_regs(dpt);

    // P^T and dS^T; rows are keys, columns queries (q0 + column).
    const int q0 = tile * kTile, q1 = min(q0 + kTile - 1, p.seq - 1);
    const int ds_q0 = doc_start(p, q0), ds_q1 = doc_start(p, q1);
    const bool full = tile_fully_visible(p, q0, q1, ds_q0, ds_q1, k0, k0 + kKeys - 1, listed);
    const float* lse = s_lse[st];
    const float* delta = s_delta[st];
    if (full && q0 + kTile <= p.seq) {
      // Every element visible (most items of a window): one FFMA, one MUFU and two FMAs per element, the
      // two lse and Delta values of a column pair in one 8-byte load each.
      #pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float2 l2 = *reinterpret_cast<const float2*>(lse + n * 8 + 2 * tq);
        const float2 d2 = *reinterpret_cast<const float2*>(delta + n * 8 + 2 * tq);
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float pr = fast_exp2(fmaf(st_acc[4 * n + e], p.scale_log2, -((e & 1) ? l2.y : l2.x)));
          st_acc[4 * n + e] = pr;
          dpt[4 * n + e] = pr * (dpt[4 * n + e] - ((e & 1) ? d2.y : d2.x));
        }
      }
    } else {
      // Queries past S are zero rows: kept out all the same. `full` is tested once, outside the element
      // loop (inside it the compiler builds a bit mask of it on every item).
      #pragma unroll
      for (int n = 0; n < 8; ++n) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * tq + (e & 1);
          st_acc[4 * n + e] = q0 + c < p.seq ? fmaf(st_acc[4 * n + e], p.scale_log2, -lse[c]) : -INFINITY;
        }
      }
      if (!full) {
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
          #pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = n * 8 + 2 * tq + (e & 1), i = q0 + c, j = key_j[e >> 1];
            if (i >= p.seq) continue;
            const int dsi = ds_q0 == ds_q1 ? ds_q0 : doc_start(p, i);
            if (!sparse_attends(i, j, dsi, listed, p.window, p.sink_tokens)) st_acc[4 * n + e] = -INFINITY;
          }
        }
      }
      #pragma unroll
      for (int n = 0; n < 8; ++n) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = n * 8 + 2 * tq + (e & 1);
          const float pr = fast_exp2(st_acc[4 * n + e]);
          st_acc[4 * n + e] = pr;
          dpt[4 * n + e] = pr * (dpt[4 * n + e] - delta[c]);
        }
      }
    }
    uint32_t pa[4][4], da[4][4];
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      #pragma unroll
      for (int r = 0; r < 4; ++r) {
        pa[kk][r] = pack2<T>(st_acc[8 * kk + 2 * r], st_acc[8 * kk + 2 * r + 1]);
        da[kk][r] = pack2<T>(dpt[8 * kk + 2 * r], dpt[8 * kk + 2 * r + 1]);
      }
    }
    // dV += P^T dO and dK += dS^T Q: the queries are the k dimension; dO and Q as MN-major B operands.
    fence_regs(dv);
    fence_regs(dk);
    cute::warpgroup_arrive();
    const SwDesc<T> dob_mn(tdO, kBoxBytes, kSbo), qb_mn(tQ, kBoxBytes, kSbo);  // MN-major B operands
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t db = dob_mn.at(kk * 16 * kPanel);
      gmma_rs<typename Gmma<T, D>::RS>(pa[kk], db, dv, std::make_index_sequence<D / 2>{});
    }
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t db = qb_mn.at(kk * 16 * kPanel);
      gmma_rs<typename Gmma<T, D>::RS>(da[kk], db, dk, std::make_index_sequence<D / 2>{});
    }
    cute::warpgroup_commit_batch();
    cute::warpgroup_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      #pragma unroll
      for (int r = 0; r < 4; ++r) {
        cute::warpgroup_fence_operand(pa[kk][r]);
        cute::warpgroup_fence_operand(da[kk][r]);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_bar[st]);  // this warp is done with the slot
  }

  if constexpr (kTakeTurns) {
    // Warpgroup 2 hands its partial dK, dV to warpgroup 1 through the Q/dO ring, which both have left
    // (barrier 1: every consumer is past its last item). Thread-major: word i * 128 + t, no bank conflicts.
    float* hand = reinterpret_cast<float*>(sQ);
    const int t = tid & 127;
    named_sync(1, 256);
    if (cw == 1) {
      #pragma unroll
      for (int i = 0; i < D / 2; ++i) {
        hand[i * 128 + t] = dk[i];
        hand[(D / 2 + i) * 128 + t] = dv[i];
      }
    }
    named_sync(1, 256);
    if (cw == 1) return;
    #pragma unroll
    for (int i = 0; i < D / 2; ++i) {
      dk[i] += hand[i * 128 + t];
      dv[i] += hand[(D / 2 + i) * 128 + t];
    }
  }
  T* dkh = static_cast<T*>(p.dk) + static_cast<int64_t>(bkv) * S * D;
  T* dvh = static_cast<T*>(p.dv) + static_cast<int64_t>(bkv) * S * D;
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int j = key_j[hf];
    if (j >= p.seq) continue;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      const int64_t off = static_cast<int64_t>(j) * D + n * 8 + 2 * tq;
      const float k_lo = dk[4 * n + 2 * hf] * p.scale, k_hi = dk[4 * n + 2 * hf + 1] * p.scale;
      const float v_lo = dv[4 * n + 2 * hf], v_hi = dv[4 * n + 2 * hf + 1];
      if (p.dk_accum != nullptr) {
        float* ak = p.dk_accum + static_cast<int64_t>(bkv) * S * D + off;
        float* av = p.dv_accum + static_cast<int64_t>(bkv) * S * D + off;
        atomicAdd(ak, k_lo);
        atomicAdd(ak + 1, k_hi);
        atomicAdd(av, v_lo);
        atomicAdd(av + 1, v_hi);
      } else {
        *reinterpret_cast<uint32_t*>(dkh + off) = pack2<T>(k_lo, k_hi);
        *reinterpret_cast<uint32_t*>(dvh + off) = pack2<T>(v_lo, v_hi);
      }
    }
  }
}


// ---- the dq kernel ----------------------------------------------------------------------------------
//
// The forward's structure (grid, QueryPlan, 128 query rows as 2 consumer warpgroups x 64, a producer
// warpgroup with TMA, 128-key steps of two 64-key slots, the odd tail's second slot a zero box past S)
// with the dq kernel's arithmetic: per step S = Q K^T and dP = dO V^T (SS, one batch), P = exp2(S scale
// log2 e - lse), dS = P (dP - Delta), dQ += dS K (RS; K as the MN-major B operand, as V in the forward).
// Q and dO arrive once; lse and Delta of a thread's two rows are read from global memory once.

template <int D>
struct DqConfig {
  static constexpr int kStages = D == 64 ? 4 : 2;
  static constexpr int kSlots = 2 * kStages;
  // Q, dO (128 rows each), kSlots x (K, V) of 64 keys, and 1 KB to align the base.
  static constexpr int kSmemBytes = (2 * kRows + 2 * kSlots * kTile) * D * 2 + 1024;
};

// d (N / 2 floats) (+)= A B for the 128-key S and dP chains.
template <typename T, int D, int kKvPanel>
__device__ __forceinline__ void issue_s_dp(float (&s)[64], float (&dp)[64], const T* q_wg, const T* do_wg,
                                           const T* tK, const T* tV) {
  constexpr uint32_t kSbo = 8 * 128;
  const SwDesc<T> qa(q_wg, 16, kSbo), kb(tK, 16, kSbo), doa(do_wg, 16, kSbo), vb(tV, 16, kSbo);
  cute::warpgroup_arrive();
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int pn = kk / 4, within = (kk % 4) * 16;
    const uint64_t da = qa.at(pn * kRows * kPanel + within);
    const uint64_t db = kb.at(pn * kKvPanel + within);
    gmma_ss<typename Gmma<T, 128>::SS>(da, db, s, kk > 0, std::make_index_sequence<64>{});
  }
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int pn = kk / 4, within = (kk % 4) * 16;
    const uint64_t da = doa.at(pn * kRows * kPanel + within);
    const uint64_t db = vb.at(pn * kKvPanel + within);
    gmma_ss<typename Gmma<T, 128>::SS>(da, db, dp, kk > 0, std::make_index_sequence<64>{});
  }
  cute::warpgroup_commit_batch();
}

template <typename T, int D, int kHeads>
__global__ void __launch_bounds__(kWsThreads, 1)
    sparse_attention_dq_sm90_kernel(const Params p, const __grid_constant__ TmaMaps maps,
                                    const __grid_constant__ CUtensorMap grad_o_map) {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  using Cfg = DqConfig<D>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kRowsH = kRows / kHeads;
  constexpr int kWgPerHead = 2 / kHeads;
  constexpr int kPanels = D / kPanel;
  constexpr int kBox = kTile * kPanel;
  constexpr uint32_t kBoxBytes = kBox * sizeof(T);
  constexpr int kKvPanel = Cfg::kSlots * kBox;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ QueryPlan plan;
  __shared__ __align__(8) uint64_t full_bar[kStages], empty_bar[kStages], q_bar;
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  T* sdO = sQ + kRows * D;           // [panel][128 rows][64]
  T* sK = sdO + kRows * D;           // [panel][slot][64][64]
  T* sV = sK + kPanels * kKvPanel;   // [panel][slot][64][64]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int heads_cta = p.heads_q / kHeads;
  const int b = blockIdx.y / heads_cta, h0 = (blockIdx.y % heads_cta) * kHeads, hkv = h0 / (p.heads_q / p.heads_kv);
  const int i0 = qt * kRowsH, i1 = min(i0 + kRowsH - 1, p.seq - 1);
  if (tid == 0) {
    build_query_plan(plan, p, b, hkv, i0, i1);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(&full_bar[st], 1);
      mbar_init(&empty_bar[st], 8);  // one arrive per consumer warp
    }
    mbar_init(&q_bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async_smem();
  }
  __syncthreads();
  const int n_tiles = __shfl_sync(0xffffffffu, plan.count(), 0);  // warp-uniform for the compiler, as in the forward
  const int n_steps = (n_tiles + 1) / 2;

  if (wg == 0) {
    // ---- producer: one thread ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid != 0) return;
    const int kv_head = b * p.heads_kv + hkv;
    mbar_arrive_expect_tx(&q_bar, 2 * 2 * kPanels * kBoxBytes);
    for (int half = 0; half < 2; ++half) {
      const int head = b * p.heads_q + h0 + (kHeads == 2 ? half : 0);
      const int row = i0 + (kHeads == 2 ? 0 : 64 * half);
      for (int pn = 0; pn < kPanels; ++pn) {
        tma_load_box(sQ + pn * kRows * kPanel + half * kBox, &maps.q, &q_bar, pn * kPanel, row, head);
        tma_load_box(sdO + pn * kRows * kPanel + half * kBox, &grad_o_map, &q_bar, pn * kPanel, row, head);
      }
    }
    for (int step = 0; step < n_steps; ++step) {
      const int st = step % kStages;
      if (step >= kStages) mbar_wait(&empty_bar[st], ((step / kStages) - 1) & 1);
      mbar_arrive_expect_tx(&full_bar[st], 2 * 2 * kPanels * kBoxBytes);
      for (int u = 0; u < 2; ++u) {
        const int key0 = 2 * step + u < n_tiles ? plan.tile(2 * step + u) * kTile : p.seq;
        const int slot = 2 * st + u;
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_box(sK + pn * kKvPanel + slot * kBox, &maps.k, &full_bar[st], pn * kPanel, key0, kv_head);
          tma_load_box(sV + pn * kKvPanel + slot * kBox, &maps.v, &full_bar[st], pn * kPanel, key0, kv_head);
        }
      }
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = __shfl_sync(0xffffffffu, wg - 1, 0), wq = warp & 3;  // cw warp-uniform for the compiler
  const int64_t S = p.seq;
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h0 + cw / kWgPerHead;
  const int tiles_per_block = p.block_size / kTile;
  const int g = lane >> 2, tq = lane & 3;
  int row_i[2], row_ds[2];
  float row_lse[2], row_delta[2];
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    row_i[hf] = i0 + (cw % kWgPerHead) * 64 + wq * 16 + g + hf * 8;
    const int ic = min(row_i[hf], p.seq - 1);
    row_ds[hf] = doc_start(p, ic);
    row_lse[hf] = lse_log2(p.lse_in[bh * S + ic]);
    row_delta[hf] = p.delta[bh * S + ic];
  }
  float s[64], dp[64], dq[D / 2];
  #pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = dp[i] = 0.f;
  #pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
  const T* q_wg = sQ + cw * 64 * kPanel;
  const T* do_wg = sdO + cw * 64 * kPanel;

  mbar_wait(&q_bar, 0);
  for (int step = 0; step < n_steps; ++step) {
    const int st = step % kStages;
    const bool pair = 2 * step + 1 < n_tiles;
    int k0[2];
    bool listed[2], full[2];
    #pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int n = min(2 * step + u, n_tiles - 1);
      const int kv_tile = plan.tile(n);
      k0[u] = kv_tile * kTile;
      listed[u] = plan.listed(n, kv_tile, tiles_per_block);
      full[u] = tile_fully_visible(p, i0, i1, plan.ds_first, plan.ds_last, k0[u], k0[u] + kTile - 1, listed[u]);
    }
    full[1] = full[1] && pair;
    mbar_wait(&full_bar[st], (step / kStages) & 1);
    fence_regs(s);
    fence_regs(dp);
    issue_s_dp<T, D, kKvPanel>(s, dp, q_wg, do_wg, sK + 2 * st * kBox, sV + 2 * st * kBox);
    cute::warpgroup_wait<0>();
    fence_regs(s);
    fence_regs(dp);
    // dS = P (dP - Delta) (the softmax scale comes at the end); both 64-key slots fully visible (most steps
    // of a window) skip the element rule.
    if (full[0] && full[1]) {
      #pragma unroll
      for (int n = 0; n < 16; ++n) {
        #pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e >> 1;
          const float pr = fast_exp2(fmaf(s[4 * n + e], p.scale_log2, -row_lse[hf]));
          s[4 * n + e] = pr * (dp[4 * n + e] - row_delta[hf]);
        }
      }
    } else {
      // One branch per 64-key tile (flags inside the element test become a bit mask built on every step,
      // as in the forward).
      #pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (full[u]) {
          #pragma unroll
          for (int n = 8 * u; n < 8 * u + 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int hf = e >> 1;
              const float pr = fast_exp2(fmaf(s[4 * n + e], p.scale_log2, -row_lse[hf]));
              s[4 * n + e] = pr * (dp[4 * n + e] - row_delta[hf]);
            }
          }
        } else {
          #pragma unroll
          for (int n = 8 * u; n < 8 * u + 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int hf = e >> 1, j = k0[u] + (n & 7) * 8 + 2 * tq + (e & 1);
              const bool ok = sparse_attends(row_i[hf], j, row_ds[hf], listed[u], p.window, p.sink_tokens);
              const float pr = ok ? fast_exp2(fmaf(s[4 * n + e], p.scale_log2, -row_lse[hf])) : 0.f;
              s[4 * n + e] = pr * (dp[4 * n + e] - row_delta[hf]);
            }
          }
        }
      }
      if (!pair) {  // the missing second tile of an odd count (a branch of its own, as in the forward)
        #pragma unroll
        for (int i = 32; i < 64; ++i) s[i] = 0.f;
      }
    }
    uint32_t da[8][4];
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      #pragma unroll
      for (int r = 0; r < 4; ++r) da[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    }
    fence_regs(dq);
    issue_pv<T, D, kKvPanel, 8>(dq, da, sK + 2 * st * kBox);  // dQ += dS K
    cute::warpgroup_wait<0>();
    fence_regs(dq);
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      #pragma unroll
      for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(da[kk][r]);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_bar[st]);
  }

  T* dqh = static_cast<T*>(p.dq) + bh * S * D;
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = row_i[hf];
    if (i >= p.seq) continue;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(dqh + static_cast<int64_t>(i) * D + n * 8 + 2 * tq) =
          pack2<T>(dq[4 * n + 2 * hf] * p.scale, dq[4 * n + 2 * hf + 1] * p.scale);
    }
  }
}

}  // namespace anvil::ops::sparse_cuda::sm90
