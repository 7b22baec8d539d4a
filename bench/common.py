"""What every benchmark shares: CUDA-event timing (median of many runs after warm-up), the device
description, the copy-bandwidth ceiling measured in the same run, and the JSON record."""
import datetime
import json
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
