"""bench/patch: a transformers Llama training step (forward + backward of the causal-LM loss, bf16, random weights)
three ways in one run: unpatched, after ``anvil.patch(model)``, and after Liger Kernel's
``apply_liger_kernel_to_llama(model=model)`` (PyPI liger-kernel, its defaults: rope, rms_norm, swiglu, fused
linear cross-entropy). Prints tokens/s and peak memory of each, and ours against Liger's last.

Goal (issue [python], "Must show"): anvil's speedup over unpatched >= Liger's, at <= Liger's peak memory.
Shapes: "1b" (Llama-3.2-1B: hidden 2048, FFN 8192, 16 layers, 32/8 heads, vocabulary 128256) and "7b" (Llama-2-7B:
hidden 4096, FFN 11008, 32 layers, 32 heads, vocabulary 32000; gradient checkpointing on, so the activations of
32 layers fit beside the 27 GB of bf16 weights and gradients). No optimizer step: the patch changes the step's
forward and backward only.

Liger patches transformers' module-level ``apply_rotary_pos_emb`` for every Llama in the process, so its run comes
last, after the unpatched and anvil runs (anvil's rotary hook is inert outside the models it patched).

    python3 bench/patch.py [--json out.json] [--shapes 1b,7b] [--batch 4] [--seq 2048] [--steps 10]
    (scripts/gpu-bench.sh patch; liger-kernel is carried as a wheel on the GPU machine)
"""
import argparse
import gc
import time

import torch

import anvil
from common import device_info, write_json

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, checkpointing=False, batch=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, checkpointing=True, batch=2),
}


def build(shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    keys = {k: v for k, v in shape.items() if k not in ("checkpointing", "batch")}
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, **keys)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if shape["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


KERNELS = ("rms_norm", "swiglu", "rope", "cross_entropy")


def apply(model, side):
    """side: "unpatched", "anvil", "liger", or "anvil:K" with only kernel K of KERNELS on (the ablation that says
    which kernel a speedup or a cost comes from). Liger has no such side: its patch replaces transformers'
    module-level functions and classes for the whole process, so one-kernel Liger runs would pile up."""
    only = side.split(":")[1] if ":" in side else None
    if side == "anvil+attention":  # every kernel and the "anvil" attention backend in place of SDPA
        print("   ", str(anvil.patch(model, attention=True)).replace("\n", "\n    "))
        return
    if side not in ("unpatched", "anvil", "liger") and (not side.startswith("anvil:") or only not in KERNELS):
        raise SystemExit(f"bench/patch: --sides: '{side}' is not unpatched, anvil, anvil+attention, liger or anvil:K with K one of "
                         f"{', '.join(KERNELS)}")
    if side.startswith("anvil"):
        options = {k: (k == only) for k in KERNELS} if only else {}
        print("   ", str(anvil.patch(model, **options)).replace("\n", "\n    "))
    elif side == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)


def run(shape, side, batch, seq, steps, profile=False):
    """(tokens/s, peak GiB, last loss) of `steps` timed training steps after 2 warm-up steps; profile: print the
    step's 15 most expensive CUDA kernels after the timed steps."""
    model = build(shape)
    apply(model, side)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, shape["vocab_size"], (batch, seq), device="cuda", generator=g)  # (B, S)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss.detach()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=70))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return batch * seq * steps / seconds, peak, loss.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--shapes", default="1b,7b")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (default: the shape's)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sides", default="",
                    help="comma-separated runs (default unpatched,anvil,liger); anvil+attention adds the anvil attention "
                         "backend; anvil:K patches kernel K "
                         f"alone ({', '.join(KERNELS)})")
    ap.add_argument("--profile", default="", help="comma-separated sides whose step's top CUDA kernels to print")
    args = ap.parse_args()
    info = device_info()
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}")
    try:
        import liger_kernel  # noqa: F401
        sides = ["unpatched", "anvil", "liger"]
    except ImportError:
        print("liger-kernel is not installed: unpatched and anvil only (no anchor; install the carried wheel)")
        sides = ["unpatched", "anvil"]
    if args.sides:
        sides = args.sides.split(",")
        if sides[0] != "unpatched":
            raise SystemExit("bench/patch: --sides must start with unpatched (the baseline of every ratio)")
        # Liger patches transformers' module-level functions for every Llama in the process: its run goes last.
        sides = [s for s in sides if s != "liger"] + [s for s in sides if s == "liger"]
    profiled = set(args.profile.split(",")) if args.profile else set()
    results = {}
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        batch = args.batch or shape["batch"]
        print(f"== {name}: batch {batch} x seq {args.seq}, {args.steps} steps")
        res = {}
        for side in sides:
            tps, peak, loss = run(shape, side, batch, args.seq, args.steps, profile=side in profiled)
            res[side] = {"tokens_per_s": tps, "peak_gib": peak, "loss": loss}
            print(f"  {side:<10} {tps:10.0f} tokens/s   peak {peak:6.2f} GiB   loss {loss:.4f}")
        base = res["unpatched"]
        for side in sides[1:]:
            r = res[side]
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_gib"] / base["peak_gib"]
            print(f"  {side:<10} speedup {r['speedup']:.3f}x, memory {r['memory_ratio']:.3f}x of unpatched")
        if "liger" in res and "anvil" in res:
            ratio = res["anvil"]["tokens_per_s"] / res["liger"]["tokens_per_s"]
            mem = res["anvil"]["peak_gib"] / res["liger"]["peak_gib"]
            res["anvil_over_liger"] = {"throughput": ratio, "memory": mem}
            print(f"  anvil / liger: throughput {ratio:.3f}x (goal >= 1), peak memory {mem:.3f}x (goal <= 1)")
        results[name] = res
    write_json(args.json, {"bench": "patch", **info, "seq": args.seq, "steps": args.steps, "results": results})


if __name__ == "__main__":
    main()
