"""`anvil distill` and its KD losses, on the CPU.

  (a) the losses against the real oracles on random logits with ignored positions, values and gradients:
      torchtune 0.6.1's ForwardKLLoss / ReverseKLLoss (torchtune/modules/loss/kd_losses.py, the installed file,
      loaded on its own: it imports only torch) and TRL 1.16.0's GKDTrainer.generalized_jsd_loss
      (trl/experimental/gkd/gkd_trainer.py) for beta 0, 0.3, 0.5, 1 and temperature 1 and 2. DistiLLM is not on
      PyPI: its skewed_forward_kl, skewed_reverse_kl and tv_distance are written out below from
      jongwooko/distillm@17c0f98 distillm/losses.py. torchtune's and DistiLLM's forward-type losses are
      cross-entropies -sum p log(.): ours are the divergences, so theirs = ours + the teacher's entropy;
  (b) torch.autograd.gradcheck of the chunked loss in float64, every loss;
  (c) a derived student (layers [0, 2] of a 3-layer Llama) saves as a folder transformers loads with anvil's logits,
      and the student `anvil distill` writes does too;
  (d) end to end on the demo's teacher (examples/tiny/base): a student trained with KD ends with a lower KL to
      the teacher on held-out text than the same student trained with CE alone for the same steps (fixed seeds);
  (e) a run killed with SIGKILL after a checkpoint and resumed gives the uninterrupted metrics, ==;
  (f) bad input: an unknown loss name, a missing teacher, a student whose vocabulary is not the teacher's;
      and --dry-run's plan names the teacher.
"""
import importlib.util
import json
import os
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F

import anvil
from hf_models import randomize
from test_train import (ENV, anvil_binary, check_ok, checkpoint_step, run_cli, wait_for, write_config,
                        write_jsonl)

transformers = pytest.importorskip("transformers")

_C = anvil._C
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TINY_BASE = os.path.join(ROOT, "examples", "tiny", "base")
TINY_DATA = os.path.join(ROOT, "examples", "tiny", "data")
VOCAB = 101


# ---- the oracles -----------------------------------------------------------------------------------------

def torchtune_kd_losses():
    """torchtune's kd_losses.py as installed (scripts/setup.sh: torchtune==0.6.1 --no-deps), imported as a file:
    the package's __init__ needs torchao and its dataset stack, the loss file only torch."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        pytest.skip("torchtune is not installed (scripts/setup.sh installs it)")
    path = os.path.join(os.path.dirname(spec.origin), "modules", "loss", "kd_losses.py")
    module_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def trl_generalized_jsd_loss():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


# DistiLLM (jongwooko/distillm@17c0f98bc263, distillm/losses.py), not packaged: the three functions written out
# from that file, the batch dict replaced by labels.
def distillm_skewed_forward_kl(logits, teacher_logits, labels, lam=0.1):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    mixed_probs = lam * teacher_probs + (1 - lam) * student_probs
    mixed_logprobs = torch.log(mixed_probs)
    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def distillm_skewed_reverse_kl(logits, teacher_logits, labels, lam=0.1):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    mixed_probs = (1 - lam) * teacher_probs + lam * student_probs
    student_logprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)
    mixed_logprobs = torch.log(mixed_probs)
    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def distillm_tv_distance(logits, teacher_logits, labels):
    teacher_probs = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    student_probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = 0.5 * torch.masked_fill(torch.abs(teacher_probs - student_probs), inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    return torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def teacher_entropy(teacher_logits, labels, temperature=1.0):
    """Mean over targets of -sum p log p: the constant torchtune's and DistiLLM's forward losses carry."""
    lp = F.log_softmax(teacher_logits.float() / temperature, -1)
    h = -(lp.exp() * lp).sum(-1)
    mask = labels != -100
    return h[mask].sum() / mask.sum()


@pytest.fixture(scope="module")
def problem():
    """Hidden rows and heads of a student (H 24) and a teacher (H 32) over V 300, 2 x 17 positions, a third
    ignored."""
    g = torch.Generator().manual_seed(0)
    b, s, v = 2, 17, 300
    hs = torch.randn(b * s, 24, generator=g)
    ws = torch.randn(v, 24, generator=g) * 0.4
    ht = torch.randn(b * s, 32, generator=g)
    wt = torch.randn(v, 32, generator=g) * 0.4
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.33] = -100
    return hs, ws, ht, wt, labels


def ours(problem, loss, chunk=5, **kw):
    """anvil's chunked loss on the target rows and its gradients wrt the student's hidden rows and head."""
    hs, ws, ht, wt, labels = problem
    rows = (labels.view(-1) != -100).nonzero().squeeze(1)
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    value = _C.kd_loss(h[rows], w, ht[rows], wt, float(rows.numel()), loss=loss, chunk=chunk, **kw)
    value.backward()
    return value.detach(), h.grad, w.grad


def oracle(problem, fn):
    """An oracle's value and gradients on the full logits (it masks the ignored positions itself)."""
    hs, ws, ht, wt, labels = problem
    h = hs.clone().requires_grad_(True)
    w = ws.clone().requires_grad_(True)
    student = (h @ w.T).view(*labels.shape, -1)
    teacher = (ht @ wt.T).view(*labels.shape, -1)
    value = fn(student, teacher, labels)
    value.backward()
    return value.detach(), h.grad, w.grad


def assert_same(got, want, offset=0.0):
    (v, dh, dw), (rv, rdh, rdw) = got, want
    assert v.item() + offset == pytest.approx(rv.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(dh, rdh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-6)


def test_forward_and_reverse_kl_equal_torchtune(problem):
    tt = torchtune_kd_losses()
    *_, labels = problem
    teacher = (problem[2] @ problem[3].T)
    flat = lambda fn: (lambda s, t, l: fn(s.reshape(-1, s.size(-1)), t.reshape(-1, t.size(-1)), l))
    entropy = teacher_entropy(teacher, labels.view(-1)).item()
    assert_same(ours(problem, "forward_kl"), oracle(problem, flat(tt.ForwardKLLoss())), offset=entropy)
    assert_same(ours(problem, "reverse_kl"), oracle(problem, flat(tt.ReverseKLLoss())))
    # torchtune's chunked variant (its recipe's loss) gives the same.
    chunked = tt.ForwardKLWithChunkedOutputLoss(num_output_chunks=4)
    chunks = lambda s, t, l: chunked(list(s.chunk(4, dim=1)), list(t.chunk(4, dim=1)), l)
    assert_same(ours(problem, "forward_kl", chunk=3), oracle(problem, chunks), offset=entropy)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd_loss(problem, beta, temperature):
    jsd = trl_generalized_jsd_loss()
    fn = lambda s, t, l: jsd(s, t, labels=l, beta=beta, temperature=temperature)
    assert_same(ours(problem, "jsd", jsd_beta=beta, temperature=temperature), oracle(problem, fn))


@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_skew_kls_and_tv_equal_distillm(problem, lam):
    *_, labels = problem
    teacher = problem[2] @ problem[3].T
    entropy = teacher_entropy(teacher, labels.view(-1)).item()
    assert_same(ours(problem, "skew_forward_kl", skew_lambda=lam),
                oracle(problem, lambda s, t, l: distillm_skewed_forward_kl(s, t, l, lam)), offset=entropy)
    assert_same(ours(problem, "skew_reverse_kl", skew_lambda=lam),
                oracle(problem, lambda s, t, l: distillm_skewed_reverse_kl(s, t, l, lam)))
    assert_same(ours(problem, "tv"), oracle(problem, distillm_tv_distance))


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv"])
def test_gradcheck_float64(loss):
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ht = torch.randn(6, 5, dtype=torch.float64, generator=g)
    wt = torch.randn(9, 5, dtype=torch.float64, generator=g)
    fn = lambda h, w: _C.kd_loss(h, w, ht, wt, 3.0, loss=loss, temperature=1.5, skew_lambda=0.2, jsd_beta=0.4, chunk=4)
    if loss == "tv":  # the kink of |p - q| is nowhere near these points, but finite differences need a margin
        assert torch.autograd.gradcheck(fn, (hs, ws), eps=1e-7, atol=1e-5)
    else:
        assert torch.autograd.gradcheck(fn, (hs, ws))


def test_unknown_loss_name_in_the_binding():
    with pytest.raises(Exception, match="forward_kl"):
        _C.kd_loss(torch.randn(2, 3), torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 3), 1.0, loss="kl")


# ---- (c) derived students load in transformers -------------------------------------------------------

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=11)
    m.save_pretrained(d)
    return d


def assert_logits_match(model_dir, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours_ = _C.CausalLM(model_dir)
    _C.set_training(ours_, False)
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours_.logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    return hf


def test_derived_student_loads_in_transformers_with_anvils_logits(teacher_dir, tmp_path):
    derived = _C.derive_by_layers(_C.CausalLM(teacher_dir), [0, 2])
    out = str(tmp_path / "derived")
    derived.save(out)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    hf = assert_logits_match(out, ids)
    assert hf.config.num_hidden_layers == 2
    # It is the teacher with its middle layer removed: the same tensors, renumbered.
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    t, s = teacher.state_dict(), hf.state_dict()
    assert torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(s["lm_head.weight"], t["lm_head.weight"])


# ---- the recipe on pre-tokenized data ---------------------------------------------------------------

def token_examples(n, seed):
    """Learnable sequences: runs of arithmetic progressions mod the vocabulary, varied lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, step = int(torch.randint(3, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(6, 15, (1,), generator=g))
        out.append({"input_ids": [3 + (start + k * step) % (VOCAB - 3) for k in range(length)]})
    return out


def distill_config(teacher_path, train_path, val_path, out_dir, **sections):
    cfg = {
        "teacher": {"path": teacher_path, "dtype": "float32", "device": "cpu"},
        "student": {"init": "derived", "layers": [0, 2], "dtype": "float32", "device": "cpu"},
        "distill": {"loss": "forward_kl", "kd_ratio": 0.5, "chunk": 16},
        "data": {"train": train_path, "validation": val_path, "seq_len": 32},
        "train": {"batch_size": 2, "grad_accum": 2, "steps": 12, "lr": 3e-3, "warmup_steps": 2, "seed": 5},
        "eval": {"every": 4},
        "output": {"dir": str(out_dir), "log_every": 1, "plot": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return d, write_jsonl(d / "train.jsonl", token_examples(40, 1)), write_jsonl(d / "val.jsonl", token_examples(8, 2))


@pytest.fixture(scope="module")
def uninterrupted(teacher_dir, data):
    d, train, val = data
    out = d / "full"
    cfg = distill_config(teacher_dir, train, val, out, output={"save_every": 3})
    result = run_cli("distill", "--config", write_config(d / "full.json", cfg))
    check_ok(result)
    return result, metrics(out), out


def test_recipe_logs_kd_ce_and_kl_and_writes_a_student_transformers_loads(uninterrupted):
    result, lines, out = uninterrupted
    steps = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    assert len(steps) == 12 and all({"kd", "ce"} <= m.keys() for m in steps)
    for m in steps:  # the blend: 0.5 CE + 0.5 KD
        assert m["loss"] == pytest.approx(0.5 * m["ce"] + 0.5 * m["kd"], rel=1e-5)
    assert [m["step"] for m in evals] == [0, 4, 8, 12]
    assert all({"val_kl", "val_top1"} <= m.keys() for m in evals)
    assert evals[-1]["val_kl"] < evals[0]["val_kl"]
    assert "kl to teacher" in result.stdout and "teacher:" in result.stderr
    ids = torch.tensor([token_examples(1, 9)[0]["input_ids"]])
    hf = assert_logits_match(str(out / "model"), ids)
    assert hf.config.num_hidden_layers == 2


def test_sigkill_then_resume_is_bit_exact(teacher_dir, data, uninterrupted):
    d, train, val = data
    _, full, _ = uninterrupted
    out = d / "killed"
    cfg = write_config(d / "killed.json", distill_config(teacher_dir, train, val, out, output={"save_every": 3}))
    proc = subprocess.Popen([anvil_binary(), "distill", "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: (checkpoint_step(out) or 0) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(out)
    assert killed_at is not None and killed_at < 12
    check_ok(run_cli("distill", "--config", cfg, "--resume"))
    strip = lambda lines: [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in lines]
    assert strip(metrics(out)) == strip(full)  # every loss, kd, ce and validation value, ==


# ---- (d) KD beats CE at matching the teacher --------------------------------------------------------

def head_lines(path, n, dest):
    with open(path) as f, open(dest, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return str(dest)


def test_kd_student_ends_closer_to_the_teacher_than_a_ce_student(tmp_path):
    if not os.path.exists(os.path.join(TINY_BASE, "model.safetensors")):
        pytest.skip("examples/tiny/base is missing")
    train = head_lines(os.path.join(TINY_DATA, "general_train.jsonl"), 600, tmp_path / "train.jsonl")
    val = head_lines(os.path.join(TINY_DATA, "general_val.jsonl"), 60, tmp_path / "val.jsonl")
    finals = {}
    for name, ratio in (("kd", 1.0), ("ce", 0.0)):
        out = tmp_path / name
        cfg = distill_config(os.path.abspath(TINY_BASE), train, val, out,
                             student={"layers": [0, 3]}, distill={"kd_ratio": ratio, "chunk": 512},
                             data={"seq_len": 128, "loss_on": "all"},
                             train={"batch_size": 4, "grad_accum": 1, "steps": 30, "lr": 2e-3, "seed": 0},
                             eval={"every": 0})
        check_ok(run_cli("distill", "--config", write_config(tmp_path / f"{name}.json", cfg), timeout=600))
        finals[name] = [m for m in metrics(out) if "val_kl" in m][-1]
    kd, ce = finals["kd"]["val_kl"], finals["ce"]["val_kl"]
    print("KD vs CE student, final validation:", finals)
    assert kd < 0.6 * ce, finals  # the margin: at least 40% lower KL to the teacher (measured: 0.224 vs 0.535)
    assert finals["kd"]["val_top1"] > finals["ce"]["val_top1"], finals


# ---- (f) bad input ----------------------------------------------------------------------------------

def test_bad_input_names_the_key_or_file(teacher_dir, data, tmp_path):
    d, train, val = data
    cfg = write_config(tmp_path / "c.json", distill_config(teacher_dir, train, val, tmp_path / "o"))
    r = run_cli("distill", "--config", cfg, "--distill.loss=kl")
    assert r.returncode != 0 and "config key distill.loss" in r.stderr and "\"forward_kl\"" in r.stderr, r.stderr
    missing = str(tmp_path / "no-such-teacher")
    r = run_cli("distill", "--config", cfg, f"--teacher.path={missing}")
    assert r.returncode != 0 and "config key teacher.path" in r.stderr and "no-such-teacher" in r.stderr, r.stderr
    # A student with another vocabulary.
    other = str(tmp_path / "other")
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(TINY, vocab_size=VOCAB + 7)))
    m.save_pretrained(other)
    r = run_cli("distill", "--config", cfg, "--student.init=pretrained", "--student.layers=[]", f"--student.path={other}")
    assert r.returncode != 0, r.stderr
    assert "config key student.path" in r.stderr and str(VOCAB + 7) in r.stderr and str(VOCAB) in r.stderr, r.stderr
    r = run_cli("distill", "--config", cfg, "--model.path=x")
    assert r.returncode != 0 and "teacher" in r.stderr, r.stderr


def test_dry_run_plans_teacher_and_student(teacher_dir, data, tmp_path):
    d, train, val = data
    cfg = write_config(tmp_path / "c.json", distill_config(teacher_dir, train, val, tmp_path / "o"))
    r = run_cli("distill", "--config", cfg, "--dry-run")
    check_ok(r)
    assert "teacher weights (frozen)" in r.stdout and "teacher forward (no grad)" in r.stdout, r.stdout
    assert not os.path.exists(tmp_path / "o")


def test_lora_student_writes_a_merged_model_and_a_peft_adapter_on_its_base(teacher_dir, data, tmp_path):
    peft = pytest.importorskip("peft")
    _, train, val = data
    out = tmp_path / "lora"
    cfg = distill_config(teacher_dir, train, val, out, lora={"r": 4, "alpha": 8}, train={"steps": 4, "lr": 1e-2},
                         eval={"every": 0})
    check_ok(run_cli("distill", "--config", write_config(tmp_path / "lora.json", cfg)))
    steps = [m for m in metrics(out) if "loss" in m]
    assert len(steps) == 4 and all({"kd", "ce"} <= m.keys() for m in steps)
    ids = torch.tensor([token_examples(1, 3)[0]["input_ids"]])
    merged = assert_logits_match(str(out / "model"), ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "student_base"), dtype=torch.float32)
    assert base.config.num_hidden_layers == 2
    with open(out / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"].endswith("student_base")
    pm = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        ref, got = pm(ids).logits, merged(ids).logits
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # The adapters trained: the merged student is not its base.
    assert not torch.equal(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           transformers.AutoModelForCausalLM.from_pretrained(str(out / "student_base"))
                           .state_dict()["model.layers.0.self_attn.q_proj.weight"])
