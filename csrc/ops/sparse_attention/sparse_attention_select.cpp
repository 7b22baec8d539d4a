// select_blocks as a composite of ATen ops, the CUDA implementation (it runs on any device, so the CPU
// tests compare it with the loops of sparse_attention_cpu.cpp). Query blocks are processed in chunks so
// the (heads, queries, blocks) score tensor stays under ~512 MiB at any S; every reduction is a plain sum
// over a fixed axis and the ranking a stable sort, so the result is deterministic (ties: lower block).
#include "ops/sparse_attention/sparse_attention_common.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

namespace anvil::ops {

at::Tensor select_blocks_aten(const at::Tensor& q, const at::Tensor& k, const SelectBlocksConfig& c,
                              const c10::optional<at::Tensor>& cu_seqlens) {
  const int64_t B = c.batch, Hkv = c.heads_kv, G = c.heads_q / c.heads_kv, S = c.seq, D = c.dim;
  const int64_t bs = c.block_size, NB = c.num_blocks;
  const auto fopt = q.options().dtype(at::kFloat);
  const auto lopt = q.options().dtype(at::kLong);
  // Mean-pooled keys per block: (B, Hkv, NB, D); the last block averages only the keys it holds.
  const auto kpad = at::constant_pad_nd(k.to(at::kFloat), {0, 0, 0, NB * bs - S});
  const auto held = (S - at::arange(NB, lopt) * bs).clamp_max(bs).to(at::kFloat);   // (NB)
  const auto kbar = kpad.view({B, Hkv, NB, bs, D}).sum(3) / held.view({1, 1, NB, 1});  // (B, Hkv, NB, D)
  // Document start of every position (S), long.
  at::Tensor ds = at::zeros({S}, lopt);
  if (cu_seqlens.has_value()) {
    const auto cu = cu_seqlens->to(at::kLong);
    const auto d = at::searchsorted(cu, at::arange(S, lopt), /*out_int32=*/false, /*right=*/true) - 1;
    ds = cu.index_select(0, d.clamp(0, cu.numel() - 1));
  }
  const auto kb = at::arange(NB, lopt);  // (NB)
  auto out = at::full({B, Hkv, NB, c.top_n}, -1, q.options().dtype(at::kInt));
  const int64_t bytes_per_qblock = B * c.heads_q * bs * NB * 4;
  const int64_t chunk = std::max<int64_t>(1, (int64_t(512) << 20) / std::max<int64_t>(1, bytes_per_qblock));
  const int64_t keep = std::min(c.top_n, NB);
  for (int64_t qb0 = 0; qb0 < NB; qb0 += chunk) {
    const int64_t qb1 = std::min(NB, qb0 + chunk), nq = qb1 - qb0;
    const int64_t r0 = qb0 * bs, r1 = std::min(S, qb1 * bs), R = r1 - r0;
    // Each query's softmax over the blocks it may see: kb <= its block, reaching into its document.
    const auto qs = q.slice(2, r0, r1).to(at::kFloat).reshape({B, Hkv, G * R, D});
    auto logits = at::matmul(qs, kbar.transpose(-1, -2)).mul_(c.scale).view({B, Hkv, G, R, NB});
    const auto rows = at::arange(r0, r1, lopt);                                        // (R)
    const auto ds_rows = ds.slice(0, r0, r1);                                          // (R)
    const auto eligible = (kb.view({1, NB}) <= rows.div(bs, "floor").view({R, 1})) &
                          ((kb.view({1, NB}) + 1) * bs > ds_rows.view({R, 1}));        // (R, NB)
    logits.masked_fill_(eligible.logical_not(), -std::numeric_limits<float>::infinity());
    auto score = logits.softmax(-1).sum(2);                                            // (B, Hkv, R, NB)
    score = at::constant_pad_nd(score, {0, 0, 0, nq * bs - R}).view({B, Hkv, nq, bs, NB}).sum(3);
    // Eligible blocks of a query block: from the block of its first query's document start to itself.
    const auto qbs = at::arange(qb0, qb1, lopt);                                       // (nq)
    const auto first_kb = ds.index_select(0, qbs * bs).div(bs, "floor");                         // (nq)
    const auto kbv = kb.view({1, NB});
    const auto elig = (kbv >= first_kb.view({nq, 1})) & (kbv <= qbs.view({nq, 1}));    // (nq, NB)
    const auto forced = elig & ((kbv < first_kb.view({nq, 1}) + c.sink_blocks) |
                                (kbv > qbs.view({nq, 1}) - c.local_blocks));
    auto key = at::where(elig, score, at::full({}, -std::numeric_limits<float>::infinity(), fopt));
    key = at::where(forced, at::full({}, std::numeric_limits<float>::infinity(), fopt), key);
    const auto [vals, idx] = key.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true);
    const auto top_vals = vals.slice(-1, 0, keep);
    auto sel = at::where(top_vals > -std::numeric_limits<float>::infinity(), idx.slice(-1, 0, keep),
                         at::full({}, NB, lopt));
    sel = std::get<0>(sel.sort(-1));
    sel = at::where(sel == NB, at::full({}, -1, lopt), sel);
    out.slice(2, qb0, qb1).slice(3, 0, keep).copy_(sel);
  }
  return out;
}

}  // namespace anvil::ops
