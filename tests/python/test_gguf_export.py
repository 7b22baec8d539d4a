"""GGUF export (anvil/model/gguf_export.h, anvil/io/gguf.h writer, anvil/data/gguf_vocab.h) against the oracles.

- gguf-py 0.19.0 (ggml's own Python package) reads every file: each metadata key, its GGUF type and value
  (the expected values are worked out here from config.json and the tokenizer files as llama.cpp's
  convert_hf_to_gguf.py would write them: gguf-py's SpecialVocab gives the special ids, merges, add_* flags
  and chat template; the vocabulary comes from tokenizer.json / a protobuf read of tokenizer.model);
- tensor names, types, shapes, and bytes equal to gguf.quants.quantize of the q/k-permuted weights (F32, F16,
  BF16, Q8_0, Q4_0), with the F16 fallback for rows that are not whole blocks and Q8_0 for q4_0's output
  (rows of 64, not of 256; the K-quants and mixes: test_gguf_kquants.py);
- logits: anvil's GGUF load equals the source model (F32: fp32 rule), and the model of the dequantized
  weights (the other types); transformers 5.17 loading the GGUF gives anvil's logits;
- the tokenizer read back (anvil's GGUF tokenizer, transformers' GGUF tokenizer) encodes as the source;
- bad input, existing output, an export killed halfway: clear errors, no partial file.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import anvil

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from hf_models import randomize  # noqa: E402

Q = gguf.GGMLQuantizationType
HERE = os.path.dirname(__file__)
TOKENIZERS = os.path.join(HERE, "..", "data", "tokenizers")
DEMO = os.path.join(HERE, "..", "..", "examples", "tiny", "base")
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType
LOGIT_RTOL = 1e-4


# ---- fixtures ----------------------------------------------------------------------------------------------

def tokenizer_vocab_size(tok_dir):
    j = json.load(open(os.path.join(tok_dir, "tokenizer.json"), encoding="utf-8"))
    return max([*j["model"]["vocab"].values(), *[a["id"] for a in j["added_tokens"]]]) + 1


def make_model(path, tok=None, vocab=96, hidden=64, ffn=96, layers=2, heads=4, kv=2, tied=False, seed=0, **extra):
    """A random transformers Llama saved as safetensors in `path`, with a fixture tokenizer's files."""
    os.makedirs(path, exist_ok=True)
    if tok is not None:
        for f in os.listdir(tok):
            shutil.copy(os.path.join(tok, f), path)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
                                   eos_token_id=2, rms_norm_eps=1e-5, rope_theta=50000.0, **extra)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    randomize(model, seed)
    model.save_pretrained(path)
    return model.eval()


def permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute (transformers' rotate_half rows -> ggml's interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf):
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    p = hf.split(".")
    return f"blk.{p[2]}.{parts['.'.join(p[3:-1])]}.weight"


def expected_type(name, shape, base, tied):
    """prepare_tensors' rules, plus llama-quantize's output rule for Q4_0 (Q6_K for a row of a multiple of 256,
    else Q8_0; see FORMATS.md; the K mixes: test_gguf_kquants.py)."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    t = base
    if base == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        t = Q.Q6_K if shape[-1] % 256 == 0 else Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[t][0]
    return t if shape[-1] % block == 0 else Q.F16


def fields(path):
    """{key: (GGUF value type, element type or None, python value)} as gguf-py's GGUFReader reads them."""
    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        out[k] = (f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None, f.contents())
    return r, out


def sp_pieces(path):
    """(piece, score, type) of a SentencePiece tokenizer.model, read from its protobuf bytes directly
    (ModelProto field 1 = pieces {1: piece, 2: score (float), 3: type (enum, NORMAL when absent)})."""
    import struct
    from protobuf_wire import fields_of
    data = open(path, "rb").read()

    out = []
    for num, v in fields_of(data):
        if num != 1:
            continue
        piece, score, typ = "", 0.0, 1
        for n2, v2 in fields_of(v):
            if n2 == 1:
                piece = v2.decode("utf-8")
            elif n2 == 2:
                score = struct.unpack("<f", v2)[0]
            elif n2 == 3:
                typ = v2
        out.append((piece, score, typ))
    return out


def looks_special(t):
    return (t in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (t.startswith("<|") and t.endswith("|>"))
            or (t.startswith("<｜") and t.endswith("｜>")) or (t.startswith("<unused") and t.endswith(">")))


def expected_tokenizer(model_dir, vocab_size, pre="gpt-2"):
    """The tokenizer keys convert_hf_to_gguf.py's LlamaModel.set_vocab writes, computed with its own pieces:
    the vocabulary (SentencePiece when tokenizer.model exists, else tokenizer.json's BPE) and gguf-py's
    SpecialVocab for the rest. Values as GGUFReader returns them; type codes as gguf-py's add_* use."""
    V = gguf.GGUFValueType
    out = {}
    sp = os.path.join(model_dir, "tokenizer.model")
    tc = json.load(open(os.path.join(model_dir, "tokenizer_config.json"))) if os.path.exists(
        os.path.join(model_dir, "tokenizer_config.json")) else {}
    if os.path.exists(sp):
        tokens = [f"[PAD{i}]" for i in range(vocab_size)]
        scores = [-10000.0] * vocab_size
        types = [5] * vocab_size
        for i, (piece, score, typ) in enumerate(sp_pieces(sp)):
            tokens[i], scores[i] = piece, score
            types[i] = {2: 2, 3: 3, 5: 5, 6: 6}.get(typ, 1)  # UNKNOWN, CONTROL, UNUSED, BYTE; else NORMAL
        for tid, d in tc.get("added_tokens_decoder", {}).items():
            tid, t = int(tid), d["content"]
            if d.get("special") or looks_special(t):
                types[tid] = 3
            else:
                t, types[tid] = t.replace("▁", " "), 4
            scores[tid], tokens[tid] = -1000.0, t
        out["tokenizer.ggml.model"] = (V.STRING, None, "llama")
        out["tokenizer.ggml.pre"] = (V.STRING, None, "default")
        out["tokenizer.ggml.tokens"] = (V.ARRAY, V.STRING, tokens)
        out["tokenizer.ggml.scores"] = (V.ARRAY, V.FLOAT32, [float(np.float32(s)) for s in scores])
        out["tokenizer.ggml.token_type"] = (V.ARRAY, V.INT32, types)
        special = gguf.SpecialVocab(model_dir, n_vocab=vocab_size)
    else:
        j = json.load(open(os.path.join(model_dir, "tokenizer.json"), encoding="utf-8"))
        by_id = {i: t for t, i in j["model"]["vocab"].items()}
        added = {a["id"]: a for a in j["added_tokens"]}
        by_id.update({i: a["content"] for i, a in added.items()})
        tokens, types = [], []
        for i in range(vocab_size):
            if i not in by_id:
                tokens.append(f"[PAD{i}]"), types.append(5)
            elif i in added:
                if added[i]["special"] or looks_special(by_id[i]):
                    tokens.append(by_id[i]), types.append(3)
                else:
                    tokens.append(by_id[i].replace("▁", " ")), types.append(4)
            else:
                tokens.append(by_id[i]), types.append(1)
        out["tokenizer.ggml.model"] = (V.STRING, None, "gpt2")
        out["tokenizer.ggml.pre"] = (V.STRING, None, pre)
        out["tokenizer.ggml.tokens"] = (V.ARRAY, V.STRING, tokens)
        out["tokenizer.ggml.token_type"] = (V.ARRAY, V.INT32, types)
        special = gguf.SpecialVocab(model_dir, load_merges=True)
        out["tokenizer.ggml.merges"] = (V.ARRAY, V.STRING, special.merges)
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "sep": "seperator_token_id",
            "pad": "padding_token_id", "mask": "mask_token_id"}
    for typ, tid in special.special_token_ids.items():
        out["tokenizer.ggml." + keys[typ]] = (V.UINT32, None, tid)
    for typ, v in special.add_special_token.items():
        if typ in ("bos", "eos"):
            out[f"tokenizer.ggml.add_{typ}_token"] = (V.BOOL, None, v)
    if special.chat_template:
        out["tokenizer.chat_template"] = (V.STRING, None, special.chat_template)
    return out


def expected_model_keys(model_dir, qtype):
    V = gguf.GGUFValueType
    c = json.load(open(os.path.join(model_dir, "config.json")))
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    out = {
        "general.architecture": (V.STRING, None, "llama"),
        "general.type": (V.STRING, None, "model"),
        "general.name": (V.STRING, None, os.path.basename(os.path.realpath(model_dir))),
        "llama.block_count": (V.UINT32, None, c["num_hidden_layers"]),
        "llama.context_length": (V.UINT32, None, c["max_position_embeddings"]),
        "llama.embedding_length": (V.UINT32, None, c["hidden_size"]),
        "llama.feed_forward_length": (V.UINT32, None, c["intermediate_size"]),
        "llama.attention.head_count": (V.UINT32, None, c["num_attention_heads"]),
        "llama.attention.head_count_kv": (V.UINT32, None, c["num_key_value_heads"]),
        "llama.rope.freq_base": (V.FLOAT32, None, f32(theta)),
        "llama.attention.layer_norm_rms_epsilon": (V.FLOAT32, None, f32(c["rms_norm_eps"])),
        "general.file_type": (V.UINT32, None, FTYPE[qtype]),
        "llama.vocab_size": (V.UINT32, None, c["vocab_size"]),
        "llama.rope.dimension_count": (V.UINT32, None, head_dim),
        "general.quantization_version": (V.UINT32, None, 2),
    }
    if c.get("head_dim") is not None:
        out["llama.attention.key_length"] = (V.UINT32, None, head_dim)
        out["llama.attention.value_length"] = (V.UINT32, None, head_dim)
    return out


def source_tensors(model_dir):
    from safetensors.torch import load_file
    return load_file(os.path.join(model_dir, "model.safetensors"))


def expected_bytes(model_dir):
    """{gguf name: (fp32 numpy in ggml row order, q/k permuted)} as the converter hands them to gguf.quants."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    out = {}
    for name, t in source_tensors(model_dir).items():
        if name == "lm_head.weight" and c.get("tie_word_embeddings"):
            continue
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = permute(a, c["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            a = permute(a, c["num_key_value_heads"])
        out[gguf_name(name)] = np.ascontiguousarray(a)
    return out


def check_file(model_dir, path, qtype, pre="gpt-2"):
    """Every key, type and value; every tensor's name, type, shape and bytes, against the oracles."""
    c = json.load(open(os.path.join(model_dir, "config.json")))
    tied = bool(c.get("tie_word_embeddings"))
    reader, got = fields(path)
    want = {**expected_model_keys(model_dir, qtype), **expected_tokenizer(model_dir, c["vocab_size"], pre)}
    assert set(got) == set(want), (set(got) ^ set(want))
    for k, (t, et, v) in want.items():
        assert got[k][0] == t and got[k][1] == et, (k, got[k][:2], (t, et))
        assert got[k][2] == v, k
    assert got["general.architecture"] == want["general.architecture"]
    assert reader.alignment == 32
    src = expected_bytes(model_dir)
    assert {t.name for t in reader.tensors} == set(src)
    for t in reader.tensors:
        a = src[t.name]
        qt = expected_type(t.name, a.shape, TYPES[qtype], tied)
        assert t.tensor_type == qt, (t.name, t.tensor_type.name, qt.name)
        assert list(reversed([int(d) for d in t.shape])) == list(a.shape), t.name
        ref = gguf.quants.quantize(a, qt)
        assert np.asarray(t.data).tobytes() == ref.tobytes(), t.name
        assert t.data_offset % 32 == 0
    return reader


def dequantized_state(path, config):
    """The Hugging Face state dict a GGUF reader must rebuild: gguf-py's dequantize, q/k un-permuted."""
    r = gguf.GGUFReader(path)
    inv = {}
    for name in source_state_names(config):
        inv[gguf_name(name)] = name
    out = {}
    for t in r.tensors:
        shape = list(reversed([int(d) for d in t.shape]))
        a = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        hf = inv[t.name]
        if hf.endswith("q_proj.weight"):
            a = unpermute(a, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            a = unpermute(a, config.num_key_value_heads)
        out[hf] = torch.from_numpy(np.ascontiguousarray(a))
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def source_state_names(config):
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{p}.weight" for p in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    return names


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


# ---- file contents against gguf-py ----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(TYPES))
@pytest.mark.parametrize("tied", [False, True])
def test_file_matches_gguf_py(qtype, tied, tmp_path):
    # ffn 80: ffn_down's rows (80) are not whole 32-blocks -> F16, as the converter falls back.
    d = str(tmp_path / "m")
    make_model(d, os.path.join(TOKENIZERS, "gpt2"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "gpt2")),
               ffn=80, tied=tied)
    out = str(tmp_path / "m.gguf")
    report = anvil._C.export_gguf(d, out, qtype)
    reader = check_file(d, out, qtype)
    assert report["bytes"] == os.path.getsize(out)
    assert report["file_type"] == FTYPE[qtype] and report["tensors"] == len(reader.tensors)
    counts = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    assert report["tensors_per_type"] == counts
    if qtype in ("q8_0", "q4_0"):
        assert counts["F16"] == 2  # the two ffn_down
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not tied)


def test_quantizers_bit_exact_on_edge_values():
    """Random wide-range data plus the cases the rules are about: ties in |max| (first wins, sign kept),
    zero blocks, halfway values for the rounding, fp16 subnormal scales, NaN for BF16."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(64, 256, generator=g) * 3)
    x[0, :32] = 0.0
    x[1, :32] = torch.tensor([1.0, -1.0] * 16)
    x[2, :32] = torch.tensor([-2.0, 2.0] * 16)
    x[3, :32] = torch.arange(32) * 0.5 - 8  # exact halves after scaling
    x[4, :32] *= 1e-6
    x[5, :32] = -0.0
    a = x.numpy()
    for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
        assert anvil._C.gguf_quantize(x, t) == gguf.quants.quantize(a, Q[t]).tobytes(), t
    y = x.clone()
    y[6, 3] = float("nan")
    y[6, 4] = float("inf")
    assert anvil._C.gguf_quantize(y, "BF16") == gguf.quants.quantize(y.numpy(), Q.BF16).tobytes()
    # bf16 / fp16 source tensors are widened to fp32 first, as gguf-py does.
    h = x.to(torch.bfloat16)
    assert anvil._C.gguf_quantize(h, "Q4_0") == gguf.quants.quantize(h.float().numpy(), Q.Q4_0).tobytes()


def test_llama3_rope_freqs(tmp_path):
    d = str(tmp_path / "l3")
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    make_model(d, os.path.join(TOKENIZERS, "llama3"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "llama3")),
               hidden=128, heads=2, kv=1, rope_parameters=rope)
    out = str(tmp_path / "l3.gguf")
    anvil._C.export_gguf(d, out, "f16")
    r = gguf.GGUFReader(out)
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert t.tensor_type == Q.F32
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors, as it computes them (torch fp32).
    base, dim = 500000.0, 64
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, low, high = 64, 1.0, 4.0
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1)
        elif wavelen > old / low:
            factors.append(8.0)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    want = torch.tensor(factors, dtype=torch.float32).numpy()
    assert np.asarray(t.data).tobytes() == want.tobytes()
    assert 1.0 in want and 8.0 in want and ((want > 1) & (want < 8)).any()  # all three branches taken
    assert fields(out)[1]["llama.rope.freq_base"][2] == float(np.float32(500000.0))


# ---- logits -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", list(TYPES))
def test_logits_anvil_and_transformers(qtype, tmp_path):
    d = str(tmp_path / "m")
    src = make_model(d, os.path.join(TOKENIZERS, "gpt2"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "gpt2")),
                     tied=(qtype == "q4_0"), seed=4)
    out = str(tmp_path / "m.gguf")
    anvil._C.export_gguf(d, out, qtype)
    ids = torch.randint(3, 2000, (2, 17), generator=torch.Generator().manual_seed(5))
    ours = anvil._C.CausalLM(out)
    got = ours.logits(ids)
    if qtype == "f32":
        with torch.no_grad():
            assert_logits_close(got, src(ids).logits)
    # The model of the weights as stored (gguf-py's dequantize, un-permuted).
    ref = transformers.LlamaForCausalLM(src.config).float().eval()
    ref.load_state_dict(dequantized_state(out, src.config))
    with torch.no_grad():
        assert_logits_close(got, ref(ids).logits)
        if qtype == "f32":
            assert all(torch.equal(ref.state_dict()[k], v) for k, v in src.state_dict().items())
        # transformers' own GGUF loader (gguf-py inside) on our file.
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
        assert_logits_close(hf(ids).logits, got)


# ---- the tokenizer ----------------------------------------------------------------------------------------

def sample_lines():
    lines = open(os.path.join(TOKENIZERS, "multilingual_sample.txt"), encoding="utf-8").read().splitlines()
    return lines + ["hello 12345 world\n\n  x", "  leading and trailing  ", "ÿ€🦙 tabs\tand\r\nnewlines"]


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2"])
def test_bpe_tokenizer_round_trip(name, tmp_path):
    tok = os.path.join(TOKENIZERS, name)
    d = str(tmp_path / name)
    vocab = tokenizer_vocab_size(tok) + 5  # rows beyond the tokenizer: [PADi] UNUSED entries
    make_model(d, tok, vocab=vocab, hidden=32, ffn=64, layers=1, heads=2, kv=1)
    out = str(tmp_path / f"{name}.gguf")
    anvil._C.export_gguf(d, out, "q8_0")
    check_file(d, out, "q8_0", pre={"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}[name])
    src = anvil._C.Tokenizer.load(d)
    back = anvil._C.Tokenizer.load(out)
    hf_src = transformers.AutoTokenizer.from_pretrained(d)
    hf_back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=f"{name}.gguf")
    # transformers 5.17 ignores tokenizer.ggml.pre for architecture "llama" and always splits with GPT-2's
    # regex (integrations/ggml.py GGUFLlamaConverter: "HACK ... ByteLevel(use_regex=True)"), so for Llama 3 /
    # Qwen2 its reading must equal the source vocabulary and merges under that pre-tokenizer instead.
    tokenizers = pytest.importorskip("tokenizers")
    j = json.load(open(os.path.join(tok, "tokenizer.json"), encoding="utf-8"))
    j["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    j["normalizer"] = None
    gpt2_split = tokenizers.Tokenizer.from_str(json.dumps(j))
    for line in sample_lines():
        want = hf_src.encode(line, add_special_tokens=False)
        assert src.encode(line, add_special_tokens=False) == want, line
        assert back.encode(line, add_special_tokens=False) == want, line
        hf_want = want if name == "gpt2" else gpt2_split.encode(line, add_special_tokens=False).ids
        # A Qwen2 vocabulary under architecture "llama" is no file llama.cpp's converter makes (Qwen2 models
        # are architecture "qwen2"), and transformers' Llama GGUF converter does not rebuild its merges
        # faithfully ('\"\"\"' stays three tokens); anvil's reader above is the check there.
        if name != "qwen2":
            assert hf_back.encode(line, add_special_tokens=False) == hf_want, line
    assert back.encode("hi", add_special_tokens=True) == src.encode("hi", add_special_tokens=True)


def sp_dirs():
    out = [("demo", DEMO)]
    if os.path.exists(os.path.join(TOKENIZERS, "llama2", "tokenizer.model")):
        out.append(("llama2", os.path.join(TOKENIZERS, "llama2")))
    return out


@pytest.mark.parametrize("name,tok", sp_dirs())
def test_sentencepiece_tokenizer(name, tok, tmp_path):
    d = str(tmp_path / name)
    if name == "demo":
        shutil.copytree(tok, d)
    else:
        n = len(sp_pieces(os.path.join(tok, "tokenizer.model")))
        make_model(d, tok, vocab=n, hidden=32, ffn=64, layers=1, heads=2, kv=1)
    out = str(tmp_path / f"{name}.gguf")
    anvil._C.export_gguf(d, out, "q8_0")
    check_file(d, out, "q8_0")
    # anvil reads SentencePiece GGUF tokenizers back only through a tokenizer.model (its reader says so).
    with pytest.raises(RuntimeError, match=r"tokenizer.ggml.model 'llama' is not supported"):
        anvil._C.Tokenizer.load(out)
    # transformers rebuilds a tokenizer from our tokens/scores/types (GGUFLlamaConverter).
    src = anvil._C.Tokenizer.load(d)
    hf_back = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=f"{name}.gguf")
    lines = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.", "numbers 12345 and 3.14"]
    if name == "demo":
        lines += open(os.path.join(HERE, "..", "..", "examples", "tiny", "data", "valid.jsonl")).read().splitlines()[:3] \
            if os.path.exists(os.path.join(HERE, "..", "..", "examples", "tiny", "data", "valid.jsonl")) else []
    for line in lines:
        assert hf_back.encode(line, add_special_tokens=False) == src.encode(line, add_special_tokens=False), line


def test_demo_model(tmp_path):
    """examples/tiny/base (hidden 192 = 6 blocks of 32, ffn 512, vocab 4096, tied): every 2-D weight
    quantizes (no F16 fallback); anvil's logits equal the dequantized model's."""
    out = str(tmp_path / "demo.gguf")
    for qtype in ("q8_0", "q4_0"):
        r = anvil._C.export_gguf(DEMO, out, qtype, overwrite=True)
        check_file(DEMO, out, qtype)
        assert "F16" not in r["tensors_per_type"]
        cfg = transformers.AutoConfig.from_pretrained(DEMO)
        ref = transformers.LlamaForCausalLM(cfg).float().eval()
        ref.load_state_dict(dequantized_state(out, cfg))
        ids = torch.randint(4, 4096, (2, 24), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert_logits_close(anvil._C.CausalLM(out).logits(ids), ref(ids).logits)
        if qtype == "q4_0":
            assert r["tensors_per_type"] == {"F32": 9, "Q8_0": 1, "Q4_0": 28}
            assert r["bytes"] < r["source_bytes"] / 4


def test_mistral_folder(tmp_path):
    """MistralForCausalLM is converted by the same LlamaModel (architecture "llama"); sliding_window is not
    written, as the converter does not write it."""
    d = str(tmp_path / "mis")
    src = make_model(d, os.path.join(TOKENIZERS, "gpt2"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "gpt2")))
    c = json.load(open(os.path.join(d, "config.json")))
    c.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None})
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    out = str(tmp_path / "mis.gguf")
    anvil._C.export_gguf(d, out, "f32")
    check_file(d, out, "f32")
    ids = torch.randint(3, 2000, (1, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert_logits_close(anvil._C.CausalLM(out).logits(ids), src(ids).logits)


# ---- bad input -------------------------------------------------------------------------------------------

def test_bad_input(tmp_path):
    d = str(tmp_path / "m")
    make_model(d, os.path.join(TOKENIZERS, "gpt2"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "gpt2")))
    with pytest.raises(RuntimeError, match=r"type 'q5_k' is not one of f32, f16, bf16, q8_0, q4_0"):
        anvil._C.export_gguf(d, str(tmp_path / "a.gguf"), "q5_k")
    existing = tmp_path / "exists.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(RuntimeError, match=r"exists.gguf' exists \(pass overwrite"):
        anvil._C.export_gguf(d, str(existing), "f16")
    assert existing.read_bytes() == b"keep"
    anvil._C.export_gguf(d, str(existing), "f16", overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF"
    with pytest.raises(RuntimeError, match=r"holds no config.json"):
        anvil._C.export_gguf(str(tmp_path), str(tmp_path / "b.gguf"), "f16")
    c = json.load(open(os.path.join(d, "config.json")))
    for change, words in [({"architectures": ["Qwen2ForCausalLM"]}, r"architectures\[0\] is 'Qwen2ForCausalLM'"),
                          ({"attention_bias": True}, r"'attention_bias': true is not supported"),
                          ({"num_local_experts": 8}, r"'num_local_experts'"),
                          ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope scaling type 'yarn'"),
                          ({"hidden_size": "64"}, r"'hidden_size' must be an integer")]:
        json.dump({**c, **change}, open(os.path.join(d, "config.json"), "w"))
        with pytest.raises(RuntimeError, match=words):
            anvil._C.export_gguf(d, str(tmp_path / "c.gguf"), "f16")
    json.dump(c, open(os.path.join(d, "config.json"), "w"))
    # A tokenizer whose pre-tokenizer llama.cpp has no name anvil can stand behind.
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZERS, "deepseek_v3", f), d)
    json.dump({**c, "vocab_size": tokenizer_vocab_size(d)}, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(RuntimeError, match=r"tokenizer.json.*pre-tokenizer.*none of the llama.cpp pre-tokenizers"):
        anvil._C.export_gguf(d, str(tmp_path / "d.gguf"), "f16")
    assert sorted(os.listdir(tmp_path)) == ["exists.gguf", "m"]  # nothing half-written anywhere


def test_killed_export_leaves_no_file(tmp_path):
    d = str(tmp_path / "big")
    make_model(d, os.path.join(TOKENIZERS, "gpt2"), vocab=tokenizer_vocab_size(os.path.join(TOKENIZERS, "gpt2")),
               hidden=512, ffn=2048, layers=8, heads=8, kv=8)
    out = str(tmp_path / "big.gguf")
    code = f"import anvil; anvil._C.export_gguf({d!r}, {out!r}, 'q4_0')"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(n.startswith(".big.gguf.tmp") for n in os.listdir(tmp_path)):
        time.sleep(0.001)
    assert p.poll() is None, "the export finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(out)  # the temporary file may remain (hidden); never a partial big.gguf
    # The same export, uninterrupted, completes and reads.
    anvil._C.export_gguf(d, out, "q4_0")
    assert len(gguf.GGUFReader(out).tensors) == 2 + 8 * 9 + 1


def test_cli_export_gguf(tmp_path):
    """`anvil export-gguf`: the same file as the binding's, the report as JSON, errors with exit status 1."""
    binary = anvil.executable()  # the build tree's bin/anvil, or the installed wheel's
    out = str(tmp_path / "demo.gguf")
    r = subprocess.run([binary, "export-gguf", "--model", DEMO, "--out", out, "--type", "q4_0", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["tensors_per_type"] == {"F32": 9, "Q8_0": 1, "Q4_0": 28} and report["bytes"] == os.path.getsize(out)
    ref = str(tmp_path / "ref.gguf")
    anvil._C.export_gguf(DEMO, ref, "q4_0")
    assert open(out, "rb").read() == open(ref, "rb").read()  # byte for byte the binding's file
    r = subprocess.run([binary, "export-gguf", "--model", DEMO, "--out", out], capture_output=True, text=True)
    assert r.returncode == 1 and "exists" in r.stderr and os.path.getsize(out) == report["bytes"]
    r = subprocess.run([binary, "export-gguf", "--model", DEMO, "--out", out, "--type", "q3_k", "--overwrite"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "type 'q3_k' is not one of" in r.stderr
