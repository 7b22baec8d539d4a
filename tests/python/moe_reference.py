"""The MoE routing ops written again in plain torch, from docs/FORMATS.md ("MoE routing"), for the
tests in test_moe.py: loops and sorts a reader can check against the text line by line, in float64
unless told otherwise, with the documented tie rule (lower expert index wins) made explicit by
stable sorts. Also the input generators those tests share (tie-free rows, discrete tied values)."""
import itertools

import torch


def stable_topk(x, k):
    """Indices of the k largest entries of each row of x, largest first; equal values in index order
    (a stable descending sort keeps equal keys in their original order). -0.0 and 0.0 compare equal."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def gate_scores(logits, score, dtype=torch.float64):
    """(T, E) s: sigmoid or softmax over E of the logits, computed in dtype."""
    x = logits.to(dtype)
    if score == "sigmoid":
        return torch.sigmoid(x)
    if score == "softmax":
        return torch.softmax(x, dim=-1)
    raise ValueError(score)


def gate(logits, bias=None, noise=None, top_k=1, n_group=1, topk_group=1, score="softmax", renormalize=True,
         routed_scale=1.0, dtype=torch.float64):
    """moe_gate as FORMATS.md states it. Returns (weights (T, k) in dtype, indices (T, k) int32) in
    descending order of selection score, ties to the lower index; also the (T, E) selection scores c
    after group masking, for callers that measure margins."""
    s = gate_scores(logits, score, dtype)                     # (T, E)
    t, e = s.shape
    c = s.clone()                                             # (T, E) selection scores
    if bias is not None:
        c = c + bias.to(dtype)
    if noise is not None:
        c = c + noise.to(dtype)
    if n_group > 1:
        per = e // n_group
        cg = c.view(t, n_group, per)                          # (T, G, E/G)
        if score == "sigmoid":
            top2 = torch.sort(cg, dim=-1, descending=True, stable=True).values[..., :2]
            group_score = top2[..., 0] + top2[..., 1]         # (T, G) sum of the two largest
        else:
            group_score = cg.amax(dim=-1)                     # (T, G) the largest
        kept = stable_topk(group_score, topk_group)           # (T, topk_group)
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=c.device)
        keep.scatter_(1, kept, True)
        # transformers 5.17: DeepseekV3TopkRouter masks with -inf, DeepseekV2Moe (softmax) with 0.0
        c = c.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf") if score == "sigmoid" else 0.0)
    idx = stable_topk(c, top_k)                               # (T, k)
    w = s.gather(1, idx)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scale, idx.to(torch.int32), c


def weights_from_indices(logits, indices, score, renormalize, routed_scale):
    """The weights of moe_gate for given indices, differentiable wrt logits (any float dtype): the
    oracle for moe_gate_backward."""
    s = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, dim=-1)
    w = s.gather(1, indices.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scale


def routing_margin(logits, bias, top_k, n_group, topk_group, score):
    """(T,) the smallest relative gap, per token, among the comparisons that decide the routing: the
    topk_group-th against the next group score, the top_k-th against the next selection score, and
    neighbouring selected weights (their order is compared too). A row with margin >> 1 ulp routes the
    same under any faithful fp32 arithmetic, ties or no tie rule."""
    _, idx, c = gate(logits, bias, None, top_k, n_group, topk_group, score, False, 1.0)
    t, e = c.shape
    rel = lambda a, b: (a - b).abs() / torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
    gaps = []
    if n_group > 1:
        s = gate_scores(logits, score) + (0 if bias is None else bias.double())
        cg = s.view(t, n_group, e // n_group)
        if score == "sigmoid":
            gs = torch.sort(cg, dim=-1, descending=True).values[..., :2].sum(-1)
        else:
            gs = cg.amax(-1)
        gs = torch.sort(gs, dim=-1, descending=True).values
        if topk_group < n_group:
            gaps.append(rel(gs[:, topk_group - 1], gs[:, topk_group]))
    cs = torch.sort(c, dim=-1, descending=True).values
    if top_k < e:
        gaps.append(rel(cs[:, top_k - 1], cs[:, top_k]))
    ws = torch.sort(gate_scores(logits, score).gather(1, idx.long()), dim=-1, descending=True).values
    if top_k > 1:
        gaps.append(rel(ws[:, :-1], ws[:, 1:]).amin(-1))
    if not gaps:
        return torch.full((t,), float("inf"), dtype=torch.float64)
    return torch.stack(gaps, -1).amin(-1)


def tie_free_logits(t, e, dtype, gen, margin, route, scale=2.0):
    """(t, e) logits in dtype, standard normal times scale, keeping only rows whose routing_margin (of
    the values as dtype holds them) exceeds margin. route: dict of top_k, n_group, topk_group, score,
    bias."""
    rows, have = [], 0
    while have < t:
        x = (torch.randn(2 * t + 16, e, generator=gen, dtype=torch.float64) * scale).to(dtype)
        m = routing_margin(x.float(), route.get("bias"), route["top_k"], route.get("n_group", 1),
                           route.get("topk_group", 1), route["score"])
        x = x[m > margin]
        rows.append(x)
        have += x.shape[0]
    return torch.cat(rows)[:t].contiguous()


# Discrete logits: many exact ties. The values are multiples of 1/4 (exact in bf16 and fp16), and chosen
# so that the sigmoids, and the sums of two sigmoids (the DeepSeek-V3 group score), of different values
# differ by far more than an ulp; min_gap() checks that where a test relies on it.
TIE_VALUES = (-2.5, -1.25, -0.5, 0.25, 1.0, 1.75, 3.0)


def discrete(shape, values, gen, probs=None):
    """A tensor of the given shape drawn from values (fp32), uniformly or with the given weights."""
    v = torch.tensor(values, dtype=torch.float32)
    p = torch.ones(len(values)) if probs is None else torch.tensor(probs, dtype=torch.float32)
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return torch.empty(shape)
    pick = torch.multinomial(p, n, replacement=True, generator=gen)
    return v[pick].reshape(shape)


def min_gap(values):
    """Smallest difference between two distinct values (float64)."""
    v = sorted({round(float(x), 13) for x in values})
    return min((b - a for a, b in zip(v, v[1:])), default=float("inf"))


def pair_sums(values):
    return [a + b for a, b in itertools.combinations_with_replacement([float(v) for v in values], 2)]


def permute(hidden, indices, num_experts, align=1, capacity=-1):
    """moe_permute as FORMATS.md states it: (permuted (R, H), slot_rows (T, k) int32, counts (E) int32,
    offsets (E + 1) int32, dropped () int32), R = T*k + E*(align - 1)."""
    t, k = indices.shape
    flat = indices.reshape(-1).long()                         # slot s = t*k + j, token order
    order = torch.sort(flat, stable=True).indices             # slots grouped by expert, token order within
    total = torch.bincount(flat, minlength=num_experts)       # (E) slots per expert before capacity
    start = torch.cumsum(total, 0) - total                    # first position of each expert in order
    rank = torch.empty_like(flat)
    rank[order] = torch.arange(flat.numel()) - start[flat[order]]
    kept = rank < capacity if capacity >= 0 else torch.ones_like(flat, dtype=torch.bool)
    counts = torch.bincount(flat[kept], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long)
    for ex in range(num_experts):
        offsets[ex + 1] = offsets[ex] + (counts[ex] + align - 1) // align * align
    slot = torch.where(kept, offsets[flat] + rank, torch.full_like(flat, -1))
    r = t * k + num_experts * (align - 1)
    permuted = torch.zeros(r, hidden.shape[1], dtype=hidden.dtype)
    token = torch.arange(t * k) // k
    permuted[slot[kept]] = hidden[token[kept]]
    dropped = torch.tensor(int((~kept).sum()), dtype=torch.int32)
    return (permuted, slot.view(t, k).to(torch.int32), counts.to(torch.int32), offsets.to(torch.int32), dropped)


def unpermute(expert_out, slot_rows, weights):
    """out[t] = sum_j weights[t, j] * expert_out[slot_rows[t, j]] over kept slots (slot_rows >= 0), in
    float64 (the op accumulates in fp32 and rounds to expert_out's dtype)."""
    t, k = slot_rows.shape
    out = torch.zeros(t, expert_out.shape[1], dtype=torch.float64)
    x = expert_out.double()
    for j in range(k):
        rows = slot_rows[:, j].long()
        kept = rows >= 0
        out[kept] += weights[kept, j].double().unsqueeze(1) * x[rows[kept]]
    return out


def distinct_indices(t, e, k, gen):
    """(t, k) int32 expert ids, k distinct per token, uniformly random (what a router produces)."""
    if t == 0:
        return torch.empty(0, k, dtype=torch.int32)
    return torch.rand(t, e, generator=gen).argsort(-1)[:, :k].to(torch.int32).contiguous()
