"""`anvil generate` and `anvil eval` end to end against transformers on a tiny random Qwen2 (and Qwen2-MoE,
Qwen3-MoE) with a locally trained byte-level BPE tokenizer (tests/data/tokenizers/qwen2): the same greedy
continuation text, the same chat prompt, the same perplexity; bad options name themselves."""
import json
import os
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2MoeConfig, Qwen3MoeConfig

import anvil

TOK_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "tokenizers", "qwen2")


def anvil_binary():
    return anvil.executable()  # the build tree's bin/anvil, or the installed wheel's


def run_cli(*args):
    return subprocess.run([anvil_binary(), *args], capture_output=True, text=True)


def make_tiny(d, config_cls, **extra):
    for f in os.listdir(TOK_DIR):
        shutil.copy(os.path.join(TOK_DIR, f), d)
    tok = AutoTokenizer.from_pretrained(str(d))
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # a random model's logits are near-flat; spread them so greedy has no near-ties
        model.lm_head.weight.mul_(20)
        for name, p in model.named_parameters():  # and the routers', so that no expert choice sits on a tie
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(d))
    return str(d), model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("qwen2-tiny"), Qwen2Config)


MOE = {"qwen2_moe": (Qwen2MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=48, mlp_only_layers=[0])),
       "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          norm_topk_prob=True))}


@pytest.fixture(scope="module", params=list(MOE))
def tiny_moe(request, tmp_path_factory):
    cls, extra = MOE[request.param]
    return make_tiny(tmp_path_factory.mktemp(request.param), cls, **extra)


def hf_continuation(model, tok, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


def test_generate_equals_transformers_greedy(tiny):
    check_generate(*tiny)


def test_moe_generate_and_eval_equal_transformers(tiny_moe, tmp_path):
    check_generate(*tiny_moe)
    check_eval(*tiny_moe, tmp_path)


def check_generate(d, model, tok):
    prompt = "The quick brown fox 跳过 lazy dogs 🐕"
    out = run_cli("generate", "--model", d, "--device", "cpu", "--prompt", prompt, "-n", "12", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == hf_continuation(model, tok, tok(prompt).input_ids, 12)
    assert "new tokens/s" in out.stderr


def test_generate_chat_uses_the_models_template(tiny):
    d, model, tok = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = run_cli("generate", "--model", d, "--device", "cpu", "--chat", "--system", "Be brief.", "--prompt",
                  "Name a prime.", "-n", "8", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == hf_continuation(model, tok, list(ids), 8)


def test_eval_perplexity_equals_transformers(tiny, tmp_path):
    check_eval(*tiny, tmp_path)


def check_eval(d, model, tok, tmp_path):
    texts = ["Perplexity of a tiny model on a short line.", "第二行：中文与 emoji 🎉 混合。",
             "def f(x):\n    return x * 2\n"]
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Bye!"}]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + json.dumps({"messages": chat}) + "\n")
    out = run_cli("eval", "--model", d, "--device", "cpu", "--data", str(data), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    nll, n = 0.0, 0
    chat_ids = tok.apply_chat_template(chat, tokenize=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    with torch.no_grad():
        for seq in [tok(t).input_ids for t in texts] + [chat_ids]:
            ids = torch.tensor([seq])
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert got["tokens"] == n and got["documents"] == 4
    assert got["perplexity"] == pytest.approx(float(torch.tensor(nll / n).exp()), rel=1e-4)
    assert "eval 4/4 docs" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "x"], "--model"),
    (["generate", "--model", "{d}", "--device", "cpu", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "{d}", "--device", "cpu", "--prompt", "x", "--top-p", "0"], "--top-p"),
    (["generate", "--model", "{d}", "--device", "cpu", "--prompt", "x", "--dtype", "int8"], "--dtype"),
    (["eval", "--model", "{d}", "--device", "cpu"], "--data"),
    (["eval", "--model", "{d}", "--device", "cpu", "--data", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
])
def test_bad_options_name_themselves(tiny, args, message):
    d = tiny[0]
    out = run_cli(*[a.replace("{d}", d) for a in args])
    assert out.returncode != 0
    assert message in out.stderr


def test_eval_bad_jsonl_line_is_named(tiny, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"oops": 1}\n')
    out = run_cli("eval", "--model", tiny[0], "--device", "cpu", "--data", str(data))
    assert out.returncode != 0 and "line 2" in out.stderr
