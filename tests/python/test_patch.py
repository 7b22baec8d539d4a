"""anvil.nn and anvil.patch(model) against transformers 5.17 itself, on the CPU.

For every architecture patch supports, a tiny random transformers model (the configs of test_models.py) is
deep-copied and the copy patched: its logits and every parameter's gradient equal the unpatched model's (fp32:
max |diff| <= 1e-4 x max |reference|, the model rule of docs/ARCHITECTURE.md; bf16: error against the fp32 model
<= 2x the unpatched bf16 model's error + slack), the loss with labels (ignore_index -100 included, chunked, with
num_items_in_batch, Mixtral's router aux loss) equals transformers' ForCausalLMLoss with its gradients, the
profiler shows the anvil ops running (and an unpatched model in the same process running none), a state_dict
round-trips both ways and save_pretrained reloads in transformers, patching twice is a no-op or an error, and an
unsupported architecture or option combination is an error that leaves the model untouched. The ops' opcheck and
gradcheck are test_fused.py's (rms_norm, swiglu, rope, cross_entropy_chunk and their backwards)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import anvil
from hf_models import randomize
from test_models import configs, tokens

transformers = pytest.importorskip("transformers")

CASES = ["llama", "llama_tied_bias", "mistral", "qwen2", "qwen3", "mixtral", "deepseek_v2", "deepseek_v2_greedy",
         "deepseek_v3", "deepseek_v3_halves", "qwen2_moe", "qwen3_moe"]
RTOL = 1e-4  # fp32 model rule: max |diff| <= 1e-4 x max |reference|
ANVIL_OPS = {"anvil::rms_norm", "anvil::rope", "anvil::swiglu", "anvil::cross_entropy_chunk"}


def build(case, dtype=torch.float32, seed=0, **config_overrides):
    config = configs()[case]
    load_kw = {k: config_overrides.pop(k) for k in ("experts_implementation",) if k in config_overrides}
    for k, v in config_overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, **load_kw)
    randomize(model, seed)
    return model.to(dtype).train()  # train(): the loss path; every dropout of these configs is 0


def pair(case, dtype=torch.float32, **patch_kw):
    ref = build(case, dtype)
    ours = copy.deepcopy(ref)
    report = anvil.patch(ours, **patch_kw)
    return ref, ours, report


def labels_for(ids, seed):
    labels = ids.clone()
    g = torch.Generator().manual_seed(seed)
    labels[torch.rand(ids.shape, generator=g) < 0.3] = -100  # about a third of the targets ignored
    labels[0, :3] = -100
    return labels


def assert_close_rule(ours, ref, what, rtol=RTOL):
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = rtol * ref.double().abs().max().item()
    assert diff <= bound, f"{what}: max |diff| {diff:.3g} > {bound:.3g}"


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def ops_run(model, *args, **kwargs):
    with torch.profiler.profile() as prof:
        out = model(*args, **kwargs)
    return out, {e.name for e in prof.events() if e.name.startswith("anvil::")}


# ---- logits and gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_fp32_logits_and_gradients_equal_unpatched(case):
    ref, ours, report = pair(case)
    ids = tokens(2, 11, seed=1)
    w = torch.randn(2, 11, configs()[case].vocab_size, generator=torch.Generator().manual_seed(2))
    ref_logits = ref(ids).logits
    (ref_logits * w).sum().backward()
    got, used = ops_run(ours, ids)
    (got.logits * w).sum().backward()
    assert_close_rule(got.logits, ref_logits, "logits")
    want_ops = {f"anvil::{k}" for k in ("rms_norm", "swiglu", "rope", "moe_gate") if k in report.replaced}
    assert used == want_ops, used
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ours.keys() == g_ref.keys() and len(g_ref) == len(list(ref.parameters()))
    for n in g_ref:
        assert_close_rule(g_ours[n], g_ref[n], f"grad {n}")


@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral", "mixtral", "deepseek_v3", "qwen3_moe"])
def test_bf16_error_within_twice_the_unpatched_bf16_error(case):
    """bf16 rule of docs/ARCHITECTURE.md: against the fp32 model, the patched bf16 model's logits and gradients
    err at most 2x the unpatched bf16 model's (+ 1e-3 x max |reference|, the bf16 atol's share)."""
    fp32 = build(case)
    ref16 = build(case, torch.bfloat16)
    ours16 = copy.deepcopy(ref16)
    anvil.patch(ours16)
    ids = tokens(2, 9, seed=3)
    w = torch.randn(2, 9, configs()[case].vocab_size, generator=torch.Generator().manual_seed(4))
    outs = {}
    for name, m in (("fp32", fp32), ("ref16", ref16), ("ours16", ours16)):
        logits = m(ids).logits
        (logits.float() * w).sum().backward()
        outs[name] = (logits.double(), {n: p.grad.double() for n, p in m.named_parameters()})

    def err(a, b):
        return (a - b).abs().max().item()

    ref_logits, ref_grads = outs["fp32"]
    theirs, ours = err(outs["ref16"][0], ref_logits), err(outs["ours16"][0], ref_logits)
    assert ours <= 2 * theirs + 1e-3 * ref_logits.abs().max().item(), ("logits", ours, theirs)
    for n, g in ref_grads.items():
        theirs, ours = err(outs["ref16"][1][n], g), err(outs["ours16"][1][n], g)
        assert ours <= 2 * theirs + 1e-3 * g.abs().max().item(), (n, ours, theirs)


# ---- the loss --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["llama", "deepseek_v3"])
def test_bf16_loss_within_twice_the_unpatched_bf16_error(case):
    """The fused loss in bf16 (logits never upcast whole; dW summed over chunks in fp32): loss and gradients
    against the fp32 model err at most 2x what the unpatched bf16 model errs (+ 1e-3 x max |reference|)."""
    fp32 = build(case)
    ref16 = build(case, torch.bfloat16)
    ours16 = copy.deepcopy(ref16)
    anvil.patch(ours16, chunk_tokens=6)
    ids = tokens(2, 12, seed=27)
    labels = labels_for(ids, seed=28)
    outs = {}
    for name, m in (("fp32", fp32), ("ref16", ref16), ("ours16", ours16)):
        loss = m(ids, labels=labels).loss
        loss.backward()
        outs[name] = (loss.double(), {n: p.grad.double() for n, p in m.named_parameters()})
    ref_loss, ref_grads = outs["fp32"]
    theirs, ours = (outs["ref16"][0] - ref_loss).abs().item(), (outs["ours16"][0] - ref_loss).abs().item()
    assert ours <= 2 * theirs + 1e-3 * ref_loss.abs().item(), ("loss", ours, theirs)
    for n, g in ref_grads.items():
        theirs = (outs["ref16"][1][n] - g).abs().max().item()
        ours = (outs["ours16"][1][n] - g).abs().max().item()
        assert ours <= 2 * theirs + 1e-3 * g.abs().max().item(), (n, ours, theirs)



@pytest.mark.parametrize("case", CASES)
def test_loss_with_labels_equals_transformers(case):
    # chunk_tokens=5: 2 x 13 targets run as six chunks, the last one short
    ref, ours, _ = pair(case, chunk_tokens=5)
    ids = tokens(2, 13, seed=5)
    labels = labels_for(ids, seed=6)
    ref_out = ref(ids, labels=labels)
    ref_out.loss.backward()
    out, used = ops_run(ours, ids, labels=labels)
    assert out.logits is None  # the fused path forms no (B, S, V) logits
    assert "anvil::cross_entropy_chunk" in used
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1.3e-6, atol=1e-5)
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        assert_close_rule(g_ours[n], g_ref[n], f"grad {n}")


def test_loss_with_num_items_in_batch_and_shift_labels():
    """transformers' gradient-accumulation form: sum / num_items_in_batch; pre-shifted labels; eval mode runs the
    original forward (logits returned, transformers' own loss)."""
    ref, ours, _ = pair("qwen2")
    ids = tokens(2, 10, seed=7)
    labels = labels_for(ids, seed=8)
    for kw in (dict(labels=labels, num_items_in_batch=torch.tensor(37)),
               dict(labels=labels, shift_labels=F.pad(labels, (0, 1), value=-100)[:, 1:].contiguous())):
        want = ref(ids, **kw).loss
        got = ours(ids, **kw)
        assert got.logits is None
        torch.testing.assert_close(got.loss, want, rtol=1.3e-6, atol=1e-5)
    ours.eval()
    ref.eval()
    got, want = ours(ids, labels=labels), ref(ids, labels=labels)
    assert got.logits is not None
    torch.testing.assert_close(got.loss, want.loss, rtol=1.3e-6, atol=1e-5)
    assert not ours(ids, labels=labels, return_dict=False)[0].isnan()


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_router_aux_loss_is_kept(case):
    ref, ours, _ = pair(case)
    ids = tokens(2, 8, seed=9)
    labels = labels_for(ids, seed=10)
    want = ref(ids, labels=labels, output_router_logits=True)
    got = ours(ids, labels=labels, output_router_logits=True)
    assert got.aux_loss is not None and want.aux_loss > 0
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1.3e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_equals_head_and_torch_cross_entropy(dtype, bias):
    g = torch.Generator().manual_seed(11)
    h0 = torch.randn(3, 17, 24, generator=g).to(dtype)
    w0 = (torch.randn(90, 24, generator=g) / 5).to(dtype)
    b0 = torch.randn(90, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, 90, (3, 17), generator=g)
    labels[1, 4:9] = -100
    params = [h0, w0] + ([b0] if bias else [])

    def run(fn):
        leaves = [p.clone().requires_grad_(True) for p in params]
        loss = fn(*leaves)
        (loss * 3.0).backward()  # a non-unit upstream gradient
        return loss.detach(), [p.grad for p in leaves]

    def reference(h, w, b=None):
        logits = F.linear(h, w, b).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, 90), labels[:, 1:].reshape(-1), ignore_index=-100)

    want, want_g = run(reference)
    got, got_g = run(lambda h, w, b=None: anvil.nn.linear_cross_entropy(h, w, labels, bias=b, chunk_tokens=7))
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
    for a, b in zip(got_g, want_g):
        assert a.dtype == b.dtype
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, rtol=1.3e-6, atol=1e-5)
        else:  # dW summed over 8 chunks in fp32 (one bf16 GEMM in the reference): a rounding or two apart
            torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-3)
    # the default chunking: 48 rows of a 24-wide, 90-row head -> ceil(48 / ceil(90 / 24)) = 12 -> 16 rows a chunk
    assert anvil.nn.auto_chunk_tokens(48, 90, 24) == 16 and anvil.nn.auto_chunk_tokens(8192, 128256, 2048) == 256
    torch.testing.assert_close(run(lambda h, w, b=None: anvil.nn.linear_cross_entropy(h, w, labels, bias=b))[0], want,
                               rtol=1.3e-6, atol=1e-5)
    with torch.no_grad():  # no gradient formed, same value
        torch.testing.assert_close(anvil.nn.linear_cross_entropy(h0, w0, labels, bias=b0), want)
    with pytest.raises(ValueError, match="chunk_tokens must be None or an int >= 1"):
        anvil.nn.linear_cross_entropy(h0, w0, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="labels give 48 targets for 51 hidden rows"):
        anvil.nn.linear_cross_entropy(h0, w0, labels[:, 1:], shift=False)


# ---- the modules -----------------------------------------------------------------------------------------------


def test_rms_norm_module_is_a_drop_in():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    theirs = LlamaRMSNorm(40, eps=1e-5)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours = anvil.nn.RMSNorm(40, eps=1e-5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.variance_epsilon == 1e-5 and list(ours.state_dict()) == ["weight"]
    x = torch.randn(3, 5, 40) * 2
    torch.testing.assert_close(ours(x), theirs(x), rtol=1.3e-6, atol=1e-5)
    # an fp32 weight under a bf16 activation: transformers' promotion, not the op (which needs one dtype)
    xb = x.bfloat16()
    assert ours(xb).dtype == theirs(xb).dtype == torch.float32
    torch.testing.assert_close(ours(xb), theirs(xb), rtol=1.3e-6, atol=1e-5)


def test_rope_function_equals_transformers_for_both_layouts():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    g = torch.Generator().manual_seed(12)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    ang = torch.rand(2, 7, 8, generator=g) * 20
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    for interleaved, fn in ((False, apply_rotary_pos_emb), (True, apply_rotary_pos_emb_interleave)):
        got = anvil.nn.apply_rotary_pos_emb(q, k, cos, sin, interleaved=interleaved)
        for a, b in zip(got, fn(q, k, cos, sin)):
            assert a.shape == b.shape and torch.equal(a, b)
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1"):
        anvil.nn.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)


# ---- the report, state_dicts, patching twice ---------------------------------------------------------------------


def test_report_counts_and_skips():
    _, _, r = pair("qwen3")  # 2 layers: 2 norms each + q/k norms each + the final norm
    assert r.architecture == "Qwen3ForCausalLM"
    assert r.replaced == {"rms_norm": 9, "swiglu": 2, "rope": 2, "cross_entropy": 1}
    assert r.skipped == {"moe_gate": "it has no MoE router", "attention": "off unless asked (attention=True)"}
    _, ours, r = pair("deepseek_v2")
    assert "rope" in r.skipped and "complex" in r.skipped["rope"]
    # the dense first layer's MLP, layer 1's shared experts (a DeepseekV2MLP) and its routed experts' gate
    assert r.replaced["swiglu"] == 3 and r.replaced["moe_gate"] == 1
    assert "routed experts' GEMMs" in str(r)
    _, _, r = pair("mixtral", cross_entropy=False)
    assert r.replaced == {"rms_norm": 5, "swiglu": 2, "moe_gate": 2, "rope": 2} and r.skipped == {"cross_entropy": "off",
                                                                                      "attention": "off unless asked (attention=True)"}
    # 3 layers, layer 1 dense: its MLP, the MoE layers' shared experts (Qwen2MoeMLP) and their routed experts' gate
    _, _, r = pair("qwen2_moe")
    assert r.replaced == {"rms_norm": 7, "swiglu": 5, "moe_gate": 2, "rope": 3, "cross_entropy": 1}
    assert "shared expert's sigmoid gate" in str(r)


@pytest.mark.parametrize("case", ["llama_tied_bias", "deepseek_v3"])
def test_state_dict_round_trip(case, tmp_path):
    ref, ours, _ = pair(case)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for n, t in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[n], t), n
    # weights loaded into the patched model reach its kernels, and its own weights reload in transformers
    other = build(case, seed=3)
    ours.load_state_dict(other.state_dict())
    ids = tokens(1, 6, seed=13)
    ours.eval()
    other.eval()
    with torch.no_grad():
        assert_close_rule(ours(ids).logits, other(ids).logits, "logits after load_state_dict")
        ours.save_pretrained(tmp_path)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert not hasattr(back, "_anvil_patch_report")
        assert_close_rule(back(ids).logits, other(ids).logits, "logits after save_pretrained")
    if case == "llama_tied_bias":
        assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("case", ["qwen3", "deepseek_v3"])
def test_generate_with_the_kv_cache_equals_unpatched(case):
    """Decoding (eval mode, one query position against the cache) runs the patched norms, MLPs and rotary."""
    ref, ours, _ = pair(case)
    ref.eval()
    ours.eval()
    ids = tokens(2, 5, seed=29)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6, min_new_tokens=6,
              pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, **kw)
        with torch.profiler.profile() as prof:
            got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert {"anvil::rms_norm", "anvil::rope"} <= {e.name for e in prof.events()}


def test_deepcopy_of_a_patched_model_is_patched_and_independent():
    """copy.deepcopy (TRL's reference model, EMA copies) rebinds the patched forwards to the copy."""
    ref, ours, _ = pair("qwen3")
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    ids = tokens(2, 8, seed=25)
    labels = labels_for(ids, seed=26)
    halved = copy.deepcopy(ref)
    with torch.no_grad():
        for p in halved.parameters():
            p.mul_(0.5)
    got, used = ops_run(twin, ids, labels=labels)
    assert {"anvil::rope", "anvil::cross_entropy_chunk"} <= used and got.logits is None
    torch.testing.assert_close(got.loss, halved(ids, labels=labels).loss, rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(ours(ids, labels=labels).loss, ref(ids, labels=labels).loss, rtol=1.3e-6, atol=1e-5)
    loss_tuple = twin(ids, labels=labels, return_dict=False)
    assert isinstance(loss_tuple, tuple) and torch.equal(loss_tuple[0], got.loss)


def test_patching_twice_is_a_no_op_or_an_error():
    ref, ours, first = pair("llama")
    modules = dict(ours.named_modules())
    forward = ours.forward
    assert anvil.patch(ours) is first  # same options: nothing changes
    assert dict(ours.named_modules()) == modules and ours.forward == forward
    ids = tokens(1, 5, seed=14)
    with torch.no_grad():
        assert_close_rule(ours(ids).logits, ref(ids).logits, "logits")
    with pytest.raises(ValueError, match="already patched"):
        anvil.patch(ours, rope=False)


def test_peft_lora_model_is_patched_through_its_base_model():
    """LoRA-wrapped Linears inside a swapped MLP keep working: the adapters' gradients equal the unpatched ones."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                           init_lora_weights=False)
    ref = peft.get_peft_model(build("qwen2"), lora)
    ours = copy.deepcopy(ref)
    r = anvil.patch(ours)
    assert r.architecture == "Qwen2ForCausalLM" and r.replaced["swiglu"] == 2
    ids = tokens(2, 9, seed=19)
    labels = labels_for(ids, seed=20)
    ref(input_ids=ids, labels=labels).loss.backward()
    out = ours(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ref.keys() == g_ours.keys() and all("lora_" in n for n in g_ref) and len(g_ref) == 16
    for n in g_ref:
        assert_close_rule(g_ours[n], g_ref[n], f"grad {n}")


# ---- what patch refuses ----------------------------------------------------------------------------------------


def untouched(model, before):
    return (dict(model.named_modules()) == before and not hasattr(model, "_anvil_patch_report")
            and "forward" not in vars(model))


def test_unsupported_architecture_names_it_and_patches_nothing():
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel .*LlamaForCausalLM"):
        anvil.patch(model)
    assert untouched(model, before)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        anvil.patch("llama")


@pytest.mark.parametrize("case,kw,words", [
    ("deepseek_v2", dict(rope=True), "rope=True is not supported for DeepseekV2ForCausalLM"),
    ("mixtral", dict(swiglu=True, experts_implementation="eager"),
     "swiglu=True is not supported for MixtralForCausalLM: the routed experts run transformers' 'eager'"),
    ("llama", dict(swiglu=True, hidden_act="gelu"), "hidden_act is 'gelu'"),
    ("qwen2", dict(moe_gate=True), "moe_gate=True is not supported for Qwen2ForCausalLM: it has no MoE router"),
])
def test_unsupported_option_names_it_and_patches_nothing(case, kw, words):
    overrides = {k: kw.pop(k) for k in list(kw) if k in ("hidden_act", "experts_implementation")}
    model = build(case, **overrides)
    before = dict(model.named_modules())
    with pytest.raises(ValueError, match=words):
        anvil.patch(model, **kw)
    assert untouched(model, before)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(rope="yes"), TypeError, "rope must be None, True or False"),
    (dict(chunk_tokens=0), ValueError, "chunk_tokens must be None or an int >= 1"),
])
def test_bad_options(kw, exc, words):
    model = build("llama")
    with pytest.raises(exc, match=words):
        anvil.patch(model, **kw)


def test_gelu_llama_patches_the_rest():
    """hidden_act gelu with swiglu left at None: the MLP stays, everything else is patched, and it still matches."""
    ref = build("llama", hidden_act="gelu")
    ours = copy.deepcopy(ref)
    r = anvil.patch(ours)
    assert "swiglu" in r.skipped and r.replaced["rms_norm"] == 5
    ids = tokens(1, 6, seed=15)
    assert_close_rule(ours(ids).logits, ref(ids).logits, "logits")


@pytest.mark.parametrize("impl", ["batched_mm", "eager"])
def test_experts_paths(impl):
    """The routed experts' gate goes through anvil::swiglu on transformers' batched_mm path too (grouped_mm, the
    default, is every other test's); on the eager path swiglu is skipped and said so, the rest still patched."""
    ref = build("deepseek_v3", experts_implementation=impl)
    ours = copy.deepcopy(ref)
    r = anvil.patch(ours)
    assert (r.replaced.get("swiglu") == 3) == (impl == "batched_mm"), r
    if impl == "eager":
        assert "'eager' experts implementation" in r.skipped["swiglu"]
    ids = tokens(2, 7, seed=17)
    w = torch.randn(2, 7, configs()["deepseek_v3"].vocab_size, generator=torch.Generator().manual_seed(18))
    (ref(ids).logits * w).sum().backward()
    got, used = ops_run(ours, ids)
    (got.logits * w).sum().backward()
    assert ("anvil::swiglu" in used) == (impl == "batched_mm")
    assert_close_rule(got.logits, ref(ids).logits, "logits")
    for n, g in grads(ref).items():
        assert_close_rule(grads(ours)[n], g, f"grad {n}")


def test_gradient_checkpointing_recomputes_through_the_patched_modules():
    """Checkpointed decoder layers rerun their forward in the backward: the recompute goes through the same anvil
    modules and the rotary hook (its depth count is set by the recomputed attention forward)."""
    ref, ours, _ = pair("llama")
    for m in (ref, ours):
        m.gradient_checkpointing_enable()
    ids = tokens(2, 9, seed=23)
    labels = labels_for(ids, seed=24)
    ref(ids, labels=labels).loss.backward()
    loss = ours(ids, labels=labels).loss
    with torch.profiler.profile() as prof:
        loss.backward()
    assert {"anvil::rope", "anvil::rms_norm", "anvil::swiglu"} <= {e.name for e in prof.events()}
    for n, g in grads(ref).items():
        assert_close_rule(grads(ours)[n], g, f"grad {n}")


def test_compiled_patched_model_equals_eager_unpatched():
    """torch.compile (aot_eager) of a patched Qwen3: the anvil ops stay in the traced graphs (the rotary hook's
    thread-local is read while tracing), loss, gradients and logits equal the unpatched eager model's."""
    ref, ours, _ = pair("qwen3")
    compiled = torch.compile(ours, backend="aot_eager")
    ids = tokens(2, 9, seed=21)
    labels = labels_for(ids, seed=22)
    want = ref(ids, labels=labels).loss
    got = compiled(ids, labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1.3e-6, atol=1e-5)
    want.backward()
    got.backward()
    for n, g in grads(ref).items():
        assert_close_rule(grads(ours)[n], g, f"grad {n}")
    ref.eval()
    ours.eval()
    with torch.no_grad():
        out, used = ops_run(compiled, ids)
        assert_close_rule(out.logits, ref(ids).logits, "logits")
    assert {"anvil::rms_norm", "anvil::rope", "anvil::swiglu"} <= used, used


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fused_loss_compiles_fullgraph(backend):
    """anvil.nn.linear_cross_entropy under torch.compile(fullgraph=True): no graph break (the backward's unit
    upstream-gradient shortcut is eager-only), loss and gradients equal eager's, and a non-unit upstream gradient
    (the loss scaled by 3, a part of a sum) scales the gradients as autograd would."""
    torch.manual_seed(5)
    h = torch.randn(45, 24, requires_grad=True)  # (N, H): three chunks of 16, the last short
    w = torch.randn(70, 24, requires_grad=True)  # (V, H)
    y = torch.randint(0, 70, (45,))
    y[::6] = -100

    def loss_of(h, w, y):
        return 3.0 * anvil.nn.linear_cross_entropy(h, w, y, shift=False, chunk_tokens=16)

    torch._dynamo.reset()
    compiled = torch.compile(loss_of, fullgraph=True, backend=backend)
    want = loss_of(h, w, y)
    want_grads = torch.autograd.grad(want, (h, w))
    got = compiled(h, w, y)
    got_grads = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    logits = F.linear(h, w)  # the reference: whole logits, autograd's own backward
    ref = 3.0 * F.cross_entropy(logits, y, ignore_index=-100)
    for a, b in zip(want_grads, torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_unpatched_models_keep_transformers_rope():
    """The rotary hook lives in the modeling module, but only patched attention modules run anvil::rope."""
    ref, ours, _ = pair("llama")
    plain = build("llama", seed=4)  # built after the hook was installed
    ids = tokens(1, 6, seed=16)
    with torch.no_grad():
        _, used = ops_run(plain, ids)
        assert used == set()
        _, used = ops_run(ours, ids)
        assert used == {"anvil::rms_norm", "anvil::rope", "anvil::swiglu"}


# ---- the attention backend (attention=True) --------------------------------------------------------------------


@pytest.mark.parametrize("case,window", [("llama", None), ("mistral", 4), ("qwen3", None), ("mixtral", 5),
                                         ("qwen2", None)])
def test_attention_backend_equals_transformers_attention(case, window):
    """attention=True: the model runs "anvil" (anvil::sparse_attention: causal, the sliding window, grouped kv heads,
    head dim 64, one the kernel takes) and its logits and gradients equal the unpatched model's (transformers' own attention
    with the same window), fp32 rule."""
    overrides = {"head_dim": 64}
    if window is not None:
        overrides["sliding_window"] = window
    ref = build(case, **overrides)
    ours = copy.deepcopy(ref)
    report = anvil.patch(ours, attention=True)
    assert report.replaced["attention"] == ref.config.num_hidden_layers and ours.config._attn_implementation == "anvil"
    assert ref.config._attn_implementation != "anvil"
    ids = tokens(2, 11, seed=3)
    w = torch.randn(2, 11, ref.config.vocab_size, generator=torch.Generator().manual_seed(4))
    ref_logits = ref(ids).logits
    (ref_logits * w).sum().backward()
    got, used = ops_run(ours, ids)
    (got.logits * w).sum().backward()
    assert "anvil::sparse_attention" in used
    assert_close_rule(got.logits, ref_logits, "logits")
    g_ref, g_ours = grads(ref), grads(ours)
    assert g_ours.keys() == g_ref.keys()
    for n in g_ref:
        assert_close_rule(g_ours[n], g_ref[n], f"grad {n}")


def test_attention_backend_padding_packing_and_generation():
    """A padded batch runs transformers' SDPA with the equivalent dense mask (same logits at the kept positions); one
    row of packed documents (position_ids restarting) runs the kernel with cu_seqlens and equals each document run
    alone; greedy generation with the cache gives the unpatched model's tokens."""
    ref = build("mistral", sliding_window=4, head_dim=64).eval()
    ours = copy.deepcopy(ref)
    anvil.patch(ours, attention=True)
    ids = tokens(2, 9, seed=5)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got, used = ops_run(ours, ids, attention_mask=mask)
    assert "anvil::sparse_attention" not in used
    keep = mask.bool()
    assert_close_rule(got.logits[keep], want[keep], "padded logits")

    a, b = tokens(1, 6, seed=6), tokens(1, 7, seed=7)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(6), torch.arange(7)]).view(1, -1)
    with torch.no_grad():
        got, used = ops_run(ours, packed, position_ids=pos)
        alone = torch.cat([ref(a).logits, ref(b).logits], 1)
    assert "anvil::sparse_attention" in used
    assert_close_rule(got.logits, alone, "packed logits")

    prompt = tokens(1, 5, seed=8)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kw), ref.generate(prompt, **kw))

    with pytest.raises(ValueError, match="head dims 8"):
        anvil.patch(build("llama"), attention=True)  # the test configs' head dim 8
    assert "off unless asked" in str(anvil.patch(build("llama")))
