"""What every benchmark shares: CUDA-event timing (median of many runs after warm-up), the device
description, the copy-bandwidth ceiling measured in the same run, and the JSON record."""
import datetime
import json
import os
import shutil
import statistics

import torch


def time_ms(fn, warmup=5, reps=30):
    """Median milliseconds of fn() over reps runs, each between its own pair of CUDA events, launched back
    to back (as triton's do_bench does): the host queues the next call while the device runs this one,
    so a call's host overhead counts only where it exceeds its device time, as in a real pipeline. (The
    first version synchronized after every call, adding each call's launch overhead to its time.)"""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def rotating(fn, inputs):
    """fn over a pool of input sets in turn, so that a pool larger than the 50 MB L2 keeps a timing from
    measuring the cache: returns a no-argument callable for time_ms."""
    state = {"i": 0}

    def call():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(x)

    return call


def graph_ms(fn, calls=50, warmup=3, reps=20):
    """Milliseconds per call of fn with launch overhead removed: `calls` calls captured in one CUDA graph
    (after 3 eager calls on a side stream, as capture requires), the graph replayed and timed as in time_ms."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    ms = time_ms(graph.replay, warmup=warmup, reps=reps) / calls
    del graph
    return ms


def copy_bandwidth_gbs(nbytes=2 << 30):
    """Device-to-device copy bandwidth, counting bytes read plus bytes written (ANCHORS.md's ceiling)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def device_info():
    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "sms": p.multi_processor_count, "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": datetime.date.today().isoformat()}


def write_json(path, record):
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {path}")


def make_llama(path, shape, tie_word_embeddings=False, max_position_embeddings=4096):
    """A Llama checkpoint of random weights saved by transformers in bf16 at `path` (written once, reused after);
    shape: LlamaConfig's size keys (vocab_size, hidden_size, intermediate_size, num_hidden_layers, heads)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie_word_embeddings, **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    del model
    return path


def make_data(root, vocab, seq, rows):
    """Pre-tokenized JSONL of `rows` rows of `seq` random token ids (packing is then the identity, so every side
    computes its loss over the same seq - 1 targets per row); written once."""
    path = os.path.join(root, f"data-{vocab}-{seq}-{rows}.jsonl")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        with open(path + ".tmp", "w") as f:
            for row in ids.tolist():
                f.write(json.dumps({"input_ids": row}) + "\n")
        os.replace(path + ".tmp", path)
    return path


def read_metrics(run_dir):
    """metrics.jsonl of an anvil run: {step: record} of the training steps."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {m["step"]: m for m in lines if "loss" in m}
