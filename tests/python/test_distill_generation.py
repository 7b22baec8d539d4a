"""`anvil distill`'s generation modes, on the CPU (distill/README.md "Sequence-level and on-policy").

  (a) sequence-level KD: the teacher data file (distill.mode "sequence") holds, for every prompt of the prompts
      file, the completion transformers' greedy `generate` gives for that prompt with the demo teacher
      (examples/tiny/base and its tokenizer), batched in anvil with left padding; the student then trains on it;
      a rerun keeps the rows already written (the file cut to its first rows grows back to the same bytes, and
      the run says how many it kept); rows from another prompts file are refused;
  (b) on-policy (GKD): on_policy.lambda 0 gives the plain online run's losses bit for bit; lambda 1 replaces every
      micro-batch (the logged on_policy term is 1 at every step and the loss is the KD term alone, as GKD's);
      lambda 0.5 mixes the two and a run killed after a checkpoint resumes to the uninterrupted metrics, ==;
  (c) bad input: on_policy.lambda outside [0, 1], a sequence section without distill.mode "sequence", a missing
      prompts file, a prompts line without "prompt": errors naming the key or file:line.
The padded batched generation itself is checked against transformers in tests/python/test_models.py.
"""
import json
import os
import signal
import subprocess

import pytest
import torch

from hf_models import randomize
from test_train import ENV, anvil_binary, check_ok, checkpoint_step, run_cli, wait_for, write_config, write_jsonl

transformers = pytest.importorskip("transformers")

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TINY_BASE = os.path.abspath(os.path.join(ROOT, "examples", "tiny", "base"))
VOCAB = 101
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)
PROMPTS = ["The meaning of life is", "A computer", "Never trust a man who", "Love", "If you can read this, you",
           "The best way to predict the future is to", "Why", "Time flies like an arrow; fruit flies"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_of(out):
    return [m for m in metrics(out) if "loss" in m]


def strip(lines):
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "elapsed_s")} for m in lines]


# ---- (a) sequence-level KD --------------------------------------------------------------------------

def sequence_config(prompts, teacher_data, out_dir, **sections):
    cfg = {
        "teacher": {"path": TINY_BASE, "dtype": "float32", "device": "cpu"},
        "student": {"init": "derived", "layers": [0, 3], "dtype": "float32", "device": "cpu"},
        "distill": {"mode": "sequence", "kd_ratio": 0.0, "chunk": 64},
        "sequence": {"prompts": prompts, "output": teacher_data, "batch_size": 3, "max_new_tokens": 12},
        "data": {"train": prompts, "seq_len": 64, "loss_on": "completion"},
        "train": {"batch_size": 2, "steps": 3, "lr": 1e-3, "seed": 1},
        "eval": {"every": 0},
        "output": {"dir": str(out_dir), "log_every": 1, "plot": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def hf_completions(prompts, n):
    """transformers' greedy completion of each prompt alone, decoded as anvil decodes (eos dropped, specials skipped)."""
    tok = transformers.AutoTokenizer.from_pretrained(TINY_BASE)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_BASE, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tok.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               eos_token_id=eos, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        fresh = g[0, ids.shape[1]:].tolist()
        for i, t in enumerate(fresh):
            if t in eos:
                fresh = fresh[:i]
                break
        out.append(tok.decode(fresh, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def sequence_run(tmp_path_factory):
    if not os.path.exists(os.path.join(TINY_BASE, "model.safetensors")):
        pytest.skip("examples/tiny/base is missing")
    d = tmp_path_factory.mktemp("sequence")
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    teacher_data = str(d / "teacher.jsonl")
    r = run_cli("distill", "--config", write_config(d / "c.json", sequence_config(prompts, teacher_data, d / "run")))
    check_ok(r)
    return d, prompts, teacher_data, r


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_sequence_mode_writes_the_teachers_greedy_completions(sequence_run):
    d, prompts, teacher_data, r = sequence_run
    rows = read_rows(teacher_data)
    assert [row["prompt"] for row in rows] == PROMPTS
    assert [row["completion"] for row in rows] == hf_completions(PROMPTS, 12)
    assert "teacher data" in r.stderr and f"{len(PROMPTS)} rows (0 kept" in r.stderr, r.stderr
    # The student trained on it: 3 steps of CE (kd_ratio 0), a model written.
    steps = steps_of(d / "run")
    assert len(steps) == 3 and all("ce" in m for m in steps)
    assert os.path.exists(d / "run" / "model" / "config.json")


def test_sequence_mode_rerun_keeps_written_rows_and_refuses_another_prompts_file(sequence_run):
    d, prompts, teacher_data, _ = sequence_run
    with open(teacher_data) as f:
        full = f.read()
    cut = str(d / "cut.jsonl")
    with open(cut, "w") as f:
        f.write("".join(full.splitlines(keepends=True)[:4]))
    r = run_cli("distill", "--config", write_config(d / "cut.json", sequence_config(prompts, cut, d / "run_cut")))
    check_ok(r)
    assert f"{len(PROMPTS)} rows (4 kept" in r.stderr, r.stderr
    with open(cut) as f:
        assert f.read() == full
    # Rows written from other prompts: refused, naming the file and line.
    other = write_jsonl(d / "other.jsonl", [{"prompt": "Something else"}] + [{"prompt": p} for p in PROMPTS[1:]])
    r = run_cli("distill", "--config", write_config(d / "other.json", sequence_config(other, cut, d / "run_other")))
    assert r.returncode != 0 and "cut.jsonl:1" in r.stderr and "another prompts" in r.stderr, r.stderr


def test_sequence_mode_bad_prompts_are_named(tmp_path):
    missing = str(tmp_path / "no-such-prompts.jsonl")
    r = run_cli("distill", "--config", write_config(tmp_path / "c.json",
                sequence_config(missing, str(tmp_path / "t.jsonl"), tmp_path / "o")))
    assert r.returncode != 0 and "config key sequence.prompts" in r.stderr and "no-such-prompts" in r.stderr, r.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, {"text": "no prompt here"}])
    r = run_cli("distill", "--config", write_config(tmp_path / "b.json",
                sequence_config(bad, str(tmp_path / "t.jsonl"), tmp_path / "o2")))
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr and "\"prompt\"" in r.stderr, r.stderr


# ---- (b) on-policy ----------------------------------------------------------------------------------

def token_examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, step = int(torch.randint(3, VOCAB, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        length = int(torch.randint(6, 15, (1,), generator=g))
        out.append({"input_ids": [3 + (start + k * step) % (VOCAB - 3) for k in range(length)]})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("onpolicy")
    teacher = str(d / "teacher")
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=11)
    m.save_pretrained(teacher)
    return d, teacher, write_jsonl(d / "train.jsonl", token_examples(40, 1)), write_jsonl(d / "val.jsonl",
                                                                                        token_examples(8, 2))


def online_config(setup, out_dir, **sections):
    d, teacher, train, val = setup
    cfg = {
        "teacher": {"path": teacher, "dtype": "float32", "device": "cpu"},
        "student": {"init": "derived", "layers": [0, 2], "dtype": "float32", "device": "cpu"},
        "distill": {"loss": "jsd", "jsd_beta": 0.5, "kd_ratio": 0.5, "chunk": 16},
        "data": {"train": train, "validation": val, "seq_len": 32},
        "train": {"batch_size": 2, "grad_accum": 2, "steps": 8, "lr": 3e-3, "warmup_steps": 2, "seed": 5},
        "eval": {"every": 4},
        "output": {"dir": str(out_dir), "log_every": 1, "plot": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def run_online(setup, name, **sections):
    d = setup[0]
    out = d / name
    check_ok(run_cli("distill", "--config", write_config(d / f"{name}.json", online_config(setup, out, **sections))))
    return out


@pytest.fixture(scope="module")
def plain(setup):
    return run_online(setup, "plain")


def test_on_policy_lambda_zero_is_the_plain_run(setup, plain):
    out = run_online(setup, "lambda0", on_policy={"lambda": 0.0, "max_new_tokens": 6})
    got, want = strip(metrics(out)), strip(metrics(plain))
    assert all(m["on_policy"] == 0 for m in got if "loss" in m)
    drop = lambda lines: [{k: v for k, v in m.items() if k != "on_policy"} for m in lines]
    assert drop(got) == want  # every loss, kd, ce and validation value, ==


def test_on_policy_lambda_one_trains_on_generations_only(setup, plain):
    out = run_online(setup, "lambda1", on_policy={"lambda": 1.0, "max_new_tokens": 6, "temperature": 1.0})
    steps = steps_of(out)
    assert len(steps) == 8
    for m in steps:
        assert m["on_policy"] == pytest.approx(1.0, abs=1e-6)  # every micro-batch replaced
        assert m["loss"] == pytest.approx(m["kd"], rel=1e-5)   # the divergence alone, as GKD's
    assert steps[0]["loss"] != steps_of(plain)[0]["loss"]


@pytest.fixture(scope="module")
def half(setup):
    return run_online(setup, "half", on_policy={"lambda": 0.5, "max_new_tokens": 6}, output={"save_every": 2})


def test_on_policy_half_mixes_and_resumes_bit_exactly(setup, half):
    fractions = [m["on_policy"] for m in steps_of(half)]
    assert 0 < sum(fractions) < len(fractions), fractions  # some micro-batches replaced, not all
    d = setup[0]
    out = d / "half_killed"
    cfg = write_config(d / "half_killed.json", online_config(setup, out, on_policy={"lambda": 0.5, "max_new_tokens": 6},
                                                             output={"save_every": 2}))
    proc = subprocess.Popen([anvil_binary(), "distill", "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: (checkpoint_step(out) or 0) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint_step(out) is not None and checkpoint_step(out) < 8
    check_ok(run_cli("distill", "--config", cfg, "--resume"))
    assert strip(metrics(out)) == strip(metrics(half))


# ---- (c) bad input -----------------------------------------------------------------------------------

def test_on_policy_and_sequence_keys_are_checked(setup, tmp_path):
    cfg = write_config(tmp_path / "c.json", online_config(setup, tmp_path / "o", on_policy={"lambda": 0.5}))
    for bad in ("1.5", "-0.1"):
        r = run_cli("distill", "--config", cfg, f"--on_policy.lambda={bad}")
        assert r.returncode != 0 and "config key on_policy.lambda" in r.stderr and "[0, 1]" in r.stderr, r.stderr
    r = run_cli("distill", "--config", cfg, "--on_policy.max_new_tokens=0")
    assert r.returncode != 0 and "on_policy.max_new_tokens" in r.stderr, r.stderr
    plain_cfg = online_config(setup, tmp_path / "o2")
    plain_cfg["sequence"] = {"prompts": "p.jsonl"}
    r = run_cli("distill", "--config", write_config(tmp_path / "s.json", plain_cfg))
    assert r.returncode != 0 and "sequence" in r.stderr and "distill.mode" in r.stderr, r.stderr
    r = run_cli("distill", "--config", cfg, "--distill.mode=offline")
    assert r.returncode != 0 and "config key distill.mode" in r.stderr, r.stderr


# ---- (d) chat prompts for sequence-level KD ------------------------------------------------------------

QWEN_TOK = os.path.join(ROOT, "tests", "data", "tokenizers", "qwen2")
CHATS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}],
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "Four (to be replaced)."}],
    [{"role": "user", "content": "Say hi in French."}],
]


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory):
    """A tiny random Qwen2 with the Qwen3-template tokenizer fixture (its logits spread so greedy has no near-ties)."""
    import shutil
    d = tmp_path_factory.mktemp("chat-teacher")
    for f in os.listdir(QWEN_TOK):
        shutil.copy(os.path.join(QWEN_TOK, f), d)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.save_pretrained(str(d))
    return str(d), model, tok


def chat_ids(tok, messages, **kw):
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_sequence_mode_chat_prompts_render_as_the_sft_path_and_get_the_teachers_reply(chat_teacher, tmp_path):
    teacher, model, tok = chat_teacher
    import anvil
    prompts = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS] + [{"prompt": "Plain text too"}])
    out = str(tmp_path / "teacher.jsonl")
    cfg = sequence_config(prompts, out, tmp_path / "run", teacher={"path": teacher}, student={"layers": [0]},
                          data={"train": prompts, "seq_len": 96})
    r = run_cli("distill", "--config", write_config(tmp_path / "c.json", cfg))
    check_ok(r)
    rows = read_rows(out)
    assert len(rows) == len(CHATS) + 1
    ours = anvil._C.Tokenizer.load(teacher)
    for messages, row in zip(CHATS, rows):
        asked = [m for m in messages if m["role"] != "assistant"]  # the trailing assistant turn is regenerated
        assert row["messages"][:-1] == asked and row["messages"][-1]["role"] == "assistant"
        # The teacher saw transformers' rendering with the generation prompt; its greedy reply is the row's.
        ids = chat_ids(tok, asked, add_generation_prompt=True)
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id, pad_token_id=0)
        fresh = g[0, len(ids):].tolist()
        if tok.eos_token_id in fresh:
            fresh = fresh[:fresh.index(tok.eos_token_id)]
        assert row["messages"][-1]["content"] == tok.decode(fresh, skip_special_tokens=True)
        # The SFT reader tokenizes the written row as prompt + reply: the prompt part is that same rendering.
        sft, target = anvil._C.tokenize_example(json.dumps(row), ours, completion_only=True)
        assert sft[:len(ids)] == ids and not any(target[:len(ids)]) and all(target[len(ids):])
    assert rows[-1]["prompt"] == "Plain text too" and "completion" in rows[-1]
    # A rerun keeps the chat rows (each checked against its conversation); another conversation is refused.
    r = run_cli("distill", "--config", write_config(tmp_path / "c2.json", dict(cfg, output=dict(cfg["output"], dir=str(tmp_path / "run2")))))
    check_ok(r)
    assert f"{len(rows)} rows ({len(rows)} kept" in r.stderr, r.stderr
    other = write_jsonl(tmp_path / "other.jsonl", [{"messages": [{"role": "user", "content": "Else?"}]}] +
                        [{"messages": m} for m in CHATS[1:]] + [{"prompt": "Plain text too"}])
    c3 = sequence_config(other, out, tmp_path / "run3", teacher={"path": teacher}, student={"layers": [0]},
                         data={"train": other, "seq_len": 96})
    r = run_cli("distill", "--config", write_config(tmp_path / "c3.json", c3))
    assert r.returncode != 0 and "teacher.jsonl:1" in r.stderr and "another prompts" in r.stderr, r.stderr


def test_sequence_mode_bad_chat_prompts_are_named(chat_teacher, tmp_path):
    teacher, _, _ = chat_teacher

    def error_of(lines):
        prompts = write_jsonl(tmp_path / "bad.jsonl", lines)
        cfg = sequence_config(prompts, str(tmp_path / "t.jsonl"), tmp_path / "o", teacher={"path": teacher},
                              student={"layers": [0]}, data={"train": prompts, "seq_len": 96})
        r = run_cli("distill", "--config", write_config(tmp_path / "b.json", cfg))
        assert r.returncode != 0
        return r.stderr

    e = error_of([{"messages": CHATS[0]}, {"messages": [{"role": "assistant", "content": "only a reply"}]}])
    assert "bad.jsonl:2" in e and "assistant" in e, e
    e = error_of([{"messages": [{"role": "user"}]}])
    assert "bad.jsonl:1" in e and "messages[0]" in e, e
    e = error_of([{"messages": "not a list"}])
    assert "bad.jsonl:1" in e and "\"messages\"" in e, e
    e = error_of([{"text": "neither"}])
    assert "bad.jsonl:1" in e and "\"prompt\"" in e and "\"messages\"" in e, e
    # The demo teacher's tokenizer has no chat template: a chat line says so, naming the line.
    cfg = sequence_config(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHATS[0]}]), str(tmp_path / "t2.jsonl"),
                          tmp_path / "o2")
    if os.path.exists(os.path.join(TINY_BASE, "model.safetensors")):
        r = run_cli("distill", "--config", write_config(tmp_path / "c.json", cfg))
        assert r.returncode != 0 and "c.jsonl:1" in r.stderr and "template" in r.stderr, r.stderr
