"""bench/profile/sparse_cases: one of bench/attention's sparse_attention cases, forward and backward, for a
profiler to look at (issue [sparse-attention]: where the backward's time goes).

    PYTHONPATH=build-gpu/python python3 bench/profile/sparse_cases.py window|nsa [--table] [--reps N]

window: B 1, 16 heads, S 32768, D 128, bf16, sliding window 4096 (bench/attention's first case).
nsa:    B 1, 64 q / 4 kv heads, S 65536, D 128, bf16, top-16 blocks of 64 from select_blocks + window 512.
Runs forward+backward `reps` times (for Nsight Compute: pick a kernel with -k and --launch-skip); --table
also prints torch.profiler's per-kernel CUDA time of one forward+backward after a warm-up.
"""
import argparse

import torch

import anvil

ops = anvil.ops


def case_inputs(name):
    """-> (q, k, v, grad_o, the op's arguments after q, k, v)."""
    torch.manual_seed(0)
    if name == "window":
        hq, hkv, s, d, w, bs, top = 16, 16, 32768, 128, 4096, 64, 0
    else:
        hq, hkv, s, d, w, bs, top = 64, 4, 65536, 128, 512, 64, 16
    q = torch.randn(1, hq, s, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    go = torch.randn_like(q)
    bi = ops.select_blocks(q, k, bs, top, 1, 2) if top else None
    for t in (q, k, v):
        t.requires_grad_()
    return q, k, v, go, (bi, None, None, w, 0, bs)


def fwd_bwd(q, k, v, go, args):
    o = ops.sparse_attention(q, k, v, *args)[0]
    o.backward(go)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=["window", "nsa"])
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    q, k, v, go, args = case_inputs(a.case)
    for _ in range(a.reps):
        fwd_bwd(q, k, v, go, args)
    torch.cuda.synchronize()
    if a.table:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd(q, k, v, go, args)
            torch.cuda.synchronize()
        print(f"{a.case}: one forward+backward, CUDA time per kernel")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
