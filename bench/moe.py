"""bench/moe: anvil's MoE routing kernels beside the composites of torch ops a PyTorch/LibTorch user
writes today, in one run, with the copy-bandwidth ceiling measured in the same run.

Goals (issue [moe]):
- moe_gate, DeepSeek-V3 routing (E 256, 8 groups, top-4 groups, top-8, sigmoid + bias, fp32 logits):
  at T = 65536 >= 40x faster than the eager composite (DeepseekV3TopkRouter's lines) and >= 50% of the
  HBM roofline (logits + bias read, weights + indices written, over the copy bandwidth);
  at T = 64 (launch bound; both sides timed inside CUDA graphs) >= 30x faster than the composite.
- moe_gate, softmax top-6 of 64 (bf16 logits, Mixtral-style composite) at T = 65536: >= 20x faster.
- routing, T = 16384, top-8 of 256: >= 10x faster than argsort + bincount (ANCHORS.md's "token permutation").
  moe_route computes the routing (slot rows, counts, padded offsets); the row gather that moe_permute
  adds moves 2 GB at H = 7168 and is bandwidth-bound for both sides, so it is timed as its own row.
torch.compile of the DeepSeek-V3 composite is timed as an extra column.

    python3 bench/moe.py [--json out.json]        (scripts/gpu-bench.sh moe)
"""
import argparse

import torch

import anvil
from common import copy_bandwidth_gbs, device_info, graph_ms, rotating, time_ms, write_json


def composite_v3(logits, bias, top_k=8, n_group=8, topk_group=4, routed_scale=2.5):
    """What users run today: DeepseekV3TopkRouter.forward after its linear (transformers 5.17.0,
    models/deepseek_v3/modeling_deepseek_v3.py), line for line in eager torch."""
    num_experts = logits.shape[-1]
    scores = logits.sigmoid()
    scores_for_choice = scores + bias
    group_scores = (
        scores_for_choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
    topk_weights = topk_weights / denominator
    return topk_weights * routed_scale, topk_indices


def v3_choice_scores(logits, bias, n_group=8, topk_group=4):
    """The composite's selection scores (after group masking), to judge disagreements."""
    e = logits.shape[-1]
    c = logits.float().sigmoid() + bias
    gs = c.view(-1, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(gs).scatter_(1, torch.topk(gs, topk_group, dim=-1)[1], 1).bool()
    return c.masked_fill(~keep.repeat_interleave(e // n_group, 1), float("-inf"))


def composite_softmax_topk(logits, top_k=6):
    """Mixtral-style (transformers MixtralTopKRouter): softmax in fp32, top-k, renormalize."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), idx


def composite_permute(hidden, indices, num_experts):
    """Expert-ordered rows the way MoE layers build them today: a stable argsort of the flattened expert
    ids, bincount for the group sizes, and a gather of the token rows."""
    flat = indices.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return hidden.index_select(0, order // indices.shape[1]), counts


def check_routing(name, w, idx, w_ref, idx_ref, choice):
    """Ours == composite: the same experts per token (as sets) and close weights. A token whose sets
    differ is accepted only if the composite's own selection scores of both choices are equal (an exact
    or ulp-level tie, which the composite's torch.topk breaks its own way); at most 1e-4 of tokens
    otherwise, from near-ties where torch's sigmoid/softmax and anvil's differ by an ulp."""
    a, b = idx.long().sort(-1), idx_ref.long().sort(-1)
    same = (a.values == b.values).all(-1)
    ours_sel = choice.gather(1, idx.long()).sort(-1).values
    ref_sel = choice.gather(1, idx_ref.long()).sort(-1).values
    tie = torch.isclose(ours_sel, ref_sel, rtol=1e-6, atol=0).all(-1)
    unexplained = (~same & ~tie).float().mean().item()
    assert unexplained <= 1e-4, f"{name}: {unexplained:.2e} of tokens routed differently from the composite"
    wa, wb = w.gather(1, a.indices)[same], w_ref.float().gather(1, b.indices)[same]
    assert torch.allclose(wa, wb, rtol=1e-5, atol=1e-6), f"{name}: weights differ from the composite"
    print(f"  {name}: {same.float().mean().item() * 100:.3f}% of tokens the same experts, the rest ties "
          f"({unexplained * idx.shape[0]:.0f} near-ties)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    info = device_info()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{info['device']}, torch {info['torch']}, {info['date']}; copy bandwidth {copy_gbs:.0f} GB/s (read+write)")
    torch.manual_seed(0)
    dev = "cuda"
    results, goals = [], []

    # --- DeepSeek-V3 gate, T = 65536 and T = 64 ---------------------------------------------------------
    e, k = 256, 8
    bias = (torch.rand(e, device=dev) * 0.2 - 0.1).contiguous()
    ours_v3 = lambda x: anvil.ops.moe_gate(x, bias, None, k, 8, 4, "sigmoid", True, 2.5)
    big = torch.randn(65536, e, device=dev) * 2
    small = torch.randn(64, e, device=dev) * 2
    print("\nchecks (ours against the composite, before timing):")
    for name, x in (("deepseek-v3 T=65536", big), ("deepseek-v3 T=64", small)):
        w, idx = ours_v3(x)
        w_ref, idx_ref = composite_v3(x, bias)
        check_routing(name, w, idx, w_ref, idx_ref, v3_choice_scores(x, bias))
    soft = (torch.randn(65536, 64, device=dev) * 2).to(torch.bfloat16)
    ours_soft = lambda: anvil.ops.moe_gate(soft, None, None, 6, 1, 1, "softmax", True, 1.0)
    w, idx = ours_soft()
    w_ref, idx_ref = composite_softmax_topk(soft)
    check_routing("softmax top-6 of 64 bf16", w, idx, w_ref, idx_ref, torch.softmax(soft.float(), -1))

    t_perm, h, e_perm = 16384, 7168, 256
    hidden = torch.randn(t_perm, h, device=dev, dtype=torch.bfloat16)
    _, perm_idx = anvil.ops.moe_gate(torch.randn(t_perm, e_perm, device=dev), None, None, k, 1, 1, "sigmoid", True, 1.0)
    perm_idx64 = perm_idx.long()   # what torch.topk hands the composite
    permuted, slot_rows, counts, offsets, dropped = anvil.ops.moe_permute(hidden, perm_idx, e_perm, 1, -1)
    permuted_ref, counts_ref = composite_permute(hidden, perm_idx64, e_perm)
    assert torch.equal(permuted[: t_perm * k], permuted_ref), "permute: rows differ from the composite"
    assert torch.equal(counts.long(), counts_ref) and int(dropped) == 0, "permute: counts differ"
    print("  permute: rows and counts equal to the composite")
    del permuted, permuted_ref

    compiled_big = torch.compile(composite_v3, dynamic=False)
    compiled_small = torch.compile(composite_v3, dynamic=False)

    # --- timing -------------------------------------------------------------------------------------------
    print(f"\n{'case':<44}{'ours ms':>10}{'GB/s':>7}{'% copy':>8}{'composite ms':>14}{'speedup':>9}{'compiled ms':>13}")

    def row(name, t_ours, t_ref, nbytes, t_compiled=None, timing="events"):
        gbs = nbytes / t_ours / 1e6
        r = {"case": name, "timing": timing, "ours_ms": t_ours, "ours_gbs": gbs, "fraction_of_copy": gbs / copy_gbs,
             "composite_ms": t_ref, "speedup_vs_composite": t_ref / t_ours}
        if t_compiled is not None:
            r["compiled_composite_ms"] = t_compiled
        results.append(r)
        comp = f"{t_compiled:13.4f}" if t_compiled is not None else f"{'':13}"
        print(f"{name:<44}{t_ours:10.4f}{gbs:7.0f}{100 * gbs / copy_gbs:7.1f}%{t_ref:14.4f}"
              f"{t_ref / t_ours:8.1f}x{comp}")
        return r

    def gate_bytes(t, e_, k_, logit_bytes, with_bias):
        # logits read, the bias read (once), weights (fp32) and indices (int32) written
        return t * e_ * logit_bytes + (e_ * 4 if with_bias else 0) + t * k_ * 8

    def maybe(what, fn):
        """A compiled-composite timing, or None (printed) where torch.compile fails on this machine."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 (an extra column must not stop the bench)
            print(f"  torch.compile {what}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            return None

    r = row("deepseek-v3 gate T=65536 fp32", time_ms(lambda: ours_v3(big)), time_ms(lambda: composite_v3(big, bias)),
            gate_bytes(65536, e, k, 4, True), maybe("T=65536", lambda: time_ms(lambda: compiled_big(big, bias))))
    goals.append(("deepseek-v3 gate T=65536", r["speedup_vs_composite"] >= 40 and r["fraction_of_copy"] >= 0.5,
                  f"{r['speedup_vs_composite']:.1f}x the composite (>= 40x), "
                  f"{100 * r['fraction_of_copy']:.1f}% of copy bandwidth (>= 50%)"))

    t_small_compiled = maybe("T=64 in a CUDA graph", lambda: graph_ms(lambda: compiled_small(small, bias)))
    r = row("deepseek-v3 gate T=64 fp32 (CUDA graphs)", graph_ms(lambda: ours_v3(small)),
            graph_ms(lambda: composite_v3(small, bias)), gate_bytes(64, e, k, 4, True), t_small_compiled,
            timing="cuda graphs")
    goals.append(("deepseek-v3 gate T=64", r["speedup_vs_composite"] >= 30,
                  f"{r['speedup_vs_composite']:.1f}x the composite, both in CUDA graphs (>= 30x)"))
    row("deepseek-v3 gate T=64 fp32 (eager launches)", time_ms(lambda: ours_v3(small), reps=200),
        time_ms(lambda: composite_v3(small, bias), reps=200), gate_bytes(64, e, k, 4, True),
        maybe("T=64", lambda: time_ms(lambda: compiled_small(small, bias), reps=200)), timing="events, eager")

    # 8 MB of logits fit in L2: both sides rotate through 8 sets (67 MB).
    soft_pool = [(torch.randn(65536, 64, device=dev) * 2).to(torch.bfloat16) for _ in range(8)]
    r = row("softmax top-6 of 64 T=65536 bf16",
            time_ms(rotating(lambda x: anvil.ops.moe_gate(x, None, None, 6, 1, 1, "softmax", True, 1.0), soft_pool)),
            time_ms(rotating(composite_softmax_topk, soft_pool)),
            gate_bytes(65536, 64, 6, 2, False))
    goals.append(("softmax top-6 of 64 T=65536", r["speedup_vs_composite"] >= 20,
                  f"{r['speedup_vs_composite']:.1f}x the composite (>= 20x)"))

    def composite_route(indices, num_experts):
        flat = indices.flatten()
        return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)

    r = row(f"route T={t_perm} top-8 of 256 (no gather)", time_ms(lambda: anvil.ops.moe_route(perm_idx, e_perm, 1, -1)),
            time_ms(lambda: composite_route(perm_idx64, e_perm)), t_perm * k * 8)
    goals.append(("route T=16384 top-8 of 256", r["speedup_vs_composite"] >= 10,
                  f"{r['speedup_vs_composite']:.1f}x argsort+bincount (>= 10x)"))

    # permute bytes: hidden read once, every row of the (R, H) buffer written, indices read, slot_rows written
    perm_bytes = t_perm * h * 2 + t_perm * k * h * 2 + t_perm * k * 8
    r = row(f"permute T={t_perm} top-8 of 256 H={h} bf16",
            time_ms(lambda: anvil.ops.moe_permute(hidden, perm_idx, e_perm, 1, -1)),
            time_ms(lambda: composite_permute(hidden, perm_idx64, e_perm)), perm_bytes)
    print(f"  (permute with the gather: {r['speedup_vs_composite']:.1f}x argsort+bincount+gather; both bandwidth-bound)")

    print()
    for name, ok, text in goals:
        print(f"goal {name}: {text}: {'met' if ok else 'NOT met'}")
    met = all(ok for _, ok, _ in goals)
    print(f"goal moe: {sum(ok for _, ok, _ in goals)} of {len(goals)} met: {'met' if met else 'NOT met'}")
    write_json(args.json, {"bench": "moe", **info, "copy_gbs": copy_gbs, "results": results,
                           "goals": [{"goal": n, "met": ok, "detail": t} for n, ok, t in goals], "goal_met": met})


if __name__ == "__main__":
    main()
