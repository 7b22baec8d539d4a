"""Oracle tests of anvil's LoRA adapters (lora/) against PEFT 0.21 on transformers 5.17, CPU, fp32.

A tiny random Llama, Qwen2, Llama with biases and DeepSeek-V3 (MLA + MoE with a shared expert) is
built with transformers and saved. Then, for a table of LoraConfigs (suffix list, full names, regex,
all-linear, rank_pattern/alpha_pattern, rsLoRA, gaussian init, DoRA):
  (a) PEFT's get_peft_model + random nonzero adapter weights + save_pretrained; anvil loads the base
      and the adapter: logits equal PEFT's (max |diff| <= 1e-4 x max |logit|);
  (b) anvil applies LoRA, its adapter weights are set at random, save_adapter; PeftModel.from_pretrained
      loads it: same logits, same tensor names and shapes, and adapter_config.json equal to the one
      PEFT writes for the same config;
  (c) anvil's merge equals PEFT's merge_and_unload (weights and logits), and the merged model saved
      by anvil reloads in transformers with the same logits.
B starts at zero in both libraries, so every adapter weight is redrawn at O(1) scale: a zero or tiny
delta would test nothing.
"""
import copy
import json
import math
import os

import pytest
import torch

import anvil
from hf_models import randomize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402

_C = anvil._C
LOGIT_RTOL = 1e-4
TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DSV3_ATTN = r".*\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
DSV3_ATTN_SHARED = r".*\.(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.shared_experts\.\w+)"


def configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(**TINY, num_key_value_heads=2),
        "llama_bias": t.LlamaConfig(**TINY, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
        "qwen2": t.Qwen2Config(**TINY, num_key_value_heads=2),
        "deepseek_v3": t.DeepseekV3Config(**TINY, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                          v_head_dim=12, moe_intermediate_size=16, n_shared_experts=1,
                                          first_k_dense_replace=1, num_key_value_heads=4, q_lora_rank=12,
                                          n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1),
        "qwen2_moe": t.Qwen2MoeConfig(**TINY, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16, shared_expert_intermediate_size=24, mlp_only_layers=[0]),
    }


# (case, LoraConfig kwargs): PEFT's own field names, passed to peft.LoraConfig and, as JSON, to anvil.
VARIANTS = {
    "llama_suffix": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_full_names": ("llama", dict(r=4, lora_alpha=16, target_modules=["model.layers.0.self_attn.q_proj",
                                                                            "model.layers.1.mlp.down_proj"])),
    "llama_regex": ("llama", dict(r=2, lora_alpha=5, target_modules=r".*\.layers\.1\..*_proj")),
    "llama_all_linear": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama_patterns": ("llama", dict(r=4, lora_alpha=8, target_modules="all-linear",
                                     rank_pattern={"k_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
                                     alpha_pattern={"o_proj": 3, "down_proj": 32})),
    "llama_rslora": ("llama", dict(r=9, lora_alpha=6, use_rslora=True, target_modules=["o_proj", "gate_proj"])),
    "llama_gaussian": ("llama", dict(r=4, lora_alpha=4, init_lora_weights="gaussian", lora_dropout=0.1,
                                     target_modules=["up_proj", "k_proj"])),
    "llama_dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "llama_bias_dora": ("llama_bias", dict(r=3, lora_alpha=7, use_dora=True, target_modules="all-linear")),
    "qwen2_all_linear": ("qwen2", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    "qwen2_lm_head": ("qwen2", dict(r=2, lora_alpha=2, target_modules=["v_proj", "lm_head"])),
    # MLA projections only: PEFT 0.21 rewrites any DeepSeek/Mixtral target ending in gate_proj, up_proj or
    # down_proj (dense MLP and shared experts included) into target_parameters on the fused routed
    # experts of transformers 5.x, so it is no oracle for MoE-model MLPs (see test_moe_mlp_adapters).
    "deepseek_v3_attn": ("deepseek_v3", dict(r=4, lora_alpha=8, target_modules=DSV3_ATTN)),
    "deepseek_v3_mla_list": ("deepseek_v3", dict(r=2, lora_alpha=4, target_modules=["q_b_proj", "kv_b_proj",
                                                                                   "kv_a_proj_with_mqa"],
                                                 rank_pattern={"kv_b_proj": 5}, use_dora=True)),
    # Attention and the shared expert's gate (a Linear hidden -> 1); the MLP names meet the same PEFT rewrite.
    "qwen2_moe_attn": ("qwen2_moe", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                            "shared_expert_gate"])),
}


def randomize_adapter(named, seed):
    """O(1)-scale lora_A / lora_B (deltas comparable to W), magnitudes 1 +- 0.3 of their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in named:
            if "lora_magnitude_vector" in name:
                t.mul_(1.0 + 0.3 * torch.randn(t.shape, generator=g))
            elif "lora_A" in name or "lora_B" in name:
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t.shape[-1]))


def peft_adapter_tensors(model):
    """(name, tensor) of a PeftModel's adapter parameters, in-memory names."""
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            d = str(tmp_path_factory.mktemp("base_" + case))
            torch.manual_seed(0)
            m = transformers.AutoModelForCausalLM.from_config(configs()[case], dtype=torch.float32)
            randomize(m, seed=len(cache) + 1)
            m.save_pretrained(d)
            cache[case] = d
        return cache[case]

    return get


def hf_model(directory):
    m = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return m.eval()


def tokens(seed, batch=2, length=9):
    return torch.randint(3, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def config_json(kwargs):
    return json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", **kwargs})


def peft_config(kwargs):
    return peft.LoraConfig(task_type="CAUSAL_LM", **copy.deepcopy(kwargs))


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def anvil_model(directory):
    model = _C.CausalLM(directory)
    _C.set_training(model, False)  # eval: LoRA dropout off, as in PEFT's eval()
    return model


def anvil_with_adapter(base_dir, kwargs, seed):
    model = anvil_model(base_dir)
    named = _C.apply_lora(model, config_json(kwargs), seed)
    randomize_adapter(named, seed)
    return model, named


# ---- (a) PEFT saves, anvil loads -------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_anvil(base, tmp_path, variant):
    case, kwargs = VARIANTS[variant]
    pm = peft.get_peft_model(hf_model(base(case)), peft_config(kwargs))
    randomize_adapter(peft_adapter_tensors(pm), seed=11)
    pm.eval()
    pm.save_pretrained(str(tmp_path))
    ids = tokens(1)
    ref = logits_of(pm, ids)
    ours_model = anvil_model(base(case))
    _C.load_adapter(ours_model, str(tmp_path))
    assert _C.trainable_parameter_names(ours_model) == []  # the base is frozen
    assert_logits_close(ours_model.logits(ids), ref)
    # The adapter changes the output: the comparison above is not base vs base.
    assert (ref - logits_of(hf_model(base(case)), ids)).abs().max() > 1e-2 * ref.abs().max()


# ---- (b) anvil saves, PEFT loads -------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_anvil_adapter_loads_in_peft(base, tmp_path, variant):
    case, kwargs = VARIANTS[variant]
    ours, named = anvil_with_adapter(base(case), kwargs, seed=5)
    _C.save_adapter(ours, config_json(kwargs), str(tmp_path / "anvil"))
    pm = peft.PeftModel.from_pretrained(hf_model(base(case)), str(tmp_path / "anvil")).eval()
    ids = tokens(2)
    assert_logits_close(ours.logits(ids), logits_of(pm, ids))

    # Same tensors, names and shapes as PEFT's own save of the same config, and the same config file.
    ref = peft.get_peft_model(hf_model(base(case)), peft_config(kwargs))
    ref.save_pretrained(str(tmp_path / "peft"))

    def shapes(d):
        with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}

    assert shapes(str(tmp_path / "anvil")) == shapes(str(tmp_path / "peft"))
    mine = json.load(open(tmp_path / "anvil" / "adapter_config.json"))
    theirs = json.load(open(tmp_path / "peft" / "adapter_config.json"))
    if case in ("deepseek_v3", "qwen2_moe"):
        # PEFT's transformers-5 MoE conversion resolves the targets and adds target_parameters: [] to
        # the config it writes for DeepSeek/Mixtral; what it targets is compared through the tensors.
        for key in ("target_modules", "target_parameters"):
            mine.pop(key), theirs.pop(key)
    for c in (mine, theirs):
        c.pop("base_model_name_or_path")  # PEFT records the directory the base was loaded from
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
    assert mine == theirs


def test_adapter_config_text_matches_peft(base, tmp_path):
    # Byte-identical when target_modules has one entry (PEFT writes a set in hash order otherwise).
    kwargs = dict(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj"],
                  rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"q_proj": 1.5})
    ours, _ = anvil_with_adapter(base("llama"), kwargs, seed=1)
    _C.save_adapter(ours, config_json({**kwargs, "base_model_name_or_path": base("llama")}), str(tmp_path / "anvil"))
    peft.get_peft_model(hf_model(base("llama")), peft_config(kwargs)).save_pretrained(str(tmp_path / "peft"))
    assert (tmp_path / "anvil" / "adapter_config.json").read_text() == \
        (tmp_path / "peft" / "adapter_config.json").read_text()


# ---- (c) merge --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama_suffix", "llama_patterns", "llama_rslora", "llama_dora",
                                     "llama_bias_dora", "qwen2_lm_head", "deepseek_v3_attn",
                                     "deepseek_v3_mla_list"])
def test_merge_matches_peft_merge_and_unload(base, tmp_path, variant):
    case, kwargs = VARIANTS[variant]
    ours, _ = anvil_with_adapter(base(case), kwargs, seed=3)
    _C.save_adapter(ours, config_json(kwargs), str(tmp_path / "adapter"))
    pm = peft.PeftModel.from_pretrained(hf_model(base(case)), str(tmp_path / "adapter")).eval()
    merged_ref = pm.merge_and_unload().eval()
    _C.merge_adapter(ours)
    assert _C.adapter_state(ours) == []
    theirs = merged_ref.state_dict()
    changed = 0
    base_state = hf_model(base(case)).state_dict()
    for name, w in ours.state_dict().items():
        if name not in theirs:  # DeepSeek's routed experts: fused 3-D in transformers 5.x, not adapted here
            assert ".mlp.experts." in name
            continue
        ref = theirs[name]
        assert torch.allclose(w, ref, rtol=1e-5, atol=1e-6), name
        changed += int(not torch.equal(w, base_state[name]))
    assert changed > 0
    ids = tokens(3)
    assert_logits_close(ours.logits(ids), logits_of(merged_ref, ids))
    # The merged model is a plain checkpoint for transformers.
    ours.save(str(tmp_path / "merged"))
    assert_logits_close(logits_of(hf_model(str(tmp_path / "merged")), ids), logits_of(merged_ref, ids))
    assert not os.path.exists(tmp_path / "merged" / "adapter_config.json")


# ---- bf16 base ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama_patterns", "llama_dora"])
def test_bf16_base_with_fp32_adapter(base, tmp_path, variant):
    """A bf16 base keeps fp32 adapters (PEFT's autocast_adapter_dtype), the file holds fp32 tensors as
    PEFT's does, logits follow the bf16 rule of docs/ARCHITECTURE.md (error vs the fp32 PEFT model <= 2x
    PEFT's own bf16 error + slack), and the bf16 merge equals PEFT's to one bf16 rounding."""
    case, kwargs = VARIANTS[variant]
    d = base(case)
    ref32 = peft.get_peft_model(hf_model(d), peft_config(kwargs))
    randomize_adapter(peft_adapter_tensors(ref32), seed=21)
    ref32.eval().save_pretrained(str(tmp_path / "adapter"))
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    peft16 = peft.PeftModel.from_pretrained(hf16, str(tmp_path / "adapter")).eval()
    ours = _C.CausalLM(d, dtype="bfloat16")
    _C.set_training(ours, False)
    _C.load_adapter(ours, str(tmp_path / "adapter"))
    assert all(t.dtype == torch.float32 for _, t in _C.adapter_state(ours))
    ids = tokens(8)
    ref = logits_of(ref32, ids).double()
    theirs = (logits_of(peft16, ids).double() - ref).abs().max().item()
    mine = (ours.logits(ids).double() - ref).abs().max().item()
    assert mine <= 2 * theirs + 1e-3 * ref.abs().max().item(), f"anvil bf16 error {mine:.3g}, PEFT's {theirs:.3g}"
    # The file anvil writes from a bf16 model: fp32 tensors, as PEFT writes.
    _C.save_adapter(ours, config_json(kwargs), str(tmp_path / "again"))
    with safe_open(str(tmp_path / "again" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    merged = peft16.merge_and_unload().state_dict()
    _C.merge_adapter(ours)
    for name, w in ours.state_dict().items():
        assert w.dtype == torch.bfloat16
        torch.testing.assert_close(w, merged[name], rtol=2 ** -7, atol=1e-6, msg=name)


# ---- gradients (what the trainer will step) ------------------------------------------------------

@pytest.mark.parametrize("variant", ["llama_suffix", "llama_patterns", "llama_bias_dora", "deepseek_v3_mla_list"])
def test_adapter_gradients_match_peft(base, tmp_path, variant):
    case, kwargs = VARIANTS[variant]
    ours, _ = anvil_with_adapter(base(case), kwargs, seed=4)
    _C.save_adapter(ours, config_json(kwargs), str(tmp_path))
    pm = peft.PeftModel.from_pretrained(hf_model(base(case)), str(tmp_path), is_trainable=True).eval()
    ids = tokens(7)
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")  # in-memory name -> file name
            theirs[key[:-len(".weight")] if key.endswith("lora_magnitude_vector.weight") else key] = p.grad
    mine = _C.adapter_gradients(ours, ids)
    assert set(mine) == set(theirs)
    for name, g in mine.items():
        ref = theirs[name]
        scale = ref.abs().max().item()
        assert scale > 0, name
        assert (g - ref).abs().max().item() <= 1e-4 * scale + 1e-7, name


# ---- initialisation, freezing, targeting ---------------------------------------------------------

def test_apply_lora_init_and_freezing(base):
    d = base("llama")
    model = _C.CausalLM(d)
    named = dict(_C.apply_lora(model, config_json(dict(r=4, lora_alpha=8, target_modules="all-linear")), 7))
    assert _C.trainable_parameter_names(model) == []
    assert all(t.requires_grad and t.is_leaf and t.dtype == torch.float32 for t in named.values())
    for name, t in named.items():
        if name.endswith("lora_A.weight"):
            bound = 1 / math.sqrt(t.shape[1])  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
            assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound and t.std() > 0.4 * bound
        else:
            assert torch.count_nonzero(t) == 0
    # B = 0: the adapted model computes the base model's logits exactly.
    ids = tokens(4)
    assert torch.equal(model.logits(ids), _C.CausalLM(d).logits(ids))
    # The same seed gives the same adapter, another seed another one.
    again = dict(_C.apply_lora(_C.CausalLM(d), config_json(dict(r=4, lora_alpha=8, target_modules="all-linear")), 7))
    other = dict(_C.apply_lora(_C.CausalLM(d), config_json(dict(r=4, lora_alpha=8, target_modules="all-linear")), 8))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(named[key], again[key]) and not torch.equal(named[key], other[key])


def test_gaussian_init_std(base):
    model = _C.CausalLM(base("llama"))
    named = _C.apply_lora(model, config_json(dict(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                                  target_modules="all-linear")), 0)
    a = torch.cat([t.flatten() for n, t in named if n.endswith("lora_A.weight")])
    assert abs(a.std().item() - 0.25) < 0.02 and abs(a.mean().item()) < 0.02


@pytest.mark.parametrize("case", ["deepseek_v3", "qwen2_moe"])
def test_all_linear_targets_every_linear_but_lm_head(base, case):
    model = anvil_model(base(case))
    names = _C.linear_names(model)
    assert "model.layers.1.mlp.experts.0.gate_proj" in names and "lm_head" in names
    named = dict(_C.apply_lora(model, config_json(dict(r=2, lora_alpha=2, target_modules="all-linear")), 0))
    targeted = [n[len("base_model.model."):-len(".lora_A.weight")] for n in named if n.endswith("lora_A.weight")]
    assert targeted == [n for n in names if n != "lm_head"]
    # The dense-model modules are exactly those PEFT's all-linear picks on transformers' model (Qwen2-MoE's shared
    # expert and its gate included; the routers are no Linear in either).
    hf = hf_model(base(case))
    hf_linear = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert hf_linear == {n for n in targeted if ".mlp.experts." not in n}


@pytest.mark.parametrize("case,shared", [("deepseek_v3", ".mlp.shared_experts.up_proj"),
                                         ("qwen2_moe", ".mlp.shared_expert_gate")])
def test_moe_mlp_adapters(base, tmp_path, case, shared):
    """Adapters on DeepSeek-V3's MLA (Qwen2-MoE's attention), dense MLP, shared and routed experts: save -> load
    round trip is exact, the adapter moves the output, and merging reproduces the adapted logits."""
    kwargs = dict(r=3, lora_alpha=6, target_modules="all-linear", use_dora=False)
    ours, named = anvil_with_adapter(base(case), kwargs, seed=9)
    assert any(shared in n for n, _ in named)
    assert any(".mlp.experts.3.down_proj" in n for n, _ in named)
    ids = tokens(6)
    adapted = ours.logits(ids)
    plain = anvil_model(base(case)).logits(ids)
    assert (adapted - plain).abs().max() > 1e-2 * plain.abs().max()
    _C.save_adapter(ours, config_json(kwargs), str(tmp_path))
    again = anvil_model(base(case))
    _C.load_adapter(again, str(tmp_path))
    assert torch.equal(again.logits(ids), adapted)
    _C.merge_adapter(again)
    assert_logits_close(again.logits(ids), adapted)


def test_dora_magnitude_init_is_weight_row_norm(base):
    model = _C.CausalLM(base("llama"))
    named = dict(_C.apply_lora(model, config_json(dict(r=2, lora_alpha=2, use_dora=True, target_modules=["q_proj"])), 0))
    w = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    m = named["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    torch.testing.assert_close(m, w.norm(dim=1))
    assert m.is_leaf and m.requires_grad


def test_dropout_only_in_training_mode(base, tmp_path):
    """lora_dropout acts on the adapter's input in training mode only; a zero-dropout adapter computes
    the same logits in both modes, and so does a trained one in eval mode."""
    d = base("llama")
    for dropout in (0.0, 0.5):
        for dora in (False, True):
            kwargs = dict(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, target_modules="all-linear")
            model, _ = anvil_with_adapter(d, kwargs, seed=13)
            ids = tokens(9)
            eval_logits = model.logits(ids)
            _C.set_training(model, True)
            train_logits = model.logits(ids)
            if dropout == 0.0:
                assert torch.equal(train_logits, eval_logits)
            else:
                assert (train_logits - eval_logits).abs().max() > 1e-3 * eval_logits.abs().max()
            _C.set_training(model, False)
            assert torch.equal(model.logits(ids), eval_logits)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["llama_patterns", "llama_dora", "deepseek_v3_attn"])
def test_cuda_adapter_matches_cpu(base, tmp_path, variant):
    case, kwargs = VARIANTS[variant]
    cpu, _ = anvil_with_adapter(base(case), kwargs, seed=17)
    _C.save_adapter(cpu, config_json(kwargs), str(tmp_path))
    gpu = _C.CausalLM(base(case), device="cuda")
    _C.set_training(gpu, False)
    _C.load_adapter(gpu, str(tmp_path))
    assert all(t.is_cuda and t.dtype == torch.float32 for _, t in _C.adapter_state(gpu))
    ids = tokens(10)
    assert_logits_close(gpu.logits(ids.cuda()).cpu(), cpu.logits(ids))
    _C.merge_adapter(gpu)
    _C.merge_adapter(cpu)
    assert_logits_close(gpu.logits(ids.cuda()).cpu(), cpu.logits(ids))


# ---- errors -----------------------------------------------------------------------------------------

def _saved_adapter(base, tmp_path, **config_overrides):
    ours, _ = anvil_with_adapter(base("llama"), VARIANTS["llama_suffix"][1], seed=2)
    d = tmp_path / "adapter"
    _C.save_adapter(ours, config_json(VARIANTS["llama_suffix"][1]), str(d))
    cfg = json.load(open(d / "adapter_config.json"))
    cfg.update(config_overrides)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("override,message", [
    (dict(peft_type="IA3"), "peft_type"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(bias="all"), "bias"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(task_type="SEQ_CLS"), "task_type"),
    (dict(target_modules=["no_such_proj"]), "matches no Linear"),
    (dict(target_modules=["q_proj", "k_proj", "v_proj"]), "k_proj.lora_A.weight"),
    (dict(target_modules=["q_proj"]), "belongs to no module"),
    (dict(r=3), "has shape"),
    (dict(r=0), "r must be > 0"),
    (dict(some_future_option={"x": 1}), "some_future_option"),
])
def test_load_adapter_errors_name_the_key(base, tmp_path, override, message):
    d = _saved_adapter(base, tmp_path, **override)
    model = _C.CausalLM(base("llama"))
    with pytest.raises(RuntimeError, match=message):
        _C.load_adapter(model, d)
    assert _C.adapter_state(model) == []  # nothing attached on failure


def test_load_adapter_missing_files(base, tmp_path):
    model = _C.CausalLM(base("llama"))
    with pytest.raises(RuntimeError, match="adapter_config.json"):
        _C.load_adapter(model, str(tmp_path))
    d = _saved_adapter(base, tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="adapter_model.safetensors"):
        _C.load_adapter(model, d)


def test_apply_twice_and_save_without_adapter_fail(base, tmp_path):
    model = _C.CausalLM(base("llama"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        _C.save_adapter(model, config_json(VARIANTS["llama_suffix"][1]), str(tmp_path))
    _C.apply_lora(model, config_json(VARIANTS["llama_suffix"][1]), 0)
    with pytest.raises(ValueError, match="already has an adapter"):
        _C.apply_lora(model, config_json(VARIANTS["llama_suffix"][1]), 0)
