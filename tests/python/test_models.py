"""Oracle tests of anvil's causal LMs against transformers 5.17, on CPU in fp32.

For every supported architecture a tiny random model is built with transformers, saved with
save_pretrained, loaded by anvil (anvil._C.CausalLM) and compared: logits (max |diff| <= 1e-4 x max
|logit|, docs/ARCHITECTURE.md), greedy generations (identical tokens vs generate(do_sample=False)),
the KV cache (cached logits equal the full forward), loss and perplexity; a model saved by anvil
reloads in transformers with the same logits and the same tensor names save_pretrained writes.
Weights are redrawn at O(1) scale (transformers' init of std 0.02 gives near-uniform routers and
near-tied logits, which would test nothing); the routers get a wider spread so that no expert choice
sits on a tie.
"""
import json
import math
import os

import pytest
import torch

import anvil
from hf_models import randomize

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LOGIT_RTOL = 1e-4  # max |diff| <= 1e-4 x max |logit|
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _mla(**kw):
    base = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1, num_key_value_heads=4)
    base.update(kw)
    return base


QWEN_MOE = dict(TINY, num_hidden_layers=3, num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=16)
QWEN2_MOE = dict(QWEN_MOE, num_experts=8, shared_expert_intermediate_size=24)
QWEN3_MOE = dict(QWEN_MOE, num_experts=4, head_dim=12)


def configs():
    t = transformers
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707}
    return {
        "llama": t.LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters=llama3),
        "llama_tied_bias": t.LlamaConfig(**{**TINY, "tie_word_embeddings": True}, num_key_value_heads=4,
                                         attention_bias=True, mlp_bias=True),
        "mistral": t.MistralConfig(**TINY, num_key_value_heads=2, sliding_window=5, head_dim=12),
        "qwen2": t.Qwen2Config(**TINY, num_key_value_heads=2),
        "qwen3": t.Qwen3Config(**TINY, num_key_value_heads=2, head_dim=16),
        "mixtral": t.MixtralConfig(**TINY, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
        "deepseek_v2": t.DeepseekV2Config(**TINY, **_mla(q_lora_rank=None), n_routed_experts=8, num_experts_per_tok=2,
                                          topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                          routed_scaling_factor=1.5),
        "deepseek_v2_greedy": t.DeepseekV2Config(**TINY, **_mla(q_lora_rank=12), n_routed_experts=4,
                                                 num_experts_per_tok=2, topk_method="greedy"),
        "deepseek_v3": t.DeepseekV3Config(**TINY, **_mla(q_lora_rank=12), n_routed_experts=8, num_experts_per_tok=2,
                                          n_group=4, topk_group=2, routed_scaling_factor=2.5, rope_parameters=yarn),
        "deepseek_v3_halves": t.DeepseekV3Config(**TINY, **_mla(q_lora_rank=None), n_routed_experts=4,
                                                 num_experts_per_tok=2, n_group=1, topk_group=1,
                                                 norm_topk_prob=False, rope_interleave=False),
        # Three layers, the middle one a dense MLP of intermediate_size (mlp_only_layers); softmax top-2 of 8 without
        # renormalisation, the sigmoid-gated shared expert, q/k/v biases.
        "qwen2_moe": t.Qwen2MoeConfig(**QWEN2_MOE, mlp_only_layers=[1], norm_topk_prob=False),
        # q/k norm, an explicit head_dim (not hidden / heads), renormalised top-2 of 4, no shared expert; layer 0 dense.
        "qwen3_moe": t.Qwen3MoeConfig(**QWEN3_MOE, mlp_only_layers=[0], norm_topk_prob=True),
    }


CASES = list(configs())


def save_random(config, directory, seed):
    """A transformers model of `config` with randomize()'d weights, in eval mode, saved to `directory`."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.eval().save_pretrained(directory)
    return model


def build_hf(case, directory, seed=0):
    return save_random(configs()[case], directory, seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (transformers model, directory it was saved to), built once per module."""
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp(case)
            cache[case] = (build_hf(case, str(d), seed=CASES.index(case)), str(d))
        return cache[case]

    return get


def tokens(batch, length, seed, vocab=TINY["vocab_size"]):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def hf_greedy(model, ids, n):
    model.generation_config.eos_token_id = None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0)
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, saved):
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d)
    assert ours.architecture == hf.config.architectures[0]
    ids = tokens(2, 11, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_logits_close(ours.logits(ids), ref)


@pytest.mark.parametrize("case", CASES)
def test_packed_documents_equal_separate_forwards(case, saved):
    """Three documents packed in a row (positions restart, doc ids) give each document's own logits;
    padding at the end (doc id -1) leaves them alone."""
    _, d = saved(case)
    ours = anvil._C.CausalLM(d)
    docs = [tokens(1, n, seed=20 + n)[0] for n in (5, 9, 4)]
    ids = torch.cat(docs + [torch.zeros(3, dtype=torch.long)]).unsqueeze(0)              # (1, 21)
    positions = torch.cat([torch.arange(len(x)) for x in docs] + [torch.zeros(3, dtype=torch.long)]).unsqueeze(0)
    doc_ids = torch.cat([torch.full((len(x),), i) for i, x in enumerate(docs)] + [torch.full((3,), -1)]).unsqueeze(0)
    packed = ours.packed_logits(ids, positions, doc_ids)[0]
    start = 0
    for x in docs:
        assert_logits_close(packed[start:start + len(x)].unsqueeze(0), ours.logits(x.unsqueeze(0)))
        start += len(x)


def left_padded(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("case", CASES)
def test_left_padded_batch_generation_matches_transformers(case, saved):
    """Prompts of different lengths, left-padded with transformers' attention_mask: the tokens of transformers'
    batched greedy generate (the same ids, pads included), with and without the cache, and each row's new tokens
    are those it gets alone. With an eos that some rows reach early: those rows stop and are padded as
    transformers pads them."""
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d)
    rows = [tokens(1, n, seed=40 + n)[0] for n in (3, 9, 1, 6)]
    ids, mask = left_padded(rows)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    got = ours.generate(ids, max_new_tokens=8, attention_mask=mask)
    assert torch.equal(got, ref), f"{got}\nvs transformers\n{ref}"
    assert torch.equal(ours.generate(ids, max_new_tokens=8, attention_mask=mask, use_cache=False), ref)
    width = ids.shape[1]
    for i, r in enumerate(rows):
        assert torch.equal(ours.generate(r.unsqueeze(0), max_new_tokens=8)[0, len(r):], got[i, width:])
    # An eos that row 0 emits as its 3rd new token: rows stop on their own, finished rows padded with 0.
    eos = int(ref[0, width + 2])
    with torch.no_grad():
        ref_eos = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                              pad_token_id=0)
    got_eos = ours.generate(ids, max_new_tokens=8, attention_mask=mask, stop_tokens=[eos], pad_token_id=0)
    assert torch.equal(got_eos, ref_eos), f"{got_eos}\nvs transformers\n{ref_eos}"
    assert (got_eos[0, width + 3:] == 0).all()


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_transformers(case, saved):
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d)
    ids = tokens(2, 6, seed=2)
    with torch.no_grad():
        ref = hf_greedy(hf, ids, 8)
    got = ours.generate(ids, max_new_tokens=8)
    assert torch.equal(got, ref), f"{got}\nvs transformers\n{ref}"
    # Without the cache (the whole sequence recomputed each step): the same tokens.
    assert torch.equal(ours.generate(ids, max_new_tokens=8, use_cache=False), ref)


@pytest.mark.parametrize("case", CASES)
def test_kv_cache_logits_equal_full_forward(case, saved):
    _, d = saved(case)
    ours = anvil._C.CausalLM(d)
    ids = tokens(2, 13, seed=3)
    full = ours.logits(ids)
    for chunk in (1, 5):  # one token at a time; prefix chunks that need an explicit mask
        assert_logits_close(ours.cached_logits(ids, chunk), full)


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen3", "mixtral", "deepseek_v2", "deepseek_v3", "qwen2_moe",
                                  "qwen3_moe"])
def test_loss_and_perplexity_match_transformers(case, saved):
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d)
    ids = tokens(2, 12, seed=4)
    labels = ids.clone()
    labels[0, 3:6] = -100
    with torch.no_grad():
        ref = hf(ids, labels=ids).loss.item()
        ref_masked = hf(ids, labels=labels).loss.item()
    assert ours.loss(ids) == pytest.approx(ref, rel=1e-5)
    assert ours.loss(ids, labels) == pytest.approx(ref_masked, rel=1e-5)
    # Perplexity over two sequences = exp of the token-weighted mean of their losses.
    a, b = tokens(1, 9, seed=5)[0], tokens(1, 14, seed=6)[0]
    with torch.no_grad():
        la = hf(a[None], labels=a[None]).loss.item()
        lb = hf(b[None], labels=b[None]).loss.item()
    r = ours.perplexity([a, b])
    assert r["tokens"] == 8 + 13
    assert r["perplexity"] == pytest.approx(math.exp((8 * la + 13 * lb) / 21), rel=1e-5)
    # Windows of 5 tokens: each scored on its own.
    w = ours.perplexity([b], max_length=5)
    assert w["tokens"] == 4 + 4 + 3  # windows [0,5) [5,10) [10,14)


@pytest.mark.parametrize("case", CASES)
def test_saved_by_anvil_reloads_in_transformers(case, saved, tmp_path):
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d)
    out = str(tmp_path / "anvil_saved")
    ours.save(out)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        hf_keys = set(f.keys())
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        our_keys = set(f.keys())
    assert our_keys == hf_keys
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokens(2, 10, seed=7)
    with torch.no_grad():
        ref = reloaded(ids).logits
    assert torch.equal(ours.logits(ids), anvil._C.CausalLM(out).logits(ids))
    assert_logits_close(ours.logits(ids), ref)


def to_transformers4_style(directory):
    """Rewrites a transformers 5.x config.json as 4.x published checkpoints write it."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    c["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    c["torch_dtype"] = c.pop("dtype")
    c.pop("rope_interleave", None)  # 4.x DeepSeek-V3 configs have none; interleaved is the default
    with open(path, "w") as f:
        json.dump(c, f)


@pytest.mark.parametrize("case", ["llama", "deepseek_v3", "qwen2", "qwen2_moe"])
def test_transformers4_config_style(case, saved, tmp_path):
    hf, d = saved(case)
    import shutil
    out = str(tmp_path / "v4")
    shutil.copytree(d, out)
    to_transformers4_style(out)
    ids = tokens(1, 9, seed=8)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_logits_close(anvil._C.CausalLM(out).logits(ids), ref)


def test_mixtral_alternative_expert_names(saved, tmp_path):
    """Mixtral experts as `mlp.experts.{e}.{gate,up,down}_proj` or fused 3-D tensors load the same."""
    hf, d = saved("mixtral")
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ids = tokens(1, 7, seed=9)
    ref = anvil._C.CausalLM(d).logits(ids)
    renamed = {}
    for k, v in tensors.items():
        k = k.replace(".block_sparse_moe.", ".mlp.")
        k = k.replace(".w1.", ".gate_proj.").replace(".w3.", ".up_proj.").replace(".w2.", ".down_proj.")
        renamed[k] = v
    fused = {k: v for k, v in renamed.items() if ".experts." not in k}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([renamed[f"{p}.{e}.gate_proj.weight"], renamed[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
        fused[f"{p}.down_proj"] = torch.stack([renamed[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    for name, ts in (("renamed", renamed), ("fused", fused)):
        out = tmp_path / name
        out.mkdir()
        save_file(ts, str(out / "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(d, "config.json")) as f:
            (out / "config.json").write_text(f.read())
        assert torch.equal(anvil._C.CausalLM(str(out)).logits(ids), ref), name


def test_sampling(saved):
    _, d = saved("llama")
    ours = anvil._C.CausalLM(d)
    ids = tokens(2, 5, seed=10)
    greedy = ours.generate(ids, max_new_tokens=6)
    # top_k = 1 and a tiny top_p leave only the argmax: sampling equals greedy.
    assert torch.equal(ours.generate(ids, max_new_tokens=6, temperature=0.7, top_k=1, seed=3), greedy)
    assert torch.equal(ours.generate(ids, max_new_tokens=6, temperature=1.3, top_p=1e-6, seed=4), greedy)
    # A seed fixes the draw; different seeds draw differently somewhere.
    a = ours.generate(ids, max_new_tokens=12, temperature=1.5, seed=11)
    assert torch.equal(a, ours.generate(ids, max_new_tokens=12, temperature=1.5, seed=11))
    draws = [ours.generate(ids, max_new_tokens=12, temperature=1.5, seed=s) for s in range(12, 16)]
    assert any(not torch.equal(a, x) for x in draws)
    # top_k = 3: each sampled token is among the 3 most likely after its prefix.
    out = ours.generate(ids, max_new_tokens=10, temperature=2.0, top_k=3, seed=5)
    logits = ours.logits(out)
    for pos in range(ids.shape[1], out.shape[1]):
        top3 = logits[:, pos - 1].topk(3).indices
        assert all(out[b, pos] in top3[b] for b in range(2))


def test_stop_tokens(saved):
    _, d = saved("qwen2")
    ours = anvil._C.CausalLM(d)
    ids = tokens(2, 5, seed=12)
    free = ours.generate(ids, max_new_tokens=10)
    stop = int(free[0, 5 + 3])  # the fourth token of row 0
    got = ours.generate(ids, max_new_tokens=10, stop_tokens=[stop], pad_token_id=0)
    first_stop = [next((i for i in range(5, free.shape[1]) if free[b, i] == stop), None) for b in range(2)]
    for b in range(2):
        end = first_stop[b]
        if end is None:
            assert torch.equal(got[b], free[b, : got.shape[1]])
        else:
            assert torch.equal(got[b, : end + 1], free[b, : end + 1])
            assert (got[b, end + 1:] == 0).all()
    # Every row stopped: generation ends early.
    if all(e is not None for e in first_stop):
        assert got.shape[1] == max(first_stop) + 1


def quantize_checkpoint_fp8(src, dst):
    """Rewrites src's 2-D projection weights as FineGrainedFP8 (F8_E4M3 + 128x128 weight_scale_inv)
    and returns the dequantized tensors (float(q) * scale) the loader must reproduce."""
    os.makedirs(dst)
    with safe_open(os.path.join(src, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, dequantized = {}, {}
    for k, w in tensors.items():
        if k.endswith("proj.weight") or ".w1." in k or ".w2." in k or ".w3." in k:
            q, s = anvil.quantize_fp8(w.contiguous(), "block128x128")
            out[k], out[k + "_scale_inv"] = q, s
            rows = s.repeat_interleave(128, 0)[: w.shape[0]]
            dequantized[k] = q.float() * rows.repeat_interleave(128, 1)[:, : w.shape[1]]
        else:
            out[k] = dequantized[k] = w
    save_file(out, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    c["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                "weight_block_size": [128, 128]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(c, f)
    return dequantized


@pytest.mark.parametrize("case", ["llama", "deepseek_v3"])
def test_fp8_checkpoint_loads_dequantized(case, saved, tmp_path):
    hf, d = saved(case)
    fp8 = str(tmp_path / "fp8")
    dequantized = quantize_checkpoint_fp8(d, fp8)
    ref_dir = str(tmp_path / "ref")
    os.makedirs(ref_dir)
    save_file(dequantized, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        (tmp_path / "ref" / "config.json").write_text(f.read())
    ids = tokens(1, 8, seed=13)
    ours = anvil._C.CausalLM(fp8, dtype="float32")
    for name, t in ours.state_dict().items():
        if name in dequantized:
            assert torch.equal(t, dequantized[name]), name
    assert torch.equal(ours.logits(ids), anvil._C.CausalLM(ref_dir).logits(ids))
    # By default an FP8 checkpoint loads in bf16, and a save writes bf16 weights without quantization_config.
    bf16 = anvil._C.CausalLM(fp8)
    assert bf16.dtype == "bfloat16"
    out = str(tmp_path / "saved")
    bf16.save(out)
    with open(os.path.join(out, "config.json")) as f:
        c = json.load(f)
    assert "quantization_config" not in c and c["dtype"] == "bfloat16"


def test_load_errors_name_the_problem(saved, tmp_path):
    _, d = saved("llama")
    bad = tmp_path / "bad"
    bad.mkdir()
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    missing["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(missing, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        anvil._C.CausalLM(str(bad))
    with pytest.raises(RuntimeError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        anvil._C.CausalLM(str(bad))
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="unknown architecture 'GPT2LMHeadModel'"):
        anvil._C.CausalLM(str(bad))


@pytest.mark.parametrize("case", ["llama", "qwen3", "mixtral", "deepseek_v3", "qwen2_moe", "qwen3_moe"])
def test_bf16_error_within_twice_transformers_bf16(case, saved):
    """bf16 rule of docs/ARCHITECTURE.md: error vs transformers' fp32 logits <= 2x (+ slack) the error
    of transformers' own bf16 run (on CPU here; the GPU check is scripts/gpu-test.sh's)."""
    hf, d = saved(case)
    ids = tokens(2, 10, seed=14)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = hf(ids).logits.double()
        theirs = (hf_bf16(ids).logits.double() - ref).abs().max().item()
    ours_model = anvil._C.CausalLM(d, dtype="bfloat16")
    assert ours_model.dtype == "bfloat16"
    ours = (ours_model.logits(ids).double() - ref).abs().max().item()
    assert ours <= 2 * theirs + 1e-3 * ref.abs().max().item(), f"anvil bf16 error {ours:.3g}, transformers' {theirs:.3g}"


@pytest.mark.parametrize("case", ["qwen2", "deepseek_v2"])
def test_eager_backend_matches(case, saved, tmp_path):
    """config.json key anvil_attention_backend = "eager" computes the same logits as "sdpa"."""
    import shutil
    _, d = saved(case)
    out = tmp_path / "eager"
    shutil.copytree(d, out)
    c = json.loads((out / "config.json").read_text())
    c["anvil_attention_backend"] = "eager"
    (out / "config.json").write_text(json.dumps(c))
    ids = tokens(2, 9, seed=15)
    sdpa = anvil._C.CausalLM(d)
    eager = anvil._C.CausalLM(str(out))
    assert_logits_close(eager.logits(ids), sdpa.logits(ids))
    assert_logits_close(eager.cached_logits(ids, 4), sdpa.logits(ids))
    c["anvil_attention_backend"] = "flash9"
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(RuntimeError, match="anvil_attention_backend 'flash9'"):
        anvil._C.CausalLM(str(out))


def test_sharded_save_reloads(saved, tmp_path):
    """A save split into shards (model.safetensors.index.json) reloads in transformers and in anvil."""
    hf, d = saved("deepseek_v3")
    ours = anvil._C.CausalLM(d)
    out = str(tmp_path / "sharded")
    ours.save(out, max_shard_bytes=20_000)
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    ids = tokens(1, 8, seed=16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert_logits_close(ours.logits(ids), reloaded(ids).logits)
    assert torch.equal(anvil._C.CausalLM(out).logits(ids), ours.logits(ids))


@pytest.mark.cuda
@pytest.mark.parametrize("case", ["llama", "mixtral", "deepseek_v3"])
def test_cuda_matches_transformers(case, saved):
    """On the GPU: fp32 logits within the fp32 rule of transformers' CPU logits, greedy tokens equal to
    the CPU run, bf16 within twice transformers' own bf16 error on the GPU."""
    hf, d = saved(case)
    ids = tokens(2, 10, seed=17)
    with torch.no_grad():
        ref = hf(ids).logits
    gpu = anvil._C.CausalLM(d, dtype="float32", device="cuda")
    assert_logits_close(gpu.logits(ids.cuda()).cpu(), ref)
    assert torch.equal(gpu.generate(ids.cuda(), max_new_tokens=8).cpu(), anvil._C.CausalLM(d).generate(ids, max_new_tokens=8))
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():
        theirs = (hf_bf16(ids.cuda()).logits.double().cpu() - ref.double()).abs().max().item()
    ours = (anvil._C.CausalLM(d, dtype="bfloat16", device="cuda").logits(ids.cuda()).double().cpu() - ref.double())
    assert ours.abs().max().item() <= 2 * theirs + 1e-3 * ref.abs().max().item()


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5},
    {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
     "attention_factor": 1.3, "beta_fast": 16.0, "beta_slow": 2.0},
])
def test_rope_variants_on_llama(rope, tmp_path):
    """The other RoPE types (linear; yarn with computed and explicit attention_factor) on a dense model."""
    hf = save_random(transformers.LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters=rope), tmp_path, 21)
    ids = tokens(2, 40, seed=22)  # past original_max_position_embeddings
    with torch.no_grad():
        ref = hf(ids).logits
    ours = anvil._C.CausalLM(str(tmp_path))
    assert_logits_close(ours.logits(ids), ref)
    assert_logits_close(ours.cached_logits(ids, 7), ref)


@pytest.mark.parametrize("case", ["llama", "qwen3", "mixtral", "deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe"])
def test_gradients_match_transformers(case, saved):
    """The backward pass (through RMSNorm, RoPE, SDPA, MLA and the MoE ops' own backward functions,
    router included) gives transformers' parameter gradients."""
    hf, d = saved(case)
    ours = anvil._C.CausalLM(d).loss_gradients(tokens(2, 9, seed=23))
    hf.zero_grad()
    hf(tokens(2, 9, seed=23), labels=tokens(2, 9, seed=23)).loss.backward()
    theirs = {}
    for name, p in hf.named_parameters():
        theirs[name] = p.grad if p.grad is not None else torch.zeros_like(p)
    hf.zero_grad()
    # transformers holds experts fused; split them into the checkpoint names for the comparison.
    for name in list(theirs):
        if name.endswith("experts.gate_up_proj"):
            g, prefix = theirs.pop(name), name[: -len("gate_up_proj")]
            i = g.shape[1] // 2
            names = ("w1", "w3") if case == "mixtral" else ("gate_proj", "up_proj")
            for e in range(g.shape[0]):
                theirs[f"{prefix}{e}.{names[0]}.weight"] = g[e, :i]
                theirs[f"{prefix}{e}.{names[1]}.weight"] = g[e, i:]
        elif name.endswith("experts.down_proj"):
            g, prefix = theirs.pop(name), name[: -len("down_proj")]
            for e in range(g.shape[0]):
                theirs[f"{prefix}{e}.{'w2' if case == 'mixtral' else 'down_proj'}.weight"] = g[e]
    if case == "mixtral":
        theirs = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in theirs.items()}
    assert set(ours) == set(theirs)
    scale = max(g.abs().max().item() for g in theirs.values())
    for name, g in theirs.items():
        diff = (ours[name].double() - g.double()).abs().max().item()
        assert diff <= 1e-4 * scale, f"{name}: max |diff| {diff:.3g} (largest gradient {scale:.3g})"


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_sliding_window_layers(family, tmp_path):
    """use_sliding_window with max_window_layers: only the layers from max_window_layers on use the window."""
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
    config = cls(**TINY, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    expect_transformers_logits(save_random(config, tmp_path, 31), tmp_path, tokens(2, 12, seed=32), chunks=(1, 5))


def expect_transformers_logits(hf, directory, ids, chunks):
    """anvil's logits of the model saved in `directory`, whole and through the cache in each chunk size, are hf's;
    returns hf's."""
    with torch.no_grad():
        ref = hf(ids).logits
    ours = anvil._C.CausalLM(str(directory))
    assert_logits_close(ours.logits(ids), ref)
    for chunk in chunks:
        assert_logits_close(ours.cached_logits(ids, chunk), ref)
    return ref


def _expert_tensors_fused(tensors, num_layers):
    """Per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` tensors as transformers 5.17 holds them in memory:
    `mlp.experts.gate_up_proj` (E, 2I, H) and `mlp.experts.down_proj` (E, H, I)."""
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for layer in range(num_layers):
        p = f"model.layers.{layer}.mlp.experts"
        n = sum(1 for k in tensors if k.startswith(p + ".") and k.endswith(".down_proj.weight"))
        if n == 0:
            continue
        fused[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}.{e}.gate_proj.weight"], tensors[f"{p}.{e}.up_proj.weight"]]) for e in range(n)])
        fused[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(n)])
    return fused


@pytest.mark.parametrize("case", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_checkpoint_names(case, saved, tmp_path):
    """save_pretrained writes per-expert tensors plus the router `mlp.gate.weight` (and Qwen2-MoE's
    `mlp.shared_expert.*`, `mlp.shared_expert_gate.weight`), which anvil holds under the same names; the fused 3-D
    expert tensors transformers keeps in memory (its state_dict) load to the same logits."""
    hf, d = saved(case)
    with safe_open(os.path.join(d, "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.0.mlp.experts.1.up_proj.weight" in tensors or "model.layers.1.mlp.experts.1.up_proj.weight" in tensors
    ours = anvil._C.CausalLM(d)
    assert set(ours.state_dict()) == set(tensors)
    if case == "qwen2_moe":
        assert tensors["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
        assert "model.layers.1.mlp.down_proj.weight" in tensors  # mlp_only_layers: a dense MLP
        # A quantized base (LoRA over int8) keeps the shared-expert gate dense, as the routers are.
        q = anvil._C.CausalLM(d, "", "cpu", "int8").state_dict()
        assert q["model.layers.0.mlp.shared_expert_gate.weight"].dtype == torch.float32
        assert q["model.layers.0.mlp.experts.0.up_proj.weight"].dtype == torch.int8
    ids = tokens(1, 7, seed=9)
    ref = ours.logits(ids)
    fused = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in fused)  # transformers 5.17's in-memory layout
    assert set(_expert_tensors_fused(tensors, 3)) == set(fused)
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(open(os.path.join(d, "config.json")).read())
    assert torch.equal(anvil._C.CausalLM(str(out)).logits(ids), ref)


def test_qwen3_moe_published_num_experts_key(saved, tmp_path):
    """Qwen3-MoE's save_pretrained writes `num_local_experts`; published configs say `num_experts`: both load."""
    import shutil
    hf, d = saved("qwen3_moe")
    out = tmp_path / "published"
    shutil.copytree(d, out)
    c = json.loads((out / "config.json").read_text())
    assert c["num_local_experts"] == 4
    c["num_experts"] = c.pop("num_local_experts")
    (out / "config.json").write_text(json.dumps(c))
    to_transformers4_style(str(out))
    ids = tokens(2, 9, seed=8)
    with torch.no_grad():
        ref = hf(ids).logits
    assert_logits_close(anvil._C.CausalLM(str(out)).logits(ids), ref)
    c = json.loads((out / "config.json").read_text())
    c["num_local_experts"] = 8
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(RuntimeError, match="'num_experts' 4 and 'num_local_experts' 8 disagree"):
        anvil._C.CausalLM(str(out))


@pytest.mark.parametrize("case,kw", [
    # decoder_sparse_step 2: layers 1 and 3 are MoE, 0 and 2 dense; the even layers below max_window_layers slide.
    ("qwen2_moe", dict(decoder_sparse_step=2, num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                       max_window_layers=3, norm_topk_prob=True)),
    # Qwen3-MoE: the window on every layer; step 2 with layer 3 listed dense as well.
    ("qwen3_moe", dict(decoder_sparse_step=2, num_hidden_layers=4, mlp_only_layers=[3], use_sliding_window=True,
                       sliding_window=4, norm_topk_prob=False)),
])
def test_qwen_moe_sparse_step_and_sliding_window(case, kw, tmp_path):
    """decoder_sparse_step, mlp_only_layers and the sliding window as each Qwen-MoE config class lays them out,
    with and without the cache; Qwen2-MoE's config loads alike without its written-out layer_types (4.x configs)."""
    if case == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**{**QWEN2_MOE, **kw})
        assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    else:
        config = transformers.Qwen3MoeConfig(**{**QWEN3_MOE, **kw})
    hf = save_random(config, tmp_path, 41)
    dense = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate_proj")]
    assert dense == ([0, 2] if case == "qwen2_moe" else [0, 2, 3])
    ids = tokens(2, 12, seed=42)
    ref = expect_transformers_logits(hf, tmp_path, ids, chunks=(5,))
    if case == "qwen2_moe":
        c = json.loads((tmp_path / "config.json").read_text())
        del c["layer_types"]
        (tmp_path / "config.json").write_text(json.dumps(c))
        assert_logits_close(anvil._C.CausalLM(str(tmp_path)).logits(ids), ref)
