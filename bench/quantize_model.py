"""bench/quantize_model: `anvil quantize` on a 7B-shaped model (Llama-2-7B shapes, synthetic bf16 weights, written to
disk first, ~13.5 GB), timed end to end as a user runs it.

Targets (issue [quantize]):
- fp8-block (no calibration: round to nearest) in <= 60 s, peak GPU memory <= 2 layers' worth (one bf16 decoder
  layer of Llama-2-7B is 405 MB: the target is 0.81 GB);
- GPTQ (gptq-int4, group 128) of the same in <= 8 minutes (128 calibration windows of 512 tokens).
Each run is one `anvil quantize` process (a fresh CUDA context); its report.json gives the recipe's own seconds
and the device's peak memory (`peak_device_gib`, PyTorch's caching allocator). The wall time printed is the
process's (start-up, reading the mapped source, writing the shards included).

    python3 bench/quantize_model.py [--json bench/results/DATE-quantize-model-h100.json]   (GPU; ~21 GB in --dir)
    python3 bench/quantize_model.py --small                   (a few MB on the CPU: a smoke test of the script)
    options: --dir PATH (default /tmp/anvil-bench-quantize[-small]), --schemes fp8-block,gptq-int4, --keep
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from load import tensor_shapes, numel  # noqa: E402  the same 7B shapes as bench/load

ROOT = os.path.join(os.path.dirname(__file__), "..")
LLAMA2_7B = dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32)
SMALL = dict(vocab=4096, hidden=256, intermediate=512, layers=4, heads=4)
TARGET_S = {"fp8-block": 60.0, "gptq-int4": 480.0}


def write_model(path, shape, shard_bytes=2 << 30):
    """config.json, tokenizer (the demo's: ids only matter) and bf16 shards written a shard at a time."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": shape["hidden"],
              "intermediate_size": shape["intermediate"], "num_hidden_layers": shape["layers"],
              "num_attention_heads": shape["heads"], "num_key_value_heads": shape["heads"], "vocab_size": shape["vocab"],
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "dtype": "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok = os.path.join(ROOT, "examples", "tiny", "tokenizer")
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), path)
    shapes = tensor_shapes(shape["vocab"], shape["hidden"], shape["intermediate"], shape["layers"])
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=gen_device).manual_seed(0)
    groups, cur, cur_bytes = [], [], 0
    for name, s in shapes:
        if cur and cur_bytes + numel(s) * 2 > shard_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, s))
        cur_bytes += numel(s) * 2
    groups.append(cur)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, s in group:
            t = torch.randn(s, generator=gen, device=gen_device) * (1.0 if name.endswith("norm.weight") else 0.02)
            shard[name] = (t + 1.0 if name.endswith("norm.weight") else t).to(torch.bfloat16).cpu()
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({name: fname for name, _ in group})
        del shard
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    if gen_device == "cuda":
        torch.cuda.empty_cache()
    layer_bytes = sum(numel(s) * 2 for n, s in shapes if n.startswith("model.layers.0."))
    return total, layer_bytes


def write_calibration(path, windows, seq_len, vocab):
    """Pre-tokenized rows ({"input_ids": [...]}) of random ids: GPTQ's cost does not depend on the text."""
    g = torch.Generator().manual_seed(1)
    with open(path, "w") as f:
        for _ in range(windows):
            f.write(json.dumps({"input_ids": torch.randint(4, vocab, (seq_len,), generator=g).tolist()}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--schemes", default="fp8-block,gptq-int4")
    ap.add_argument("--anvil", default=os.path.join(ROOT, "build", "bin", "anvil"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    shape = SMALL if args.small else LLAMA2_7B
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.dir or ("/tmp/anvil-bench-quantize" + ("-small" if args.small else ""))
    src = os.path.join(work, "model")
    if not os.path.exists(os.path.join(src, "model.safetensors.index.json")):
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.time()
        total, layer_bytes = write_model(src, shape, shard_bytes=(2 << 30) if not args.small else (2 << 20))
        print(f"wrote the synthetic model: {total / 1e9:.2f} GB in {time.time() - t0:.0f} s")
    else:
        total, layer_bytes = None, None
    if layer_bytes is None:
        shapes = tensor_shapes(shape["vocab"], shape["hidden"], shape["intermediate"], shape["layers"])
        layer_bytes = sum(numel(s) * 2 for n, s in shapes if n.startswith("model.layers.0."))
    calib = os.path.join(work, "calib.jsonl")
    write_calibration(calib, 128 if not args.small else 8, 512 if not args.small else 64, shape["vocab"])

    results = []
    for scheme in args.schemes.split(","):
        out = os.path.join(work, "out-" + scheme)
        cmd = [args.anvil, "quantize", "--model", src, "--scheme", scheme, "--out", out, "--overwrite",
               "--model.device=" + device, "--model.dtype=bfloat16"]
        if scheme.startswith("gptq") or scheme.startswith("w8a8"):
            cmd += ["--calib", calib, "--data.calib_seq_len=" + ("512" if not args.small else "64"),
                    "--data.calib_samples=128"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            print(f"{scheme}: anvil quantize failed ({r.returncode})\n{r.stderr[-3000:]}")
            results.append({"scheme": scheme, "error": r.stderr[-2000:]})
            continue
        report = json.load(open(os.path.join(out, "report.json")))
        peak = report.get("peak_device_gib", -1)
        row = {"scheme": scheme, "wall_s": wall, "recipe_s": report["seconds"], "target_s": TARGET_S.get(scheme),
               "peak_device_gib": peak, "peak_target_gib": 2 * layer_bytes / 2**30,
               "bytes_before": report["bytes_before"], "bytes_after": report["bytes_after"]}
        results.append(row)
        print(f"{scheme:10s} wall {wall:7.1f} s (target <= {TARGET_S.get(scheme, 0):.0f} s, ratio "
              f"{wall / TARGET_S.get(scheme, wall):.2f})  peak device {peak:.2f} GiB (target <= "
              f"{row['peak_target_gib']:.2f})  {report['bytes_before'] / 1e9:.2f} GB -> {report['bytes_after'] / 1e9:.2f} GB")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    record = {"bench": "quantize_model", "shape": shape, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
