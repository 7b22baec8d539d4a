"""One MoE case, run a few times, for a profiler (scripts/gpu-profile.sh): ncu captures the kernels.

    python3 bench/profile/moe_cases.py v3|softmax|route
"""
import sys

import torch

import anvil  # noqa: F401

case = sys.argv[1]
torch.manual_seed(0)
dev = "cuda"
if case == "v3":
    logits = torch.randn(65536, 256, device=dev)
    bias = torch.randn(256, device=dev) * 0.01
    run = lambda: torch.ops.anvil.moe_gate(logits, bias, None, 8, 8, 4, "sigmoid", True, 2.5)
elif case == "softmax":
    logits = torch.randn(65536, 64, device=dev, dtype=torch.bfloat16)
    run = lambda: torch.ops.anvil.moe_gate(logits, None, None, 6, 1, 1, "softmax", True, 1.0)
elif case == "route":
    idx = torch.randint(0, 256, (16384, 8), device=dev, dtype=torch.int32)
    run = lambda: torch.ops.anvil.moe_route(idx, 256, 1, -1)
else:
    raise SystemExit(f"unknown case {case!r}: v3, softmax or route")
for _ in range(3):
    run()
torch.cuda.synchronize()
