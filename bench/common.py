"""What every benchmark shares: CUDA-event timing (median of many runs after warm-up), the device
description, the copy-bandwidth ceiling measured in the same run, and the JSON record."""
import datetime
import json
import statistics

import torch


def time_ms(fn, warmup=5, reps=30):
    """Median milliseconds of fn() over reps runs, each between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


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
