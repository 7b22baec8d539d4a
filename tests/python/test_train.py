"""`anvil lora` and `anvil train` end to end on the CPU in fp32, on a tiny random Llama built with
transformers and pre-tokenized JSONL data (no tokenizer needed).

  (a) oracle: the per-step losses of `anvil lora` equal a transformers + PEFT + torch.optim.AdamW loop
      (torch's clip_grad_norm_, transformers' cosine schedule with warmup) started from anvil's step-0
      adapter (output.save_initial_adapter), rtol 1e-5; the trained adapters agree too;
  (b) anvil's final adapter loads in PEFT (PeftModel.from_pretrained) and gives anvil's logits;
  (c) a run killed with SIGKILL after a checkpoint and resumed gives the uninterrupted loss curve, ==;
  (d) Ctrl-C (SIGINT) saves a checkpoint and exits 130; resuming gives the same curve, ==;
  (e) a non-finite loss stops the run with exit 1 and a message naming the step;
  (f) bad config keys and values are errors naming the key and the allowed values;
  (g) --print-config and --dry-run;
  (h) `anvil train` (full parameters, random init) lowers the loss and its model/ loads in
      transformers with anvil's logits;
  and a recipe fixture: a few steps of `anvil train` on a fixed tiny model and data give the losses
  recorded in tests/data/train/recipe_fixture.json (rtol 1e-5).
"""
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch

import anvil
from hf_models import randomize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

_C = anvil._C
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "train")
VOCAB = 101
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, pad_token_id=0)


def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


# One intra-op thread: the runs are tiny, and on a shared CI machine OpenMP barriers between two busy
# threads cost more than the work.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def run_cli(*args, timeout=300):
    return subprocess.run([anvil_binary(), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("base"))
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=5)
    m.save_pretrained(d)
    return d


def write_jsonl(path, examples):
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps(e) + "\n")
    return str(path)


def full_row_examples(n, length, seed, masked_prefix=0):
    """n pre-tokenized examples of exactly `length` ids (one per packed row); with masked_prefix, every
    other example carries labels with its first tokens -100 (a prompt that is not a target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        e = {"input_ids": ids}
        if masked_prefix and i % 2 == 0:
            e["labels"] = [-100] * masked_prefix + ids[masked_prefix:]
        out.append(e)
    return out


def lora_config(base_dir, train_path, out_dir, **sections):
    cfg = {
        "model": {"path": base_dir, "dtype": "float32", "device": "cpu"},
        "data": {"train": train_path, "seq_len": 16},
        "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
        "train": {"batch_size": 2, "grad_accum": 2, "steps": 6, "lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 2,
                  "schedule": "cosine", "max_grad_norm": 1.0, "seed": 3},
        "output": {"dir": str(out_dir), "log_every": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(path, cfg):
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def train_losses(out_dir):
    lines = []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                lines.append(json.loads(line))
            except ValueError:  # a line being written while a test polls the file
                pass
    return [(m["step"], m["loss"]) for m in lines if "loss" in m], [(m["step"], m["val_loss"]) for m in lines
                                                                      if "val_loss" in m]


def check_ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


# ---- (a) and (b): the PEFT oracle ------------------------------------------------------------------

def train_like_anvil(pm, examples, cfg):
    """transformers + PEFT + torch.optim.AdamW on the PeftModel `pm` over the batches anvil builds: one
    example per row, epoch e in the order _C.shuffled_order(n, seed * 1000003 + e + 1), batch_size rows per
    micro-batch, the loss a sum over the step's targets divided by their count. -> the per-step losses
    (pm is left in training mode)."""
    t = cfg["train"]
    pm.train()
    params = [p for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=t["weight_decay"])
    sched = transformers.get_cosine_schedule_with_warmup(opt, t["warmup_steps"], t["steps"])
    rows, epoch = [], 0  # micro-batches of examples, in the order anvil visits them
    while len(rows) < t["steps"] * t["grad_accum"] * t["batch_size"]:
        order = _C.shuffled_order(len(examples), t["seed"] * 1000003 + epoch + 1)
        epoch_rows = [examples[i] for i in order]
        rows.extend(epoch_rows[i:i + t["batch_size"]] for i in range(0, len(epoch_rows), t["batch_size"]))
        epoch += 1
    losses = []
    for step in range(t["steps"]):
        micro = rows[step * t["grad_accum"]:(step + 1) * t["grad_accum"]]
        batches = [(torch.tensor([e["input_ids"] for e in b]), torch.tensor([e.get("labels", e["input_ids"]) for e in b]))
                   for b in micro]
        targets = sum(int((labels[:, 1:] != -100).sum()) for _, labels in batches)
        total = 0.0
        for ids, labels in batches:
            logits = pm(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                     ignore_index=-100, reduction="sum") / targets
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, t["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def oracle_losses(base_dir, adapter_dir, examples, cfg):
    """train_like_anvil from the base checkpoint and the initial adapter anvil wrote -> (losses, PeftModel)."""
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return train_like_anvil(pm, examples, cfg), pm


def test_lora_losses_equal_peft_adamw_oracle(base, tmp_path):
    examples = full_row_examples(10, 16, seed=1, masked_prefix=5)
    train = write_jsonl(tmp_path / "train.jsonl", examples)
    out = tmp_path / "run"
    cfg = lora_config(base, train, out, output={"save_initial_adapter": True})
    check_ok(run_cli("lora", "--config", write_config(tmp_path / "cfg.json", cfg)))
    losses, _ = train_losses(out)
    assert [s for s, _ in losses] == list(range(1, 7))
    ours = [l for _, l in losses]
    ref, pm = oracle_losses(base, str(out / "initial_adapter"), examples, cfg)
    assert ours == pytest.approx(ref, rel=1e-5), f"anvil {ours}\noracle {ref}"
    assert ours[-1] < ours[0]  # it learns

    # (b) the final adapter loads in PEFT; its weights are the oracle's trained ones and its logits
    # are what anvil computes with it.
    trained = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32), str(out / "adapter")).eval()
    oracle_state = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    for n, p in trained.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p, oracle_state[n], rtol=1e-4, atol=1e-6)
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(9))
    ours_model = _C.CausalLM(base)
    _C.set_training(ours_model, False)
    _C.load_adapter(ours_model, str(out / "adapter"))
    with torch.no_grad():
        ref_logits = trained(ids).logits
    got = ours_model.logits(ids)
    assert (got - ref_logits).abs().max().item() <= 1e-4 * ref_logits.abs().max().item()
    assert (out / "loss.svg").read_text().startswith("<svg")
    assert json.loads((out / "config.json").read_text())["lora"]["r"] == 4


# ---- (c), (d): resume is exact -----------------------------------------------------------------------

RESUME_STEPS = 400


def resume_config(base_dir, train, val, out_dir):
    return lora_config(base_dir, train, out_dir, lora={"r": 4, "alpha": 8, "dropout": 0.1},
                       data={"validation": val, "seq_len": 16},
                       train={"steps": RESUME_STEPS, "lr": 1e-3, "batch_size": 2, "grad_accum": 2},
                       eval={"every": 50}, output={"save_every": 3, "plot": False})


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    # Short examples of varied lengths: several per row, so packing and document masks are exercised.
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                                            generator=g).tolist()} for _ in range(30)]
    train = write_jsonl(d / "train.jsonl", examples)
    val = write_jsonl(d / "val.jsonl", examples[:6])
    out = d / "full"
    check_ok(run_cli("lora", "--config", write_config(d / "full.json", resume_config(base, train, val, out))))
    return d, train, val, train_losses(out)


def wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the test could interrupt it")
        if time.time() - start > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.005)


def checkpoint_step(out):
    """The step of the checkpoint a resume would use (checkpoint/, else checkpoint.old/ when a kill fell
    between the two renames of a save)."""
    for name in ("checkpoint", "checkpoint.old"):
        try:
            with open(os.path.join(out, name, "state.json")) as f:
                return json.load(f)["step"]
        except (OSError, ValueError):
            pass
    return None


def test_sigkill_then_resume_is_bit_exact(base, uninterrupted):
    d, train, val, (full_losses, full_val) = uninterrupted
    out = d / "killed"
    cfg = write_config(d / "killed.json", resume_config(base, train, val, out))
    proc = subprocess.Popen([anvil_binary(), "lora", "--config", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: (checkpoint_step(out) or 0) >= 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_step(out)
    assert killed_at is not None and killed_at < RESUME_STEPS
    check_ok(run_cli("lora", "--config", cfg, "--resume"))
    losses, val_losses = train_losses(out)
    assert losses == full_losses  # bit-exact: == on every step's loss
    assert val_losses == full_val


def test_sigint_saves_and_resumes(base, uninterrupted):
    d, train, val, (full_losses, full_val) = uninterrupted
    out = d / "interrupted"
    cfg = write_config(d / "interrupted.json", resume_config(base, train, val, out))
    proc = subprocess.Popen([anvil_binary(), "lora", "--config", cfg], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(lambda: os.path.exists(out / "metrics.jsonl") and len(train_losses(out)[0]) >= 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = checkpoint_step(out)
    assert step is not None and step < RESUME_STEPS
    assert f"saved a checkpoint at step {step}" in err and "--resume" in err
    check_ok(run_cli("lora", "--config", cfg, "--resume"))
    assert train_losses(out) == (full_losses, full_val)


# A kill at every stage of a checkpoint's rotation (tmp written, .old removed, checkpoint/ moved to .old,
# tmp renamed, .old removed; and halfway through tmp) leaves a checkpoint that --resume finds, and the
# resumed run ends bit-exact the uninterrupted one. The crash comes from the test hook
# ANVIL_TEST_CHECKPOINT_CRASH="<save>:<stage>" (csrc/train/checkpoint.cpp), exit status 86. At 878962f a
# kill between removing .old and renaming tmp after a resume from .old left no checkpoint at all.
ROTATION_STEPS = 12


@pytest.fixture(scope="module")
def rotation(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("rotation")
    train = write_jsonl(d / "train.jsonl", full_row_examples(10, 16, seed=6))
    cfg = lambda out: lora_config(base, train, out, train={"steps": ROTATION_STEPS, "batch_size": 2, "grad_accum": 1},
                                  output={"save_every": 2, "plot": False})
    out = d / "full"
    check_ok(run_cli("lora", "--config", write_config(d / "full.json", cfg(out))))
    return d, cfg, train_losses(out)[0]


def run_with_crash(cfg_path, spec, *extra):
    return subprocess.run([anvil_binary(), "lora", "--config", cfg_path, *extra], capture_output=True, text=True,
                          timeout=300, env=dict(ENV, ANVIL_TEST_CHECKPOINT_CRASH=spec))


@pytest.mark.parametrize("stage", range(6))
def test_kill_at_every_stage_of_the_checkpoint_rotation_resumes(rotation, stage):
    d, cfg, full = rotation
    out = d / f"crash{stage}"
    path = write_config(d / f"crash{stage}.json", cfg(out))
    r = run_with_crash(path, f"3:{stage}")  # the third save: a checkpoint/ and its rotation exist
    assert r.returncode == 86, r.stderr
    # Resume and crash again in the same stage of the resumed run's second save: the rotation must also
    # hold when the run came back from checkpoint.old/ or checkpoint.tmp/.
    r = run_with_crash(path, f"2:{stage}", "--resume")
    assert r.returncode == 86, r.stderr
    assert "resuming from" in r.stderr, r.stderr
    check_ok(run_cli("lora", "--config", path, "--resume"))
    assert train_losses(out)[0] == full
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.replace('"tokens"', '"tokenz"'), ["state.json", "lacks the key \"tokens\""]),
    (lambda s: s[: len(s) // 2], ["state.json", "is not valid JSON"]),
    (lambda s: s.replace('"config"', '"konfig"'), ["state.json", "lacks the key \"config\""]),
    (lambda s: s.replace('"train": {', '"trains": {'), ["train.batch_size", "checkpoint was made with null"]),
], ids=["missing-key", "torn", "no-config", "no-train-section"])
def test_damaged_state_json_names_the_file(rotation, edit, words, request):
    """At 878962f a missing key was undefined behaviour (operator[] on a const json) and bad JSON gave a
    message without the file's name."""
    d, cfg, _ = rotation
    out = d / ("damaged-" + request.node.callspec.id)
    path = write_config(d / f"{out.name}.json", cfg(out))
    check_ok(run_cli("lora", "--config", path, "--train.steps=2"))
    state = out / "checkpoint" / "state.json"
    state.write_text(edit(state.read_text()))
    r = run_cli("lora", "--config", path, "--resume")
    assert r.returncode == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    assert "Segmentation" not in r.stderr and "terminate" not in r.stderr, r.stderr


# ---- (e), (f), (g): failures and the informational modes ---------------------------------------------

@pytest.fixture(scope="module")
def small(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    train = write_jsonl(d / "train.jsonl", full_row_examples(8, 16, seed=2))
    return d, train


def test_nonfinite_loss_stops_with_a_message(base, small):
    d, train = small
    cfg = lora_config(base, train, d / "nan", train={"lr": 1e30, "max_grad_norm": 0.0, "steps": 20, "warmup_steps": 0,
                                                      "schedule": "constant"},
                      output={"save_every": 1})
    r = run_cli("lora", "--config", write_config(d / "nan.json", cfg))
    assert r.returncode == 1, r.stderr
    assert "the loss is" in r.stderr and "at step" in r.stderr, r.stderr
    # The first update already gives weights ~1e30, so no checkpoint holds weights that gave a finite loss
    # (at 878962f the step-1 checkpoint was named "last good" and resumed to NaN).
    assert "No checkpoint was saved yet" in r.stderr, r.stderr


def test_the_named_last_good_checkpoint_resumes_finite(base, small):
    """lr 1e30 after one step of warm-up (lr 0 at step 0): the step-1 weights are the initial ones, the
    step-2 update explodes. The failure must name the step-1 checkpoint, and resuming it with a sane lr
    must train to finite losses."""
    d, train = small
    out = d / "explode"
    cfg = lora_config(base, train, out, train={"lr": 1e30, "max_grad_norm": 0.0, "steps": 8, "warmup_steps": 1,
                                                "schedule": "constant"},
                      output={"save_every": 1, "plot": False})
    path = write_config(d / "explode.json", cfg)
    r = run_cli("lora", "--config", path)
    assert r.returncode == 1, r.stderr
    assert "last good checkpoint" in r.stderr and "(step 1," in r.stderr, r.stderr
    assert checkpoint_step(out) == 1
    r = run_cli("lora", "--config", path, "--resume", "--train.lr=1e-3")
    check_ok(r)
    losses = [l for _, l in train_losses(out)[0]]
    assert len(losses) == 8 and all(math.isfinite(l) for l in losses), losses


def test_skip_nonfinite_steps(base, small):
    """ANVIL_TEST_NONFINITE_STEPS (a test hook of csrc/train/trainer.cpp) makes the loss of steps 3 and 4
    NaN: without train.skip_nonfinite_steps the run stops there naming the last good checkpoint; with it
    the two steps make no update and the run finishes, its logged losses finite; nine in a row stop it."""
    d, train = small
    env = dict(ENV, ANVIL_TEST_NONFINITE_STEPS="3,4")
    def run(name, *extra, env=env):
        cfg = lora_config(base, train, d / name, train={"steps": 6}, output={"save_every": 1, "plot": False})
        return subprocess.run([anvil_binary(), "lora", "--config", write_config(d / f"{name}.json", cfg), *extra],
                              capture_output=True, text=True, timeout=300, env=env)
    r = run("poison-stop")
    assert r.returncode == 1 and "last good checkpoint" in r.stderr and "(step 1," in r.stderr, r.stderr
    r = run("poison-skip", "--train.skip_nonfinite_steps=true")
    check_ok(r)
    assert "step 3: loss nan" in r.stderr and "skipped" in r.stderr and "2 in a row" in r.stderr, r.stderr
    lines = [json.loads(line) for line in open(d / "poison-skip" / "metrics.jsonl")]
    steps = [m for m in lines if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 5, 6]  # the skipped steps log no loss of their own
    assert all(math.isfinite(m["loss"]) for m in steps) and steps[-1]["skipped_steps"] == 2
    r = run("poison-many", "--train.skip_nonfinite_steps=true", "--train.steps=12",
            env=dict(ENV, ANVIL_TEST_NONFINITE_STEPS=",".join(str(i) for i in range(2, 12))))
    assert r.returncode == 1 and "8 steps in a row" in r.stderr, r.stderr


@pytest.mark.parametrize("override, words", [
    ("--train.learning_rate=1", ["train.learning_rate", "lr", "batch_size"]),
    ("--train.schedule=cos", ["train.schedule", "\"cosine\", \"linear\", \"constant\""]),
    ("--lora.r=0", ["lora.r", ">= 1"]),
    ("--data.validation_fraction=2", ["data.validation_fraction", "[0, 1)"]),
    ("--optimizer.lr=1", ["unknown section 'optimizer'"]),
    ("--model.dtype=int8", ["model.dtype", "\"bfloat16\", \"float32\", \"float16\""]),
])
def test_bad_config_names_the_key(base, small, override, words):
    d, train = small
    cfg = write_config(d / "bad.json", lora_config(base, train, d / "bad"))
    r = run_cli("lora", "--config", cfg, override, "--print-config")
    assert r.returncode == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.parametrize("row, words", [
    ({"input_ids": [5, 4294967297, 6]}, ["train.jsonl:2", "\"input_ids\"[1]", "below 2^31", "4294967297"]),
    ({"input_ids": [5, VOCAB, 6]}, ["train.jsonl:2", "\"input_ids\"[1] = 101", "vocabulary of 101 ids"]),
    ({"input_ids": [5, -1]}, ["train.jsonl:2", "\"input_ids\"[1]"]),
], ids=["over-wide", "past-the-vocabulary", "negative"])
def test_bad_token_ids_name_the_line_and_the_vocabulary(base, tmp_path, row, words):
    """At 878962f 4294967297 trained as token 1 and an id past the vocabulary failed later as a bare
    "index out of range in self" ([hardening] item 5)."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"input_ids": [3, 4, 5]}, row])
    r = run_cli("lora", "--config", write_config(tmp_path / "c.json", lora_config(base, train, tmp_path / "out")))
    assert r.returncode == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def test_a_rank_that_cannot_fit_the_host_is_a_config_error(base, small):
    """At 878962f lora.r = 1e9 ended in a c10 FATAL from the CPU allocator, exit 134 ([hardening] item 3)."""
    d, train = small
    r = run_cli("lora", "--config", write_config(d / "huge.json", lora_config(base, train, d / "huge")),
                "--lora.r=1000000000")
    assert r.returncode == 1, r.stderr
    assert "lora.r" in r.stderr and "host memory" in r.stderr and "lower lora.r" in r.stderr, r.stderr


def test_an_override_that_is_not_utf8_is_named(base, small):
    """Found by tests/fuzz/fuzz_config.cpp: command-line bytes that are not UTF-8 reached the config, and the
    first message or config.json that showed them threw a JSON type error instead of naming the key."""
    d, train = small
    cfg = write_config(d / "utf8.json", lora_config(base, train, d / "utf8"))
    r = subprocess.run([anvil_binary().encode(), b"lora", b"--config", cfg.encode(), b"--train.lr=1e\xff-3"],
                       capture_output=True, timeout=300, env=ENV)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode != 0 and "train.lr" in err and "not valid UTF-8" in err, err


def test_print_config_and_dry_run(base, small):
    d, train = small
    cfg = write_config(d / "print.json", lora_config(base, train, d / "print"))
    r = run_cli("lora", "--config", cfg, "--train.lr=3e-4", "--lora.targets", "[\"q_proj\"]", "--print-config")
    check_ok(r)
    resolved = json.loads(r.stdout)
    assert resolved["train"]["lr"] == 3e-4
    assert resolved["lora"]["targets"] == ["q_proj"]
    assert resolved["eval"]["max_new_tokens"] == 48  # a default filled in
    r = run_cli("lora", "--config", cfg, "--dry-run")
    check_ok(r)
    for w in ["memory estimate", "weights", "adapters", "AdamW state", "activations with grad_checkpointing",
              "loss chunk", "total"]:
        assert w in r.stdout, r.stdout
    assert not os.path.exists(d / "print")  # nothing written



def test_dry_run_of_a_7b_random_init_plans_on_meta(tmp_path):
    """`anvil train --dry-run` of a Llama-2-7B shape (init random, bf16) builds nothing: it finishes in seconds on
    this 24 GiB machine, and the plan's weights are the parameters transformers counts for that config."""
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    config = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    config.save_pretrained(cfg_dir)
    with torch.device("meta"):
        numel = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    train = write_jsonl(tmp_path / "train.jsonl", [{"input_ids": list(range(3, 40))}] * 4)
    cfg = {
        "model": {"init": "random", "config": str(cfg_dir / "config.json"), "dtype": "bfloat16", "device": "cpu"},
        "data": {"train": train, "seq_len": 4096},
        "train": {"batch_size": 8, "steps": 10, "grad_checkpointing": True},
        "output": {"dir": str(tmp_path / "out")},
    }
    start = time.monotonic()
    r = run_cli("train", "--config", write_config(tmp_path / "7b.json", cfg), "--dry-run")
    check_ok(r)
    assert time.monotonic() - start < 60, "a dry run must not build the weights"
    weights = next(l for l in r.stdout.splitlines() if l.strip().startswith("weights")).split()
    assert float(weights[1]) == pytest.approx(numel * 2 / 2**30, abs=0.001) and weights[2] == "GiB", r.stdout
    assert f"{numel} trainable parameters" in r.stdout, r.stdout
    assert "per rank under torchrun" in r.stdout and not os.path.exists(tmp_path / "out")

# ---- (h) full training ----------------------------------------------------------------------------------

def test_full_training_random_init_learns_and_loads_in_transformers(tmp_path):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    transformers.LlamaConfig(**TINY).save_pretrained(cfg_dir)
    # A learnable corpus: arithmetic progressions mod the vocabulary.
    examples = [{"input_ids": [3 + (s + k * step) % (VOCAB - 3) for k in range(16)]}
                for s in range(12) for step in (1, 2)]
    train = write_jsonl(tmp_path / "train.jsonl", examples)
    out = tmp_path / "full"
    cfg = {
        "model": {"init": "random", "config": str(cfg_dir / "config.json"), "dtype": "float32", "device": "cpu"},
        "data": {"train": train, "seq_len": 16, "validation_fraction": 0.25},
        "train": {"batch_size": 4, "steps": 40, "lr": 1e-2, "schedule": "linear", "warmup_steps": 2, "seed": 1},
        "output": {"dir": str(out), "log_every": 1},
    }
    check_ok(run_cli("train", "--config", write_config(tmp_path / "train.json", cfg)))
    losses, val = train_losses(out)
    assert len(losses) == 40 and len(val) == 1
    assert sum(l for _, l in losses[-5:]) / 5 < 0.7 * losses[0][1], losses
    assert losses[0][1] == pytest.approx(math.log(VOCAB), rel=0.05)  # a fresh init predicts ~uniformly
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
    ids = torch.tensor([examples[0]["input_ids"]])
    ours = _C.CausalLM(str(out / "model"))
    _C.set_training(ours, False)
    with torch.no_grad():
        ref = hf(ids).logits
    got = ours.logits(ids)
    assert (got - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_recipe_fixture(tmp_path):
    """A few steps of `anvil train` on a fixed config and data: the losses recorded in the fixture.
    Regenerate with ANVIL_UPDATE_FIXTURES=1 after a deliberate change of the numerics."""
    fixture_path = os.path.join(DATA_DIR, "recipe_fixture.json")
    cfg_path = os.path.join(DATA_DIR, "tiny_llama_config.json")
    examples = [{"input_ids": [3 + (7 * i + 3 * j) % 60 for j in range(12)]} for i in range(16)]
    train = write_jsonl(tmp_path / "train.jsonl", examples)
    cfg = {
        "model": {"init": "random", "config": cfg_path, "dtype": "float32", "device": "cpu"},
        "data": {"train": train, "seq_len": 24},
        "train": {"batch_size": 2, "grad_accum": 2, "steps": 5, "lr": 3e-3, "warmup_steps": 1, "seed": 7},
        "output": {"dir": str(tmp_path / "run"), "plot": False},
    }
    check_ok(run_cli("train", "--config", write_config(tmp_path / "cfg.json", cfg)))
    losses = [l for _, l in train_losses(tmp_path / "run")[0]]
    if os.environ.get("ANVIL_UPDATE_FIXTURES"):
        with open(fixture_path, "w") as f:
            json.dump({"losses": losses}, f, indent=2)
    with open(fixture_path) as f:
        expected = json.load(f)["losses"]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_full_training_bf16_mixed_precision_keeps_fp32_master_weights(tmp_path):
    """train.mixed_precision = bf16 (CPU autocast here, CUDA on a GPU) with gradient checkpointing:
    the first loss is the fp32 run's within bf16 rounding, the loss falls, the checkpoint's master
    weights are fp32 and model/ is written in model.dtype."""
    from safetensors import safe_open
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    transformers.LlamaConfig(**TINY).save_pretrained(cfg_dir)
    examples = [{"input_ids": [3 + (s + k * step) % (VOCAB - 3) for k in range(16)]}
                for s in range(12) for step in (1, 2)]
    train = write_jsonl(tmp_path / "train.jsonl", examples)

    def run(name, **train_keys):
        cfg = {
            "model": {"init": "random", "config": str(cfg_dir / "config.json"), "dtype": "bfloat16", "device": "cpu"},
            "data": {"train": train, "seq_len": 16},
            "train": {"batch_size": 4, "steps": 20, "lr": 1e-2, "schedule": "constant", "seed": 1, **train_keys},
            "output": {"dir": str(tmp_path / name), "plot": False},
        }
        check_ok(run_cli("train", "--config", write_config(tmp_path / f"{name}.json", cfg)))
        return [l for _, l in train_losses(tmp_path / name)[0]]

    mixed = run("mixed", mixed_precision="bf16", grad_checkpointing=True)
    full32 = run("fp32", mixed_precision="none")  # model.dtype bfloat16 without autocast: bf16 weights
    assert mixed[0] == pytest.approx(full32[0], rel=2e-2)
    assert sum(mixed[-3:]) / 3 < 0.8 * mixed[0], mixed
    with safe_open(str(tmp_path / "mixed" / "checkpoint" / "trainable.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())
    with safe_open(str(tmp_path / "mixed" / "model" / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
