"""anvil/data/dataset.h against the Python tokenizers: JSONL examples tokenized as transformers would
(text, prompt/completion, chat messages through the model's template), the targets that a completion-only
loss keeps, packing with per-example positions and document ids, and the seeded shuffle."""
import json
import os

import pytest
from transformers import AutoTokenizer

import anvil

C = anvil._C
TOK_DIR = os.path.join(os.path.dirname(__file__), "..", "data", "tokenizers", "qwen2")


@pytest.fixture(scope="module")
def toks():
    return C.Tokenizer.load(TOK_DIR), AutoTokenizer.from_pretrained(TOK_DIR)


def test_text_example_is_every_token_plus_eos(toks):
    ours, hf = toks
    text = "Plain text, 中文 and emoji 🎉."
    ids, target = C.tokenize_example(json.dumps({"text": text}), ours)
    assert ids == hf(text).input_ids + [hf.eos_token_id]
    assert target == [1] * len(ids)


def test_prompt_completion_targets_only_the_completion(toks):
    ours, hf = toks
    line = json.dumps({"prompt": "Q: two plus two?\nA:", "completion": " four"})
    ids, target = C.tokenize_example(line, ours, completion_only=True)
    p = hf("Q: two plus two?\nA:").input_ids
    c = hf(" four", add_special_tokens=False).input_ids
    assert ids == p + c + [hf.eos_token_id]
    assert target == [0] * len(p) + [1] * (len(c) + 1)
    _, all_targets = C.tokenize_example(line, ours, completion_only=False)
    assert all_targets == [1] * len(ids)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "Seven."}, {"role": "user", "content": "Another?"},
            {"role": "assistant", "content": "Eleven."}]


def test_chat_example_is_the_rendered_conversation_and_targets_the_replies():
    tok = C.Tokenizer.load(os.path.join(os.path.dirname(TOK_DIR), "llama3"))  # a prefix-stable format
    ids, target = C.tokenize_example(json.dumps({"messages": MESSAGES}), tok, completion_only=True)
    assert ids == tok.encode(tok.render_chat(MESSAGES, add_generation_prompt=False), add_special_tokens=False)
    kept = [i for i, t in zip(ids, target) if t]
    assert tok.decode(kept) == "Seven.<|eot_id|>Eleven.<|eot_id|>"
    _, all_targets = C.tokenize_example(json.dumps({"messages": MESSAGES}), tok, completion_only=False)
    assert all(all_targets)


def test_chat_single_turn_equals_transformers_and_rewriting_formats_are_refused(toks):
    ours, hf = toks  # this fixture's template is Qwen3's, which drops <think> from earlier assistant turns
    one = MESSAGES[:3]
    ids, target = C.tokenize_example(json.dumps({"messages": one}), ours, completion_only=True)
    want = hf.apply_chat_template(one, tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert hf.decode([i for i, t in zip(ids, target) if t]) == "<think>\n\n</think>\n\nSeven.<|im_end|>\n"
    with pytest.raises(RuntimeError, match=r"messages\[3\].*rewrites earlier turns"):
        C.tokenize_example(json.dumps({"messages": MESSAGES}), ours, completion_only=True)
    # with every token a target there is nothing to cut: the whole rendering, as transformers has it
    ids, target = C.tokenize_example(json.dumps({"messages": MESSAGES}), ours, completion_only=False)
    want = hf.apply_chat_template(MESSAGES, tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want) and all(target)


def test_packing_keeps_examples_whole_and_apart():
    a = ([1, 2, 3], [1, 1, 1])
    b = ([4, 5], [0, 1])
    c = ([6, 7, 8, 9], [1, 1, 1, 1])
    p = C.pack_examples([a, b, c], 6, 0)
    assert p["rows"] == 2
    assert p["ids"] == [1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 0, 0]
    assert p["positions"] == [0, 1, 2, 0, 1, 0, 0, 1, 2, 3, 0, 0]
    assert p["doc_ids"] == [0, 0, 0, 1, 1, -1, 0, 0, 0, 0, -1, -1]
    # the next token, only inside an example and only where it is a target (b's 5 is, its 4 is not)
    assert p["labels"] == [2, 3, -100, 5, -100, -100, 7, 8, 9, -100, -100, -100]
    long = C.pack_examples([(list(range(1, 11)), [1] * 10)], 4, 0)
    assert long["rows"] == 1 and long["ids"] == [1, 2, 3, 4]  # cut to the row
    with pytest.raises(ValueError, match="row_length"):
        C.pack_examples([a], 1, 0)


def test_shuffle_is_a_seeded_permutation():
    o = C.shuffled_order(1000, 7)
    assert sorted(o) == list(range(1000))
    assert o == C.shuffled_order(1000, 7) and o != C.shuffled_order(1000, 8) and o != list(range(1000))
    assert C.shuffled_order(0, 1) == [] and C.shuffled_order(1, 1) == [0]


@pytest.mark.parametrize("line, message", [
    ('{"oops": 1}', "needs"),
    ("not json", "not valid JSON"),
    ('{"text": 3}', '"text" must be a string'),
    ('{"messages": []}', "non-empty"),
    ('{"messages": [{"role": "user"}]}', r"messages\[0\]"),
])
def test_bad_lines_name_the_rule(toks, line, message):
    with pytest.raises(RuntimeError, match=message):
        C.tokenize_example(line, toks[0])
