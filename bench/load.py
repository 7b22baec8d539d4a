"""bench/load: loading a checkpoint to the GPU, anvil's Checkpoint::load_all beside what users run
today, `safetensors.torch.load_file(shard)` + `.cuda()` per shard, in one run.

Goals (issue [models]):
- a 7B-shaped bf16 checkpoint (Llama-2-7B shapes, synthetic weights, 3 shards, ~13.5 GB) loads to the
  GPU at least as fast as load_file + .cuda() (median of --reps runs each, alternating, page cache warm);
- anvil's peak anonymous host memory while loading (RssAnon, so the page cache of the mapped files is
  excluded) grows by at most 1.2x the largest shard over the process's RssAnon before the load.
Each run is a fresh child process (same imports, CUDA initialised before the clock starts); the parent
samples the child's /proc/<pid>/status every millisecond for the peak RssAnon, so the child's GIL and
its loader's threads do not matter. Before timing, the anvil child checks a few tensors against
safetensors' own reader, bit for bit.

    python3 bench/load.py [--json out.json]          (scripts/gpu-bench.sh load; needs ~14 GB in --dir)
    python3 bench/load.py --small                    (a few MB, CPU when there is no GPU: a smoke test)
    options: --dir PATH (default /tmp/anvil-bench-load[-small]), --reps N, --cold (drop the files from the
    page cache before each run), --keep (leave the checkpoint on disk)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from common import write_json

LLAMA2_7B = dict(vocab=32000, hidden=4096, intermediate=11008, layers=32)
SMALL = dict(vocab=1024, hidden=256, intermediate=688, layers=4)
SHARDS = 3


def tensor_shapes(vocab, hidden, intermediate, layers):
    """The tensors of LlamaForCausalLM in state_dict order, with their shapes."""
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                (p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                (p + "mlp.down_proj.weight", (hidden, intermediate)),
                (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def write_checkpoint(path, shapes):
    """SHARDS shards of about equal size, written one at a time by safetensors itself, plus the index."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    total = sum(numel(s) * 2 for _, s in shapes)
    groups, start = [[] for _ in range(SHARDS)], 0
    for name, shape in shapes:  # by where the tensor starts: SHARDS contiguous groups of about total/SHARDS
        groups[min(SHARDS - 1, start * SHARDS // total)].append((name, shape))
        start += numel(shape) * 2
    groups = [g for g in groups if g]
    gen_device = "cuda" if torch.cuda.is_available() else "cpu"  # randn of 6.7e9 values is slow on a CPU
    gen = torch.Generator(device=gen_device).manual_seed(0)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: (torch.randn(shape, generator=gen, device=gen_device) * 0.02).to(torch.bfloat16).cpu()
                 for name, shape in group}
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        del shard
        weight_map.update({name: fname for name, _ in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    if gen_device == "cuda":
        torch.cuda.empty_cache()  # the children need the GPU memory, not the parent
    return total


def shard_files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))


def warm_page_cache(files):
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def drop_page_cache(files):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ---- child: one load, timed ------------------------------------------------------------------------------

def child(method, path, device, out):
    if device == "cuda":
        torch.empty(1, device="cuda")  # the CUDA context, before the baseline and the clock
        torch.cuda.synchronize()
    if method.startswith("anvil"):
        import anvil
        if method == "anvil-ring":  # the staging-ring path, for comparison (the default registers the mapping)
            os.environ["ANVIL_LOAD_PATH"] = "ring"
        load = lambda: anvil._C.load_checkpoint(path, device)
    else:
        from safetensors.torch import load_file

        def load():
            tensors = {}
            for f in shard_files(path):
                tensors.update({k: v.to(device) for k, v in load_file(f).items()})
            return tensors
    before = status_kib("self", "RssAnon")
    t0 = time.perf_counter()
    tensors = load()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "anon_before_kib": before, "tensors": len(tensors),
              "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
    if method.startswith("anvil"):  # bit-exact against safetensors' own reader, a few tensors
        from safetensors import safe_open
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            weight_map = json.load(f)["weight_map"]
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
            with safe_open(os.path.join(path, weight_map[name]), framework="pt") as f:
                want = f.get_tensor(name)
            got = tensors[name].cpu()
            assert got.dtype == want.dtype and torch.equal(got.view(torch.int16), want.view(torch.int16)), name
        result["checked"] = True
    with open(out, "w") as f:
        json.dump(result, f)


def run_child(method, path, device, cold):
    if cold:
        drop_page_cache(shard_files(path))
    out = f"{path}.{method}.result.json"
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", method, "--dir", path,
                             "--device", device, "--child-out", out])
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        try:
            peak_anon = max(peak_anon, status_kib(proc.pid, "RssAnon"))
            peak_hwm = max(peak_hwm, status_kib(proc.pid, "VmHWM"))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.001)
    if proc.wait() != 0:
        raise RuntimeError(f"the {method} child failed (exit {proc.returncode})")
    with open(out) as f:
        r = json.load(f)
    os.remove(out)
    r.update(peak_anon_kib=peak_anon, peak_hwm_kib=peak_hwm, anon_increase_kib=max(0, peak_anon - r["anon_before_kib"]))
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--small", action="store_true", help="a few-MB model (a smoke test; CPU when there is no GPU)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the shards from the page cache before each run")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint on disk")
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir, args.device, args.child_out)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = SMALL if args.small else LLAMA2_7B
    path = args.dir or ("/tmp/anvil-bench-load-small" if args.small else "/tmp/anvil-bench-load")
    if device == "cuda":
        from common import device_info
        info = device_info()
    else:
        info = {"device": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    shapes = tensor_shapes(**dims)
    print(f"{info['device']}, torch {info['torch']}, {info['date']}")
    t0 = time.perf_counter()
    if os.path.isdir(path):
        shutil.rmtree(path)
    total = write_checkpoint(path, shapes)
    files = shard_files(path)
    largest = max(os.path.getsize(f) for f in files)
    print(f"checkpoint: {'small' if args.small else '7B'}-shaped bf16 ({dims}), {len(files)} shards, "
          f"{total / 1e9:.2f} GB, largest shard {largest / 1e9:.2f} GB, written in {time.perf_counter() - t0:.0f} s "
          f"to {path}; page cache {'dropped before each run' if args.cold else 'warm'}")
    try:
        if not args.cold:
            warm_page_cache(files)
        methods = ("anvil", "anvil-ring", "safetensors") if device == "cuda" else ("anvil", "safetensors")
        runs = {m: [] for m in methods}
        for _ in range(args.reps):
            for method in methods:
                runs[method].append(run_child(method, path, device, args.cold))
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)

    rows = {}
    mib = 1 / 1024
    print(f"\n{'method':<34}{'median s':>10}{'GB/s':>8}{'peak RssAnon MiB':>18}{'increase MiB':>14}{'peak VmHWM MiB':>16}")
    labels = {"anvil": f"anvil load_all -> {device}", "anvil-ring": "  (anvil's staging ring)",
              "safetensors": f"load_file + .to({device!r})"}
    for method, label in labels.items():
        if method not in runs:
            continue
        rs = runs[method]
        sec = statistics.median(r["seconds"] for r in rs)
        row = {"method": method, "seconds": sec, "seconds_all": [r["seconds"] for r in rs], "gbs": total / sec / 1e9,
               "peak_anon_mib": max(r["peak_anon_kib"] for r in rs) * mib,
               "anon_increase_mib": max(r["anon_increase_kib"] for r in rs) * mib,
               "peak_hwm_mib": max(r["peak_hwm_kib"] for r in rs) * mib}
        assert all(r["bytes"] == total and r["tensors"] == len(shapes) for r in rs), f"{method} loaded the wrong set"
        rows[method] = row
        print(f"{label:<34}{sec:10.3f}{row['gbs']:8.2f}{row['peak_anon_mib']:18.0f}{row['anon_increase_mib']:14.0f}"
              f"{row['peak_hwm_mib']:16.0f}")
    speedup = rows["safetensors"]["seconds"] / rows["anvil"]["seconds"]
    bound_mib = 1.2 * largest / (1 << 20)
    goals = [("load speed", speedup >= 1.0, f"{speedup:.2f}x load_file + .cuda() (>= 1x)"),
             ("host memory", rows["anvil"]["anon_increase_mib"] <= bound_mib,
              f"peak RssAnon increase {rows['anvil']['anon_increase_mib']:.0f} MiB (<= 1.2 x largest shard = "
              f"{bound_mib:.0f} MiB)")]
    print(f"\nspeedup (theirs / ours): {speedup:.2f}x")
    if device != "cuda" or args.small:
        print("(a smoke run: the goals are judged on the GPU with the 7B shape)")
    for name, ok, text in goals:
        print(f"goal {name}: {text}: {'met' if ok else 'NOT met'}")
    met = all(ok for _, ok, _ in goals)
    print(f"goal load: {sum(ok for _, ok, _ in goals)} of {len(goals)} met: {'met' if met else 'NOT met'}")
    write_json(args.json, {"bench": "load", **info, "shape": dims, "shards": len(files), "total_bytes": total,
                           "largest_shard_bytes": largest, "cold": args.cold, "small": args.small,
                           "results": list(rows.values()), "speedup": speedup,
                           "goals": [{"goal": n, "met": ok, "detail": t} for n, ok, t in goals], "goal_met": met})


if __name__ == "__main__":
    main()
