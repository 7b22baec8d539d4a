"""bench/distill: online knowledge distillation throughput and memory, `anvil distill` beside a PyTorch baseline
written the way a torchtune user would, with the same models, data and settings, in one run (issue [distill]).

Cases:
- "1b": a Llama-3.2-1B-shaped student (hidden 2048, 16 layers, ffn 8192, 32 heads, 8 kv heads) distilled from a
  Llama-3.2-3B-shaped teacher (hidden 3072, 28 layers, ffn 8192, 24 heads, 8 kv heads), both with Llama 3's
  vocabulary of 128256 (tied embeddings, as those models have), batch 8 x 1024, every student parameter trained
  (bf16 weights, AdamW), forward KL, kd_ratio 0.5, T = 1: the pair torchtune's knowledge_distillation recipes ship
  for (Llama-3.1-8B -> 3.2-1B there; a 3B teacher keeps the baseline inside one H100). Goals: anvil's tokens/s
  >= 1.5x the baseline's at <= its peak memory; and anvil's KD step <= 1.1 x (anvil's student step + anvil's teacher
  forward), the three measured in this run: the student step is `anvil distill` with kd_ratio 0 (the recipe then
  never runs the teacher in training), the teacher forward is anvil's CausalLM.logits on the same batch.
- "cache": offline distillation, ours alone: the 1b case's 3B teacher writes its top-64 float16 cache over the
  same data (`teacher.cache_only`); prints the write throughput (tokens/s) and bytes per token, then the 1B
  student's tokens/s training from the cache (teacher out of the process). `--small --cases cache` is the CPU
  smoke test.
- "7b-plan": the 7B plan, ours alone (no baseline holds it on one GPU): a ~14B-shaped teacher (hidden 5120, 48
  layers, ffn 13824, 40 heads, 8 kv heads, vocab 32000: 13.6B parameters) stored as FineGrainedFP8 and run through
  the FP8 GEMM, and a 7B student derived from its every second layer (24 layers, 7.0B parameters, bf16) training
  LoRA r=16 on all linears with gradient checkpointing, batch 4 x 1024. Prints peak memory and tokens/s.

The baseline (a child process, so its memory cannot count against ours): transformers' LlamaForCausalLM teacher
(eval, under no_grad) and student, torchtune 0.6.1's ForwardKLWithChunkedOutputLoss and CEWithChunkedOutputLoss
(the installed files, loaded alone: they import only torch) over 8 output chunks computed as torchtune's own
models compute them (the final hidden state split along the sequence, the LM head applied per chunk), loss =
(1 - kd_ratio) CE + kd_ratio KD, clipping at 1.0, torch.optim.AdamW(fused=True). Both sides read the same rows of
random token ids (pre-tokenized JSONL; packing is the identity) and count tokens/s over the steps after --warmup.

    python3 bench/distill.py [--json out.json] [--cases 1b,7b-plan,cache] [--steps 12] [--warmup 4] [--small]

torchtune is not on the GPU machine: carry its wheel (`pip download --no-deps torchtune==0.6.1`) and install it
with --no-deps, as scripts/setup.sh does here.
"""
import argparse
import importlib.util
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

SHAPES = {
    "3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
    "14b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8),
    "small-teacher": dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2),
    "small-fp8": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2),
    "small-student": dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
}
LR = 1e-5
KD_RATIO = 0.5
CHUNKS = 8  # torchtune's num_output_chunks


# ---- the baseline, in a child process --------------------------------------------------------------------------

def torchtune_loss_module(name):
    """torchtune's modules/loss/<name>.py as installed, loaded as a file (the package's __init__ pulls in its
    recipes' dependencies, which the loss files do not need)."""
    spec = importlib.util.find_spec("torchtune")
    assert spec, "torchtune is not installed: pip install --no-deps torchtune==0.6.1"
    path = os.path.join(os.path.dirname(spec.origin), "modules", "loss", f"{name}.py")
    module_spec = importlib.util.spec_from_file_location(f"torchtune_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def baseline_child(teacher_path, student_path, data_path, batch, seq, steps, warmup, out):
    from transformers import LlamaForCausalLM
    kd = torchtune_loss_module("kd_losses").ForwardKLWithChunkedOutputLoss(num_output_chunks=CHUNKS)
    ce = torchtune_loss_module("ce_chunked_output_loss").CEWithChunkedOutputLoss(num_output_chunks=CHUNKS)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = LlamaForCausalLM.from_pretrained(teacher_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    teacher.eval().requires_grad_(False)
    student = LlamaForCausalLM.from_pretrained(student_path, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, fused=dev == "cuda")

    def chunked_logits(model, ids):
        # torchtune's TransformerDecoder with num_output_chunks: the head applied to each sequence chunk.
        hidden = model.model(input_ids=ids).last_hidden_state  # (B, S, H)
        return [model.lm_head(h) for h in hidden.chunk(CHUNKS, dim=1)]  # CHUNKS x (B, S / CHUNKS, V)

    with open(data_path) as f:
        rows = torch.tensor([json.loads(line)["input_ids"] for line in f])
    losses, t0 = [], None
    for step in range(steps):
        if step == warmup:
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        ids = rows[(step * batch) % len(rows):][:batch].to(dev)
        # torchtune's recipes shift the labels and pad the last position with ignore_index.
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        with torch.no_grad():
            teacher_chunks = chunked_logits(teacher, ids)
        student_chunks = chunked_logits(student, ids)
        loss = (1 - KD_RATIO) * ce(student_chunks, labels) + KD_RATIO * kd(student_chunks, teacher_chunks, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del teacher_chunks, student_chunks
        losses.append(loss.item() if step in (0, steps - 1) else None)
    if dev == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    with open(out, "w") as f:
        json.dump({"tokens_per_s": (steps - warmup) * batch * seq / seconds, "peak_gib": peak,
                   "first_loss": losses[0], "last_loss": losses[-1]}, f)


def teacher_forward_child(teacher_path, data_path, batch, reps, base_weights, out):
    """anvil's teacher forward on one training batch (CausalLM.logits under no_grad: every position's logits, as
    the KD loss needs them), median seconds over `reps` after two warm-up calls."""
    import anvil  # noqa: F401  (loads the op library)
    from anvil import _C
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = _C.CausalLM(teacher_path, "bfloat16", dev, base_weights)
    with open(data_path) as f:
        ids = torch.tensor([json.loads(next(f))["input_ids"] for _ in range(batch)]).to(dev)
    times = []
    for i in range(reps + 2):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        logits = model.logits(ids)
        if dev == "cuda":
            torch.cuda.synchronize()
        del logits
        if i >= 2:
            times.append(time.perf_counter() - t)
    with open(out, "w") as f:
        json.dump({"seconds": sorted(times)[len(times) // 2]}, f)


# ---- anvil distill, through its command line -------------------------------------------------------------------

def run_anvil(anvil_bin, root, name, teacher, student, data, batch, seq, steps, warmup, kd_ratio=KD_RATIO,
              lora=None, ckpt=False, teacher_extra=None, fused=None):
    run_dir = os.path.join(root, f"anvil-{name}")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = {
        "teacher": {"path": teacher, "dtype": "bfloat16", "device": "auto", **(teacher_extra or {})},
        "student": {**student, "dtype": "bfloat16", "device": "auto"},
        "distill": {"loss": "forward_kl", "temperature": 1.0, "kd_ratio": kd_ratio, "chunk": 1024},
        "data": {"train": data, "seq_len": seq, "loss_on": "all"},
        "train": {"batch_size": batch, "grad_accum": 1, "steps": steps, "lr": LR, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0, "grad_checkpointing": ckpt, "seed": 0},
        "eval": {"every": 0},
        "output": {"dir": run_dir, "save_every": 0, "log_every": 1, "plot": False},
    }
    if lora:
        cfg["lora"] = lora
    if fused is not None:  # distill.fused: the fused CUDA KD chunk (anvil::kd_rows); None = anvil's default
        cfg["distill"]["fused"] = fused
    cfg_path = os.path.join(root, f"anvil-{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    t = time.perf_counter()
    proc = subprocess.run([anvil_bin, "distill", "--config", cfg_path], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"anvil distill failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    if (teacher_extra or {}).get("cache_only"):
        return {"stderr": proc.stderr, "wall_s": wall}
    train = read_metrics(run_dir)
    seconds = train[steps]["elapsed_s"] - train[warmup]["elapsed_s"]
    return {"tokens_per_s": (steps - warmup) * batch * seq / seconds,
            "peak_gib": max(m.get("peak_mem_gib", 0.0) for m in train.values()),
            "first_loss": train[1]["loss"], "last_loss": train[steps]["loss"], "wall_s": wall,
            "kd_first": train[1].get("kd"), "kd_last": train[steps].get("kd"), **({"stderr": proc.stderr} if teacher_extra else {})}


def cache_write_figures(stderr):
    """The writer's line: "teacher cache DIR: wrote W of N shards (S complete already), P positions, B bytes/token,
    R tokens/s" (distill/recipe.cpp)."""
    for line in stderr.splitlines():
        if line.startswith("teacher cache") and ": wrote" in line:
            parts = line.split(", ")
            positions = int(next(p for p in parts if p.endswith(" positions")).split()[0])
            bpt = float(next(p for p in parts if p.endswith(" bytes/token")).split()[0])
            tps = float(next(p for p in parts if p.endswith(" tokens/s")).split()[0])
            return {"positions": positions, "bytes_per_token": bpt, "write_tokens_per_s": tps}
    raise RuntimeError("no cache-writing line in anvil's output:\n" + stderr[-3000:])


def fp8_block_quantize(w):
    """w (N, K) -> (e4m3 (N, K), scale_inv (ceil(N/128), ceil(K/128)) fp32): DeepSeek-V3's 128x128 blocks, with
    anvil's arithmetic (docs/FORMATS.md: amax floor 1e-10, scale_inv = amax / 448); N and K multiples of 128 here."""
    n, k = w.shape
    blocks = w.float().reshape(n // 128, 128, k // 128, 128)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-10) / 448.0  # (N/128, K/128)
    q = (blocks / scale_inv[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(n, k)
    return q, scale_inv


def make_fp8_llama(path, shape):
    """A FineGrainedFP8 (DeepSeek-V3 layout) Llama checkpoint of random weights, written shard by shard on the GPU
    without a bf16 copy of the whole model: the Linear weights e4m3 + weight_scale_inv, the rest bf16."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from safetensors.torch import save_file
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads

    def normal(*size):
        return (torch.randn(*size, generator=g, device=dev) * 0.02).to(torch.bfloat16)

    weight_map, shard, shards = {}, {}, []

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file({k: t.contiguous().cpu() for k, t in shard.items()}, os.path.join(tmp, name), metadata={"format": "pt"})
        for k in shard:
            weight_map[k] = name
        shards.append(name)
        shard.clear()

    shard["model.embed_tokens.weight"] = normal(v, h)
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        for name, (n, k) in {"self_attn.q_proj": (heads * d, h), "self_attn.k_proj": (kv * d, h),
                             "self_attn.v_proj": (kv * d, h), "self_attn.o_proj": (h, heads * d),
                             "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}.items():
            q, s = fp8_block_quantize(normal(n, k))
            shard[p + name + ".weight"], shard[p + name + ".weight_scale_inv"] = q, s
        if (i + 1) % 8 == 0:
            flush()
    shard["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
    shard["lm_head.weight"] = normal(v, h)
    flush()
    total = sum(os.path.getsize(os.path.join(tmp, s)) for s in shards)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}, **shape}
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    os.replace(tmp, path)
    return path


def params_b(shape, layers=None):
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * shape["num_key_value_heads"] * d + 3 * h * f
    return ((layers or shape["num_hidden_layers"]) * per_layer + 2 * v * h) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--cases", default="1b,7b-plan")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--fused", choices=["default", "on", "off", "both"], default="default",
                    help="distill.fused for anvil's KD runs; 'both' runs the 1b case's KD step unfused and fused")
    ap.add_argument("--small", action="store_true", help="tiny models (a smoke test; ratios mean nothing)")
    ap.add_argument("--dir", default="/tmp/anvil-bench-distill")
    ap.add_argument("--anvil", default=None, help="the anvil binary (default: build-gpu/bin/anvil, else build/bin/anvil)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--teacher-child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        t, s, d, b, sq, st, w, out = args.child
        return baseline_child(t, s, d, int(b), int(sq), int(st), int(w), out)
    if args.teacher_child:
        t, d, b, reps, bw, out = args.teacher_child
        return teacher_forward_child(t, d, int(b), int(reps), bw, out)

    root = os.path.dirname(HERE)
    anvil_bin = args.anvil or next((p for p in (os.path.join(root, "build-gpu/bin/anvil"),
                                                os.path.join(root, "build/bin/anvil")) if os.path.exists(p)), None)
    assert anvil_bin, "no anvil binary: build first (scripts/gpu-test.sh or scripts/setup.sh)"
    os.makedirs(args.dir, exist_ok=True)
    info = device_info() if torch.cuda.is_available() else {"device": "cpu"}
    print(f"{info['device']}, torch {torch.__version__}; forward KL, kd_ratio {KD_RATIO}, T 1, AdamW lr {LR}, "
          f"{args.steps} steps ({args.warmup} warm-up)")
    cases = args.cases.split(",")
    results, goals = [], []
    for case in cases:
        if case == "1b":
            tname, sname, batch, seq = ("small-teacher", "small-student", 2, 128) if args.small else ("3b", "1b", 8, 1024)
            teacher = make_llama(os.path.join(args.dir, f"model-{tname}"), SHAPES[tname], tie_word_embeddings=True)
            student = make_llama(os.path.join(args.dir, f"model-{sname}"), SHAPES[sname], tie_word_embeddings=True)
            data = make_data(args.dir, SHAPES[tname]["vocab_size"], seq, batch * args.steps)
            out = os.path.join(args.dir, "baseline-result.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", teacher, student, data, str(batch),
                            str(seq), str(args.steps), str(args.warmup), out], check=True)
            with open(out) as f:
                theirs = json.load(f)
            pretrained = {"init": "pretrained", "path": student}
            fused = {"default": None, "on": True, "off": False, "both": False}[args.fused]
            ours = run_anvil(anvil_bin, args.dir, "kd", teacher, pretrained, data, batch, seq, args.steps, args.warmup,
                             fused=fused)
            ours_fused = (run_anvil(anvil_bin, args.dir, "kd-fused", teacher, pretrained, data, batch, seq, args.steps,
                                    args.warmup, fused=True) if args.fused == "both" else None)
            ce_only = run_anvil(anvil_bin, args.dir, "ce", teacher, pretrained, data, batch, seq, args.steps,
                                args.warmup, kd_ratio=0.0)
            out = os.path.join(args.dir, "teacher-forward.json")
            env = {**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(os.path.dirname(anvil_bin)), "python")
                   + os.pathsep + os.environ.get("PYTHONPATH", "")}
            subprocess.run([sys.executable, os.path.abspath(__file__), "--teacher-child", teacher, data, str(batch),
                            "5", "auto", out], check=True, env=env)
            with open(out) as f:
                teacher_s = json.load(f)["seconds"]
            tokens = batch * seq
            kd_step, student_step = tokens / ours["tokens_per_s"], tokens / ce_only["tokens_per_s"]
            overhead = kd_step / (student_step + teacher_s)
            speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
            mem = ours["peak_gib"] / theirs["peak_gib"] if theirs["peak_gib"] else float("nan")
            print(f"\n1b: teacher {params_b(SHAPES[tname]):.2f}B, student {params_b(SHAPES[sname]):.2f}B "
                  f"(tied embeddings counted twice), batch {batch} x {seq}, every student parameter trained")
            print(f"  {'':34}{'tokens/s':>12}{'peak GiB':>10}{'loss first -> last':>24}")
            rows = [("anvil distill" + (", unfused" if ours_fused else ""), ours)]
            rows += [("anvil distill, fused", ours_fused)] if ours_fused else []
            for name, r in rows + [("anvil distill, kd_ratio 0", ce_only), ("HF + torchtune losses", theirs)]:
                print(f"  {name:34}{r['tokens_per_s']:12,.0f}{r['peak_gib']:10.2f}"
                      f"{r['first_loss']:12.4f} -> {r['last_loss']:.4f}")
            print(f"  anvil step times: KD {kd_step * 1e3:.0f} ms; student alone {student_step * 1e3:.0f} ms; "
                  f"teacher forward {teacher_s * 1e3:.0f} ms; KD / (student + teacher) = {overhead:.3f}")
            print(f"  ratio: {speed:.2f}x tokens/s, {mem:.2f}x peak memory")
            fused_figures = {}
            if ours_fused:
                f_step = tokens / ours_fused["tokens_per_s"]
                fused_figures = {"anvil_fused": ours_fused,
                                 "speedup_fused": ours_fused["tokens_per_s"] / theirs["tokens_per_s"],
                                 "memory_ratio_fused": ours_fused["peak_gib"] / theirs["peak_gib"],
                                 "kd_step_over_student_plus_teacher_fused": f_step / (student_step + teacher_s)}
                print(f"  fused: KD step {f_step * 1e3:.0f} ms, KD / (student + teacher) = "
                      f"{fused_figures['kd_step_over_student_plus_teacher_fused']:.3f}; ratio "
                      f"{fused_figures['speedup_fused']:.2f}x tokens/s, {fused_figures['memory_ratio_fused']:.2f}x peak memory")
            if ours_fused:  # the goals are anvil's default path's, the fused one
                speed, mem = fused_figures["speedup_fused"], fused_figures["memory_ratio_fused"]
                overhead = fused_figures["kd_step_over_student_plus_teacher_fused"]
            if not args.small:
                goals += [("1b speed", speed >= 1.5, f"{speed:.2f}x (>= 1.5x)"),
                          ("1b memory", mem <= 1.0, f"{mem:.2f}x (<= 1.0x)"),
                          ("1b KD overhead", overhead <= 1.1, f"{overhead:.3f} (<= 1.1)")]
            results.append({"case": case, "batch": batch, "seq": seq, "anvil": ours, "anvil_kd_ratio_0": ce_only,
                            "anvil_teacher_forward_s": teacher_s, "baseline": theirs, "speedup": speed,
                            "memory_ratio": mem, "kd_step_over_student_plus_teacher": overhead,
                            "fused": args.fused, **fused_figures})
        elif case == "cache":
            # Offline: the 1b case's teacher writes its top-64 (float16) cache, then the student trains from it.
            tname, sname, batch, seq = ("small-teacher", "small-student", 2, 128) if args.small else ("3b", "1b", 8, 1024)
            teacher = make_llama(os.path.join(args.dir, f"model-{tname}"), SHAPES[tname], tie_word_embeddings=True)
            student = make_llama(os.path.join(args.dir, f"model-{sname}"), SHAPES[sname], tie_word_embeddings=True)
            data = make_data(args.dir, SHAPES[tname]["vocab_size"], seq, batch * args.steps)
            cache_dir = os.path.join(args.dir, f"cache-{tname}")
            shutil.rmtree(cache_dir, ignore_errors=True)
            extra = {"cache": cache_dir, "cache_k": 64, "cache_dtype": "float16"}
            pretrained = {"init": "pretrained", "path": student}
            written = run_anvil(anvil_bin, args.dir, "cache-write", teacher, pretrained, data, batch, seq, args.steps,
                                args.warmup, teacher_extra={**extra, "cache_only": True})
            figures = cache_write_figures(written["stderr"])
            ours = run_anvil(anvil_bin, args.dir, "cache-train", teacher, pretrained, data, batch, seq, args.steps,
                             args.warmup, teacher_extra=extra)
            print(f"\ncache: teacher {params_b(SHAPES[tname]):.2f}B writes its top-64 float16 log-probs, "
                  f"{figures['positions']:,} positions (batch {batch} x {seq} x {args.steps} steps)")
            print(f"  write: {figures['write_tokens_per_s']:,.0f} tokens/s, {figures['bytes_per_token']:.1f} bytes/token "
                  f"(wall {written['wall_s']:.0f} s, loading included)")
            print(f"  student {params_b(SHAPES[sname]):.2f}B from the cache: {ours['tokens_per_s']:,.0f} tokens/s, peak "
                  f"{ours['peak_gib']:.2f} GiB, loss {ours['first_loss']:.4f} -> {ours['last_loss']:.4f}")
            results.append({"case": case, "batch": batch, "seq": seq, "k": 64, "logprob_dtype": "float16",
                            "cache_write": figures, "anvil_from_cache": {k: v for k, v in ours.items() if k != "stderr"}})
        elif case == "7b-plan":
            shape = SHAPES["small-fp8" if args.small else "14b"]
            batch, seq = (2, 128) if args.small else (4, 1024)
            teacher = make_fp8_llama(os.path.join(args.dir, f"model-{'small' if args.small else '14b'}-fp8"), shape)
            data = make_data(args.dir, shape["vocab_size"], seq, batch * args.steps)
            lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}
            ours = run_anvil(anvil_bin, args.dir, "7b", teacher, {"init": "derived", "every_nth": 2}, data, batch,
                             seq, args.steps, args.warmup, lora=lora, ckpt=True)
            print(f"\n7b-plan: FP8 teacher {params_b(shape):.1f}B (FineGrainedFP8, the FP8 GEMM), student its every "
                  f"second layer {params_b(shape, shape['num_hidden_layers'] // 2):.1f}B bf16 + LoRA r=16 all-linear, "
                  f"checkpointing, batch {batch} x {seq}")
            print(f"  anvil distill: {ours['tokens_per_s']:,.0f} tokens/s, peak {ours['peak_gib']:.2f} GiB, loss "
                  f"{ours['first_loss']:.4f} -> {ours['last_loss']:.4f}, wall {ours['wall_s']:.0f} s (loading included)")
            if not args.small:
                goals.append(("7b-plan fits one H100", ours["peak_gib"] < 79, f"{ours['peak_gib']:.1f} GiB"))
            results.append({"case": case, "batch": batch, "seq": seq, "anvil": ours,
                            "teacher_params_b": params_b(shape),
                            "student_params_b": params_b(shape, shape["num_hidden_layers"] // 2)})
    print()
    for name, ok, text in goals:
        print(f"goal {name}: {text}: {'met' if ok else 'NOT met'}")
    write_json(args.json, {"bench": "distill", **info, "steps": args.steps, "warmup": args.warmup,
                           "results": results, "goals": [{"name": n, "met": ok, "text": t} for n, ok, t in goals]})


if __name__ == "__main__":
    main()
