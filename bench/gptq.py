"""bench/gptq: anvil's GPTQ (quantize/gptq.h through anvil._C) on the Linear shapes of a 7B Llama layer,
beside llm-compressor 0.14's quantize_weight (its Triton path on CUDA) on the same weight and Hessian when
it is installed, in one run.

Goal (issue [quantize]): GPTQ of a whole 7B-shaped model within the 8 minutes bench/quantize_model allows,
so a layer's GPTQ must take seconds: a 4096 x 4096 layer in seconds. Per layer the sweeps are
q/k/v (one sweep, 12288 x 4096), o (4096 x 4096), gate/up (one sweep, 22016 x 4096), down (4096 x 11008);
the printed "model" time is 32 layers of them (calibration forwards not included). Also printed: peak GPU
memory of a sweep, and the fraction of integers equal to llm-compressor's (a rounding tie can flip
where cuBLAS or Triton sum in another order).

    python3 bench/gptq.py [--json out.json] [--quick]      (scripts/gpu-bench.sh gptq)
"""
import argparse
import time

import torch

import anvil
from common import device_info, write_json

C = anvil._C
DEV = "cuda"
LAYERS = 32
SHAPES = {  # name: (rows, in_features); rows of layers sharing an input are concatenated
    "qkv": (3 * 4096, 4096),
    "o": (4096, 4096),
    "gate_up": (2 * 11008, 4096),
    "down": (4096, 11008),
}


def hessian(k, tokens=4096, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(tokens, k, device=DEV, generator=g)
    x = x @ (torch.randn(k, k, device=DEV, generator=g) / k ** 0.5 + 0.3 * torch.eye(k, device=DEV))
    acc = C.HessianAccumulator(k, DEV)
    acc.add(x)
    return acc.hessian()


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def llmc_quantize(w, h, act_order):
    try:
        from compressed_tensors.quantization import QuantizationArgs
        from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
        from llmcompressor.observers import Observer
    except ImportError:
        return None
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128,
                            actorder="weight" if act_order else None)
    obs = Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)
    obs(w)
    qp = obs.get_qparams()
    out, _, _ = quantize_weight(w[None].clone(), h[None].clone(), qp["scale"][None], qp["zero_point"][None], None,
                                args, 128, 0.01)
    return out[0], qp["scale"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--quick", action="store_true", help="the 4096 x 4096 layer only")
    a = ap.parse_args()
    record = {"device": device_info(), "bits": 4, "group_size": 128, "results": []}
    shapes = {"o": SHAPES["o"]} if a.quick else SHAPES
    for act_order in (False, True):
        layer_s = 0.0
        for name, (n, k) in shapes.items():
            w = (torch.randn(n, k, device=DEV) * 0.02).to(torch.bfloat16)
            h = hessian(k)
            C.gptq_quantize(w[:256], h, act_order=act_order)  # warm-up (cuSOLVER handles, allocator)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            s, r = timed(lambda: C.gptq_quantize(w, h, act_order=act_order))
            peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
            row = {"shape": name, "rows": n, "in_features": k, "act_order": act_order, "anvil_s": round(s, 3),
                   "peak_gb": round(peak_gb, 2), "rtn_fallback": r["rtn_fallback"]}
            ref = None
            if n * k <= 4096 * 4096 * 3:  # llm-compressor on the smaller sweeps only (time)
                t_ref, ref = timed(lambda: llmc_quantize(w, h, act_order))
            if ref is not None:
                dq, scale = ref
                q_ref = torch.round(dq.float() / scale.float().repeat_interleave(128, 1))
                row["llmcompressor_s"] = round(t_ref, 3)
                row["int_equal"] = round((r["q"].float() == q_ref).float().mean().item(), 6)
                row["scale_equal"] = bool(torch.equal(r["scale"], scale))
            layer_s += s
            print(row)
            record["results"].append(row)
            del w, h, r
            torch.cuda.empty_cache()
        if not a.quick:
            print(f"act_order {act_order}: one layer {layer_s:.2f} s, {LAYERS} layers {LAYERS * layer_s / 60:.2f} min")
            record[f"model_min_act_order_{act_order}"] = round(LAYERS * layer_s / 60, 2)
    write_json(a.json, record)


if __name__ == "__main__":
    main()
