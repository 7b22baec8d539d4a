"""bench/lora: LoRA fine-tuning throughput and memory, `anvil lora` beside transformers + PEFT with the same
model, data and settings, in one run (issue [lora]).

Cases (ANCHORS.md "LoRA fine-tuning"): a Llama of 853M parameters (hidden 2048, 16 layers, ffn 5632, 16
heads, 4 kv heads, vocab 32000), batch 8 x 1024, r=16 on all 7 linears, AdamW, bf16 base weights (fp32
adapters, as PEFT keeps them), without and with gradient checkpointing; and a Llama-2-7B shape, batch
4 x 2048, with checkpointing. Goals: >= 1.4x PEFT's tokens/s at <= 0.8x its peak memory without
checkpointing; >= 1.4x at <= its memory with checkpointing; >= 1.4x on the 7B shape.

Both sides start from one checkpoint (random weights, saved once by transformers) and train on the same
rows of random token ids (a pre-tokenized JSONL, one row of `seq` tokens per example, so packing is the
identity and both compute the loss over the same seq - 1 targets per row). Each side runs in its own
process, so one's memory cannot count against the other: PEFT as users write it (get_peft_model,
torch.optim.AdamW(fused=True), clipping at 1.0, model(input_ids, labels=...)); anvil through its
command line with the equivalent config. tokens/s counts the steps after `--warmup` steps; peak memory is
torch.cuda.max_memory_allocated over the whole run (weights included).

    python3 bench/lora.py [--json out.json] [--cases 853m,853m-ckpt,7b] [--steps 20] [--warmup 5] [--small]
                          [--baseline OTHER_ANVIL_BINARY]

--baseline runs a second anvil binary (a build of an earlier commit) on the same cases, right after ours,
and prints ours / baseline: a refactor's "no slower than before" in the same run as the anchor.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import device_info, make_data, make_llama, read_metrics, write_json  # noqa: E402

MODELS = {
    "853m": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "small": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
}
# case: (model, batch, seq, gradient checkpointing, speed goal, memory goal as a fraction of PEFT's)
CASES = {
    "853m": ("853m", 8, 1024, False, 1.4, 0.8),
    "853m-ckpt": ("853m", 8, 1024, True, 1.4, 1.0),
    "7b": ("7b", 4, 2048, True, 1.4, None),
    "small": ("small", 2, 64, False, None, None),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR = 1e-4


def make_model(name, root):
    """The checkpoint both sides load: random weights saved by transformers in bf16 (written once)."""
    return make_llama(os.path.join(root, f"model-{name}"), MODELS[name])


# ---- transformers + PEFT, in a child process ---------------------------------------------------------------

def peft_child(model_path, data_path, batch, seq, ckpt, steps, warmup, out):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=dev == "cuda")
    with open(data_path) as f:
        rows = torch.tensor([json.loads(line)["input_ids"] for line in f])
    losses, t0 = [], None
    for step in range(steps):
        if step == warmup:
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = rows[(step * batch) % len(rows):][:batch].to(dev)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item() if step in (0, steps - 1) else None)
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    with open(out, "w") as f:
        json.dump({"tokens_per_s": (steps - warmup) * batch * seq / seconds, "peak_gib": peak,
                   "first_loss": losses[0], "last_loss": losses[-1]}, f)


# ---- anvil lora, through its command line ---------------------------------------------------------------------

def run_anvil(anvil_bin, model_path, data_path, batch, seq, ckpt, steps, warmup, root):
    run_dir = os.path.join(root, "anvil-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = {
        "model": {"path": model_path, "dtype": "bfloat16", "device": "auto"},
        "data": {"train": data_path, "seq_len": seq, "loss_on": "all"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targets": TARGETS},
        "train": {"batch_size": batch, "grad_accum": 1, "steps": steps, "lr": LR, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "grad_checkpointing": ckpt, "seed": 0},
        "eval": {"every": 0},
        "output": {"dir": run_dir, "save_every": 0, "log_every": 1, "plot": False},
    }
    cfg_path = os.path.join(root, "anvil-lora.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    # The --dry-run memory estimate of the same config, recorded beside the measured peak.
    dry = subprocess.run([anvil_bin, "lora", "--config", cfg_path, "--dry-run"], capture_output=True, text=True)
    estimate_gib = None
    for line in dry.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "total":
            estimate_gib = float(parts[1]) / (1024 if parts[2] == "MiB" else 1)
    proc = subprocess.run([anvil_bin, "lora", "--config", cfg_path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"anvil lora failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    train = read_metrics(run_dir)
    seconds = train[steps]["elapsed_s"] - train[warmup]["elapsed_s"]
    return {"tokens_per_s": (steps - warmup) * batch * seq / seconds,
            "peak_gib": max(m.get("peak_mem_gib", 0.0) for m in train.values()),
            "first_loss": train[1]["loss"], "last_loss": train[steps]["loss"], "dry_run_estimate_gib": estimate_gib}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--cases", default="853m,853m-ckpt,7b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a tiny model (a smoke test; ratios mean nothing)")
    ap.add_argument("--dir", default="/tmp/anvil-bench-lora")
    ap.add_argument("--anvil", default=None, help="the anvil binary (default: build-gpu/bin/anvil, else build/bin/anvil)")
    ap.add_argument("--baseline", default=None, help="another anvil binary to time beside ours (e.g. an earlier commit)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        m, d, b, s, c, st, w, out = args.child
        return peft_child(m, d, int(b), int(s), c == "1", int(st), int(w), out)

    root = os.path.dirname(HERE)
    anvil_bin = args.anvil or next((p for p in (os.path.join(root, "build-gpu/bin/anvil"),
                                                os.path.join(root, "build/bin/anvil")) if os.path.exists(p)), None)
    assert anvil_bin, "no anvil binary: build first (scripts/gpu-test.sh or scripts/setup.sh)"
    os.makedirs(args.dir, exist_ok=True)
    cases = ["small"] if args.small else args.cases.split(",")
    info = device_info() if torch.cuda.is_available() else {"device": "cpu"}
    print(f"{info['device']}, torch {torch.__version__}; LoRA r=16 on {', '.join(TARGETS)}, AdamW lr {LR}, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    results, goals = [], []
    for case in cases:
        model_name, batch, seq, ckpt, speed_goal, mem_goal = CASES[case]
        model_path = make_model(model_name, args.dir)
        data_path = make_data(args.dir, MODELS[model_name]["vocab_size"], seq, batch * args.steps)
        out = os.path.join(args.dir, "peft-result.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), "--child", model_path, data_path, str(batch),
                        str(seq), "1" if ckpt else "0", str(args.steps), str(args.warmup), out], check=True)
        with open(out) as f:
            theirs = json.load(f)
        ours = run_anvil(anvil_bin, model_path, data_path, batch, seq, ckpt, args.steps, args.warmup, args.dir)
        base = None
        if args.baseline:
            base = run_anvil(args.baseline, model_path, data_path, batch, seq, ckpt, args.steps, args.warmup, args.dir)
        speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
        mem = ours["peak_gib"] / theirs["peak_gib"] if theirs["peak_gib"] else float("nan")
        label = f"{case}: batch {batch} x {seq}, checkpointing {'on' if ckpt else 'off'}"
        print(f"\n{label}")
        print(f"  {'':24}{'tokens/s':>12}{'peak GiB':>10}{'loss first -> last':>24}")
        rows = [("anvil lora", ours)] + ([("anvil lora (baseline)", base)] if base else [])
        for name, r in rows + [("transformers + PEFT", theirs)]:
            print(f"  {name:24}{r['tokens_per_s']:12,.0f}{r['peak_gib']:10.2f}"
                  f"{r['first_loss']:12.4f} -> {r['last_loss']:.4f}")
        print(f"  ratio: {speed:.2f}x tokens/s, {mem:.2f}x peak memory")
        if base:
            print(f"  ours / baseline: {ours['tokens_per_s'] / base['tokens_per_s']:.3f}x tokens/s, "
                  f"{ours['peak_gib'] / base['peak_gib']:.3f}x peak memory "
                  f"(baseline {base['tokens_per_s'] / theirs['tokens_per_s']:.2f}x PEFT)")
        if ours.get("dry_run_estimate_gib") and ours["peak_gib"]:
            print(f"  anvil lora --dry-run estimated {ours['dry_run_estimate_gib']:.2f} GiB "
                  f"({ours['dry_run_estimate_gib'] / ours['peak_gib']:.2f}x the measured peak)")
        if speed_goal:
            goals.append((f"{case} speed", speed >= speed_goal, f"{speed:.2f}x (>= {speed_goal}x)"))
        if mem_goal:
            goals.append((f"{case} memory", mem <= mem_goal, f"{mem:.2f}x (<= {mem_goal}x)"))
        results.append({"case": case, "batch": batch, "seq": seq, "grad_checkpointing": ckpt, "anvil": ours,
                        "peft": theirs, "speedup": speed, "memory_ratio": mem,
                        **({"baseline": base, "vs_baseline": ours["tokens_per_s"] / base["tokens_per_s"]} if base else {})})
    print()
    for name, ok, text in goals:
        print(f"goal {name}: {text}: {'met' if ok else 'NOT met'}")
    write_json(args.json, {"bench": "lora", **info, "steps": args.steps, "warmup": args.warmup,
                           **({"baseline_binary": args.baseline} if args.baseline else {}), "results": results,
                           "goals": [{"name": n, "met": ok, "text": t} for n, ok, t in goals]})


if __name__ == "__main__":
    main()
