"""Minitron width pruning of derived students and the hidden-state losses (anvil/model/derive.h,
anvil/train/hidden_loss.h), on the CPU.

  (a) the activation importance equals a written-out reference: transformers' LlamaForCausalLM with forward hooks
      on the inputs of q_proj / gate_proj (the two RMSNorm outputs), o_proj (the heads' attention outputs) and
      down_proj (act(gate) * up), aggregated as Model-Optimizer's MegatronL2NormHook does (mean |x| over the
      sequence, L2 over rows); the pruned student keeps exactly the top-scored channels / heads / KV groups;
  (b) pruning intermediate channels and heads is exact: transformers' teacher with those down_proj / o_proj columns
      zeroed gives the pruned student's logits; the pruned student (hidden_size too) saves as a folder transformers
      loads with anvil's logits, head_dim written explicitly;
  (c) the per-layer states anvil records are transformers' decoder-layer outputs; the hidden-state losses equal
      their formulas with gradients (float64 gradcheck; the projection's gradient against autograd of the formula);
  (d) `anvil distill` with a pruned student and a hidden-state loss: the summary printed, the KL to the teacher
      falls, the projection trains (in the checkpoint, not in the exported model), and a SIGKILLed run resumed
      gives the same metrics and projection, ==;
  (e) bad input: intermediate_size larger than the teacher's, heads that do not divide, a layer map out of range,
      width keys on a student that is not derived.
"""
import json
import os
import re
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import anvil
from hf_models import randomize
from test_train import ENV, anvil_binary, check_ok, checkpoint_step, run_cli, wait_for, write_config, write_jsonl

transformers = pytest.importorskip("transformers")

_C = anvil._C
VOCAB = 101
# 8 query heads in 2 KV groups of 4, head_dim 4 (not hidden / heads), 3 layers.
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, head_dim=4, max_position_embeddings=128, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=21)
    m.save_pretrained(d)
    return d


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calibration(seed, shapes=((2, 9), (3, 7))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, s, generator=g) for s in shapes]


def reference_importance(hf, batches):
    """Minitron's scores from forward hooks on transformers' modules (written out, not anvil's code)."""
    sums = {}

    def hook(key):
        def record(module, args, out):
            a = args[0].detach().float().abs().mean(1)  # (B, in): mean over the sequence
            sums[key] = sums.get(key, 0) + a.pow(2).sum(0)  # L2 over rows, squared
        return record

    handles = []
    for i, layer in enumerate(hf.model.layers):
        for name, mod in (("q", layer.self_attn.q_proj), ("gate", layer.mlp.gate_proj), ("o", layer.self_attn.o_proj),
                          ("down", layer.mlp.down_proj)):
            handles.append(mod.register_forward_hook(hook((name, i))))
    with torch.no_grad():
        for ids in batches:
            hf(ids)
    for h in handles:
        h.remove()
    cfg = hf.config
    n = cfg.num_hidden_layers
    mlp = [sums[("down", i)].sqrt() for i in range(n)]
    heads = [sums[("o", i)].sqrt().view(cfg.num_attention_heads, cfg.head_dim).norm(dim=1) for i in range(n)]
    hidden = sum(sums[("q", i)].sqrt() + sums[("gate", i)].sqrt() for i in range(n))
    return mlp, heads, hidden


def close(a, b, rtol=1e-4):
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


# ---- (a) importance and selection -------------------------------------------------------------------------

def test_importance_equals_the_transformers_hook_reference(teacher_dir):
    batches = calibration(1)
    mlp, heads, hidden = reference_importance(hf_model(teacher_dir), batches)
    got = _C.activation_importance(_C.CausalLM(teacher_dir), batches)
    assert got["rows"] == 5 and got["tokens"] == 2 * 9 + 3 * 7
    assert len(got["mlp"]) == 3 and len(got["heads"]) == 3
    for i in range(3):
        assert got["mlp"][i].shape == (48,) and close(got["mlp"][i], mlp[i])
        assert got["heads"][i].shape == (8,) and close(got["heads"][i], heads[i])
    assert got["hidden"].shape == (32,) and close(got["hidden"], hidden)


def top(scores, k):
    return sorted(torch.topk(scores, k).indices.tolist())


def test_the_student_keeps_exactly_the_top_scored(teacher_dir):
    batches = calibration(2)
    mlp, heads, hidden = reference_importance(hf_model(teacher_dir), batches)
    _, sel = _C.derive_pruned(_C.CausalLM(teacher_dir), [], intermediate_size=20, num_attention_heads=4,
                              num_key_value_heads=2, hidden_size=24, batches=batches)
    assert sel["hidden"].tolist() == top(hidden, 24)
    for i in range(3):
        assert sel["mlp"][i].tolist() == top(mlp[i], 20)
        # 2 of 4 heads in each of the 2 groups: each group's top two
        g = heads[i].view(2, 4)
        want = [4 * grp + h for grp in range(2) for h in top(g[grp], 2)]
        assert sel["heads"][i].tolist() == want and sel["kv"][i].tolist() == [0, 1]
    # One group of 2 heads: the group whose best two score highest.
    _, sel = _C.derive_pruned(_C.CausalLM(teacher_dir), [], num_attention_heads=2, num_key_value_heads=1,
                              batches=batches)
    for i in range(3):
        g = heads[i].view(2, 4)
        best = int(torch.argmax(torch.topk(g, 2, dim=1).values.sum(1)))
        assert sel["kv"][i].tolist() == [best]
        assert sel["heads"][i].tolist() == [4 * best + h for h in top(g[best], 2)]
    assert re.search(r"num_attention_heads\s+2/8 kept", sel["summary"]), sel["summary"]
    assert re.search(r"intermediate_size\s+48 \(kept\)", sel["summary"]), sel["summary"]


# ---- (b) exactness against masking; transformers loads the student ------------------------------------------

def test_pruned_student_is_the_masked_teacher_and_loads_in_transformers(teacher_dir, tmp_path):
    batches = calibration(3)
    student, sel = _C.derive_pruned(_C.CausalLM(teacher_dir), [], intermediate_size=30, num_attention_heads=2,
                                    num_key_value_heads=1, batches=batches)
    masked = hf_model(teacher_dir)
    with torch.no_grad():
        for i, layer in enumerate(masked.model.layers):
            keep = torch.zeros(48)
            keep[sel["mlp"][i]] = 1
            layer.mlp.down_proj.weight.mul_(keep)
            heads = torch.zeros(8)
            heads[sel["heads"][i]] = 1
            layer.self_attn.o_proj.weight.mul_(heads.repeat_interleave(4))
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = masked(ids).logits
        teacher = hf_model(teacher_dir)(ids).logits
    got = student.logits(ids)
    assert close(got, want, 1e-5)
    assert (teacher - want).abs().max().item() > 1e-3  # the masking changed the teacher: the check bites
    out = str(tmp_path / "pruned")
    student.save(out)
    hf = hf_model(out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (30, 2, 1, 4)
    with torch.no_grad():
        assert close(hf(ids).logits, got, 1e-5)


def test_hidden_pruned_student_with_fewer_layers_loads_in_transformers(teacher_dir, tmp_path):
    student, sel = _C.derive_pruned(_C.CausalLM(teacher_dir), [0, 2], intermediate_size=40, hidden_size=24,
                                    num_attention_heads=6, batches=calibration(5))
    out = str(tmp_path / "narrow")
    student.save(out)
    hf = hf_model(out)
    assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.head_dim) == (24, 2, 4)
    assert hf.config.num_attention_heads == 6 and hf.config.num_key_value_heads == 2
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert close(hf(ids).logits, student.logits(ids), 1e-5)
    t = hf_model(teacher_dir).state_dict()
    s = hf.state_dict()
    h = sel["hidden"]
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"][:, h])
    assert torch.equal(s["model.layers.1.mlp.down_proj.weight"],
                       t["model.layers.2.mlp.down_proj.weight"][h][:, sel["mlp"][2]])


# ---- (c) layer states and the hidden-state losses ----------------------------------------------------------

def test_layer_outputs_are_transformers_decoder_layer_outputs(teacher_dir):
    hf = hf_model(teacher_dir)
    outs = []
    handles = [l.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for l in hf.model.layers]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    m = _C.CausalLM(teacher_dir)
    _C.set_training(m, False)
    got = _C.layer_outputs(m, ids)
    assert len(got) == 4
    assert torch.equal(got[0], hf.model.embed_tokens(ids).detach())
    for i in range(3):
        assert close(got[i + 1], outs[i], 1e-5)


def reference_hidden_loss(kind, weight, pairs, s, t, params, rows, normalizer):
    total = 0
    for p, (i, j) in enumerate(pairs):
        a = s[i].reshape(-1, s[i].shape[-1])[rows]
        b = t[j].reshape(-1, t[j].shape[-1])[rows]
        if params:
            a = torch.nn.functional.linear(a, params[2 * p][1], params[2 * p + 1][1])
        if kind == "mse":
            total = total + torch.nn.functional.mse_loss(a, b, reduction="none").mean(1).sum()
        else:
            total = total + (1 - torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-8)).sum()
    return total * weight / (normalizer * len(pairs))


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("widths", [(6, 6), (6, 10)])
def test_hidden_loss_equals_its_formula_with_gradients(kind, widths):
    hs, ht = widths
    g = torch.Generator().manual_seed(8)
    s = [torch.randn(2, 4, hs, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    t = [torch.randn(2, 4, ht, generator=g, dtype=torch.float64) for _ in range(5)]
    rows = torch.tensor([0, 2, 5, 7])
    pairs = [(1, 2), (2, 4)]
    loss = _C.HiddenLoss(kind, 0.3, pairs, 2, 4, hs, ht, dtype="float64", seed=3)
    params = loss.parameters()
    assert len(params) == (0 if hs == ht else 4)
    got = loss(s, t, rows, 5.0)
    want = reference_hidden_loss(kind, 0.3, pairs, s, t, params, rows, 5.0)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(got, s[1:] + [p for _, p in params])
    ref = torch.autograd.grad(want, s[1:] + [p for _, p in params])
    for a, b in zip(grads, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
    if params:
        assert params[0][1].shape == (ht, hs) and grads[2].abs().sum() > 0  # the projection gets a gradient
    # gradcheck over the student states (and the projection's weight, through a functional wrapper)
    assert torch.autograd.gradcheck(lambda a, b: loss([s[0], a, b], t, rows, 5.0), (s[1], s[2]))
    assert torch.autograd.gradcheck(lambda a, b: _C.hidden_divergence(a, b, kind),
                                    (torch.randn(5, ht, dtype=torch.float64, requires_grad=True),
                                     torch.randn(5, ht, dtype=torch.float64, requires_grad=True)))


def test_uniform_layer_map():
    assert _C.uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert _C.uniform_layer_map(3, 3) == [(1, 1), (2, 2), (3, 3)]


# ---- (d) the recipe ----------------------------------------------------------------------------------------

def token_examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, step = int(torch.randint(3, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(6, 15, (1,), generator=g))
        out.append({"input_ids": [3 + (start + k * step) % (VOCAB - 3) for k in range(length)]})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return d, write_jsonl(d / "train.jsonl", token_examples(40, 1)), write_jsonl(d / "val.jsonl", token_examples(8, 2))


def pruned_config(teacher, train, val, out, **sections):
    cfg = {
        "teacher": {"path": teacher, "dtype": "float32", "device": "cpu"},
        "student": {"init": "derived", "layers": [0, 2], "intermediate_size": 32, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "hidden_size": 24, "prune_calibration": 8, "dtype": "float32",
                    "device": "cpu"},
        "distill": {"loss": "forward_kl", "kd_ratio": 0.5, "chunk": 16, "hidden_loss": "cosine", "hidden_weight": 0.5},
        "data": {"train": train, "validation": val, "seq_len": 32},
        "train": {"batch_size": 2, "grad_accum": 2, "steps": 12, "lr": 3e-3, "warmup_steps": 2, "seed": 5},
        "eval": {"every": 4},
        "output": {"dir": str(out), "log_every": 1, "plot": False, "save_every": 3},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def pruned_run(teacher_dir, data):
    d, train, val = data
    out = d / "pruned"
    result = run_cli("distill", "--config", write_config(d / "pruned.json", pruned_config(teacher_dir, train, val, out)))
    check_ok(result)
    return result, metrics(out), out


def test_pruned_student_distills_with_a_hidden_loss(pruned_run):
    result, lines, out = pruned_run
    assert "importance pruning (Minitron" in result.stderr, result.stderr
    assert re.search(r"hidden_size\s+24/32 kept", result.stderr) and re.search(r"num_key_value_heads\s+1/2 kept",
                                                                               result.stderr), result.stderr
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 12 and all({"kd", "ce", "hidden"} <= m.keys() for m in steps)
    for m in steps:  # 0.5 CE + 0.5 KD + the hidden loss (weight inside)
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["kd"] + m["hidden"], rel=1e-5)
    assert steps[-1]["hidden"] < steps[0]["hidden"]
    evals = [m for m in lines if "val_kl" in m]
    assert evals[-1]["val_kl"] < evals[0]["val_kl"], evals
    hf = hf_model(str(out / "model"))
    assert (hf.config.hidden_size, hf.config.intermediate_size, hf.config.num_attention_heads) == (24, 32, 4)
    m = _C.CausalLM(str(out / "model"))
    _C.set_training(m, False)
    ids = torch.tensor([token_examples(1, 9)[0]["input_ids"]])
    with torch.no_grad():
        assert close(hf(ids).logits, m.logits(ids), 1e-5)
    # The projection (24 -> 32, one per pair of the uniform map) is in the checkpoint, not the exported model.
    ck = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    assert ck["hidden_projection.0.weight"].shape == (32, 24) and "hidden_projection.1.bias" in ck
    assert not any("hidden_projection" in k for k in hf.state_dict())


def test_pruned_run_resumed_after_sigkill_is_bit_exact(teacher_dir, data, pruned_run):
    d, train, val = data
    _, full, full_out = pruned_run
    out = d / "killed"
    cfg = write_config(d / "killed.json", pruned_config(teacher_dir, train, val, out))
    proc = subprocess.Popen([anvil_binary(), "distill", "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: (checkpoint_step(out) or 0) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(out)
    assert killed_at is not None and killed_at < 12
    check_ok(run_cli("distill", "--config", cfg, "--resume"))
    strip = lambda lines: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in lines]
    assert strip(metrics(out)) == strip(full)
    a = load_file(str(out / "checkpoint" / "trainable.safetensors"))
    b = load_file(str(full_out / "checkpoint" / "trainable.safetensors"))
    for k in ("hidden_projection.0.weight", "hidden_projection.1.bias"):
        assert torch.equal(a[k], b[k]), k


# ---- (e) bad input ------------------------------------------------------------------------------------------

def test_bad_widths_and_layer_maps_name_the_key(teacher_dir, data, tmp_path):
    _, train, val = data
    cfg = write_config(tmp_path / "c.json", pruned_config(teacher_dir, train, val, tmp_path / "o"))
    cases = [
        (["--student.intermediate_size=64"], "config key student.intermediate_size: 64 is larger than the source's "
                                             "intermediate_size 48"),
        (["--student.num_attention_heads=3", "--student.num_key_value_heads=2"],
         "config key student.num_attention_heads: 3 must be a multiple of num_key_value_heads (2)"),
        (["--student.num_attention_heads=8", "--student.num_key_value_heads=1"],
         "config key student.num_attention_heads: 8 heads over 1 KV groups"),
        (["--student.hidden_size=30"],
         "config key student.num_attention_heads: a Llama student's hidden_size (30) must be a multiple of its "
         "num_attention_heads (4)"),
        (["--distill.hidden_layers=[[1, 2], [3, 3]]"], "config key distill.hidden_layers: pair [3, 3]: student index 3 "
                                                       "is out of range 0..2"),
        (["--distill.hidden_layers=[[1, 9]]"], "teacher index 9 is out of range 0..3"),
        (["--distill.hidden_layers=last"], "config key distill.hidden_layers: must be \"uniform\" or a list"),
        (["--distill.hidden_loss=l1"], "config key distill.hidden_loss"),
        (["--student.init=random", "--student.layers=[]", "--student.config=x.json"],
         "config key student.intermediate_size: is for student.init \"derived\""),
    ]
    for args, message in cases:
        r = run_cli("distill", "--config", cfg, *args)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
