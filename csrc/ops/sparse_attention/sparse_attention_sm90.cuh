// The Hopper (sm_90a) forward of sparse_attention: the FlashAttention-2 loop of
// sparse_attention_kernels.cuh with both GEMMs on warpgroup MMA (wgmma), after FlashAttention-3's design.
// The tile walk (range A / range B / extra, QueryPlan) and the element rule (sparse_attends) are the
// mma.sync kernel's own, so the kernels visit the same key tiles and mask the same elements.
// One kernel: warp-specialized (a TMA producer warpgroup, 2 consumer warpgroups), 128-key steps, FA3's
// intra-warpgroup overlap and ping-pong. Two earlier designs were measured on the way and removed
// (GPU round 1, H100, window 4096, S = 32768, 16 heads, D = 128): 2 warpgroups loading with cp.async in
// 64-key steps 5.73 ms; the warp-specialized kernel without the overlap 4.31 ms; this one 2.40 ms (430
// TFLOP/s); the mma.sync kernel 6.55 ms.
//
// Shape: 128 query rows per CTA, 64 per consumer warpgroup: either 128 rows of one head
// (TileShape::kRows128) or 64 rows of two heads of a GQA group (kTwoHeads64). Key tiles are the plan's
// 64 keys (ranges and listed blocks are counted in 64-key tiles); a step takes two.
//   S = Q K^T   wgmma m64nNk16 (N = 64 or 128 keys), both operands in shared memory (Q and K K-major);
//   softmax     on the fp32 accumulator in registers (base 2, scale * log2 e folded in, as before);
//   O += P V    wgmma m64nDk16 with P as the register A operand ("RS"): the accumulator fragment of S
//               is, pair by pair, the A fragment of the second GEMM (both are the m16n8k16 layout per
//               warp: thread t holds rows t/4 and t/4 + 8, columns 2 (t % 4) + {0, 1} + 8 i), so P is
//               only converted to 16 bits, never moved; V is (keys, D) with D contiguous, i.e. the
//               MN-major B operand (wgmma's transposed-B flag).
// Shared memory holds every tile in the canonical 128-byte-swizzle layout of wgmma: a tile of R rows x D
// columns is D / 64 panels of R rows x 64 elements (128 bytes a row), panel after panel; inside a panel
// the 16-byte chunk c of row r sits at chunk c ^ (r & 7). Panels start on 1024-byte boundaries, so the
// swizzle the hardware applies to address bits [4, 7) ^ [7, 10) is exactly this one (and TMA's
// SWIZZLE_128B writes exactly this layout). Descriptors:
//   Q, K (K-major)  stride byte offset 1024 (8 rows x 128 B); k-steps of 16 columns add 32 bytes inside
//                   a panel, the next panel adds R x 128 bytes;
//   V (MN-major)    stride byte offset 1024 (8 keys), leading byte offset = the panel size (the next
//                   64 columns of D); k-steps of 16 keys add 16 x 128 bytes.
#pragma once

#include "ops/sparse_attention/sparse_attention_kernels.cuh"

#include <cuda.h>
#include <cute/arch/mma_sm90_gmma.hpp>

#include <utility>

namespace anvil::ops::sparse_cuda::sm90 {

constexpr int kRows = 128;        // query rows per CTA (64 per warpgroup)
constexpr int kPanel = 64;        // columns of a 128-byte swizzle panel (16-bit elements)

// wgmma shared-memory descriptors of the 128-byte swizzle layout (byte offsets in 16-byte units), built
// once per buffer and moved by element offsets inside it: at(n) adds n * sizeof(T) / 16 to the low word
// (start address, leading byte offset; no carry, shared memory is below 256 KB) and keeps the high word
// (stride byte offset, swizzle mode), a constant. Building each descriptor from its pointer (cvta, shifts,
// masks) cost ~10 integer instructions per wgmma, a third of the forward's consumer instructions.
template <typename T>
struct SwDesc {
  uint32_t lo, hi;
  __device__ __forceinline__ SwDesc(const T* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
    const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    lo = ((addr >> 4) & 0x3FFFu) | (((lbo_bytes >> 4) & 0x3FFFu) << 16);
    hi = ((sbo_bytes >> 4) & 0x3FFFu) | (1u << 30);  // SWIZZLE_128B: bit 62 of the descriptor
  }
  __device__ __forceinline__ uint64_t at(int elements) const {
    return (static_cast<uint64_t>(hi) << 32) | (lo + static_cast<uint32_t>(elements * static_cast<int>(sizeof(T))) / 16);
  }
};

__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The CuTe MMA atoms (raw wgmma PTX) for T = bf16 / fp16.
template <typename T, int N>
struct Gmma;
template <>
struct Gmma<__nv_bfloat16, 64> {
  using SS = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x64x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__nv_bfloat16, 128> {
  using SS = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x128x16_F32BF16BF16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__half, 64> {
  using SS = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x64x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};
template <>
struct Gmma<__half, 128> {
  using SS = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_SS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::K>;
  using RS = cute::SM90::GMMA::MMA_64x128x16_F32F16F16_RS<cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>;
};

// d (N / 2 floats per thread) (+)= A (smem) B (smem).
template <typename Op, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t da, uint64_t db, float* d, bool accumulate,
                                        std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., accumulate ? cute::SM90::GMMA::ScaleOut::One : cute::SM90::GMMA::ScaleOut::Zero);
}
// d (N / 2 floats per thread) += A (4 registers) B (smem).
template <typename Op, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t db, float* d, std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], db, d[I]..., cute::SM90::GMMA::ScaleOut::One);
}

// Keeps the compiler from moving reads or writes of wgmma accumulators across the fence/wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(r[i]);
}

// ---- warp specialization: TMA producer, mbarrier rings, 128-key steps ------------------------------
//
// 3 warpgroups (384 threads): warpgroup 0 is the producer (one thread issues every TMA copy; the
// warpgroup gives up registers with setmaxnreg), warpgroups 1 and 2 are the consumers of 64 query rows
// each (they take the registers). Q arrives once (q_bar); K and V come in rings of stages of two
// 64-key slots each (PpConfig below): one step of the consumers is two plan tiles (128 keys), S = Q K^T as one m64n128k16
// chain, O += P V as 8 k16 steps. The last step of an odd count loads its second slot from past S (TMA
// fills it with zeros) and masks it: every step runs the same wgmma chains, no branch in between (a
// branch there makes ptxas serialize the wgmmas).
// The slots of a step lie next to each other inside each 64-column panel ([panel][slot][64 keys][64]),
// so the two tiles read as one 128-key operand whichever key tiles they are.
// Barriers per stage: full (the producer's arrive.expect_tx + the TMA bytes) and empty (one arrive per
// consumer warp after its PV wgmma completed). No CTA-wide barrier in the loop: the two consumer
// warpgroups drift apart, so one's softmax runs under the other's GEMMs.
// TMA copies (D, 64 rows) boxes of 64 columns with the 128-byte swizzle, which is the wgmma layout above;
// rows past S arrive as zeros (out of bounds of the tensor map's S dimension).

constexpr int kWsThreads = 384;

struct TmaMaps {
  CUtensorMap q, k, v;  // 3-d: (D, S, B * H), boxes (64, 64, 1), 128-byte swizzle
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}
// One (64 columns, 64 rows) box of a 3-d tensor map into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_box(void* dst, const CUtensorMap* map, uint64_t* bar, int col, int row,
                                             int head) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(col), "r"(row), "r"(head)
      : "memory");
}

// 2^x by the MUFU instruction alone (exp2f adds a range fix-up for denormal results; P in [0, 1] is
// rounded to 16 bits right after, so flushing those to zero changes nothing that survives).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// S (+)= Q K^T for one step: 128 keys (two slots) or 64 (one).
template <typename T, int D, int kKvPanel, bool kPair>
__device__ __forceinline__ void issue_qk(float (&s)[64], const T* q_wg, const T* tK) {
  constexpr uint32_t kSbo = 8 * 128;
  const SwDesc<T> qa(q_wg, 16, kSbo), kb(tK, 16, kSbo);
  cute::warpgroup_arrive();
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int pn = kk / 4, within = (kk % 4) * 16;
    const uint64_t da = qa.at(pn * kRows * kPanel + within);
    const uint64_t db = kb.at(pn * kKvPanel + within);
    if constexpr (kPair) {
      gmma_ss<typename Gmma<T, 128>::SS>(da, db, s, kk > 0, std::make_index_sequence<64>{});
    } else {
      gmma_ss<typename Gmma<T, 64>::SS>(da, db, s, kk > 0, std::make_index_sequence<32>{});
    }
  }
  cute::warpgroup_commit_batch();
}

// O += P V for one step: kSteps x 16 keys (8: two slots, 4: one).
template <typename T, int D, int kKvPanel, int kSteps>
__device__ __forceinline__ void issue_pv(float (&acc)[D / 2], const uint32_t (&pa)[8][4], const T* tV) {
  constexpr uint32_t kSbo = 8 * 128;
  const SwDesc<T> vb(tV, kKvPanel * sizeof(T), kSbo);
  cute::warpgroup_arrive();
  #pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    const uint64_t db = vb.at(kk * 16 * kPanel);
    gmma_rs<typename Gmma<T, D>::RS>(pa[kk], db, acc, std::make_index_sequence<D / 2>{});
  }
  cute::warpgroup_commit_batch();
}

// ---- the overlapped kernel: FlashAttention-3's intra-warpgroup overlap and ping-pong ------------------
//
// The consumer loop of FA3 on the warp-specialized structure above: step j issues S(j) = Q K_j^T and then
// O += P(j-1) V(j-1) back to back, waits for S(j) only, runs the softmax of step j while the PV GEMM of
// step j-1 is still in the tensor cores, then waits for it, rescales O and packs P(j) (so S of one step,
// P of the previous one and O are live at once: the consumers need about 200 registers, which
// setmaxnreg gives them). With `pingpong` the two consumer warpgroups take turns to issue their GEMMs
// (named barriers 1 and 2, warpgroup 0 first): one warpgroup's softmax runs under the other's GEMMs.
// Stages: 2 x 128 keys at D = 128 (Q 32 KB + K/V 128 KB), 4 at D = 64. K and V have separate full/empty
// barriers and the producer loads K one step ahead of V: K(j) is released when S(j) is done, V(j) when
// PV(j) is, so each load has about a step of slack even with two stages.

// kKStages: stages of the K ring (0: as many as V's). At D = 128 a third K stage still fits (192 KB).
template <int D, int kKStages = 0>
struct PpConfig {
  static constexpr int kStagesV = D == 64 ? 4 : 2;
  static constexpr int kStagesK = kKStages > 0 ? kKStages : kStagesV;
  static constexpr int kSmemBytes = (kRows + 2 * (kStagesK + kStagesV) * kTile) * D * 2 + 1024;
};

template <typename T, int D, int kHeads, int kKStages>
__global__ void __launch_bounds__(kWsThreads, 1)
    sparse_attention_fwd_sm90_pp_kernel(const Params p, const __grid_constant__ TmaMaps maps, const int pingpong) {
  static_assert(D == 64 || D == 128, "head dim 64 or 128");
  using Cfg = PpConfig<D, kKStages>;
  constexpr int kStK = Cfg::kStagesK, kStV = Cfg::kStagesV;
  constexpr int kRowsH = kRows / kHeads;
  constexpr int kWgPerHead = 2 / kHeads;
  constexpr int kPanels = D / kPanel;
  constexpr int kBox = kTile * kPanel;
  constexpr uint32_t kBoxBytes = kBox * sizeof(T);
  constexpr int kKPanel = 2 * kStK * kBox;  // elements of one panel of the K ring
  constexpr int kVPanel = 2 * kStV * kBox;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  __shared__ QueryPlan plan;
  // K and V have barriers of their own: K(j) is free once S(j) is done, V(j) only after PV(j).
  __shared__ __align__(8) uint64_t full_k[kStK], full_v[kStV], empty_k[kStK], empty_v[kStV], q_bar;
  T* sQ = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  T* sK = sQ + kRows * D;           // [panel][slot][64][64]
  T* sV = sK + kPanels * kKPanel;  // [panel][slot][64][64]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wg = warp >> 2;
  const int qt = gridDim.x - 1 - blockIdx.x;
  const int heads_cta = p.heads_q / kHeads;
  const int b = blockIdx.y / heads_cta, h0 = (blockIdx.y % heads_cta) * kHeads, hkv = h0 / (p.heads_q / p.heads_kv);
  const int i0 = qt * kRowsH, i1 = min(i0 + kRowsH - 1, p.seq - 1);
  if (tid == 0) {
    build_query_plan(plan, p, b, hkv, i0, i1);
    for (int st = 0; st < kStK; ++st) {
      mbar_init(&full_k[st], 1);
      mbar_init(&empty_k[st], 8);  // one arrive per consumer warp
    }
    for (int st = 0; st < kStV; ++st) {
      mbar_init(&full_v[st], 1);
      mbar_init(&empty_v[st], 8);
    }
    mbar_init(&q_bar, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    fence_proxy_async_smem();
  }
  __syncthreads();
  // Broadcast from lane 0 (as CUTLASS's canonical_warp_group_idx): the compiler then knows these are
  // warp-uniform and keeps the wgmma descriptors and loop state in uniform registers.
  const int n_tiles = __shfl_sync(0xffffffffu, plan.count(), 0);
  const int n_steps = (n_tiles + 1) / 2;

  if (wg == 0) {
    // ---- producer: one thread ----
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (tid != 0) return;
    const int kv_head = b * p.heads_kv + hkv;
    mbar_arrive_expect_tx(&q_bar, 2 * kPanels * kBoxBytes);
    for (int half = 0; half < 2; ++half) {
      const int head = b * p.heads_q + h0 + (kHeads == 2 ? half : 0);
      const int row = i0 + (kHeads == 2 ? 0 : 64 * half);
      for (int pn = 0; pn < kPanels; ++pn) {
        tma_load_box(sQ + pn * kRows * kPanel + half * kBox, &maps.q, &q_bar, pn * kPanel, row, head);
      }
    }
    // Step j's two slots of K (or V); always two: the missing second tile of an odd count is a box past
    // S, which TMA fills with zeros (P V then adds 0 x 0, and no branch splits the consumers' wgmma chains).
    auto load = [&](int step, T* ring, int ring_panel, int stages, const CUtensorMap* map, uint64_t* full,
                    uint64_t* empty) {
      const int st = step % stages;
      if (step >= stages) mbar_wait(&empty[st], ((step / stages) - 1) & 1);
      mbar_arrive_expect_tx(&full[st], 2 * kPanels * kBoxBytes);
      for (int u = 0; u < 2; ++u) {
        const int key0 = 2 * step + u < n_tiles ? plan.tile(2 * step + u) * kTile : p.seq;
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_box(ring + pn * ring_panel + (2 * st + u) * kBox, map, &full[st], pn * kPanel, key0, kv_head);
        }
      }
    };
    // K runs kStK - kStV + 1 steps ahead of V: K(j + 1) is needed before V(j) (S(j + 1) is issued with
    // PV(j)); a deeper K ring lets K run further ahead.
    constexpr int kAhead = kStK - kStV + 1;
    for (int step = 0; step < kAhead && step < n_steps; ++step) load(step, sK, kKPanel, kStK, &maps.k, full_k, empty_k);
    for (int step = 0; step < n_steps; ++step) {
      if (step + kAhead < n_steps) load(step + kAhead, sK, kKPanel, kStK, &maps.k, full_k, empty_k);
      load(step, sV, kVPanel, kStV, &maps.v, full_v, empty_v);
    }
    return;
  }

  // ---- consumers ----
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int cw = __shfl_sync(0xffffffffu, wg - 1, 0);  // warp-uniform for the compiler (see n_tiles)
  const int wq = warp & 3;
  const int64_t S = p.seq;
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h0 + cw / kWgPerHead;
  const int tiles_per_block = p.block_size / kTile;
  const int g = lane >> 2, tq = lane & 3;
  int row_i[2], row_ds[2];
  float row_max[2], row_sum[2], corr[2];
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    row_i[hf] = i0 + (cw % kWgPerHead) * 64 + wq * 16 + g + hf * 8;
    row_ds[hf] = doc_start(p, min(row_i[hf], p.seq - 1));
    row_max[hf] = -INFINITY;
    row_sum[hf] = 0.f;
    corr[hf] = 1.f;
  }
  float s[64];
  float acc[D / 2];
  uint32_t pa[8][4];
  #pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = 0.f;
  #pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  #pragma unroll
  for (int kk = 0; kk < 8; ++kk) pa[kk][0] = pa[kk][1] = pa[kk][2] = pa[kk][3] = 0u;
  const T* q_wg = sQ + cw * 64 * kPanel;
  const int my_bar = 1 + cw, other_bar = 2 - cw;

  // The softmax of a step: scale, mask (per element only where a tile is not fully visible; the
  // missing second tile of an odd count is masked whole), row max, exp2, row sums; corr rescales O.
  auto softmax = [&](int step) {
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
    // mul: what the exp's FFMA multiplies s by. The common case (no per-element test, scale > 0, so the
    // max of the raw scores is the max of the scaled ones) leaves s raw and folds the scale into the FFMA;
    // otherwise s is scaled (visible tiles) and masked (the others) in place and mul is 1.
    float mul = 1.f;
    if (full[0] && full[1] && p.scale_log2 > 0.f) {
      mul = p.scale_log2;
    } else {
      // One branch per 64-key tile, and the missing second tile of an odd count in a branch of its own:
      // with `full[u] || ...` and `&& pair` inside the element test, the compiler kept 64 copies of those
      // flags as a bit mask, built on every step (~100 instructions, the fully visible steps included).
      #pragma unroll
      for (int u = 0; u < 2; ++u) {
        if (full[u]) {
          #pragma unroll
          for (int i = 32 * u; i < 32 * u + 32; ++i) s[i] *= p.scale_log2;
        } else {
          #pragma unroll
          for (int n = 8 * u; n < 8 * u + 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int hf = e >> 1, j = k0[u] + (n & 7) * 8 + 2 * tq + (e & 1);
              const bool ok = sparse_attends(row_i[hf], j, row_ds[hf], listed[u], p.window, p.sink_tokens);
              s[4 * n + e] = ok ? s[4 * n + e] * p.scale_log2 : -INFINITY;
            }
          }
        }
      }
      if (!pair) {
        #pragma unroll
        for (int i = 32; i < 64; ++i) s[i] = -INFINITY;
      }
    }
    // Row max and row sum over four independent partials each: shorter dependency chains than one running
    // value (measured within noise of the single chain on the H100, 2026-11-23).
    float mx[2];
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float m4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
      #pragma unroll
      for (int n = 0; n < 16; ++n) m4[n & 3] = fmaxf(m4[n & 3], fmaxf(s[4 * n + 2 * hf], s[4 * n + 2 * hf + 1]));
      mx[hf] = fmaxf(fmaxf(m4[0], m4[1]), fmaxf(m4[2], m4[3]));
    }
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
    #pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      // Lazy rescaling (as FlashAttention-4): the running max moves only when the step's max passes it by
      // more than 8 (log2 units), so P <= 2^8 and O / l and lse stay exact, and most steps keep corr = 1
      // and skip the rescale of O (rescale_and_pack tests that per warp).
      const float m_step = fmaxf(row_max[hf], mx[hf] * mul);
      const float m_new = m_step > row_max[hf] + 8.f ? m_step : row_max[hf];
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      corr[hf] = m_new == row_max[hf] ? 1.f : fast_exp2(row_max[hf] - m_use);
      float s4[4] = {0.f, 0.f, 0.f, 0.f};
      #pragma unroll
      for (int n = 0; n < 16; ++n) {
        s[4 * n + 2 * hf] = fast_exp2(fmaf(s[4 * n + 2 * hf], mul, -m_use));
        s[4 * n + 2 * hf + 1] = fast_exp2(fmaf(s[4 * n + 2 * hf + 1], mul, -m_use));
        s4[n & 3] += s[4 * n + 2 * hf] + s[4 * n + 2 * hf + 1];
      }
      row_sum[hf] = row_sum[hf] * corr[hf] + ((s4[0] + s4[1]) + (s4[2] + s4[3]));
      row_max[hf] = m_new;
    }
  };
  auto rescale_and_pack = [&]() {
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
      #pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[4 * n + 0] *= corr[0];
        acc[4 * n + 1] *= corr[0];
        acc[4 * n + 2] *= corr[1];
        acc[4 * n + 3] *= corr[1];
      }
    }
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto fence_pa = [&]() {
    #pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      #pragma unroll
      for (int r = 0; r < 4; ++r) cute::warpgroup_fence_operand(pa[kk][r]);
    }
  };

  mbar_wait(&q_bar, 0);
  // Rounds of the ping-pong: step 0 issues S(0); step j in [1, n) issues S(j) and PV(j - 1); the last
  // round issues PV(n - 1). Each round: my barrier (the other warpgroup has issued), issue, the other's
  // barrier. Warpgroup 0 goes first; warpgroup 1 skips the arrive of the last round (nobody waits for it).
  if (n_steps > 0) {
    if (pingpong && cw == 1) named_arrive(other_bar, 2 * 128);
    mbar_wait(&full_k[0], 0);
    if (pingpong) named_sync(my_bar, 2 * 128);
    fence_regs(s);
    issue_qk<T, D, kKPanel, true>(s, q_wg, sK);
    if (pingpong) named_arrive(other_bar, 2 * 128);
    cute::warpgroup_wait<0>();
    fence_regs(s);
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty_k[0]);
    softmax(0);
    rescale_and_pack();
    for (int step = 1; step < n_steps; ++step) {
      const int st = step % kStK, prev_st = (step - 1) % kStV;
      mbar_wait(&full_k[st], (step / kStK) & 1);
      mbar_wait(&full_v[prev_st], ((step - 1) / kStV) & 1);
      if (pingpong) named_sync(my_bar, 2 * 128);
      fence_regs(s);
      issue_qk<T, D, kKPanel, true>(s, q_wg, sK + 2 * st * kBox);
      fence_regs(acc);
      fence_pa();
      issue_pv<T, D, kVPanel, 8>(acc, pa, sV + 2 * prev_st * kBox);
      if (pingpong) named_arrive(other_bar, 2 * 128);
      cute::warpgroup_wait<1>();  // S(step); PV(step - 1) may still run under the softmax
      fence_regs(s);
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty_k[st]);  // this warp is done with K(step)
      softmax(step);
      cute::warpgroup_wait<0>();
      fence_regs(acc);
      fence_pa();
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty_v[prev_st]);  // this warp is done with V(step - 1)
      rescale_and_pack();
    }
    const int last_st = (n_steps - 1) % kStV;
    mbar_wait(&full_v[last_st], ((n_steps - 1) / kStV) & 1);
    if (pingpong) named_sync(my_bar, 2 * 128);
    fence_regs(acc);
    fence_pa();
    issue_pv<T, D, kVPanel, 8>(acc, pa, sV + 2 * last_st * kBox);
    if (pingpong && cw == 0) named_arrive(other_bar, 2 * 128);
    cute::warpgroup_wait<0>();
    fence_regs(acc);
    fence_pa();
  }

  T* oh = static_cast<T*>(p.o) + bh * S * D;
  #pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = row_sum[hf];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int i = row_i[hf];
    if (i >= p.seq) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(oh + static_cast<int64_t>(i) * D + n * 8 + 2 * tq) =
          pack2<T>(acc[4 * n + 2 * hf] * inv, acc[4 * n + 2 * hf + 1] * inv);
    }
    if (tq == 0) p.lse[bh * S + i] = l > 0.f ? (row_max[hf] + log2f(l)) * kLn2 : -INFINITY;
  }
}

}  // namespace anvil::ops::sparse_cuda::sm90
