"""Packed training rows: which attention form is faster, the (B, 1, S, S) document mask through SDPA (its
memory-efficient kernel, the only one that takes a mask) or anvil's sparse_attention with cu_seqlens over
the flattened rows (the varlen path the model takes on CUDA)? Forward + backward, bf16, the 853M LoRA
bench's attention shape (batch 8 x 1024, 16 query heads, 4 kv heads, head dim 128), documents of random
lengths with the given mean.

    python3 bench/profile/packed_attention.py [--mean 256] [--seq 1024] [--batch 8]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import anvil  # noqa: E402,F401
from common import time_ms  # noqa: E402

ops = torch.ops.anvil


def doc_ids(b, s, mean, gen):
    ids = torch.empty(b, s, dtype=torch.long)
    for r in range(b):
        at, d = 0, 0
        while at < s:
            n = max(1, int(torch.empty(1).exponential_(1 / mean, generator=gen).item()))
            ids[r, at:at + n] = d
            at, d = at + n, d + 1
    return ids


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mean", type=int, default=256)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    b, s, hq, hk, d = a.batch, a.seq, 16, 4, 128
    gen = torch.Generator().manual_seed(0)
    ids = doc_ids(b, s, a.mean, gen).cuda()                                   # (B, S)
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hk, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    go = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
    causal = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
    mask = ((ids.unsqueeze(2) == ids.unsqueeze(1)) & causal).unsqueeze(1)    # (B, 1, S, S)
    starts = torch.ones(b, s, dtype=torch.bool, device="cuda")
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    cu = torch.cat([starts.reshape(-1).nonzero().reshape(-1),
                    torch.tensor([b * s], device="cuda")]).int()             # (docs + 1)

    def sdpa_mask_fwd():
        kk, vv = k.repeat_interleave(hq // hk, 1), v.repeat_interleave(hq // hk, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    def flat(t):
        return t.transpose(0, 1).reshape(1, t.size(1), b * s, d)

    def varlen_fwd():
        o, _ = ops.sparse_attention(flat(q), flat(k), flat(v), None, None, cu, -1, 0, 64, None)
        return o.view(hq, b, s, d).transpose(0, 1)

    with torch.no_grad():
        err = (varlen_fwd().float() - sdpa_mask_fwd().float()).abs().max().item()
    t_mask = time_ms(lambda: sdpa_mask_fwd().backward(go))
    t_var = time_ms(lambda: varlen_fwd().backward(go))
    print(f"B={b} S={s} Hq={hq} Hkv={hk} D={d}, {cu.numel() - 1} documents (mean length {b * s / (cu.numel() - 1):.0f}): "
          f"fwd+bwd SDPA with the document mask {t_mask:.3f} ms, anvil varlen {t_var:.3f} ms: {t_mask / t_var:.2f}x "
          f"(max |diff| of the outputs {err:.3g})")


if __name__ == "__main__":
    main()
