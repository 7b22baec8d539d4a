"""K-quants and llama-quantize's mixes in the GGUF export (csrc/io/gguf_kquants.cpp, csrc/model/gguf_export.cpp).

Oracles:
- ggml itself: ggml-quants.c compiled at test time (tests/python/ggml_ref.py; needs ANVIL_GGML_SRC, else those
  tests skip): anvil's Q4_K / Q5_K / Q6_K / Q5_0 / Q5_1 bytes equal quantize_row_*_ref's on random, heavy-tailed
  and edge-case data, and inside an exported file;
- gguf-py 0.19: its Q5_0 / Q5_1 quantizers (always), its dequantizers of every type (anvil's dequantizer equals
  them bit for bit), GGUFReader reading each mix with the tensor types llama-quantize's llama_tensor_get_type
  picks (rules transcribed below from llama.cpp src/llama-quant.cpp);
- quality: each type's round-trip SQNR above the bound its bit width allows, in the order of their bits, and the
  demo model's logits through anvil's GGUF loader ordered q8_0 < q6_k < q5_k_m < q4_k_m < q4_0 in error.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch

import anvil

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
import ggml_ref  # noqa: E402
from test_gguf_export import (DEMO, TOKENIZERS, dequantized_state, make_model, permute,  # noqa: E402
                              tokenizer_vocab_size)

Q = gguf.GGMLQuantizationType
KTYPES = ["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"]
BITS = {"Q4_0": 4, "Q4_K": 4, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}
MIXES = {"q8_0": (Q.Q8_0, 7), "q4_0": (Q.Q4_0, 2), "q4_k_m": (Q.Q4_K, 15), "q5_k_m": (Q.Q5_K, 17),
         "q6_k": (Q.Q6_K, 18)}  # export type -> (default ggml type, gguf.LlamaFileType)

needs_ggml = pytest.mark.skipif(ggml_ref.load() is None if ggml_ref.find_source() else True,
                                reason="no ggml sources (set ANVIL_GGML_SRC to a ggml / llama.cpp checkout)")


def edge_data(seed, n_blocks=64):
    """Rows of 256 covering what the scale searches branch on: gaussian at several scales, heavy tails
    (student-t 1.5), one outlier, all-positive, all-negative, an all-zero and a constant super-block, tiny
    values, a block of exact ties, integers."""
    g = np.random.default_rng(seed)
    rows = [g.standard_normal(256) * s for s in (1e-3, 0.02, 1.0, 300.0)]
    rows += [g.standard_t(1.5, 256), g.standard_t(1.5, 256) * 0.01]
    r = g.standard_normal(256) * 0.01
    r[g.integers(256)] = 4.0
    rows += [r, np.abs(g.standard_normal(256)) + 0.5, -np.abs(g.standard_normal(256)) - 0.1]
    rows += [np.zeros(256), np.full(256, 0.25), g.standard_normal(256) * 1e-20]
    rows += [np.tile([1.0, -1.0, 0.5, -0.5], 64), np.round(g.standard_normal(256) * 8)]
    rows += [g.standard_normal(256) * g.uniform(0.001, 2.0) for _ in range(n_blocks - len(rows))]
    return np.stack(rows).astype(np.float32)


def anvil_bytes(x, t):
    return np.frombuffer(anvil._C.gguf_quantize(torch.from_numpy(np.ascontiguousarray(x)), t), dtype=np.uint8)


# ---- bytes --------------------------------------------------------------------------------------------------

@needs_ggml
@pytest.mark.parametrize("t", KTYPES + ["Q4_0", "Q8_0"])
def test_bytes_equal_ggml_reference(t):
    for seed in range(3):
        x = edge_data(seed)
        assert anvil_bytes(x, t).tobytes() == ggml_ref.quantize(x, t).tobytes(), (t, seed)
    # A whole random weight matrix, as the export quantizes it (one row of blocks after another).
    w = (torch.randn(96, 512, generator=torch.Generator().manual_seed(7)) * 0.05).numpy()
    assert anvil_bytes(w, t).tobytes() == ggml_ref.quantize(w, t).tobytes()


@pytest.mark.parametrize("t", ["Q5_0", "Q5_1"])
def test_q5_bytes_equal_gguf_py(t):
    x = edge_data(11)[:, :224]  # 7 blocks of 32 per row
    assert anvil_bytes(x, t).tobytes() == gguf.quants.quantize(x, Q[t]).tobytes()


@pytest.mark.parametrize("t", KTYPES)
def test_anvil_dequantizes_as_gguf_py(t, tmp_path):
    x = edge_data(5)
    raw = anvil_bytes(x, t).reshape(x.shape[0], -1)
    ref = gguf.quants.dequantize(raw, Q[t]).reshape(x.shape)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("x", raw, raw_dtype=Q[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = anvil._C.gguf_tensors(str(tmp_path / "k.gguf"))["x"]
    assert ours.shape == x.shape
    assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))


def sqnr(x, y):
    return 10 * np.log10((x.astype(np.float64) ** 2).sum() / ((x.astype(np.float64) - y) ** 2).sum())


@pytest.mark.parametrize("dist", ["gaussian", "student_t"])
def test_round_trip_error_within_the_bit_budget(dist):
    """SQNR of a uniform b-bit grid over a Gaussian block is about 6.02 b - 4 dB (the range of ~3 sigma cut into
    2^b steps); each type must reach 6.02 b - 9 dB (heavy tails: - 12), and more bits must never do worse."""
    g = np.random.default_rng(3)
    x = (g.standard_normal((64, 1024)) if dist == "gaussian" else g.standard_t(3.0, (64, 1024))).astype(np.float32)
    got = {}
    for t in ["Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]:
        y = gguf.quants.dequantize(anvil_bytes(x, t).reshape(64, -1), Q[t]).reshape(x.shape)
        got[t] = sqnr(x, y)
        assert got[t] >= 6.02 * BITS[t] - (9 if dist == "gaussian" else 12), (t, got[t])
    # The K types' searched scales beat the plain block scales of the same width.
    assert got["Q4_K"] > got["Q4_0"] and got["Q5_K"] > got["Q5_0"]
    assert got["Q4_K"] < got["Q5_K"] < got["Q6_K"] < got["Q8_0"]


def test_zero_and_constant_blocks_round_trip():
    x = np.zeros((3, 256), np.float32)
    x[1] = 0.75
    x[2, ::2] = -2.0
    for t in KTYPES:
        y = gguf.quants.dequantize(anvil_bytes(x, t).reshape(3, -1), Q[t]).reshape(x.shape)
        assert np.all(y[0] == 0), t
        np.testing.assert_allclose(y[1:], x[1:], atol=2.0 / 2 ** BITS[t], err_msg=t)


def test_bad_type_and_shape():
    with pytest.raises(RuntimeError, match=r"not one of F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"):
        anvil._C.gguf_quantize(torch.zeros(256), "Q3_K")
    with pytest.raises(RuntimeError, match=r"Q4_K"):
        anvil._C.gguf_quantize(torch.zeros(2, 128), "Q4_K")  # a row of 128 is not a whole 256-block


# ---- mixes ------------------------------------------------------------------------------------------------

def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def block(t):
    return gguf.GGML_QUANT_SIZES[t][0]


def llama_quantize_type(mix, name, shape, n_layer, has_output):
    """llama.cpp src/llama-quant.cpp for LLM_ARCH_LLAMA (not 70B), no imatrix: tensor_allows_quantization,
    llama_tensor_get_type_impl, tensor_type_fallback (F16 where llama-quantize would refuse the row)."""
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return Q.F32
    base = MIXES[mix][0]
    t = base
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        if shape[-1] % block(base) != 0:
            t = Q.Q8_0
        elif base != Q.Q8_0:
            t = Q.Q6_K
    elif name.startswith("blk.") and mix in ("q4_k_m", "q5_k_m"):
        layer = int(name.split(".")[1])
        if (name.endswith(".attn_v.weight") or name.endswith(".ffn_down.weight")) and use_more_bits(layer, n_layer):
            t = Q.Q6_K
    if shape[-1] % block(t) != 0:
        t = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}.get(t, Q.F16)
        if t != Q.F16 and shape[-1] % block(t) != 0:
            t = Q.F16
    return t


def source_tensors(model_dir):
    """{llama.cpp name: the checkpoint's tensor}."""
    from safetensors.numpy import load_file
    from test_gguf_export import gguf_name as to_gguf
    st = {}
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            st.update(load_file(os.path.join(model_dir, f)))
    return {to_gguf(k): v for k, v in st.items() if "rotary" not in k}


def source_tensor(src, gguf_name, config):
    """The fp32 tensor the export quantizes for `gguf_name` (q/k permuted as the converter does)."""
    a = src[gguf_name].astype(np.float32)
    if gguf_name.endswith("attn_q.weight"):
        a = permute(a, config["num_attention_heads"])
    elif gguf_name.endswith("attn_k.weight"):
        a = permute(a, config["num_key_value_heads"])
    return np.ascontiguousarray(a)


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("hidden,ffn,tied", [(256, 512, False), (64, 80, True), (256, 288, True)])
def test_mix_types_bytes_and_dequantization(mix, hidden, ffn, tied, tmp_path):
    """8 layers (use_more_bits: layers 0, 3, 6, 7); rows of 256 take the K types, rows of 64 / 288 their
    fallbacks (Q5_0, Q5_1, Q8_0; F16 for ffn_down's row of 80)."""
    tok = os.path.join(TOKENIZERS, "gpt2")
    d = str(tmp_path / "m")
    make_model(d, tok, vocab=tokenizer_vocab_size(tok), hidden=hidden, ffn=ffn, layers=8, heads=4, kv=2, tied=tied)
    out = str(tmp_path / "m.gguf")
    report = anvil._C.export_gguf(d, out, mix)
    assert report["file_type"] == MIXES[mix][1]
    r = gguf.GGUFReader(out)
    assert int(r.fields["general.file_type"].parts[-1][0]) == MIXES[mix][1]
    cfg = json.load(open(os.path.join(d, "config.json")))
    names = {t.name for t in r.tensors}
    src = source_tensors(d)
    promoted = 0
    for t in r.tensors:
        shape = list(reversed([int(x) for x in t.shape]))
        want = llama_quantize_type(mix, t.name, shape, 8, "output.weight" in names)
        assert t.tensor_type == want, (t.name, shape, t.tensor_type.name, want.name)
        promoted += t.tensor_type == Q.Q6_K and MIXES[mix][0] != Q.Q6_K
        raw = np.asarray(t.data)
        a = source_tensor(src, t.name, cfg)
        if ggml_ref.find_source() and ggml_ref.load() and t.tensor_type.name in ggml_ref.FUNCS:
            assert raw.tobytes() == ggml_ref.quantize(a, t.tensor_type.name).tobytes(), t.name
        else:
            assert raw.tobytes() == anvil_bytes(a, t.tensor_type.name if t.tensor_type != Q.F32 else "F32").tobytes()
    if mix in ("q4_k_m", "q5_k_m") and (hidden, ffn) == (256, 512):
        assert promoted == 4 * 2 + 1  # attn_v and ffn_down on 4 layers, and output
    # anvil's loader dequantizes as gguf-py does: the reloaded model's weights are gguf-py's.
    ours = anvil._C.gguf_model_tensors(out)
    ref = dequantized_state(out, transformers.AutoConfig.from_pretrained(d))
    assert set(ours) <= set(ref)
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k


def test_unknown_mix_and_non_llama(tmp_path):
    tok = os.path.join(TOKENIZERS, "gpt2")
    d = str(tmp_path / "m")
    make_model(d, tok, vocab=tokenizer_vocab_size(tok))
    with pytest.raises(RuntimeError, match=r"type 'q4_k_s' is not one of f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k"):
        anvil._C.export_gguf(d, str(tmp_path / "a.gguf"), "q4_k_s")
    c = json.load(open(os.path.join(d, "config.json")))
    json.dump({**c, "architectures": ["Qwen2ForCausalLM"]}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(RuntimeError, match=r"architectures\[0\] is 'Qwen2ForCausalLM'"):
        anvil._C.export_gguf(d, str(tmp_path / "b.gguf"), "q4_k_m")
    assert not os.path.exists(tmp_path / "a.gguf") and not os.path.exists(tmp_path / "b.gguf")


# ---- the demo model: logits of the reloaded files ------------------------------------------------------------

def test_demo_logit_error_ordered_by_bits(tmp_path):
    """examples/tiny/base through each mix, reloaded by anvil's GGUF loader: logits equal the model of gguf-py's
    dequantized weights (1e-4 relative), and the error to the dense model grows as the bits shrink."""
    ids = torch.randint(4, 4096, (4, 64), generator=torch.Generator().manual_seed(3))
    dense = anvil._C.CausalLM(DEMO).logits(ids).double()
    cfg = transformers.AutoConfig.from_pretrained(DEMO)
    err = {}
    for mix in ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]:
        out = str(tmp_path / f"{mix}.gguf")
        anvil._C.export_gguf(DEMO, out, mix)
        got = anvil._C.CausalLM(out).logits(ids).double()
        ref = transformers.LlamaForCausalLM(cfg).float().eval()
        ref.load_state_dict(dequantized_state(out, cfg))
        with torch.no_grad():
            want = ref(ids).logits.double()
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), mix
        err[mix] = ((got - dense).square().mean() / dense.square().mean()).sqrt().item()
    order = ["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
    assert [err[m] for m in order] == sorted(err.values()), err
    assert err["q8_0"] < 0.01 and err["q4_0"] < 0.2, err


# ---- anvil quantize --scheme gguf-* ---------------------------------------------------------------------------

DATA = os.path.join(os.path.dirname(DEMO), "data")


def quantize(*args):
    binary = anvil.executable()  # the build tree's bin/anvil, or the installed wheel's
    return subprocess.run([binary, "quantize", *args], capture_output=True, text=True, timeout=600)


EVAL = ["--eval", os.path.join(DATA, "general_val.jsonl"), "--data.eval_seq_len=256", "--data.eval_max_tokens=8192"]


def test_quantize_recipe_writes_a_gguf_file_and_its_report(tmp_path):
    out = str(tmp_path / "demo-q4_k_m.gguf")
    r = quantize("--model", DEMO, "--scheme", "gguf-q4_k_m", "--out", out, *EVAL)
    assert r.returncode == 0, r.stderr
    assert "perplexity on" in r.stdout and "per-layer SQNR" in r.stdout
    report = json.load(open(str(tmp_path / "demo-q4_k_m.report.json")))
    assert report["scheme"] == "gguf-q4_k_m" and report["format"] == "gguf"
    assert report["gguf"]["file_type"] == 15 and report["bytes_after"] == os.path.getsize(out)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert report["gguf"]["tensors_per_type"] == {k: list(types.values()).count(k) for k in set(types.values())}
    # The same bytes as the core export.
    ref = str(tmp_path / "ref.gguf")
    anvil._C.export_gguf(DEMO, ref, "q4_k_m")
    assert open(out, "rb").read() == open(ref, "rb").read()
    # Per-tensor SQNR is the file's: recompute one from gguf-py's dequantization.
    layer = next(l for l in report["layers"] if l["name"] == "model.layers.1.mlp.down_proj")
    assert layer["ggml_type"] == types["blk.1.ffn_down.weight"]
    from safetensors.numpy import load_file
    src = load_file(os.path.join(DEMO, "model.safetensors"))["model.layers.1.mlp.down_proj.weight"].astype(np.float32)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(src.shape)
    assert abs(layer["weight_sqnr_db"] - sqnr(src, deq)) < 1e-3
    sq = [l["weight_sqnr_db"] for l in report["layers"]]
    assert sq == sorted(sq) and sq[0] > 15
    e = report["eval"]
    assert e["tokens"] > 4000 and abs(e["ppl_increase_pct"]) < 5 and e["kl_mean"] > 0  # a 4-bit mix may lower ppl a little


def test_quantize_recipe_folder_output_and_quality_order(tmp_path):
    """--out DIR: DIR/model.gguf and DIR/report.json; the perplexity increase on held-out text follows the bits."""
    inc = {}
    for scheme in ["gguf-q8_0", "gguf-q6_k", "gguf-q4_0"]:
        out = str(tmp_path / scheme)
        r = quantize("--model", DEMO, "--scheme", scheme, "--out", out, *EVAL)
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(out)) == ["model.gguf", "report.json"]
        rep = json.load(open(os.path.join(out, "report.json")))
        assert gguf.GGUFReader(os.path.join(out, "model.gguf")).tensors
        inc[scheme] = rep["eval"]["kl_mean"]
    assert inc["gguf-q8_0"] < inc["gguf-q6_k"] < inc["gguf-q4_0"], inc
    r = quantize("--model", DEMO, "--scheme", "gguf-q8_0", "--out", str(tmp_path / "gguf-q8_0"))
    assert r.returncode == 1 and "exists" in r.stderr


def test_quantize_recipe_bad_input(tmp_path):
    r = quantize("--model", DEMO, "--scheme", "gguf-q3_k", "--out", str(tmp_path / "a.gguf"))
    assert r.returncode == 1 and "gguf-q4_k_m" in r.stderr and "gguf-q3_k" in r.stderr
    r = quantize("--model", DEMO, "--scheme", "gguf-q4_k_m", "--out", str(tmp_path / "b.gguf"),
                 "--calib", os.path.join(DATA, "general_train.jsonl"))
    assert r.returncode == 1 and "data.calib" in r.stderr and "not calibrated" in r.stderr
    r = quantize("--model", DEMO, "--scheme", "gguf-q4_k_m", "--out", str(tmp_path / "c"),
                 "--output.format=compressed-tensors")
    assert r.returncode == 1 and "output.format" in r.stderr
    assert os.listdir(tmp_path) == []
