"""bench/quantized_linear: quantized inference of a Llama-7B-shaped model, each of anvil's Linear weight formats
beside the dense bf16 model in one run (issue [quantize] item 4, "Must show": quantized forward tokens/s vs
bf16 at batch >= 8 x 1024: fp8-block >= 1.3x, w8a8-int8 >= 1.3x).

Two measurements, both at M = batch x seq tokens (8 x 1024 by default):
  1. The linears of one decoder layer (q, k, v, o 4096 x 4096; gate, up 11008 x 4096; down 4096 x 11008) as the
     formats run them, activation quantization included (each distinct input once, as the model's SharedInput
     does: q/k/v share one, gate/up one): bf16 torch.mm; "fp8" (block: quantize_fp8 1x128 +
     fp8_gemm with 128x128 weight scales); "fp8-channel" (quantize_fp8 row + fp8_gemm per-channel); "w8a8"
     (quantize_int8 row + int8_gemm); "int4" (the weight dequantized per product, then bf16 GEMM: anvil's
     weight-only path). Anchors for the raw GEMMs in the same run: torch._scaled_mm (cuBLASLt FP8, row-wise
     scales) and torch._int_mm (cuBLASLt int8 -> int32) plus its scale epilogue written in torch.
  2. A 7B-shaped CausalLM of --layers decoder layers (4 by default) forward, the logits of every token, loaded
     with each base_weights: tokens/s, the ratio to the dense model, and the logits' SQNR against it. lm_head
     (4096 x 32000) stays dense bf16 in every format, a quarter of the GEMM work at 2 layers and 3% at 32, so
     fewer layers understate the formats' gain on a whole 7B model; the layer measurement above has no such
     share.
Ratios are last on each line (> 1: faster than bf16).

    python3 bench/quantized_linear.py [--json bench/results/DATE-quantized_linear-h100.json] [--batch 8] [--seq 1024]
    python3 bench/quantized_linear.py --small     # CPU smoke test: tiny shapes, the numbers mean nothing
"""
import argparse
import os
import shutil
import statistics
import time

import torch

import anvil
from common import device_info, time_ms, write_json

ops = anvil.ops
FORMATS = ("fp8", "fp8-channel", "w8a8", "int4")


def timer(dev):
    if dev == "cuda":
        return lambda fn, reps=20: time_ms(fn, warmup=3, reps=reps)

    def cpu_ms(fn, reps=3):
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)
    return cpu_ms


def layer_shapes(hidden, inter):
    """(N, K) of one Llama decoder layer's seven projections."""
    return [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]


# Which input each of the seven reads, as in the model: q, k, v read the normed x; o the attention output; gate and
# up the normed h; down the SwiGLU output. The model quantizes each distinct input once (model::SharedInput), so
# the layer's formats below do too: four activation quantizations, not seven.
LAYER_INPUTS = [0, 0, 0, 1, 2, 2, 3]


def int4_weight(w):
    """Symmetric int4 in groups of 128 (anvil's Linear "int4" arithmetic) -> (q int8, scale (N, K / 128))."""
    n, k = w.shape
    g = w.float().view(n, k // 128, 128)
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 7
    q = torch.round(torch.clamp(g / scale, -7, 7)).to(torch.int8)
    return q.view(n, k), scale.view(n, k // 128)


def layer_linears(m, shapes, dev, ms):
    """Milliseconds for the seven products of one layer, per format, and the anchors."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = {i: torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
         for i, (_, k) in sorted(dict(zip(LAYER_INPUTS, shapes)).items())}
    ws = [torch.randn(n, k, device=dev, generator=g).to(torch.bfloat16) * 0.02 for n, k in shapes]
    fp8_block = [ops.quantize_fp8(w.contiguous(), "block128x128") for w in ws]
    fp8_row = [ops.quantize_fp8(w.contiguous(), "row") for w in ws]
    int8_row = [ops.quantize_int8(w.contiguous(), "row") for w in ws]
    int4 = [int4_weight(w) for w in ws]

    def quantized_inputs(quantize):
        """Each distinct input quantized once, in the layer's order (the quantization is timed with the GEMMs)."""
        done = {}
        for i in LAYER_INPUTS:
            if i not in done:
                done[i] = quantize(x[i])
            yield done[i]

    def run_bf16():
        for w, i in zip(ws, LAYER_INPUTS):
            torch.mm(x[i], w.t())

    def run_fp8():
        for (q, s), (xq, xs) in zip(fp8_block, quantized_inputs(lambda t: ops.quantize_fp8(t, "block1x128"))):
            ops.fp8_gemm(xq, xs, q, s, torch.bfloat16)

    def run_fp8_channel():
        for (q, s), (xq, xs) in zip(fp8_row, quantized_inputs(lambda t: ops.quantize_fp8(t, "row"))):
            ops.fp8_gemm(xq, xs, q, s, torch.bfloat16)

    def run_w8a8():
        for (q, s), (xq, xs) in zip(int8_row, quantized_inputs(lambda t: ops.quantize_int8(t, "row"))):
            ops.int8_gemm(xq, xs, q, s, torch.bfloat16)

    def run_int4():
        for (q, s), (n, k), i in zip(int4, shapes, LAYER_INPUTS):
            w = (q.float().view(n, k // 128, 128) * s.unsqueeze(-1)).view(n, k).to(torch.bfloat16)
            torch.mm(x[i], w.t())

    results = {"bf16": ms(run_bf16), "fp8": ms(run_fp8), "fp8-channel": ms(run_fp8_channel), "w8a8": ms(run_w8a8),
               "int4": ms(run_int4)}
    if dev == "cuda":
        # The anchors: cuBLASLt's own FP8 (row-wise scales) and int8 GEMMs on the same operands, activations
        # quantized by anvil's kernels (the quantize cost is in both columns).
        def run_scaled_mm():
            for (q, s), (xq, xs) in zip(fp8_row, quantized_inputs(lambda t: ops.quantize_fp8(t, "row"))):
                torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=s.view(1, -1), out_dtype=torch.bfloat16)

        def run_int_mm():
            for (q, s), (xq, xs) in zip(int8_row, quantized_inputs(lambda t: ops.quantize_int8(t, "row"))):
                ((torch._int_mm(xq, q.t()).float() * xs) * s.view(1, -1)).to(torch.bfloat16)
        results["anchor torch._scaled_mm (fp8 row)"] = ms(run_scaled_mm)
        results["anchor torch._int_mm + epilogue"] = ms(run_int_mm)
        results["w8a8 path"] = anvil.int8_gemm_path(m, shapes[0][0], shapes[0][1])
    return results


def model_forward(args, dev, dims, ms):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, torch_dtype="bfloat16", **dims)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    shutil.rmtree(args.dir, ignore_errors=True)
    hf.save_pretrained(args.dir)
    del hf
    ids = torch.randint(0, dims["vocab_size"], (args.batch, args.seq), device=dev)
    out, dense_logits = {}, None
    for fmt in ("dense",) + FORMATS:
        model = anvil._C.CausalLM(args.dir, "bfloat16", dev, base_weights=fmt)
        with torch.no_grad():
            logits = model.logits(ids).float()
            if dense_logits is None:
                dense_logits = logits
            sqnr = (10 * torch.log10(dense_logits.pow(2).sum() / (dense_logits - logits).pow(2).sum())).item()
            del logits
            out[fmt] = {"ms": ms(lambda: model.logits(ids), reps=10), "sqnr_db": sqnr}
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    shutil.rmtree(args.dir, ignore_errors=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the model forward")
    ap.add_argument("--small", action="store_true", help="tiny shapes on the CPU (a smoke test; ratios mean nothing)")
    ap.add_argument("--dir", default="/tmp/anvil-bench-quantized")
    args = ap.parse_args()
    dims = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                num_attention_heads=32, num_key_value_heads=32)
    dev = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    if args.small:
        dims = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4)
        args.batch, args.seq = 2, 64
    ms = timer(dev)
    m = args.batch * args.seq
    info = device_info() if dev == "cuda" else {"device": "cpu"}
    print(f"{info['device']}, torch {torch.__version__}; M = {args.batch} x {args.seq} = {m} tokens, "
          f"layer {dims['hidden_size']} / {dims['intermediate_size']}, bf16 activations")

    shapes = layer_shapes(dims["hidden_size"], dims["intermediate_size"])
    lin = layer_linears(m, shapes, dev, ms)
    flops = 2 * m * sum(n * k for n, k in shapes)
    print("one layer's linears (7 GEMMs, activation quantization included):")
    base = lin["bf16"]
    for name, t in lin.items():
        if isinstance(t, str):
            print(f"  {name}: {t}")
            continue
        print(f"  {name:34s} {t:8.3f} ms  {flops / t / 1e9:8.1f} TFLOP/s  {m / t * 1e3:12.0f} tokens/s  "
              f"{base / t:5.2f}x bf16")

    fwd = model_forward(args, dev, dims, ms)
    print(f"{dims['num_hidden_layers']}-layer model forward (logits of every token):")
    for fmt, r in fwd.items():
        print(f"  {fmt:12s} {r['ms']:8.2f} ms  {m / r['ms'] * 1e3:12.0f} tokens/s  SQNR {r['sqnr_db']:6.1f} dB  "
              f"{fwd['dense']['ms'] / r['ms']:5.2f}x bf16")
    goals = {"fp8": 1.3, "w8a8": 1.3}
    verdict = {}
    for fmt, target in goals.items():
        ratio = fwd["dense"]["ms"] / fwd[fmt]["ms"]
        layer_ratio = lin["bf16"] / lin[fmt]
        verdict[fmt] = {"forward_ratio": ratio, "layer_linears_ratio": layer_ratio, "target": target,
                        "met": ratio >= target}
        if not args.small:
            print(f"goal {fmt} forward tokens/s >= {target}x bf16: {ratio:.2f}x: {'met' if ratio >= target else 'NOT met'} "
                  f"(one layer's linears: {layer_ratio:.2f}x)")
    write_json(args.json, {**info, "batch": args.batch, "seq": args.seq, "dims": dims, "layer_linears_ms": lin,
                           "layer_linears_tflop": flops / 1e12, "model_forward": fwd, "goals": verdict})


if __name__ == "__main__":
    main()
