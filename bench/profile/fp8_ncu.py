"""One block-scaled FP8 GEMM of anvil and one of cuBLAS (torch._scaled_mm, same scales), each run a few
times, for Nsight Compute to profile (issue [fp8-gemm]: why CUTLASS 4.2's block-scaled mainloop stops
near cuBLAS). Run under ncu, e.g.
    ncu --clock-control none --launch-skip 3 --launch-count 1 -k regex:'cutlass|sm90|gemm' \
        --section SpeedOfLight --section WarpStateStats python3 bench/profile/fp8_ncu.py 8192 8192 8192
"""
import sys

import torch

import anvil

ops = anvil.ops


def main():
    m, n, k = (int(x) for x in sys.argv[1:4])
    who = sys.argv[4] if len(sys.argv) > 4 else "both"
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)              # (M, K) activations
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05       # (N, K) weight
    qa, sa = ops.quantize_fp8(a, "block1x128")                             # sa (M, K/128)
    qb, sb = ops.quantize_fp8(b, "block128x128")                           # sb (N/128, K/128)
    for _ in range(4):
        if who in ("both", "ours"):
            ops.fp8_gemm(qa, sa, qb, sb, torch.bfloat16)
    torch.cuda.synchronize()
    if who in ("both", "cublas"):
        sa_mmajor = sa.t().contiguous().t()
        for _ in range(4):
            torch._scaled_mm(qa, qb.t(), scale_a=sa_mmajor, scale_b=sb.t(), out_dtype=torch.bfloat16)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
