"""Offline distillation from the teacher's top-k cache (anvil/train/teacher_cache.h, docs/FORMATS.md "Teacher cache").

(a) The sparse-teacher loss: with k = V it is the dense loss; for k < V it is the divergence of the coarse
    k + 1 outcome distributions (the top-k ids plus an "other" bucket, DistillKit's SYMMETRIC_UNIFORM handling,
    its forward KL written as distillkit/lossfuncs/kl.py sparse_kl_div_inner does), written here in torch;
    gradients pass torch.autograd.gradcheck in float64.
(b) End to end on the CLI: a run from the cache with k = V gives the online run's losses and validation
    measures; a writer killed mid-cache resumes to a bit-identical cache; a cache from another teacher or
    data, or a corrupted shard, is a clear error naming what differs or the file.
"""
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch

import anvil
from hf_models import randomize
from test_distill import VOCAB, TINY, distill_config, metrics, token_examples, write_jsonl
from test_train import ENV, anvil_binary, check_ok, run_cli, wait_for, write_config

_C = anvil._C
transformers = pytest.importorskip("transformers")

LOSSES = ["forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv"]


# ---- (a) the loss -----------------------------------------------------------------------------------

def kl(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def coarse_reference(student_logprobs, ids, teacher_logprobs, loss, lam=0.1, beta=0.5):
    """The divergence between the k + 1 outcome distributions, from probabilities (no log-space tricks)."""
    q, pk = student_logprobs.exp(), teacher_logprobs.exp()
    qk = q.gather(1, ids)
    if ids.shape[1] < q.shape[1]:
        p = torch.cat([pk, (1 - pk.sum(1, keepdim=True)).clamp_min(1e-30)], 1)
        q = torch.cat([qk, 1 - qk.sum(1, keepdim=True)], 1)
    else:
        p, q = pk, qk
    p = p / p.sum(1, keepdim=True)
    if loss == "forward_kl":
        return kl(p, q)
    if loss == "reverse_kl":
        return kl(q, p)
    if loss == "skew_forward_kl":
        return kl(p, lam * p + (1 - lam) * q)
    if loss == "skew_reverse_kl":
        return kl(q, (1 - lam) * p + lam * q)
    if loss == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    return 0.5 * (p - q).abs().sum(-1)


def distillkit_symmetric_uniform_forward_kl(student_logprobs, ids, teacher_logprobs):
    """DistillKit's sparse forward KL with missing = SYMMETRIC_UNIFORM, per row, as its sparse_kl_div_inner
    computes it (kl.py): the top-k terms plus the missing mass term, the student's log-probs over the full
    vocabulary gathered at the ids."""
    s = student_logprobs.gather(1, ids)
    p = teacher_logprobs.exp()
    inner = (p * (teacher_logprobs - s)).sum(-1)
    log_tm = torch.log1p(-p.sum(-1).clamp(max=1 - 1e-12))
    log_sm = torch.log1p(-s.exp().sum(-1).clamp(max=1 - 1e-12))
    return inner + log_tm.exp() * (log_tm - log_sm)


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(7, 23, dtype=torch.float64, generator=g) * 2
    zt = torch.randn(7, 23, dtype=torch.float64, generator=g) * 2
    return zs, zt


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_equals_dense_at_k_equals_v_and_the_coarse_formula_below(rows, loss):
    zs, zt = rows
    ls, lt = torch.log_softmax(zs, 1), torch.log_softmax(zt, 1)
    vals, ids = lt.topk(lt.shape[1], 1)
    dense = _C.kd_divergence_from_logits(zs, zt, loss=loss, skew_lambda=0.3, jsd_beta=0.4)
    full = _C.kd_divergence_sparse(ls, ids, vals, loss=loss, skew_lambda=0.3, jsd_beta=0.4)
    torch.testing.assert_close(full, dense, rtol=1e-12, atol=1e-12)
    for k in (1, 5, 22):
        vals, ids = lt.topk(k, 1)
        got = _C.kd_divergence_sparse(ls, ids, vals, loss=loss, skew_lambda=0.3, jsd_beta=0.4)
        torch.testing.assert_close(got, coarse_reference(ls, ids, vals, loss, 0.3, 0.4), rtol=1e-10, atol=1e-12)
        assert (got <= dense + 1e-12).all()  # coarsening never increases the divergence


def test_forward_kl_is_distillkits_symmetric_uniform(rows):
    zs, zt = rows
    ls, lt = torch.log_softmax(zs, 1), torch.log_softmax(zt, 1)
    for k in (2, 9):
        vals, ids = lt.topk(k, 1)
        torch.testing.assert_close(_C.kd_divergence_sparse(ls, ids, vals, loss="forward_kl"),
                                   distillkit_symmetric_uniform_forward_kl(ls, ids, vals), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("k", [3, 9])
def test_sparse_chunked_loss_gradcheck_float64(loss, k):
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    lt = torch.log_softmax(torch.randn(6, 9, dtype=torch.float64, generator=g) / 1.5, 1)
    vals, ids = lt.topk(k, 1)
    fn = lambda h, w: _C.kd_loss_sparse(h, w, ids, vals, 3.0, loss=loss, temperature=1.5, skew_lambda=0.2,
                                        jsd_beta=0.4, chunk=4)
    if loss == "tv":
        assert torch.autograd.gradcheck(fn, (hs, ws), eps=1e-7, atol=1e-5)
    else:
        assert torch.autograd.gradcheck(fn, (hs, ws))


# ---- (b) the recipe -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    teacher = str(d / "teacher")
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=11)
    m.save_pretrained(teacher)
    train = write_jsonl(d / "train.jsonl", token_examples(40, 1))
    val = write_jsonl(d / "val.jsonl", token_examples(8, 2))
    return d, teacher, train, val


def offline(cache, **teacher):
    return dict(cache=str(cache), cache_k=VOCAB, cache_dtype="float32", **teacher)


def test_offline_with_k_equal_to_the_vocabulary_gives_the_online_losses(setup):
    d, teacher, train, val = setup
    online = distill_config(teacher, train, val, d / "online")
    check_ok(run_cli("distill", "--config", write_config(d / "online.json", online)))
    cfg = distill_config(teacher, train, val, d / "offline")
    cfg["teacher"].update(offline(d / "cache_full", cache_shard_tokens=96))
    result = run_cli("distill", "--config", write_config(d / "offline.json", cfg))
    check_ok(result)
    assert "bytes/token" in result.stderr and "tokens/s" in result.stderr
    assert "teacher: offline" in result.stderr
    a, b = metrics(d / "online"), metrics(d / "offline")
    assert len(a) == len(b)
    keys = ("loss", "kd", "ce", "grad_norm", "val_loss", "val_kl", "val_top1")
    compared = 0
    for x, y in zip(a, b):
        assert x.get("step") == y.get("step")
        for key in keys:
            if key in x:
                # float32 teacher rows computed in other batch shapes (the writer packs documents in file order,
                # training in each epoch's shuffled order): ~1e-7 relative, grown over 12 Adam steps.
                assert y[key] == pytest.approx(x[key], rel=2e-4, abs=2e-6), (key, x, y)
                compared += 1
    assert compared > 50
    # A second run finds the cache complete and writes nothing.
    again = run_cli("distill", "--config", write_config(d / "offline2.json", dict(cfg, output=dict(cfg["output"], dir=str(d / "offline2")))))
    check_ok(again)
    assert not any(l.startswith("teacher cache") and ": wrote" in l for l in again.stderr.splitlines())
    assert "complete, " in again.stderr


def cache_files(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path)) if not n.startswith(".")}


def test_killed_cache_writer_resumes_to_a_bit_identical_cache(setup):
    d, teacher, train, val = setup
    whole, killed = d / "cache_whole", d / "cache_killed"
    many = write_jsonl(d / "many.jsonl", token_examples(400, 3))  # ~150 one-row shards: time to interrupt
    cfg = distill_config(teacher, many, val, d / "unused")
    cfg["teacher"].update(offline(whole, cache_shard_tokens=32, cache_only=True))
    check_ok(run_cli("distill", "--config", write_config(d / "whole.json", cfg)))
    manifest = json.load(open(whole / "manifest.json"))
    assert len(manifest["shards"]) >= 4 and all(s["complete"] for s in manifest["shards"])
    cfg["teacher"]["cache"] = str(killed)
    path = write_config(d / "killed.json", cfg)
    proc = subprocess.Popen([anvil_binary(), "distill", "--config", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)

    def some_written():
        try:
            return sum(s["complete"] for s in json.load(open(killed / "manifest.json"))["shards"]) >= 1
        except (OSError, ValueError):
            return False

    wait_for(some_written, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sum(s["complete"] for s in json.load(open(killed / "manifest.json"))["shards"])
    assert 1 <= done < len(manifest["shards"]), "the kill came after the last shard: no resume was tested"
    result = run_cli("distill", "--config", path)
    check_ok(result)
    assert f"({done} complete already)" in result.stderr
    assert cache_files(killed) == cache_files(whole)


def test_another_teacher_or_data_or_k_and_corrupted_shards_are_clear_errors(setup):
    d, teacher, train, val = setup
    cache = d / "cache_checks"
    cfg = distill_config(teacher, train, val, d / "checks")
    cfg["teacher"].update(offline(cache, cache_shard_tokens=64, cache_only=True))
    check_ok(run_cli("distill", "--config", write_config(d / "checks.json", cfg)))

    def error_of(c):
        r = run_cli("distill", "--config", write_config(d / "bad.json", c))
        assert r.returncode != 0
        return r.stderr

    # Another teacher: the same shapes, other weights.
    other = str(d / "teacher2")
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=12)
    m.save_pretrained(other)
    c = json.loads(json.dumps(cfg))
    c["teacher"]["path"] = other
    e = error_of(c)
    assert "teacher.cache" in e and str(cache) in e and "another teacher" in e and "teacher.safetensors" in e
    # Other data.
    c = json.loads(json.dumps(cfg))
    c["data"]["train"] = write_jsonl(d / "train2.jsonl", token_examples(40, 7))
    e = error_of(c)
    assert "another data" in e and "data.train" in e
    c = json.loads(json.dumps(cfg))
    c["data"]["seq_len"] = 48
    assert "data.seq_len" in error_of(c)
    # Another k.
    c = json.loads(json.dumps(cfg))
    c["teacher"]["cache_k"] = 7
    assert "teacher.cache_k" in error_of(c)
    # A truncated shard, then a flipped byte.
    shard = cache / "shard-00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-5])
    e = error_of(cfg)
    assert str(shard) in e and "truncated" in e
    shard.write_bytes(good[:40] + bytes([good[40] ^ 1]) + good[41:])
    e = error_of(cfg)
    assert str(shard) in e and "checksum mismatch" in e
    shard.write_bytes(good)
    check_ok(run_cli("distill", "--config", write_config(d / "checks.json", cfg)))
    # cache_only needs a cache; a bad storage dtype names its key.
    c = json.loads(json.dumps(cfg))
    c["teacher"]["cache"] = ""
    assert "teacher.cache_only" in error_of(c)
    c = json.loads(json.dumps(cfg))
    c["teacher"]["cache_dtype"] = "int8"
    assert "teacher.cache_dtype" in error_of(c)


# ---- (c) on-policy rounds: the student's rollouts scored by a separate teacher pass ----------------------

def onpolicy_config(setup, out, cache, data=None, **on_policy):
    d, teacher, train, val = setup
    cfg = distill_config(teacher, data or train, val, out)
    cfg["teacher"].update(cache=str(cache), cache_k=8, cache_dtype="float32", cache_shard_tokens=64)
    cfg["on_policy"] = dict({"lambda": 0.5, "max_new_tokens": 6, "temperature": 0.9}, **on_policy)
    return cfg


def load_st(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def greedy(model_dir, prompt, n):
    """Greedy continuation by argmax of the last logits, n tokens, no stop token (the data has no tokenizer)."""
    m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def test_refresh_writes_the_students_rollouts_and_the_teacher_pass_scores_them(setup):
    d, teacher, train, val = setup
    cache = d / "cache_onpolicy"
    cfg = onpolicy_config(setup, d / "op_first", cache)
    path = write_config(d / "op.json", cfg)
    check_ok(run_cli("distill", "--config", path, "--teacher.cache_only=true"))
    first = run_cli("distill", "--config", path)  # no round yet: the teacher's rows only
    check_ok(first)
    assert "holds no round yet" in first.stderr
    student = str(d / "op_first" / "model")

    # Round 1: the trained student's folder, greedy, so that its tokens have an oracle.
    r = run_cli("distill", "--config", path, f"--on_policy.refresh_from={student}", "--on_policy.temperature=0")
    check_ok(r)
    assert "on-policy refresh: round 1" in r.stderr and "teacher.cache_only" in r.stderr, r.stderr
    early = run_cli("distill", "--config", write_config(d / "op_early.json", onpolicy_config(setup, d / "op_early", cache)))
    assert early.returncode != 0 and "awaits the teacher" in early.stderr and "teacher.cache_only=true" in early.stderr
    scored = run_cli("distill", "--config", path, "--teacher.cache_only=true")
    check_ok(scored)
    manifest = json.load(open(cache / "manifest.json"))
    (round1,) = manifest["rounds"]
    assert round1["student"]["kind"] == "model" and os.path.realpath(round1["student"]["source"]) == os.path.realpath(student)
    assert 5 < round1["documents"] < 35, round1  # lambda 0.5 of 40 documents
    hf_teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    examples = [e["input_ids"] for e in token_examples(40, 1)]
    docs = 0
    for shard in round1["shards"]:
        ro, sc = load_st(cache / shard["rollout"]["file"]), load_st(cache / shard["scores"]["file"])
        assert torch.equal(ro["keys"], sc["keys"])
        for i in range(len(ro["keys"])):
            p = ro["prompts"][ro["prompt_offsets"][i]:ro["prompt_offsets"][i + 1]].tolist()
            c = ro["completions"][ro["completion_offsets"][i]:ro["completion_offsets"][i + 1]].tolist()
            # The prompt of a document whose every token is a target: its first half (data::document_prompts).
            assert any(p == e[:max(1, len(e) // 2)] for e in examples)
            assert c == greedy(student, p, 6)
            # The score shard: the teacher's top-8 log-probs over the generated tokens, as a direct forward gives.
            with torch.no_grad():
                z = hf_teacher(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) + len(c) - 1]
            full = torch.log_softmax(z.float(), -1)  # (len(c), V)
            rows = slice(int(sc["offsets"][i]), int(sc["offsets"][i + 1]))
            # The 8 largest, in order (compared by value, so that a near-tie may order its two ids either way) ...
            torch.testing.assert_close(sc["logprobs"][rows], full.topk(8, -1).values, rtol=0, atol=2e-5)
            # ... and each stored id's log-prob is the teacher's for that id.
            torch.testing.assert_close(full.gather(1, sc["ids"][rows].long()), sc["logprobs"][rows], rtol=0, atol=2e-5)
            docs += 1
    assert docs == round1["documents"]

    # Round 2: the run's own checkpoint (sampled); a training run then reads round 2's rows beside the cache's.
    r = run_cli("distill", "--config", path, "--on_policy.refresh_from=checkpoint")
    check_ok(r)
    assert "on-policy refresh: round 2" in r.stderr, r.stderr
    again = run_cli("distill", "--config", path, "--on_policy.refresh_from=checkpoint")
    check_ok(again)
    assert "already holds this student's rollouts" in again.stderr
    check_ok(run_cli("distill", "--config", path, "--teacher.cache_only=true"))
    round2 = json.load(open(cache / "manifest.json"))["rounds"][1]
    assert round2["student"]["kind"] == "checkpoint" and round2["student"]["step"] == 12
    mixed = run_cli("distill", "--config", write_config(d / "op_mixed.json", onpolicy_config(setup, d / "op_mixed", cache)))
    check_ok(mixed)
    assert "on-policy rows: round 2" in mixed.stderr, mixed.stderr
    steps = [m for m in metrics(d / "op_mixed") if "loss" in m]
    shares = [m["on_policy"] for m in steps]
    assert all(0 <= s <= 1 for s in shares) and 0.1 < sum(shares) / len(shares) < 0.9, shares
    assert all(torch.isfinite(torch.tensor([m["loss"], m["kd"], m["ce"]])).all() for m in steps)
    val = [m["val_kl"] for m in metrics(d / "op_mixed") if "val_kl" in m]
    assert val[-1] < val[0], val
    # Without an on_policy section the rounds are not read: the same metrics as a run on the base cache.
    plain = onpolicy_config(setup, d / "op_plain", cache)
    del plain["on_policy"]
    check_ok(run_cli("distill", "--config", write_config(d / "op_plain.json", plain)))
    assert all("on_policy" not in m for m in metrics(d / "op_plain"))


def test_killed_refresh_resumes_to_the_same_round_and_another_student_is_refused(setup):
    d, teacher, train, val = setup
    many = write_jsonl(d / "many_op.jsonl", token_examples(300, 4))
    base = d / "cache_op_base"
    cfg = onpolicy_config(setup, d / "unused_op", base, data=many, **{"lambda": 1.0})
    cfg["teacher"]["cache_shard_tokens"] = 32  # one row a shard: one document a rollout shard
    check_ok(run_cli("distill", "--config", write_config(d / "opk.json", cfg), "--teacher.cache_only=true"))
    whole, killed = d / "cache_op_whole", d / "cache_op_killed"
    shutil.copytree(base, whole)
    shutil.copytree(base, killed)
    student = teacher  # any folder of the same vocabulary is a student
    cfg["teacher"]["cache"] = str(whole)
    check_ok(run_cli("distill", "--config", write_config(d / "opw.json", cfg), f"--on_policy.refresh_from={student}"))
    total = len(json.load(open(whole / "manifest.json"))["rounds"][0]["shards"])
    cfg["teacher"]["cache"] = str(killed)
    path = write_config(d / "opk2.json", cfg)
    proc = subprocess.Popen([anvil_binary(), "distill", "--config", path, f"--on_policy.refresh_from={student}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)

    def rollouts_done():
        try:
            rounds = json.load(open(killed / "manifest.json")).get("rounds", [])
            return sum(s["rollout"]["complete"] for s in rounds[0]["shards"]) if rounds else 0
        except (OSError, ValueError, KeyError):
            return 0

    wait_for(lambda: rollouts_done() >= 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = rollouts_done()
    assert 1 <= done < total, "the kill came after the last rollout shard: no resume was tested"
    # Another student (other weights) cannot finish the round: its shards would mix two students.
    other = str(d / "student_other")
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(torch.float32)
    randomize(m, seed=13)
    m.save_pretrained(other)
    r = run_cli("distill", "--config", path, f"--on_policy.refresh_from={other}")
    assert r.returncode != 0 and "config key on_policy.refresh_from" in r.stderr and "unfinished" in r.stderr, r.stderr
    r = run_cli("distill", "--config", path, f"--on_policy.refresh_from={student}", "--on_policy.temperature=0.5")
    assert r.returncode != 0 and "config key on_policy.temperature" in r.stderr, r.stderr
    # Training cannot start on the unfinished round either.
    r = run_cli("distill", "--config", path)
    assert r.returncode != 0 and "round 1 is unfinished" in r.stderr and "on_policy.refresh_from" in r.stderr, r.stderr
    r = run_cli("distill", "--config", path, f"--on_policy.refresh_from={student}")
    check_ok(r)
    assert f"({done} complete already)" in r.stderr, r.stderr
    assert cache_files(killed) == cache_files(whole)
    # Scored, then a rollout shard rewritten: training refuses it, naming the file.
    check_ok(run_cli("distill", "--config", path, "--teacher.cache_only=true"))
    shard = killed / json.load(open(killed / "manifest.json"))["rounds"][0]["shards"][0]["rollout"]["file"]
    good = shard.read_bytes()
    shard.write_bytes(good[:-9] + bytes([good[-9] ^ 1]) + good[-8:])
    r = run_cli("distill", "--config", path)
    assert r.returncode != 0 and str(shard) in r.stderr and "checksum mismatch" in r.stderr, r.stderr


def test_refresh_keys_are_checked(setup, tmp_path):
    d, teacher, train, val = setup
    cfg = onpolicy_config(setup, tmp_path / "o", tmp_path / "cache")

    def error_of(c, *args):
        r = run_cli("distill", "--config", write_config(tmp_path / "bad.json", c), *args)
        assert r.returncode != 0
        return r.stderr

    online = json.loads(json.dumps(cfg))
    online["teacher"]["cache"] = ""
    e = error_of(online, "--on_policy.refresh_from=checkpoint")
    assert "config key on_policy.refresh_from" in e and "teacher.cache" in e
    e = error_of(cfg, "--on_policy.refresh_from=checkpoint", "--teacher.cache_only=true")
    assert "config key on_policy.refresh_from" in e and "teacher.cache_only" in e
    e = error_of(cfg, f"--on_policy.refresh_from={teacher}", "--on_policy.lambda=0")
    assert "config key on_policy.lambda" in e
    e = error_of(cfg, "--on_policy.refresh_from=checkpoint")  # no run in output.dir yet
    assert "output.dir" in e or "checkpoint" in e
    e = error_of(cfg, f"--on_policy.refresh_from={tmp_path / 'nowhere'}")
    assert "config key on_policy.refresh_from" in e
    e = error_of(dict(cfg, distill=dict(cfg["distill"], mode="sequence")))
    assert "config key teacher.cache" in e and "sequence" in e
