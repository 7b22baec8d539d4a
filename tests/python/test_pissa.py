"""PiSSA (lora.init "pissa" / "pissa_niter_N") against PEFT 0.21 on a tiny random Llama, CPU, fp32.

  (a) at attach time: the residual base (the model with B set to zero) and every module's B A equal
      PEFT's init_lora_weights="pissa" (and "pissa_niter_2", with PEFT's torch.svd_lowrank fed the
      Gaussian draws anvil takes from its seeded generator); the adapted model is the base model;
  (a') `anvil lora` with PiSSA trains like a PEFT + torch.optim.AdamW loop on PEFT's PiSSA model
      (per-step losses, rtol 1e-5), and the trained models give the same logits;
  (b) adapter/ (the adapter converted to a LoRA of the original base) loaded by
      PeftModel.from_pretrained on the ORIGINAL base gives anvil's trained logits (1e-4 x max |logit|);
      its adapter_config.json is the one PEFT writes with path_initial_model_for_weight_conversion, and
      initial_adapter/ the one PEFT's initial folder holds; the raw adapter_pissa/ loads in PEFT too
      (PEFT redoes the SVD of the original base), while anvil refuses to load it on a plain base;
  (c) a run stopped at a checkpoint and resumed gives the uninterrupted losses, == (pissa_niter_2:
      the residual comes back from the checkpoint's initial factors);
  and the refusals (DoRA, quantized bases, bad init names) name the key.
SVD factors are compared only through sign-free quantities (B A, residual, logits).
"""
import json
import math
import shutil

import pytest
import torch

import anvil
from hf_models import randomize
from test_train import (TINY, VOCAB, check_ok, full_row_examples, lora_config, run_cli, train_like_anvil, train_losses,
                        write_config, write_jsonl)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

_C = anvil._C
LOGIT_RTOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pissa_base"))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=6)
    m.save_pretrained(d)
    return d


def hf_model(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def config_json(kwargs):
    return json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", **kwargs})


def tokens(seed, batch=2, length=11):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(ours, ref):
    assert ours.shape == ref.shape
    diff = (ours.double() - ref.double()).abs().max().item()
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"


def anvil_pissa(base_dir, kwargs, seed):
    model = _C.CausalLM(base_dir)
    _C.set_training(model, False)
    named = dict(_C.apply_lora(model, config_json(kwargs), seed))
    return model, named


def anvil_products(named):
    """module -> B A (out, in), sign-free."""
    out = {}
    for name, t in named.items():
        if name.endswith(".lora_A.weight"):
            module = name[:-len(".lora_A.weight")]
            out[module] = named[module + ".lora_B.weight"] @ t
    return out


def peft_products(pm):
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = "base_model.model." + name[len("base_model.model."):]
            out[key] = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
    return out


class SharedGeneratorSvdLowrank:
    """torch.svd_lowrank drawing its Gaussian matrix from one CPU generator seeded like anvil's, module
    after module (PEFT calls it with the default generator, which nn.Linear's own init also consumes)."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, a, q, niter):
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.gen.get_state())
            out = torch.svd_lowrank(a, q=q, niter=niter)
            self.gen.set_state(torch.get_rng_state())
        return out


# ---- (a) the initialization ------------------------------------------------------------------------

@pytest.mark.parametrize("init, kwargs", [
    ("pissa", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("pissa", dict(r=3, lora_alpha=5, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 6},
                   alpha_pattern={"q_proj": 2})),
    ("pissa", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["v_proj", "up_proj"])),
    ("pissa_niter_2", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    ("pissa_niter_0", dict(r=2, lora_alpha=3, target_modules=["k_proj", "gate_proj"])),
])
def test_init_matches_peft(base, monkeypatch, init, kwargs):
    kwargs = dict(kwargs, init_lora_weights=init)
    seed = 13
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", SharedGeneratorSvdLowrank(seed))
    pm = peft.get_peft_model(hf_model(base), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    ours, named = anvil_pissa(base, kwargs, seed)
    ids = tokens(1)

    # Every module's B A (sign-free), then the adapted model = the base model.
    mine, theirs = anvil_products(named), peft_products(pm)
    assert set(mine) == set(theirs) and mine
    for module, ba in mine.items():
        ref = theirs[module]
        assert ba.shape == ref.shape, module
        assert (ba - ref).abs().max() <= 1e-4 * ref.abs().max(), module
        assert ref.abs().max() > 0.1, module  # a real top-r component, not a zero init
    with torch.no_grad():
        base_logits = hf_model(base)(ids).logits
        assert_logits_close(ours.logits(ids), pm(ids).logits)
    assert_logits_close(ours.logits(ids), base_logits)

    # The residual base alone (B = 0 in both): W - scaling B A.
    with torch.no_grad():
        for name, t in named.items():
            if name.endswith("lora_B.weight"):
                t.zero_()
        with pm.disable_adapter():
            residual_ref = pm(ids).logits
    residual = ours.logits(ids)
    assert_logits_close(residual, residual_ref)
    assert (residual - base_logits).abs().max() > 10 * LOGIT_RTOL * base_logits.abs().max()  # W really changed


def test_bf16_base_keeps_its_dtype_and_rounds_the_adapters_as_peft(base):
    """PEFT's dtype handling: the SVD in fp32, the residual written back in bf16, lora_A/lora_B moved to the
    base dtype and then upcast to fp32 (autocast_adapter_dtype)."""
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], init_lora_weights="pissa")
    hf = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    model = _C.CausalLM(base, "bfloat16")
    named = dict(_C.apply_lora(model, config_json(kwargs), 0))
    for t in named.values():
        assert t.dtype == torch.float32 and torch.equal(t.to(torch.bfloat16).float(), t)
    mine, theirs = anvil_products(named), peft_products(pm)
    assert set(mine) == set(theirs)
    for module, ba in mine.items():
        assert (ba - theirs[module]).abs().max() <= 2 ** -7 * theirs[module].abs().max(), module
    ours_w = model.state_dict()
    peft_w = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in pm.named_parameters()
              if "lora_" not in n}
    original = hf_model(base).state_dict()
    for module in mine:
        key = module[len("base_model.model."):] + ".weight"
        w, ref = ours_w[key], peft_w[key]
        assert w.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16, key
        torch.testing.assert_close(w.float(), ref.float(), rtol=2 ** -7, atol=1e-6, msg=key)  # an ulp at most
        assert not torch.equal(w.float(), original[key].to(torch.bfloat16).float()), key  # the residual


def test_quantized_base_is_refused(base):
    model = _C.CausalLM(base, "float32", "cpu", "int8")
    with pytest.raises(Exception, match="int8-quantized"):
        _C.apply_lora(model, config_json(dict(r=2, target_modules=["q_proj"], init_lora_weights="pissa")), 0)


def test_attach_refusals(base):
    model = _C.CausalLM(base)
    with pytest.raises(Exception, match="use_dora"):
        _C.apply_lora(model, config_json(dict(r=2, target_modules=["q_proj"], init_lora_weights="pissa",
                                              use_dora=True)), 0)
    with pytest.raises(Exception, match="lm_head"):
        _C.apply_lora(model, config_json(dict(r=2, target_modules=["lm_head"], init_lora_weights="pissa")), 0)
    with pytest.raises(Exception, match="exceeds min"):
        _C.apply_lora(model, config_json(dict(r=40, target_modules=["q_proj"], init_lora_weights="pissa")), 0)
    with pytest.raises(Exception, match="pissa_niter_N"):
        _C.apply_lora(model, config_json(dict(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_x")), 0)
    # Nothing was attached or changed by the refused calls.
    ids = tokens(2)
    assert torch.equal(model.logits(ids), _C.CausalLM(base).logits(ids))


# ---- (a'), (b): training, the converted adapter ------------------------------------------------------

def anvil_trained_model(base_dir, out, kwargs, seed):
    """anvil's trained PiSSA model: the residual rebuilt by apply_lora, the checkpoint's adapter tensors."""
    model, named = anvil_pissa(base_dir, kwargs, seed)
    trained = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert set(trained) == set(named)
    with torch.no_grad():
        for name, t in named.items():
            t.copy_(trained[name])
    return model


def without_provenance(cfg):
    """The config without the keys that only record provenance (PEFT rewrites the initial folder's config
    with the training-time inference_mode false when it converts)."""
    cfg = dict(cfg)
    cfg.pop("base_model_name_or_path", None)
    cfg.pop("inference_mode", None)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    return cfg


def test_training_and_converted_adapter_match_peft(base, tmp_path):
    examples = full_row_examples(10, 16, seed=1, masked_prefix=5)
    train = write_jsonl(tmp_path / "train.jsonl", examples)
    out = tmp_path / "run"
    cfg = lora_config(base, train, out, lora={"r": 4, "alpha": 8, "init": "pissa"}, train={"lr": 2e-3},
                      output={"save_initial_adapter": True, "save_pissa_adapter": True})
    check_ok(run_cli("lora", "--config", write_config(tmp_path / "cfg.json", cfg)))
    ours = [l for _, l in train_losses(out)[0]]
    assert len(ours) == cfg["train"]["steps"]

    # PEFT: PiSSA init, its initial folder, the same training, the converted save.
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
    pm = peft.get_peft_model(hf_model(base), peft.LoraConfig(task_type="CAUSAL_LM", **kwargs))
    init_dir, conv_dir = tmp_path / "peft_init", tmp_path / "peft_converted"
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented way to save the initial adapter
    pm.save_pretrained(str(init_dir))
    pm.peft_config["default"].init_lora_weights = "pissa"
    ref = train_like_anvil(pm, examples, cfg)
    pm.eval()
    assert ours == pytest.approx(ref, rel=1e-5), f"anvil {ours}\noracle {ref}"
    assert ours[-1] < ours[0]

    ids = tokens(9)
    mine = anvil_trained_model(base, out, kwargs, cfg["train"]["seed"])
    with torch.no_grad():
        peft_trained = pm(ids).logits
    ours_logits = mine.logits(ids)
    assert_logits_close(ours_logits, peft_trained)

    # (b) adapter/ on the ORIGINAL base, in PEFT and in anvil.
    converted = peft.PeftModel.from_pretrained(hf_model(base), str(out / "adapter")).eval()
    with torch.no_grad():
        assert_logits_close(converted(ids).logits, ours_logits)
    plain = _C.CausalLM(base)
    _C.set_training(plain, False)
    _C.load_adapter(plain, str(out / "adapter"))
    assert_logits_close(plain.logits(ids), ours_logits)

    # The converted config is PEFT's own: rank 2r, alpha doubled, init true.
    pm.save_pretrained(str(conv_dir), path_initial_model_for_weight_conversion=str(init_dir))
    ours_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert ours_cfg["r"] == 8 and ours_cfg["lora_alpha"] == 16 and ours_cfg["init_lora_weights"] is True
    assert without_provenance(ours_cfg) == without_provenance(json.loads((conv_dir / "adapter_config.json").read_text()))
    assert without_provenance(json.loads((out / "initial_adapter" / "adapter_config.json").read_text())) == \
        without_provenance(json.loads((init_dir / "adapter_config.json").read_text()))
    # PEFT's converted tensors give the same delta per module (B' A', sign-free).
    peft_conv = load_file(str(conv_dir / "adapter_model.safetensors"))
    ours_conv = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(peft_conv) == set(ours_conv)
    for name in ours_conv:
        if name.endswith("lora_A.weight"):
            b = name.replace("lora_A", "lora_B")
            d_ours, d_peft = ours_conv[b] @ ours_conv[name], peft_conv[b] @ peft_conv[name]
            assert (d_ours - d_peft).abs().max() <= 1e-4 * d_peft.abs().max() + 1e-6, name

    # The raw adapter: PEFT rebuilds the residual from the original base; anvil refuses a plain base.
    raw_cfg = json.loads((out / "adapter_pissa" / "adapter_config.json").read_text())
    assert raw_cfg["init_lora_weights"] == "pissa" and raw_cfg["r"] == 4
    raw = peft.PeftModel.from_pretrained(hf_model(base), str(out / "adapter_pissa")).eval()
    with torch.no_grad():
        assert_logits_close(raw(ids).logits, ours_logits)
    with pytest.raises(Exception, match="raw PiSSA adapter"):
        _C.load_adapter(_C.CausalLM(base), str(out / "adapter_pissa"))


def test_rslora_conversion_keeps_the_scaling(base, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", full_row_examples(6, 16, seed=3))
    out = tmp_path / "run"
    cfg = lora_config(base, train, out, lora={"r": 3, "alpha": 5, "rslora": True, "init": "pissa_niter_1",
                                              "targets": ["q_proj", "down_proj"]}, train={"lr": 2e-3, "steps": 3})
    check_ok(run_cli("lora", "--config", write_config(tmp_path / "cfg.json", cfg)))
    conv = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conv["r"] == 6 and conv["lora_alpha"] == pytest.approx(5 * math.sqrt(2), rel=1e-15)
    kwargs = dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "down_proj"],
                  init_lora_weights="pissa_niter_1")
    mine = anvil_trained_model(base, out, kwargs, cfg["train"]["seed"])
    ids = tokens(4)
    converted = peft.PeftModel.from_pretrained(hf_model(base), str(out / "adapter")).eval()
    with torch.no_grad():
        assert_logits_close(converted(ids).logits, mine.logits(ids))


# ---- (c) resume -------------------------------------------------------------------------------------------

def test_resume_rebuilds_the_same_residual(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),),
                                            generator=g).tolist()} for _ in range(20)]
    train = write_jsonl(tmp_path / "train.jsonl", examples)

    def cfg(out, steps):
        return lora_config(base, train, out, lora={"r": 4, "alpha": 8, "dropout": 0.1, "init": "pissa_niter_2"},
                           train={"steps": steps, "lr": 1e-3, "schedule": "constant", "warmup_steps": 0},
                           output={"plot": False})

    check_ok(run_cli("lora", "--config", write_config(tmp_path / "full.json", cfg(tmp_path / "full", 10))))
    full = train_losses(tmp_path / "full")
    part = write_config(tmp_path / "part.json", cfg(tmp_path / "part", 4))
    check_ok(run_cli("lora", "--config", part))
    factors_file = tmp_path / "part" / "checkpoint" / "pissa_init.safetensors"
    assert factors_file.exists()
    # The residual comes from the checkpoint's factors, not from a new SVD: a copy of the run whose
    # factors are perturbed resumes into other losses.
    shutil.copytree(tmp_path / "part", tmp_path / "tampered")
    factors = load_file(str(factors_file))
    save_file({k: v * 1.05 if k.endswith("lora_A.weight") else v for k, v in factors.items()},
              str(tmp_path / "tampered" / "checkpoint" / "pissa_init.safetensors"))
    tampered = write_config(tmp_path / "tampered.json", cfg(tmp_path / "tampered", 4))
    check_ok(run_cli("lora", "--config", tampered, "--resume", "--train.steps=10"))
    check_ok(run_cli("lora", "--config", part, "--resume", "--train.steps=10"))
    assert train_losses(tmp_path / "tampered")[0][4][1] != full[0][4][1]
    assert train_losses(tmp_path / "part") == full  # bit-exact
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # A checkpoint without the initial factors (a kaiming run's) cannot resume as PiSSA.
    kaiming = lora_config(base, train, tmp_path / "k", train={"steps": 1}, output={"plot": False})
    check_ok(run_cli("lora", "--config", write_config(tmp_path / "k.json", kaiming)))
    r = run_cli("lora", "--config", str(tmp_path / "k.json"), "--resume", "--lora.init=pissa", "--train.steps=2")
    assert r.returncode == 1 and "lora.init" in r.stderr, r.stderr
    r = run_cli("lora", "--config", part, "--resume", "--lora.r=2", "--train.steps=12")
    assert r.returncode == 1 and "config key lora.r is 2" in r.stderr, r.stderr


# ---- refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["--lora.init=pissa_niter_"], ["lora.init", "pissa_niter_N"]),
    (["--lora.init=svd"], ["lora.init", "\"kaiming\", \"gaussian\", \"pissa\""]),
    (["--lora.init=pissa", "--lora.dora=true"], ["lora.dora", "PiSSA"]),
    (["--lora.init=pissa", "--model.base_weights=int8"], ["lora.init", "dense"]),
    (["--lora.init=pissa", "--lora.rslora=true", "--lora.rank_pattern={\"q_proj\": 2}"], ["lora.rslora"]),
    (["--output.save_pissa_adapter=true"], ["output.save_pissa_adapter"]),
])
def test_bad_pissa_config_names_the_key(base, tmp_path, overrides, words):
    train = write_jsonl(tmp_path / "train.jsonl", full_row_examples(4, 16, seed=2))
    cfg = write_config(tmp_path / "bad.json", lora_config(base, train, tmp_path / "bad"))
    r = run_cli("lora", "--config", cfg, *overrides, "--print-config")
    assert r.returncode == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


# ---- on the GPU ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_cuda_init_matches_cpu(base, init):
    """The SVD (cuSOLVER; the randomized variant's Gaussian matrix drawn on the CPU and moved) gives the
    CPU's residual and B A on the GPU."""
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    cpu, cpu_named = anvil_pissa(base, kwargs, 5)
    gpu = _C.CausalLM(base, device="cuda")
    _C.set_training(gpu, False)
    gpu_named = dict(_C.apply_lora(gpu, config_json(kwargs), 5))
    assert all(t.is_cuda and t.dtype == torch.float32 for t in gpu_named.values())
    mine, ref = anvil_products({k: v.cpu() for k, v in gpu_named.items()}), anvil_products(cpu_named)
    for module, ba in mine.items():
        assert (ba - ref[module]).abs().max() <= 1e-4 * ref[module].abs().max(), module
    ids = tokens(3)
    with torch.no_grad():
        for named in (cpu_named, gpu_named):
            for name, t in named.items():
                if name.endswith("lora_B.weight"):
                    t.zero_()
    assert_logits_close(gpu.logits(ids.cuda()).cpu(), cpu.logits(ids))  # the residual bases


@pytest.mark.cuda
def test_cuda_run_writes_an_adapter_of_the_original_base(base, tmp_path):
    """`anvil lora` with PiSSA on the GPU (the fused loss): adapter/ on the original base (PEFT, CPU)
    gives the GPU's trained model."""
    train = write_jsonl(tmp_path / "train.jsonl", full_row_examples(8, 16, seed=5))
    out = tmp_path / "run"
    cfg = lora_config(base, train, out, model={"device": "cuda"}, lora={"r": 4, "alpha": 8, "init": "pissa"},
                      train={"lr": 2e-3, "steps": 4})
    check_ok(run_cli("lora", "--config", write_config(tmp_path / "cfg.json", cfg)))
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa")
    mine = anvil_trained_model(base, out, kwargs, cfg["train"]["seed"])  # on the CPU: the residual rebuilt
    converted = peft.PeftModel.from_pretrained(hf_model(base), str(out / "adapter")).eval()
    ids = tokens(6)
    with torch.no_grad():
        assert_logits_close(converted(ids).logits, mine.logits(ids))
