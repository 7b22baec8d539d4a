"""How exact is anvil's cross_entropy_chunk at large vocabularies? A diagnostic for the CUDA test's
tolerance: the loss and lse of the CUDA kernel and of the CPU reference, both in fp32, each against an
fp64 reference, at V in {32000, 151936} for fp32 and bf16 logits.

    python3 bench/profile/ce_precision.py
"""
import torch

import anvil  # noqa: F401  (loads the op library)

ops = torch.ops.anvil


def main():
    torch.manual_seed(0)
    for v in (32000, 151936):
        for dt in (torch.float32, torch.bfloat16):
            t = 67
            logits = (torch.randn(t, v) * 4).to(dt)
            labels = torch.randint(0, v, (t,))
            ref_loss, ref_lse = ops.cross_entropy_chunk(logits.double(), labels, -100)
            cpu_loss, cpu_lse = ops.cross_entropy_chunk(logits, labels, -100)
            gpu_loss, gpu_lse = ops.cross_entropy_chunk(logits.cuda(), labels.cuda(), -100)
            torch_lse = torch.logsumexp(logits.float(), -1)
            torch_gpu_lse = torch.logsumexp(logits.float().cuda(), -1).cpu()
            err = lambda x, r: (x.double() - r).abs().max().item()  # noqa: E731
            rel = lambda x, r: ((x.double() - r).abs() / r.abs()).max().item()  # noqa: E731
            print(f"V={v} {str(dt):15} lse max abs err vs fp64: gpu {err(gpu_lse.cpu(), ref_lse):.3e} "
                  f"cpu {err(cpu_lse, ref_lse):.3e} torch-cpu {err(torch_lse, ref_lse):.3e} "
                  f"torch-gpu {err(torch_gpu_lse, ref_lse):.3e} | loss max rel err: gpu {rel(gpu_loss.cpu(), ref_loss):.3e} "
                  f"cpu {rel(cpu_loss, ref_loss):.3e} | gpu vs cpu max abs {err(gpu_lse.cpu(), cpu_lse.double()):.3e}")


if __name__ == "__main__":
    main()
