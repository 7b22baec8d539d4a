"""`anvil merge` end to end against PEFT: a tiny random transformers Llama and a PEFT adapter with
random nonzero A and B (LoRA, and DoRA with perturbed magnitudes), saved by PEFT; `anvil merge` writes
a checkpoint that transformers loads, whose logits equal PEFT's merge_and_unload (max |diff| <=
1e-4 x max |logit|, fp32), with the base's tokenizer files beside it. Then what must fail, fails with
the path or key named: a missing adapter folder or file, an adapter trained on another base, an
existing --out without --force; and a failed merge leaves neither OUT nor OUT.tmp behind."""
import json
import os
import shutil
import subprocess

import peft
import pytest
import torch
import transformers
from safetensors import safe_open

import anvil
from hf_models import randomize

LOGIT_RTOL = 1e-4
TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "tiny", "tokenizer")
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


def run_merge(*args):
    return subprocess.run([anvil_binary(), "merge", *args], capture_output=True, text=True)


def make_base(directory, seed, **overrides):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(TINY, **overrides)))
    randomize(model, seed=seed)
    model.save_pretrained(directory)
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), directory)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(str(tmp_path_factory.mktemp("base")), seed=1)


def load(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def make_adapter(base_dir, directory, seed, **kwargs):
    """A PEFT adapter on base_dir with random nonzero A and B (init_lora_weights=False) and, for DoRA,
    magnitudes moved away from their init (so the magnitude term matters)."""
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                             init_lora_weights=False, **kwargs)
    torch.manual_seed(seed)
    model = peft.get_peft_model(load(base_dir), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(directory)
    return directory


def logits(model, seed=0):
    ids = torch.randint(4, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits.double()


def peft_merged(base_dir, adapter_dir):
    return peft.PeftModel.from_pretrained(load(base_dir), adapter_dir).merge_and_unload().eval()


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_merge_equals_peft_merge_and_unload(base, tmp_path, variant):
    kwargs = {"lora": {}, "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}[variant]
    adapter = make_adapter(base, str(tmp_path / "adapter"), seed=7, **kwargs)
    out = str(tmp_path / "merged")
    result = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "merge: wrote" in result.stderr and ("DoRA" if variant == "dora" else "LoRA") in result.stderr

    ours = logits(load(out))
    ref = logits(peft_merged(base, adapter))
    untouched = logits(load(base))
    bound = LOGIT_RTOL * ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= bound
    assert (untouched - ref).abs().max().item() > 100 * bound  # the adapter changed the model
    assert not os.path.exists(out + ".tmp")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    for name in os.listdir(TOKENIZER_DIR):  # the tokenizer travels with the weights
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(TOKENIZER_DIR, name), "rb") as b:
            assert a.read() == b.read(), name
    # a plain checkpoint: no adapter keys left
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]


def test_merge_to_bfloat16(base, tmp_path):
    adapter = make_adapter(base, str(tmp_path / "adapter"), seed=3)
    out = str(tmp_path / "merged16")
    result = run_merge("--base", base, "--adapter", adapter, "--out", out, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    ref = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter).merge_and_unload()
    ref_state = ref.state_dict()
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        for key in f.keys():
            ours = f.get_tensor(key)
            assert ours.dtype == torch.bfloat16, key
            # anvil rounds base + delta once, PEFT rounds the delta and then the sum: 2 bf16 ulps apart at most
            theirs = ref_state[key].float()
            assert torch.allclose(ours.float(), theirs, rtol=2 * 2 ** -8, atol=1e-6), key


def test_existing_out_needs_force(base, tmp_path):
    adapter = make_adapter(base, str(tmp_path / "adapter"), seed=5)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_merge("--base", base, "--adapter", adapter, "--out", str(out))
    assert result.returncode != 0
    assert str(out) in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"

    result = run_merge("--base", base, "--adapter", adapter, "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("merged")] == ["merged"]

    result = run_merge("--base", base, "--adapter", adapter, "--out", base, "--force")
    assert result.returncode != 0 and "input folder" in result.stderr
    assert os.path.exists(os.path.join(base, "model.safetensors"))


def test_missing_adapter_is_named(base, tmp_path):
    missing = str(tmp_path / "no-such-adapter")
    result = run_merge("--base", base, "--adapter", missing, "--out", str(tmp_path / "m"))
    assert result.returncode != 0 and missing in result.stderr and "not a directory" in result.stderr

    adapter = make_adapter(base, str(tmp_path / "adapter"), seed=9)
    result = run_merge("--base", str(tmp_path / "no-such-base"), "--adapter", adapter, "--out", str(tmp_path / "m"))
    assert result.returncode != 0 and "no-such-base" in result.stderr

    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    result = run_merge("--base", base, "--adapter", adapter, "--out", str(tmp_path / "m"))
    assert result.returncode != 0 and os.path.join(adapter, "adapter_model.safetensors") in result.stderr
    assert not os.path.exists(tmp_path / "m") and not os.path.exists(str(tmp_path / "m") + ".tmp")


def test_mismatched_base_is_refused(base, tmp_path):
    other = make_base(str(tmp_path / "other"), seed=2, hidden_size=32, intermediate_size=48)
    adapter = make_adapter(other, str(tmp_path / "adapter"), seed=11)
    out = str(tmp_path / "m")
    result = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert result.returncode == 1
    assert "lora_A" in result.stderr or "lora_B" in result.stderr  # the key whose shape does not fit
    assert not os.path.exists(out) and not os.path.exists(out + ".tmp")

    deeper = make_base(str(tmp_path / "deeper"), seed=3, num_hidden_layers=3)
    adapter = make_adapter(deeper, str(tmp_path / "adapter3"), seed=11)
    result = run_merge("--base", base, "--adapter", adapter, "--out", out)
    assert result.returncode == 1 and "layers.2" in result.stderr
    assert not os.path.exists(out)


def test_required_options_and_bad_dtype(base, tmp_path):
    result = run_merge("--base", base, "--out", str(tmp_path / "m"))
    assert result.returncode != 0 and "--adapter" in result.stderr
    adapter = make_adapter(base, str(tmp_path / "adapter"), seed=1)
    result = run_merge("--base", base, "--adapter", adapter, "--out", str(tmp_path / "m"), "--dtype", "fp8")
    assert result.returncode != 0 and "--dtype" in result.stderr and "fp8" in result.stderr
    assert run_merge("--help").returncode == 0
