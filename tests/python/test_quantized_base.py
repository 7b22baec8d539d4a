"""Quantized base weights (anvil::model::Linear's "fp8" / "int8" formats; load_causal_lm's base_weights):
FP8 checkpoints kept in FP8, dense checkpoints quantized at load, LoRA over a quantized base.

Oracles: an int8 weight-only model must compute exactly what transformers computes with the dequantized
weights (fp32, so to rounding); an fp8 model (activations quantized to 1x128 blocks too) must stay within
the fp8-quantized-layer rule of ARCHITECTURE.md (SQNR >= 25 dB against the dense model); LoRA gradients over
an int8 base equal those over the dense model holding the dequantized weights."""
import json
import os

import pytest
import torch

import anvil
from hf_models import randomize

transformers = pytest.importorskip("transformers")
_C = anvil._C

# in_features multiples of 128 (the FP8 GEMM's 1x128 activation blocks): hidden 128, ffn 256, 4 x 32 heads.
TINY = dict(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, max_position_embeddings=64, tie_word_embeddings=False)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dense"))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    randomize(m, 0)
    m.save_pretrained(d)
    return d


def rewrite_weights(src, dst, fn):
    """A copy of checkpoint src whose projection weights are fn(name, w) (a dict of tensors to write)."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out = {}
    for name, w in tensors.items():
        if name.endswith(".weight") and any(p in name for p in PROJ):
            out.update(fn(name, w))
        else:
            out[name] = w
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    return cfg


def write_config(dst, cfg):
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)


def ids(seed=1):
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))


def sqnr_db(ref, x):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def test_int8_base_equals_transformers_with_dequantized_weights(dense_dir, tmp_path):
    ref_dir = str(tmp_path / "dequantized")

    def dequantized(name, w):
        q, s = anvil.quantize_int8(w.contiguous(), "row")
        return {name: anvil.dequantize_int8(q, s, "row", torch.float32)}
    write_config(ref_dir, rewrite_weights(dense_dir, ref_dir, dequantized))
    ref = transformers.LlamaForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()

    ours = _C.CausalLM(dense_dir, dtype="float32", base_weights="int8")
    formats = ours.weight_formats()
    assert formats["lm_head"] == "dense"
    assert all(f == "int8" for n, f in formats.items() if n != "lm_head") and len(formats) == 1 + 7 * 2
    with torch.no_grad():
        want = ref(ids()).logits
    got = ours.logits(ids())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def fp8_emulated(model):
    """transformers' model with each projection computing what anvil's fp8 Linear computes on the CPU:
    x quantized to 1x128 blocks, W to 128x128 blocks, both dequantized, fp32 product."""
    def forward(self, x):
        q, s = anvil.quantize_fp8(x.reshape(-1, x.shape[-1]).contiguous(), "block1x128")
        xd = anvil.dequantize_fp8(q, s, "block1x128", torch.float32).view(x.shape)
        wq, ws = anvil.quantize_fp8(self.weight.contiguous(), "block128x128")
        return torch.nn.functional.linear(xd, anvil.dequantize_fp8(wq, ws, "block128x128", torch.float32))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in PROJ:
            mod.forward = forward.__get__(mod)
    return model


def test_fp8_base_from_a_dense_checkpoint_equals_the_fp8_emulation(dense_dir):
    ref = fp8_emulated(transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval())
    dense = _C.CausalLM(dense_dir, dtype="float32", base_weights="dense")
    fp8 = _C.CausalLM(dense_dir, dtype="float32", base_weights="fp8")
    assert all(f == "fp8" for n, f in fp8.weight_formats().items() if n != "lm_head")
    with torch.no_grad():
        want = ref(ids()).logits
    got = fp8.logits(ids())
    assert not torch.equal(got, dense.logits(ids()))  # quantization happened
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_fp8_checkpoint_keeps_its_weights_as_stored(dense_dir, tmp_path):
    fp8_dir = str(tmp_path / "fp8")

    def quantized(name, w):
        q, s = anvil.quantize_fp8(w.contiguous(), "block128x128")
        return {name: q, name + "_scale_inv": s}
    cfg = rewrite_weights(dense_dir, fp8_dir, quantized)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                  "weight_block_size": [128, 128]}
    write_config(fp8_dir, cfg)
    kept = _C.CausalLM(fp8_dir, dtype="float32", base_weights="fp8")
    auto = _C.CausalLM(fp8_dir, dtype="float32")  # CPU: auto dequantizes
    assert all(f == "fp8" for n, f in kept.weight_formats().items() if n != "lm_head")
    assert all(f == "dense" for f in auto.weight_formats().values())
    # Kept as stored: computes what quantizing the dense original at load computes (requantizing the
    # dequantized blocks in fp32 gives back the stored e4m3 values and scales).
    ref = fp8_emulated(transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval())
    with torch.no_grad():
        want = ref(ids()).logits
    got = kept.logits(ids())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert sqnr_db(auto.logits(ids()), got) >= 15  # and close to the dequantized model (fp8 activations)
    with pytest.raises(RuntimeError, match="quantized base weight"):
        kept.save(str(tmp_path / "saved"))


def test_bad_base_weights_value_is_named(dense_dir):
    with pytest.raises(RuntimeError, match="base_weights 'int3' is not one of auto, dense, fp8, fp8-channel, "
                                           "fp8-tensor, w8a8, int8, int4"):
        _C.CausalLM(dense_dir, base_weights="int3")


def test_lora_gradients_over_an_int8_base_equal_the_dequantized_dense_model(dense_dir, tmp_path):
    ref_dir = str(tmp_path / "dequantized")

    def dequantized(name, w):
        q, s = anvil.quantize_int8(w.contiguous(), "row")
        return {name: anvil.dequantize_int8(q, s, "row", torch.float32)}
    write_config(ref_dir, rewrite_weights(dense_dir, ref_dir, dequantized))
    config = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                         "target_modules": "all-linear"})
    grads = []
    for model in (_C.CausalLM(dense_dir, dtype="float32", base_weights="int8"), _C.CausalLM(ref_dir, dtype="float32")):
        named = _C.apply_lora(model, config, 3)
        with torch.no_grad():
            for _, t in named:  # non-zero B, so every gradient path is exercised
                t.normal_(0, 0.1, generator=torch.Generator().manual_seed(t.numel()))
        grads.append(_C.adapter_gradients(model, ids(2)))
    ours, ref = grads
    assert set(ours) == set(ref) and len(ours) == 2 * 7 * 2
    for name, g in ours.items():
        scale = ref[name].abs().max().item()
        assert scale > 0, name
        assert (g - ref[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name
    model = _C.CausalLM(dense_dir, dtype="float32", base_weights="int8")
    _C.apply_lora(model, config, 3)
    with pytest.raises(ValueError, match="int8 base weight; merge into a dense base"):
        _C.merge_adapter(model)


@pytest.mark.cuda
@pytest.mark.parametrize("base_weights", ["fp8", "int8"])
def test_quantized_base_on_the_gpu_matches_its_cpu_emulation(dense_dir, base_weights):
    """bf16 on the GPU (the sm_90a FP8 GEMM for fp8): logits and LoRA gradients against the fp32 emulation."""
    ref = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    if base_weights == "fp8":
        ref = fp8_emulated(ref)
    else:
        with torch.no_grad():
            for name, mod in ref.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in PROJ:
                    q, s = anvil.quantize_int8(mod.weight.contiguous(), "row")
                    mod.weight.copy_(anvil.dequantize_int8(q, s, "row", torch.float32))
    gpu = _C.CausalLM(dense_dir, dtype="bfloat16", device="cuda", base_weights=base_weights)
    assert gpu.weight_formats()["model.layers.0.mlp.down_proj"] == base_weights
    with torch.no_grad():
        want = ref(ids()).logits
        dense_ref = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()(ids()).logits

    def err(got, ref):
        return (1 - 2 * (got * ref).sum() / (got.pow(2) + ref.pow(2)).sum()).item()
    got = gpu.logits(ids().cuda()).float().cpu()
    # The whole model runs in bf16 on the GPU. int8: bound its distance from the fp32 emulation by twice the
    # distance of the dense bf16 model from its own fp32 reference (the house rule for bf16 logits). fp8: the
    # activations are quantized too, and bf16 activations round to other e4m3 values than the emulation's
    # fp32 ones (independent quantization noise of the same size, measured 3.6e-3 here), so the rule is that
    # the GPU's fp8 model is no further from the dense fp32 model than twice what fp8 itself costs (the
    # emulation's distance) plus the bf16 bound.
    dense_bf16 = _C.CausalLM(dense_dir, dtype="bfloat16", device="cuda", base_weights="dense")
    bound = err(dense_bf16.logits(ids().cuda()).float().cpu(), dense_ref)
    if base_weights == "int8":
        assert err(got, want) <= 2 * bound + 1e-4
    else:
        assert err(got, dense_ref) <= 2 * err(want, dense_ref) + 2 * bound
    config = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                         "target_modules": "all-linear"})
    named = _C.apply_lora(gpu, config, 3)
    with torch.no_grad():
        for _, t in named:
            t.normal_(0, 0.1)
    grads = _C.adapter_gradients(gpu, ids(2).cuda())
    assert len(grads) == 2 * 7 * 2 and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())


def test_anvil_lora_over_an_int8_base_trains_and_saves_a_peft_adapter(tmp_path):
    """`anvil lora --model.base_weights=int8` on the demo: the loss falls over a few steps and the adapter
    is written (the same keys as over the dense base)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    binary = anvil.executable()  # the build tree's bin/anvil, or the installed wheel's
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([binary, "lora", "--config", os.path.join(root, "examples/tiny/lora.json"),
                           "--model.base_weights=int8", "--train.steps=6", "--eval.every=0", "--eval.prompts=[]",
                           "--output.log_every=1", f"--output.dir={out}"], cwd=root, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from safetensors import safe_open
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 4 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in keys)


# ---- the Linear formats of [quantize] (fp8-channel, fp8-tensor, w8a8, int8 groups, int4) -----------------------
# Each format's product written out here from docs/FORMATS.md "Linear weight formats", independently of the C++:
# the weight quantized by round to nearest (the ops' arithmetic), the activations by the quantize ops (the
# reference the GEMMs' callers use), the product in fp32 (fp64 for w8a8's exact integer sums).

FORMATS = ("fp8-channel", "fp8-tensor", "w8a8", "int8", "int4")


def rtn_groups(w, group, qmax):
    """Symmetric round to nearest per group of `group` inputs: scale = max(amax, 1e-10) / qmax in fp32,
    q = round_half_even(clamp(w / scale, -qmax, qmax)) -> (q (out, in) int8, scale (out, in / group))."""
    out, inp = w.shape
    x = w.float().view(out, inp // group, group)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / qmax
    q = torch.round(torch.clamp(x / scale, -qmax, qmax))
    return q.to(torch.int8).view(out, inp), scale.view(out, inp // group)


def dequantized_weight(fmt, w):
    if fmt == "fp8-channel":
        return anvil.dequantize_fp8(*anvil.quantize_fp8(w.contiguous(), "row"), "row", torch.float32)
    if fmt == "fp8-tensor":
        return anvil.dequantize_fp8(*anvil.quantize_fp8(w.contiguous(), "tensor"), "tensor", torch.float32)
    q, s = rtn_groups(w, {"w8a8": w.shape[1], "int8": w.shape[1], "int4": 128}[fmt], 7 if fmt == "int4" else 127)
    return (q.float().view(q.shape[0], s.shape[1], -1) * s.unsqueeze(-1)).view(q.shape)


def emulated(model, fmt):
    """transformers' model with each projection computing the format's written-out product."""
    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        if fmt in ("fp8-channel", "fp8-tensor"):
            q, s = anvil.quantize_fp8(x2, "row")
            y = anvil.dequantize_fp8(q, s, "row", torch.float32) @ dequantized_weight(fmt, self.weight).T
        elif fmt == "w8a8":
            q, s = anvil.quantize_int8(x2, "row")
            wq, ws = rtn_groups(self.weight, self.weight.shape[1], 127)
            acc = (q.double() @ wq.double().T).float()  # exact integer sums
            y = acc * s * ws.view(1, -1)
        else:
            y = x2 @ dequantized_weight(fmt, self.weight).T
        return y.view(*x.shape[:-1], -1)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in PROJ:
            mod.forward = forward.__get__(mod)
    return model


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_computes_its_written_formula(dense_dir, fmt):
    ref = emulated(transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval(), fmt)
    ours = _C.CausalLM(dense_dir, dtype="float32", base_weights=fmt)
    formats = ours.weight_formats()
    assert formats["lm_head"] == "dense" and all(f == fmt for n, f in formats.items() if n != "lm_head")
    with torch.no_grad():
        want = ref(ids()).logits
    got = ours.logits(ids())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    # dense_weight dequantizes every format to the written-out weight
    w = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).model.layers[1].mlp.down_proj.weight
    assert torch.allclose(ours.dense_weight("model.layers.1.mlp.down_proj"), dequantized_weight(fmt, w.detach()),
                          rtol=0, atol=0)


# SQNR (dB) of each format's logits against the dense fp32 model on the tiny random Llama (hf_models.randomize
# weights, which make its logits sensitive), measured 2026-12-06 on the CPU with ids(5) / ids(6): fp8 19.8 / 18.8,
# fp8-channel 20.3 / 19.1, fp8-tensor 19.7 / 19.0, w8a8 31.2 / 30.1, int8 34.5 / 34.0, int4 (RTN, g128) 9.5 / 8.8.
# The bounds sit about 2 dB under; the order (int8 weight-only best, int4 worst, fp8's 3-bit mantissa on both
# operands below int8's 7 bits) is asserted too.
SQNR_DB = {"fp8": 17, "fp8-channel": 17, "fp8-tensor": 17, "w8a8": 28, "int8": 32, "int4": 7}


def test_quantized_logits_stay_close_to_the_dense_model(dense_dir):
    dense = _C.CausalLM(dense_dir, dtype="float32", base_weights="dense").logits(ids(5))
    sqnr = {}
    for fmt in SQNR_DB:
        got = _C.CausalLM(dense_dir, dtype="float32", base_weights=fmt).logits(ids(5))
        assert not torch.equal(got, dense)
        sqnr[fmt] = sqnr_db(dense, got)
        assert sqnr[fmt] >= SQNR_DB[fmt], (fmt, sqnr[fmt])
    assert sqnr["int8"] > sqnr["w8a8"] > max(sqnr["fp8"], sqnr["fp8-channel"], sqnr["fp8-tensor"]) > sqnr["int4"]


def ct_quantized(w, bits, group, symmetric):
    """compressed-tensors' own quantizer (the W4A16 / W8A16 checkpoints llm-compressor writes) -> (q int8,
    scale, zero_point int8 or None, dequantized weight)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    g = w.float().view(w.shape[0], -1, group)
    scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    q = quantize(w.float(), scale, zp, args)
    deq = dequantize(q, scale, zp, args)
    return q.to(torch.int8), scale, (None if symmetric else zp.to(torch.int8)), deq


@pytest.mark.parametrize("fmt,bits,group,symmetric", [("int4", 4, 64, False), ("int4", 4, 32, True),
                                                      ("int8", 8, 32, False)])
def test_grouped_weights_with_zero_points_equal_compressed_tensors(dense_dir, tmp_path, fmt, bits, group, symmetric):
    """Weights quantized by compressed-tensors (asymmetric: zero points) set into anvil's int4 / int8 formats:
    dense_weight equals compressed-tensors' dequantize bit for bit, and the logits equal transformers' on the
    dequantized weights."""
    pytest.importorskip("compressed_tensors")
    ours = _C.CausalLM(dense_dir, dtype="float32", base_weights="dense")
    hf = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    modules = dict(hf.named_modules())
    for name in ours.weight_formats():
        if name == "lm_head":
            continue
        w = modules[name].weight.detach()
        q, scale, zp, deq = ct_quantized(w, bits, group, symmetric)
        assert q.min().item() >= -(2 ** (bits - 1)) and q.max().item() < 2 ** (bits - 1)
        ours.set_quantized_weight(name, fmt, q, scale, zp, group)
        assert torch.equal(ours.dense_weight(name), deq), name
        with torch.no_grad():
            modules[name].weight.copy_(deq)
    assert all(f == fmt for n, f in ours.weight_formats().items() if n != "lm_head")
    with torch.no_grad():
        want = hf(ids()).logits
    got = ours.logits(ids())
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_bad_quantized_weights_are_named(dense_dir):
    m = _C.CausalLM(dense_dir, dtype="float32", base_weights="dense")
    name = "model.layers.0.mlp.down_proj"  # (128, 256)
    q8 = torch.zeros(128, 256, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="weight format 'int2' is not one of fp8, fp8-channel, fp8-tensor, w8a8, int8, int4"):
        m.set_quantized_weight(name, "int2", q8, torch.ones(128, 1))
    with pytest.raises(RuntimeError, match=r"int4 weight_scale must be \(out, in / group_size\)"):
        m.set_quantized_weight(name, "int4", q8, torch.ones(128, 3))
    with pytest.raises(RuntimeError, match="int4 group_size 64 does not match weight_scale"):
        m.set_quantized_weight(name, "int4", q8, torch.ones(128, 2), None, 64)
    with pytest.raises(RuntimeError, match="weight_zero_point must be int8"):
        m.set_quantized_weight(name, "int4", q8, torch.ones(128, 2), torch.zeros(128, 2, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="weight_zero_point must have weight_scale's shape"):
        m.set_quantized_weight(name, "int4", q8, torch.ones(128, 2), torch.zeros(128, 1, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="a zero point applies to int8 and int4 .* only, not w8a8"):
        m.set_quantized_weight(name, "w8a8", q8, torch.ones(128, 1), torch.zeros(128, 1, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"w8a8 weight_scale must be \(out, 1\) = \(128, 1\)"):
        m.set_quantized_weight(name, "w8a8", q8, torch.ones(128, 2))
    with pytest.raises(RuntimeError, match="a fp8-channel weight must be float8_e4m3fn"):
        m.set_quantized_weight(name, "fp8-channel", q8, torch.ones(128, 1))
    with pytest.raises(RuntimeError, match=r"fp8-tensor weight_scale must be a scalar \(\)"):
        m.set_quantized_weight(name, "fp8-tensor", q8.view(torch.float8_e4m3fn), torch.ones(128, 1))
    with pytest.raises(RuntimeError, match="weight_scale must be float32"):
        m.set_quantized_weight(name, "int8", q8, torch.ones(128, 1, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="quantized weight shape"):
        m.set_quantized_weight(name, "int8", q8.t().contiguous(), torch.ones(256, 1))
    with pytest.raises(RuntimeError, match="group_size applies to int8 and int4 only"):
        m.quantize_weights("w8a8", 64)
    assert m.weight_formats()[name] == "dense"  # nothing half-set by the refusals
    assert m.quantize_weights("int4", 64) == 14 and m.dense_weight(name).shape == (128, 256)
    with pytest.raises(RuntimeError, match="already quantized"):
        m.set_quantized_weight(name, "int8", q8, torch.ones(128, 1))
    # compressed-tensors' per-tensor scales, shape (1), are taken as ()
    m2 = _C.CausalLM(dense_dir, dtype="float32", base_weights="dense")
    q, s = anvil.quantize_fp8(torch.randn(128, 256), "tensor")
    m2.set_quantized_weight(name, "fp8-tensor", q, s.reshape(1))
    assert m2.weight_formats()[name] == "fp8-tensor" and torch.equal(m2.dense_weight(name), q.float() * s)


# Per-tensor cosine of the adapter gradients over an activation-quantized base to those over the dequantized dense
# model, smallest measured 2026-12-06 (CPU): fp8-channel 0.986, fp8-tensor 0.986, w8a8 0.998 (e4m3 activations keep
# 3 mantissa bits, int8 per-token ~7). A missing dX through the frozen bases would leave only the residual path.
COS_BOUND = {"fp8-channel": 0.97, "fp8-tensor": 0.97, "w8a8": 0.99}


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_gradients_flow_over_each_format(dense_dir, tmp_path, fmt):
    """LoRA over a quantized base: weight-only formats give the gradients of the dense model holding the
    dequantized weights (to fp32 rounding); the activation-quantized ones (fp8-channel, fp8-tensor, w8a8) differ
    only by their activation rounding (cosine per tensor, COS_BOUND), which needs dX through every frozen base."""
    ref_dir = str(tmp_path / "dequantized")
    write_config(ref_dir, rewrite_weights(dense_dir, ref_dir, lambda name, w: {name: dequantized_weight(fmt, w)}))
    config = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                         "target_modules": "all-linear"})
    grads = []
    for model in (_C.CausalLM(dense_dir, dtype="float32", base_weights=fmt), _C.CausalLM(ref_dir, dtype="float32")):
        named = _C.apply_lora(model, config, 3)
        with torch.no_grad():
            for _, t in named:
                t.normal_(0, 0.1, generator=torch.Generator().manual_seed(t.numel()))
        grads.append(_C.adapter_gradients(model, ids(2)))
    ours, ref = grads
    assert set(ours) == set(ref) and len(ours) == 2 * 7 * 2
    for name, g in ours.items():
        scale = ref[name].abs().max().item()
        assert scale > 0 and torch.isfinite(g).all(), name
        if fmt in ("int8", "int4"):
            assert (g - ref[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name
        else:
            cos = torch.nn.functional.cosine_similarity(g.flatten().double(), ref[name].flatten().double(), dim=0)
            assert cos.item() >= COS_BOUND[fmt], (name, cos.item())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_on_the_gpu_matches_its_cpu_emulation(dense_dir, fmt):
    """bf16 on the GPU (fp8_gemm's sm_90a kernels, int8_gemm's tensor-core paths): logits within the bf16 rule
    against the fp32 emulation (twice the dense bf16 model's distance from fp32, plus what activation
    quantization of bf16 rather than fp32 inputs adds: twice the format's own cost), LoRA gradients finite.
    A bf16 model quantizes its bf16 weights, so the emulation quantizes the weights rounded to bf16: int4's grid
    is coarse enough that the ties bf16 rounding flips cost 15x the bound otherwise (3.0e-3 against 4.6e-5)."""
    ref = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ref = emulated(ref, fmt)
    dense_ref = transformers.LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    gpu = _C.CausalLM(dense_dir, dtype="bfloat16", device="cuda", base_weights=fmt)
    assert gpu.weight_formats()["model.layers.0.mlp.down_proj"] == fmt
    with torch.no_grad():
        want = ref(ids()).logits
        dense_want = dense_ref(ids()).logits

    def err(got, ref):
        return (1 - 2 * (got * ref).sum() / (got.pow(2) + ref.pow(2)).sum()).item()
    got = gpu.logits(ids().cuda()).float().cpu()
    dense_bf16 = _C.CausalLM(dense_dir, dtype="bfloat16", device="cuda", base_weights="dense")
    bound = err(dense_bf16.logits(ids().cuda()).float().cpu(), dense_want)
    if fmt in ("int8", "int4"):
        assert err(got, want) <= 2 * bound + 1e-4
    else:
        assert err(got, dense_want) <= 2 * err(want, dense_want) + 2 * bound
    config = json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
                         "target_modules": "all-linear"})
    named = _C.apply_lora(gpu, config, 3)
    with torch.no_grad():
        for _, t in named:
            t.normal_(0, 0.1)
    grads = _C.adapter_gradients(gpu, ids(2).cuda())
    assert len(grads) == 2 * 7 * 2 and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads.values())
