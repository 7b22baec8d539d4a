"""bench/model_forward: the bf16 forward of a Llama-2-7B-shaped model, anvil's CausalLM beside
transformers' LlamaForCausalLM (SDPA attention) with the same weights, in one run.

Goal (issue [models]): anvil's forward tokens/s >= 0.95x transformers'. Both compute the logits of every
token (lm_head included), under no_grad, from the same checkpoint (random weights, saved once by
transformers). Also prints the bf16 logits' agreement (max |diff| / max |logit|) as a sanity check.

    python3 bench/model_forward.py [--json out.json] [--batch 4] [--seq 2048] [--small]
"""
import argparse
import os
import shutil

import torch

import anvil
from common import device_info, time_ms, write_json


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--small", action="store_true", help="a tiny model (a smoke test; ratios mean nothing)")
    ap.add_argument("--dir", default="/tmp/anvil-bench-forward")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
    if args.small:
        dims = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
        args.batch, args.seq = 2, 128
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16", **dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    shutil.rmtree(args.dir, ignore_errors=True)
    hf.save_pretrained(args.dir)
    # Reload the reference as users load a bf16 model: .to(bfloat16) above also rounded the rotary
    # inv_freq buffer to bf16, which from_pretrained keeps in fp32 (as anvil does).
    del hf
    hf = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
    ours = anvil._C.CausalLM(args.dir, "bfloat16", dev)
    ids = torch.randint(0, dims["vocab_size"], (args.batch, args.seq), device=dev)
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours.logits(ids)
        agree = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        del ref, got
        t_ours = time_ms(lambda: ours.logits(ids), warmup=3, reps=10)
        t_hf = time_ms(lambda: hf(ids).logits, warmup=3, reps=10)
    tokens = args.batch * args.seq
    info = device_info() if dev == "cuda" else {"device": "cpu"}
    print(f"{info['device']}, torch {torch.__version__}; Llama {dims['num_hidden_layers']} layers x "
          f"{dims['hidden_size']}, bf16, batch {args.batch} x {args.seq}")
    print(f"logits agreement (bf16, max |diff| / max |logit|): {agree:.2e}")
    print(f"anvil        {t_ours:9.2f} ms  {tokens / t_ours * 1e3:10.0f} tokens/s")
    print(f"transformers {t_hf:9.2f} ms  {tokens / t_hf * 1e3:10.0f} tokens/s")
    ratio = t_hf / t_ours
    ok = ratio >= 0.95
    print(f"goal forward tokens/s >= 0.95x transformers: {ratio:.2f}x: {'met' if ok else 'NOT met'}")
    write_json(args.json, {**info, "batch": args.batch, "seq": args.seq, "dims": dims, "anvil_ms": t_ours,
                           "transformers_ms": t_hf, "ratio": ratio, "logits_rel_diff": agree, "goal_met": ok})
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
