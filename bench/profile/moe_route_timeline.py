"""Host and device time of one moe_route call, split by kernel (torch.profiler), for bench notes."""
import torch
import anvil  # noqa: F401
from torch.profiler import ProfilerActivity, profile

idx = torch.randint(0, 256, (16384, 8), device="cuda", dtype=torch.int32)
logits = torch.randn(65536, 64, device="cuda", dtype=torch.bfloat16)
for _ in range(20):
    torch.ops.anvil.moe_route(idx, 256, 1, -1)
    torch.ops.anvil.moe_gate(logits, None, None, 6, 1, 1, "softmax", True, 1.0)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        torch.ops.anvil.moe_route(idx, 256, 1, -1)
    for _ in range(10):
        torch.ops.anvil.moe_gate(logits, None, None, 6, 1, 1, "softmax", True, 1.0)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
