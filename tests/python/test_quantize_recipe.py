"""`anvil quantize` end to end (the recipe; tests/python/test_quantize.py tests the ops).

Oracles: the bytes of every quantized weight are anvil's ops' (torch.ops.anvil.quantize_fp8 / quantize_int8, the
arithmetic of docs/FORMATS.md) on the source weight; compressed-tensors 0.19's own compressors decompress each
compressed-tensors export to exactly anvil's dequantized weights; transformers 5.17 loads the exports on the CPU and
gives anvil's logits on them (fp32: max |diff| <= 1e-4 x max |logit|); the quality figures of the demo model are
held to the issue's targets; bad input fails naming the argument; a kill leaves no half-written output; a model
twice the size of the recipe's peak resident memory quantizes (the peak measured by the kernel)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import anvil
from hf_models import randomize

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TOKENIZER_DIR = os.path.join(ROOT, "examples", "tiny", "tokenizer")
DEMO = os.path.join(ROOT, "examples", "tiny", "base")
DATA = os.path.join(ROOT, "examples", "tiny", "data")
LOGIT_RTOL = 1e-4
# Every shape a multiple of 128, so that every scheme (fp8-block's 128x128 blocks) fits every Linear.
FIT = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=False)


def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


def quantize(*args, check=True, **kwargs):
    r = subprocess.run([anvil_binary(), "quantize", *args], capture_output=True, text=True, **kwargs)
    if check and r.returncode != 0:
        raise AssertionError(f"anvil quantize {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def make_model(directory, seed=1, **overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(FIT, **overrides)))
    randomize(model, seed=seed)
    model.save_pretrained(directory)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), directory)
    return directory


@pytest.fixture(scope="module")
def fit_model(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("fit")))


def tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as s:
                for k in s.keys():
                    out[k] = s.get_tensor(k)
    return out


def linear_names(src):
    return sorted(k[: -len(".weight")] for k, v in src.items() if v.dim() == 2 and "layers." in k)


def anvil_dequantized(w, scheme):
    """anvil's FineGrainedFP8-style quantization of w (N, K) by the ops (fp32 scales), dequantized to fp32."""
    ops = torch.ops.anvil
    g = {"fp8-block": "block128x128", "fp8-channel": "row", "fp8-tensor": "tensor"}[scheme]
    q, s = ops.quantize_fp8(w, g)
    return q, s, ops.dequantize_fp8(q, s, g, torch.float32)


# ---- FineGrainedFP8 ------------------------------------------------------------------------------------------------

def test_fp8_block_writes_finegrained_fp8_that_transformers_and_anvil_load_alike(fit_model, tmp_path):
    out = str(tmp_path / "fp8")
    quantize("--model", fit_model, "--scheme", "fp8-block", "--out", out)
    config = json.load(open(os.path.join(out, "config.json")))
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["activation_scheme"] == "dynamic"
    assert qc["weight_block_size"] == [128, 128] and "lm_head" in qc["modules_to_not_convert"]
    for f in ("tokenizer.json", "tokenizer_config.json", "report.json"):
        assert os.path.exists(os.path.join(out, f)), f
    src, got = tensors(fit_model), tensors(out)
    for m in linear_names(src):
        q, s, _ = anvil_dequantized(src[m + ".weight"], "fp8-block")
        assert got[m + ".weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(got[m + ".weight"].view(torch.uint8), q.view(torch.uint8)), m
        assert got[m + ".weight_scale_inv"].dtype == torch.float32 and torch.equal(got[m + ".weight_scale_inv"], s), m
    assert torch.equal(got["lm_head.weight"], src["lm_head.weight"])  # kept
    assert torch.equal(got["model.layers.0.input_layernorm.weight"], src["model.layers.0.input_layernorm.weight"])

    # transformers on the CPU dequantizes FineGrainedFP8 weights at load (no FP8 GEMM there); anvil does the same.
    ids = torch.randint(0, FIT["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(3))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = anvil._C.CausalLM(out, dtype="float32").logits(ids)
    assert (ours - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()
    # ... and they are the dequantized weights', not the source's.
    dense = transformers.AutoModelForCausalLM.from_pretrained(fit_model, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (dense(ids).logits - ref).abs().max() > 10 * LOGIT_RTOL * ref.abs().max()


# ---- compressed-tensors -----------------------------------------------------------------------------------------

# (scheme, extra arguments): every round-to-nearest scheme with a compressed-tensors export.
CT_SCHEMES = [("fp8-channel", []), ("fp8-tensor", []), ("fp8-block", ["--output.format=compressed-tensors"]),
              ("int8-weight", []), ("int4-weight", []), ("int4-weight", ["--quantize.symmetric=false"])]
CT_FORMATS = {"fp8-channel": "float-quantized", "fp8-tensor": "float-quantized", "fp8-block": "float-quantized",
              "int8-weight": "pack-quantized", "int4-weight": "pack-quantized", "w8a8-int8": "int-quantized"}


def export_scheme(out):
    """The export's one config group as compressed-tensors parses it, and its format."""
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.load(open(os.path.join(out, "config.json")))["quantization_config"])
    scheme = qc.config_groups["group_0"]
    return scheme, scheme.format or qc.format


def ct_decompress(out, module_tensors):
    """compressed-tensors' own compressor of the export's format, on one module's tensors (local names)."""
    from compressed_tensors.compressors import BaseCompressor

    scheme, fmt = export_scheme(out)
    return BaseCompressor.get_value_from_registry(fmt).decompress(module_tensors, scheme)["weight"]


def llm_compressor_rtn(w, scheme, fmt):
    """llm-compressor 0.14's round to nearest of one weight: its weight observer (the scheme's, min-max) on w in w's
    own dtype, then compressed-tensors' compressor against that scale -> the module's checkpoint tensors."""
    from compressed_tensors.compressors import BaseCompressor
    from llmcompressor.observers import Observer

    obs = Observer.load_from_registry(scheme.weights.observer or "minmax", base_name="weight", args=scheme.weights.model_copy())
    obs(w)
    qp = obs.get_qparams()
    sd = {"weight": w, "weight_scale": qp["scale"]}
    if not scheme.weights.symmetric:
        sd["weight_zero_point"] = qp["zero_point"]
    return BaseCompressor.get_value_from_registry(fmt).compress(sd, scheme)


def module_local(got, m):
    return {k[len(m) + 1:]: v for k, v in got.items() if k.startswith(m + ".") and k != m + ".bias"}


def same_bits(a, b):
    view = (lambda t: t.contiguous().view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(view(a), view(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("scheme,extra", CT_SCHEMES)
def test_compressed_tensors_export_is_llm_compressors(fit_model, tmp_path, scheme, extra, dtype):
    """Every tensor of every quantized module is what llm-compressor writes for the same weight in the model's dtype
    (scales in that dtype, q quantized against the rounded scale), compressed-tensors decompresses it to exactly the
    weights anvil's loader holds, and the format is the one compressed-tensors infers for the scheme (what vLLM's
    scheme selection needs: weight-only int8 is pack-quantized)."""
    from compressed_tensors.compressors.format import infer_module_format

    out = str(tmp_path / scheme)
    quantize("--model", fit_model, "--scheme", scheme, "--out", out, f"--model.dtype={dtype}", *extra)
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert "lm_head" in qc["ignore"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    ct_scheme, fmt = export_scheme(out)
    assert fmt == qc["format"] == CT_FORMATS[scheme]
    assert infer_module_format(torch.nn.Linear, ct_scheme).value == fmt
    src, got = tensors(fit_model), tensors(out)
    loaded = anvil._C.CausalLM(out, "", "cpu", "dense")
    assert loaded.dtype == dtype
    state = loaded.state_dict()
    wdt = getattr(torch, dtype)
    for m in linear_names(src):
        local = module_local(got, m)
        theirs = llm_compressor_rtn(src[m + ".weight"].to(wdt), ct_scheme, fmt)
        assert sorted(local) == sorted(theirs), (m, sorted(local), sorted(theirs))
        for k in theirs:
            assert same_bits(local[k], theirs[k]), f"{scheme} {dtype} {m}.{k}"
        assert local["weight_scale"].dtype == wdt
        w = ct_decompress(out, local)
        assert w.dtype == wdt and torch.equal(state[m + ".weight"], w), f"{scheme} {dtype} {m}"


def test_w8a8_export_holds_model_dtype_scales_that_decompress_to_the_loaded_weights(fit_model, tmp_path):
    """w8a8-int8 (SmoothQuant moves the weights first, so the source is no oracle): int-quantized, bf16 scales of
    amax / 127.5 per row (llm-compressor's observer on the smoothed weight), decompressed by compressed-tensors to
    the weights anvil loads."""
    out = str(tmp_path / "w8a8")
    quantize("--model", fit_model, "--scheme", "w8a8-int8", "--out", out, "--model.dtype=bfloat16",
             "--calib", os.path.join(DATA, "general_train.jsonl"), "--data.calib_samples=4", "--data.calib_seq_len=64")
    ct_scheme, fmt = export_scheme(out)
    assert fmt == "int-quantized" and ct_scheme.input_activations.strategy == "token"
    got, state = tensors(out), anvil._C.CausalLM(out, "", "cpu", "dense").state_dict()
    for m in linear_names(tensors(fit_model)):
        local = module_local(got, m)
        assert local["weight"].dtype == torch.int8 and local["weight_scale"].dtype == torch.bfloat16
        assert local["weight"].min() == -128 or local["weight"].max() == 127  # the amax maps to +-127.5, rounded
        assert torch.equal(state[m + ".weight"], ct_decompress(out, local)), m


def test_int8_weight_reads_back_in_the_old_int_quantized_layout_too(fit_model, tmp_path):
    """Exports before 2026-12-07 wrote int8-weight as int-quantized (`weight` I8): anvil's loader reads both layouts
    to the same weights (compressed-tensors' own pack/unpack turn one into the other)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    new = str(tmp_path / "new")
    quantize("--model", fit_model, "--scheme", "int8-weight", "--out", new, "--model.dtype=bfloat16")
    old = str(tmp_path / "old")
    shutil.copytree(new, old)
    config = json.load(open(os.path.join(old, "config.json")))
    config["quantization_config"]["format"] = "int-quantized"
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "int-quantized"
    json.dump(config, open(os.path.join(old, "config.json"), "w"))
    got = tensors(new)
    rewritten = {}
    for k, v in got.items():
        if k.endswith(".weight_packed"):
            m = k[: -len(".weight_packed")]
            shape = torch.Size(got[m + ".weight_shape"].tolist())
            rewritten[m + ".weight"] = unpack_from_int32(v, 8, shape).to(torch.int8)
        elif not k.endswith(".weight_shape"):
            rewritten[k] = v
    for f in os.listdir(old):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(old, f))
    save_file(rewritten, os.path.join(old, "model.safetensors"), metadata={"format": "pt"})
    a = anvil._C.CausalLM(new, "", "cpu", "dense").state_dict()
    b = anvil._C.CausalLM(old, "", "cpu", "dense").state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, FIT["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(anvil._C.CausalLM(new, "", "cpu", "auto").logits(ids),
                       anvil._C.CausalLM(old, "", "cpu", "auto").logits(ids))


@pytest.mark.parametrize("scheme,extra", CT_SCHEMES)
def test_transformers_loads_the_compressed_tensors_export(fit_model, tmp_path, scheme, extra):
    out = str(tmp_path / scheme)
    quantize("--model", fit_model, "--scheme", scheme, "--out", out, *extra)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # The reference: transformers' dense model with the export's weights (compressed-tensors' decompress) in place.
    dense = transformers.AutoModelForCausalLM.from_pretrained(fit_model, dtype=torch.float32).eval()
    src, got = tensors(fit_model), tensors(out)
    with torch.no_grad():
        for m in linear_names(src):
            dense.get_submodule(m).weight.copy_(ct_decompress(out, module_local(got, m)))
            # ... and the scheme's dynamic activation quantization in front of each of them, as anvil's report
            # model computes (the ops' arithmetic); transformers runs compressed-tensors' own.
            if scheme in ACTIVATIONS:
                dense.get_submodule(m).register_forward_pre_hook(
                    lambda mod, args, g=ACTIVATIONS[scheme]: (fake_quantize_fp8(args[0], g),))
    ids = torch.randint(0, FIT["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, ref = hf(ids).logits, dense(ids).logits
    assert (got - ref).abs().max() <= LOGIT_RTOL * ref.abs().max()


ACTIVATIONS = {"fp8-channel": "row", "fp8-tensor": "tensor", "fp8-block": "block1x128"}


def fake_quantize_fp8(x, granularity):
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    q, s = torch.ops.anvil.quantize_fp8(x2, granularity)
    return torch.ops.anvil.dequantize_fp8(q, s, granularity, torch.float32).reshape(x.shape).to(x.dtype)


# ---- the demo and its quality figures ------------------------------------------------------------------------------

def run_demo_scheme(tmp_path, scheme, *extra):
    out = str(tmp_path / scheme)
    quantize("--model", DEMO, "--scheme", scheme, "--out", out,
             "--calib", os.path.join(DATA, "general_train.jsonl"), "--eval", os.path.join(DATA, "general_val.jsonl"),
             "--data.calib_samples=32", "--data.calib_seq_len=256", "--data.eval_seq_len=256",
             "--data.eval_max_tokens=16384", *extra)
    return json.load(open(os.path.join(out, "report.json")))


@pytest.mark.parametrize("scheme,limit", [("fp8-channel", 0.5), ("fp8-tensor", 1.0), ("int8-weight", 0.3),
                                          ("w8a8-int8", 1.5)])
def test_quality_on_the_demo_model(tmp_path, scheme, limit):
    r = run_demo_scheme(tmp_path, scheme)
    e = r["eval"]
    assert e["tokens"] > 10000 and e["ppl_before"] > 1
    assert abs(e["ppl_increase_pct"]) <= limit, e
    assert e["kl_mean"] > 0
    assert r["bytes_after"] < 0.6 * r["bytes_before"]
    sqnr = [l["output_sqnr_db"] for l in r["layers"]]
    assert sqnr == sorted(sqnr) and sqnr[0] > 15 and all(l["calibration_tokens"] == 32 * 256 for l in r["layers"])


def test_fp8_block_on_the_demo_keeps_the_layers_that_do_not_fit(tmp_path):
    """The demo's hidden size (192) is not a multiple of 128: with quantize.misfit "keep" only the down_proj layers
    (in_features 512) take 128x128 blocks, and the export lists the rest as not converted."""
    r = run_demo_scheme(tmp_path, "fp8-block", "--quantize.misfit=keep")
    assert {l["name"].split(".")[-1] for l in r["layers"]} == {"down_proj"}
    assert len(r["kept_high_precision"]) == 4 * 6
    assert abs(r["eval"]["ppl_increase_pct"]) <= 0.5
    qc = json.load(open(tmp_path / "fp8-block" / "config.json"))["quantization_config"]
    assert "model.layers.0.self_attn.q_proj" in qc["modules_to_not_convert"]


def test_gptq_int4_beats_round_to_nearest_at_the_same_group_size(tmp_path):
    rtn = run_demo_scheme(tmp_path, "int4-weight", "--quantize.group_size=64")["eval"]
    gptq = run_demo_scheme(tmp_path, "gptq-int4", "--quantize.group_size=64")["eval"]
    assert gptq["ppl_increase_pct"] < 0.8 * rtn["ppl_increase_pct"], (gptq, rtn)
    assert gptq["kl_mean"] < rtn["kl_mean"]


def test_asymmetric_gptq_export_decompresses_to_the_loaded_weights(fit_model, tmp_path):
    """gptq-int4 with quantize.symmetric=false: the config says so (symmetric false, an int8 zp_dtype), each module
    holds a weight_zero_point packed along the output dimension as compressed-tensors packs it, in the grid's range
    [-8, 7], and compressed-tensors' decompress gives exactly the weights anvil's loader holds."""
    out = str(tmp_path / "gptq-asym")
    quantize("--model", fit_model, "--scheme", "gptq-int4", "--out", out, "--quantize.symmetric=false",
             "--quantize.group_size=32", "--calib", os.path.join(DATA, "general_train.jsonl"),
             "--data.calib_samples=4", "--data.calib_seq_len=64")
    ct_scheme, fmt = export_scheme(out)
    assert fmt == "pack-quantized" and ct_scheme.weights.symmetric is False and ct_scheme.weights.group_size == 32
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    got, state = tensors(out), anvil._C.CausalLM(out, "", "cpu", "dense").state_dict()
    for m in linear_names(tensors(fit_model)):
        local = module_local(got, m)
        rows, cols = local["weight_shape"].tolist()
        zp = unpack_from_int32(local["weight_zero_point"], 4, torch.Size([rows, cols // 32]), packed_dim=0)
        assert -8 <= zp.min() and zp.max() <= 7 and zp.ne(0).any(), m
        assert torch.equal(state[m + ".weight"], ct_decompress(out, local)), m


def test_the_embedded_demo_runs(tmp_path):
    r = quantize(cwd=str(tmp_path), timeout=300)
    assert "perplexity on" in r.stdout and "per-layer SQNR" in r.stdout
    assert "layer 4/4" in r.stderr
    report = json.load(open(tmp_path / "runs" / "tiny-quantize" / "report.json"))
    assert report["scheme"] == "fp8-channel" and abs(report["eval"]["ppl_increase_pct"]) <= 0.5


def test_pre_tokenized_calibration_rows_calibrate_as_their_text_does(fit_model, tmp_path):
    # {"input_ids"} lines (as the training data takes them) give the same windows, so the same GPTQ export, as the
    # text they came from; an id outside the model's vocabulary names file:line.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(fit_model)
    texts = [f"calibration line {i}: the quick brown fox jumps over the lazy dog " * 3 for i in range(40)]
    as_text, as_ids = tmp_path / "text.jsonl", tmp_path / "ids.jsonl"
    as_text.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    as_ids.write_text("".join(json.dumps({"input_ids": tok(t)["input_ids"] + [tok.eos_token_id]}) + "\n" for t in texts))
    outs = []
    for name, calib in (("t", as_text), ("i", as_ids)):
        out = str(tmp_path / name)
        quantize("--model", fit_model, "--scheme", "gptq-int4", "--out", out, "--calib", str(calib),
                 "--data.calib_seq_len=32", "--data.calib_samples=8", "--quantize.group_size=32")
        outs.append(tensors(out))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2, 10 ** 6]}) + "\n")
    r = quantize("--model", fit_model, "--scheme", "gptq-int4", "--out", str(tmp_path / "b"), "--calib", str(bad),
                 check=False)
    assert r.returncode != 0 and "bad.jsonl:1" in r.stderr and "vocabulary" in r.stderr, r.stderr


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_input_names_the_argument(fit_model, tmp_path):
    out = str(tmp_path / "out")

    def fails(*args):
        r = quantize(*args, check=False)
        assert r.returncode != 0, r.stdout
        assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
        return r.stderr

    assert "quantize.scheme" in fails("--model", fit_model, "--scheme", "fp9", "--out", out)
    err = fails("--model", DEMO, "--scheme", "fp8-block", "--out", out)
    assert "self_attn.q_proj" in err and "not a multiple of 128" in err and "quantize.misfit" in err
    assert "quantize.group_size" in fails("--model", fit_model, "--scheme", "int4-weight", "--out", out,
                                          "--quantize.group_size=96")
    err = fails("--model", fit_model, "--scheme", "fp8-channel", "--out", out, "--quantize.symmetric=false")
    assert "quantize.symmetric" in err and "group schemes" in err
    assert "data.calib" in fails("--model", fit_model, "--scheme", "fp8-channel", "--out", out,
                                 "--calib", str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "hi"}\n')
    assert "no usable rows" in fails("--model", fit_model, "--scheme", "fp8-channel", "--out", out, "--calib", str(empty))
    assert "model.path" in fails("--scheme", "fp8-channel", "--out", out)
    assert "output.dir" in fails("--model", fit_model, "--scheme", "fp8-channel")
    os.makedirs(out)
    r = quantize("--model", fit_model, "--scheme", "fp8-channel", "--out", out, check=False)
    assert r.returncode != 0 and "--overwrite" in r.stderr and os.listdir(out) == []
    quantize("--model", fit_model, "--scheme", "fp8-channel", "--out", out, "--overwrite")
    assert os.path.exists(os.path.join(out, "config.json"))


# ---- host memory and interruption ---------------------------------------------------------------------------------

BIG = dict(vocab=4096, hidden=1024, intermediate=4096, layers=12)  # ~0.84 GB of fp32 weights, one shard per layer


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A Llama of BIG's shapes with random fp32 weights, written a layer per shard by safetensors itself."""
    d = str(tmp_path_factory.mktemp("big"))
    h, f, v = BIG["hidden"], BIG["intermediate"], BIG["vocab"]
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=f,
                  num_hidden_layers=BIG["layers"], num_attention_heads=8, num_key_value_heads=8, vocab_size=v,
                  max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  hidden_act="silu", dtype="float32")
    json.dump(config, open(os.path.join(d, "config.json"), "w"))
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])
    shards = [{"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h), "lm_head.weight": rnd(v, h)}]
    for i in range(BIG["layers"]):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(h, h),
                       p + "self_attn.v_proj.weight": rnd(h, h), p + "self_attn.o_proj.weight": rnd(h, h),
                       p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                       p + "mlp.down_proj.weight": rnd(h, f), p + "input_layernorm.weight": torch.ones(h),
                       p + "post_attention_layernorm.weight": torch.ones(h)})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(d, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        total += sum(t.numel() * 4 for t in shard.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return d, total


# Runs argv[1:] with stdout discarded and prints "returncode peak_rss_kib". It runs in a fresh interpreter without
# site packages (a few MB), because a child's ru_maxrss counts the address space it was forked or vforked from until
# its exec: measured straight from pytest, the peak would be pytest's own (torch, transformers: ~1.8 GiB).
_MEASURE = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)\n")


def peak_rss_bytes(cmd, **kwargs):
    """Runs cmd and returns (its exit code, its stderr, its peak resident set in bytes). The peak is the kernel's own
    (ru_maxrss of that one child, via wait4: VmHWM at exit), so no poller can miss a short spike; it counts
    file-backed pages too (a mapped shard that is read is resident)."""
    p = subprocess.run([sys.executable, "-S", "-c", _MEASURE, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, **kwargs)
    assert p.returncode == 0, p.stderr[-3000:]
    rc, kib = p.stdout.split()
    return int(rc), p.stderr, int(kib) * 1024


def test_host_memory_stays_below_the_models_size(big_model, tmp_path):
    """The recipe never holds the model: what its run adds to the process's peak resident memory (heap, the mapped
    shards it reads) over the same command's --dry-run (the program and its libraries: libtorch alone is ~0.5 GiB
    resident, as big as this model's half) stays below half the model's bytes, where loading the model (anvil's
    CausalLM, measured the same way against `import anvil`) adds more than the model's size. (RLIMIT_AS counts
    torch's virtual reservations and RLIMIT_DATA stopped libcudnn from loading; this machine's cgroup v1 memory
    limit is not writable: hence a measured peak.) The export is checked against the ops' quantization of a layer's
    weight."""
    src, total = big_model
    out = str(tmp_path / "out")
    cmd = [anvil_binary(), "quantize", "--model", src, "--scheme", "fp8-block", "--out", out,
           "--output.max_shard_bytes=67108864"]
    rc, err, base = peak_rss_bytes(cmd + ["--dry-run"])
    assert rc == 0 and not os.path.exists(out), err[-3000:]
    rc, err, peak = peak_rss_bytes(cmd)
    assert rc == 0, err[-3000:]
    added = peak - base
    print(f"anvil quantize fp8-block of a {total / 2**30:.2f} GiB model: peak RSS {peak / 2**30:.3f} GiB, "
          f"{added / 2**30:.3f} GiB over its --dry-run ({added / total:.2f}x the model)")
    assert 0 < added < 0.5 * total, (peak, base, total)
    got = tensors(out)
    with safe_open(os.path.join(src, "model-00005-of-00013.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.3.mlp.down_proj.weight")
    q, scale, _ = anvil_dequantized(w, "fp8-block")
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 3
    # The control: the same measurement of a process that loads the model whole.
    rc, err, py_base = peak_rss_bytes([sys.executable, "-c", "import anvil"])
    assert rc == 0, err[-3000:]
    load = f"import anvil; m = anvil._C.CausalLM({src!r}, 'float32'); print(len(m.state_dict()))"
    rc, err, whole = peak_rss_bytes([sys.executable, "-c", load])
    assert rc == 0, err[-3000:]
    assert whole - py_base > total > 2 * added, (whole, py_base, total, added)


def test_a_kill_leaves_no_half_written_output(big_model, tmp_path):
    src, _ = big_model
    out = str(tmp_path / "out")
    args = [anvil_binary(), "quantize", "--model", src, "--scheme", "fp8-channel", "--out", out,
            "--output.max_shard_bytes=33554432"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        tmp = out + ".tmp"
        if os.path.isdir(tmp) and len([f for f in os.listdir(tmp) if f.endswith(".safetensors")]) >= 3:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(out)  # nothing at OUT: the shards were in OUT.tmp
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not os.path.exists(out + ".tmp") and os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert all(os.path.exists(os.path.join(out, f)) for f in set(index["weight_map"].values()))


def test_qwen2_moe_keeps_its_routers_and_calibrates_every_expert(tmp_path):
    """A Qwen2-MoE (a dense layer by mlp_only_layers, routed experts, the sigmoid-gated shared expert): every routed
    and shared expert projection is quantized and calibrated on every token, the router and the (1, H) shared-expert
    gate stay in high precision (vLLM runs both unquantized) and are listed in the export's ignore, and anvil's
    loaded export gives logits near the source's."""
    src = str(tmp_path / "qwen2_moe")
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, mlp_only_layers=[0], max_position_embeddings=256))
    randomize(model, seed=3)
    model.save_pretrained(src)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), src)
    out = str(tmp_path / "fp8")
    quantize("--model", src, "--scheme", "fp8-channel", "--out", out, "--calib", os.path.join(DATA, "general_train.jsonl"),
             "--data.calib_samples=4", "--data.calib_seq_len=32")
    r = json.load(open(os.path.join(out, "report.json")))
    kept = {k["name"] for k in r["kept_high_precision"]}
    assert kept == {"model.layers.1.mlp.shared_expert_gate"}, kept  # the report lists the Linears kept
    quantized = {l["name"] for l in r["layers"]}
    assert "model.layers.1.mlp.experts.3.down_proj" in quantized and "model.layers.1.mlp.shared_expert.up_proj" in quantized
    assert "model.layers.0.mlp.gate_proj" in quantized  # the dense layer
    assert len(r["experts"]) == 4 and all(e["calibrated_tokens"] == 4 * 32 for e in r["experts"])
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert {"model.layers.1.mlp.gate", "model.layers.1.mlp.shared_expert_gate", "lm_head"} <= set(qc["ignore"])
    got = tensors(out)
    assert got["model.layers.1.mlp.shared_expert_gate.weight"].dtype == torch.float32
    assert got["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    ids = torch.randint(0, 4096, (1, 9), generator=torch.Generator().manual_seed(4))
    ref = anvil._C.CausalLM(src).logits(ids)
    q = anvil._C.CausalLM(out, "", "cpu", "dense").logits(ids)
    assert (q - ref).abs().max() <= 0.1 * ref.abs().max()
