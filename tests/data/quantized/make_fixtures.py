"""Makes the compressed-tensors fixtures in this folder with llm-compressor itself (CPU).

What users pull from the hub as "FP8", "W8A8" and "W4A16" checkpoints are llm-compressor `oneshot` outputs;
there is no hub here, so each fixture is such an output, made from a tiny random model with the recipe the
llm-compressor examples use. The models are tiny (hidden 128 so that every in_features is a multiple of the
128-wide groups, 2 layers, a 512-token cut of tests/data/tokenizers/gpt2, bf16 as hub checkpoints) so that
the committed folders stay small; anvil's reader is tested on them in tests/python/test_compressed_tensors.py.

    python tests/data/quantized/make_fixtures.py            # rewrite the fixtures in place
    python tests/data/quantized/make_fixtures.py --check    # regenerate into a temporary folder, compare
    python tests/data/quantized/make_fixtures.py --only llama-fp8-dynamic --out /tmp/x

--check compares config.json (as JSON) and every tensor of model.safetensors: integer and fp8 tensors exactly,
floating scales within a relative 1e-2, fp8 values in at most 1 % of the elements, and integer values by at most
MAX_STEPS steps in at most MAX_FRACTION of a tensor's values (GPTQ's Cholesky and the observers run in bf16/fp32 on
whatever BLAS kernels the CPU has, and GPTQ turns their last bits into rounding decisions; on one machine with one
thread, reruns are bit-identical).

Pins: llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.11 (the .venv).
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tokenizers", "gpt2")
VOCAB = 512  # tests/data/tokenizers/gpt2 cut to its first 511 tokens + <|endoftext|> (small_tokenizer)
EOS = VOCAB - 1
CALIB_SAMPLES, CALIB_LEN = 32, 64


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=None,
                       rms_norm_eps=1e-5, dtype="bfloat16")


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=True, bos_token_id=EOS,
                         eos_token_id=EOS, pad_token_id=None, rms_norm_eps=1e-5, dtype="bfloat16")


def small_tokenizer(dst):
    """The gpt2 fixture tokenizer cut to VOCAB ids: its byte alphabet and first merges (BPE ids follow merge
    order, so the first ids with the merges that build them are a complete tokenizer), <|endoftext|> last."""
    t = json.load(open(os.path.join(TOKENIZER, "tokenizer.json"), encoding="utf-8"))
    vocab = {tok: i for tok, i in t["model"]["vocab"].items() if i < EOS}
    assert sorted(vocab.values()) == list(range(EOS))
    merges = []
    for m in t["model"]["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    t["model"]["vocab"], t["model"]["merges"] = vocab, merges
    t["added_tokens"] = [dict(t["added_tokens"][0], id=EOS)]  # <|endoftext|>
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(t, f, ensure_ascii=False, indent=None)
    shutil.copy(os.path.join(TOKENIZER, "tokenizer_config.json"), os.path.join(dst, "tokenizer_config.json"))
    return dst


def randomize(model, seed):
    """O(1)-scale weights (as tests/python/hf_models.py): logits far from uniform, router scores apart."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 3.0 if name.endswith("gate.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(p.shape[-1]))
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def recipe(kind):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import SmoothQuantModifier

    ignore = ["lm_head"]
    if kind == "fp8-dynamic":  # llm-compressor examples/quantization_w8a8_fp8
        return QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=ignore)
    if kind == "fp8-static":  # per-tensor weights, calibrated static per-tensor input scales
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=ignore)
    if kind == "fp8-block":  # DeepSeek-V3 style 128x128 weight blocks, dynamic 1x128 activations
        return QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=ignore)
    if kind == "w8a8-int8":  # examples/quantization_w8a8_int8: SmoothQuant, then GPTQ
        return [SmoothQuantModifier(smoothing_strength=0.8), GPTQModifier(targets="Linear", scheme="W8A8", ignore=ignore)]
    if kind == "w4a16":  # examples/quantization_w4a16: GPTQ, groups of 128
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore)
    if kind == "w4a16-asym":  # asymmetric groups of 128: zero points packed beside the scales
        return GPTQModifier(targets="Linear", scheme="W4A16_ASYM", ignore=ignore)
    if kind == "w8a16-asym":  # int8 weights, asymmetric per channel, weight-only (pack-quantized, 8 bits)
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", symmetric=False, strategy="channel"))
        return QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)
    if kind == "moe-w4a16":  # the router gates stay bf16 (as the Mixtral examples ignore them)
        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=ignore + ["re:.*block_sparse_moe.gate$"])
    raise ValueError(kind)


FIXTURES = {
    "llama-fp8-dynamic": ("llama", "fp8-dynamic"),
    "llama-fp8-static": ("llama", "fp8-static"),
    "llama-fp8-block": ("llama", "fp8-block"),
    "llama-w8a8-int8": ("llama", "w8a8-int8"),
    "llama-w4a16": ("llama", "w4a16"),
    "llama-w4a16-asym": ("llama", "w4a16-asym"),
    "llama-w8a16-asym": ("llama", "w8a16-asym"),
    "mixtral-w4a16": ("mixtral", "moe-w4a16"),
}


def make(name, out_root, work):
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM, LlamaForCausalLM

    arch, kind = FIXTURES[name]
    seed = sorted(FIXTURES).index(name)
    torch.manual_seed(seed)
    config = llama_config() if arch == "llama" else mixtral_config()
    model = (LlamaForCausalLM if arch == "llama" else MixtralForCausalLM)(config)
    randomize(model, seed)
    tok = AutoTokenizer.from_pretrained(small_tokenizer(os.path.join(work, "tokenizer")))
    base = os.path.join(work, name + "-base")
    model.to(torch.bfloat16).save_pretrained(base)
    tok.save_pretrained(base)
    # llm-compressor reads the model's name_or_path (config, processor): load it from its folder, as users do.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, VOCAB, (CALIB_SAMPLES, CALIB_LEN), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe(kind), num_calibration_samples=CALIB_SAMPLES,
            max_seq_length=CALIB_LEN, shuffle_calibration_samples=False, moe_calibrate_all_experts=True)
    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    check_calibrated(out)
    return out


def check_calibrated(folder):
    """Every scale finite and non-zero: an expert or layer left uncalibrated is an error, never a fixture."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.endswith("_scale"):
                t = f.get_tensor(key).float()
                if not torch.isfinite(t).all() or (t == 0).any():
                    raise RuntimeError(f"{folder}: {key} has non-finite or zero scales (uncalibrated)")


# GPTQ turns the CPU's float rounding into rounding decisions: its Cholesky and the layer inputs (layer 1's are
# layer 0's quantized output, computed by whatever BLAS kernels the CPU has) differ in their last bits between
# machines, and each column's rounding error is fed into the next. Between the AMD EPYC of 2026-12-07 and the
# machine that made the fixtures: up to 2 steps in at most 7.1 % of a tensor's values (layer 0: 0.2 %). A wrong
# recipe (group size, symmetry, calibration data, scheme) moves most values.
MAX_STEPS, MAX_FRACTION = 2, 0.10


def unpack(words, bits):
    """compressed-tensors' pack_to_int32 inverted: (rows, words) int32 -> (rows, words * 32/bits) unsigned values,
    value j of a word in bits [bits*j, bits*j + bits)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(words.shape[0], -1)


INEXACT = []  # tensors that differ at all (within tolerance or not), for the --check summary


def compare(made, committed):
    """Differences between two fixture folders, as text lines (empty: equal within the stated tolerance)."""
    from safetensors import safe_open

    problems = []
    a = json.load(open(os.path.join(made, "config.json")))
    b = json.load(open(os.path.join(committed, "config.json")))
    a.pop("transformers_version", None), b.pop("transformers_version", None)
    if a != b:
        problems.append(f"{committed}/config.json differs")
    with safe_open(os.path.join(made, "model.safetensors"), "pt") as fa, \
            safe_open(os.path.join(committed, "model.safetensors"), "pt") as fb:
        ka, kb = set(fa.keys()), set(fb.keys())
        if ka != kb:
            problems.append(f"{committed}: tensors differ: only new {sorted(ka - kb)[:5]}, only committed {sorted(kb - ka)[:5]}")
        for k in sorted(ka & kb):
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{committed}: {k} {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
                continue
            if torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y):
                continue
            INEXACT.append(f"{os.path.basename(committed)}/{k}")
            if x.dtype in (torch.int32, torch.int64) and not k.endswith(("weight_packed", "weight_zero_point")):
                problems.append(f"{committed}: {k} differs")
            elif x.dtype in (torch.int32, torch.int8):  # quantized integers: compared value by value, in steps
                if x.dtype == torch.int32:  # packed: the values of each word
                    cols = fb.get_tensor(k[:-len("packed")] + "shape")[1].item()
                    bits = 32 * y.shape[1] // cols
                    x, y = unpack(x, bits)[:, :cols], unpack(y, bits)[:, :cols]
                steps = (x.int() - y.int()).abs()
                frac = (steps > 0).float().mean().item()
                if steps.max().item() > MAX_STEPS or frac > MAX_FRACTION:
                    problems.append(f"{committed}: {k} differs in {frac:.2%} of its values, by up to "
                                    f"{steps.max().item()} steps")
            elif x.dtype == torch.float8_e4m3fn:
                frac = (x.float() != y.float()).float().mean().item()
                if frac > 0.01:
                    problems.append(f"{committed}: {k} differs in {frac:.2%} of its values")
            else:
                rel = ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                if rel > 1e-2:
                    problems.append(f"{committed}: {k} differs by {rel:.2e} (relative to its max)")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    p.add_argument("--only", action="append", choices=sorted(FIXTURES), help="make only these")
    p.add_argument("--out", default=HERE, help="where to write (default: this folder)")
    args = p.parse_args()
    torch.set_num_threads(1)  # one BLAS thread: reruns are bit-identical on one machine
    names = args.only or sorted(FIXTURES)
    with tempfile.TemporaryDirectory() as work:
        out_root = os.path.join(work, "out") if args.check else args.out
        os.makedirs(out_root, exist_ok=True)
        problems = []
        for name in names:
            made = make(name, out_root, work)
            if args.check:
                problems += compare(made, os.path.join(HERE, name))
        if args.check:
            if problems:
                print("\n".join(problems))
                sys.exit(1)
            print(f"{len(names)} fixtures reproduce ({len(INEXACT)} tensors not bit-identical)")


if __name__ == "__main__":
    main()
