"""The embedded demo's committed ingredients (examples/tiny/): the tokenizer reads the same in anvil,
the sentencepiece package and (tokenizer.json) transformers; anvil's JSONL reader turns every demo line into the
examples that examples/tiny/reference_train.py (with which the recipe was tuned) builds; the tiny
config gives a model that fits the 10 MB budget; and make.sh regenerates the committed files
byte for byte when the Debian packages are installed."""
import filecmp
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
import transformers

from anvil import _C

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TINY = os.path.join(ROOT, "examples", "tiny")
TOK = os.path.join(TINY, "tokenizer")
DATA = os.path.join(TINY, "data")
sys.path.insert(0, TINY)
import reference_train  # noqa: E402


def lines(name, limit=None):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        out = [line for line in f if line.strip()]
    return out[:limit] if limit else out


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=os.path.join(TOK, "tokenizer.model"))


def test_tokenizer_same_in_anvil_and_sentencepiece(sp):
    ours = _C.Tokenizer.load(TOK)
    assert ours.kind == "sentencepiece"  # tokenizer.model wins over the SentencePiece-style tokenizer.json
    assert ours.vocab_size == sp.get_piece_size() == 4096
    texts = [json.loads(line)["text"] for line in lines("general_val.jsonl", 100)]
    texts += [json.loads(line)["completion"] for line in lines("foldoc_val.jsonl", 100)]
    texts += ["Q: What is TCP/IP?\nA:", "naïve café — 東京 🐕 \t tabs  and  spaces\n\n"]
    for text in texts:
        expected = [sp.bos_id()] + sp.encode(text)
        assert ours.encode(text) == expected, text
        assert ours.decode(expected[1:]) == sp.decode(expected[1:]) == text
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, 3)


def test_tokenizer_json_for_transformers_matches_on_the_demo_data(sp):
    """transformers 5 reads tokenizer.json (it needs protobuf for tokenizer.model). Its BPE merges are
    derived from the pieces, which reproduces SentencePiece on text like the corpora; known to differ
    on runs of leading spaces ("  x"), which the demo data does not start with."""
    hf = transformers.AutoTokenizer.from_pretrained(TOK)
    rows = [json.loads(line) for line in lines("general_val.jsonl") + lines("foldoc_val.jsonl")]
    for row in rows:
        text = row.get("text") or row["prompt"] + " " + row["completion"]
        assert hf(text).input_ids == [sp.bos_id()] + sp.encode(text), text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (1, 2, 3, 0)


@pytest.mark.parametrize("name,completion_only", [("general_val.jsonl", False), ("foldoc_val.jsonl", True),
                                                  ("foldoc_train.jsonl", True)])
def test_anvil_reads_the_demo_data_as_the_reference_does(sp, name, completion_only):
    tok = _C.Tokenizer.load(TOK)
    for line in lines(name, 300):
        ids, target = _C.tokenize_example(line, tok, completion_only, True)
        ref_ids, ref_target = reference_train.tokenize(json.loads(line), sp, completion_only)
        assert ids == ref_ids and target == ref_target, line


def test_tiny_config_fits_the_budget():
    config = transformers.AutoConfig.from_pretrained(TINY)
    model = transformers.LlamaForCausalLM(config)
    saved = sum(p.numel() for p in model.parameters())  # tied lm_head: counted once, saved once
    assert saved * 4 <= 10_000_000  # float32 safetensors of the base model <= 10 MB
    assert config.vocab_size == 4096 and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)


def test_demo_data_shapes():
    for name in ("foldoc_train.jsonl", "foldoc_val.jsonl"):
        for line in lines(name):
            row = json.loads(line)
            assert set(row) == {"prompt", "completion"}
            assert row["prompt"].startswith("Q: What is ") and row["prompt"].endswith("?\nA:")
            assert row["completion"] and not row["completion"].startswith(" ")
    val_prompts = {json.loads(line)["prompt"] for line in lines("foldoc_val.jsonl")}
    train_prompts = {json.loads(line)["prompt"] for line in lines("foldoc_train.jsonl")}
    assert not val_prompts & train_prompts  # no term in both splits
    for name in ("pretrain.json", "lora.json"):
        with open(os.path.join(TINY, name)) as f:
            config = json.load(f)
        for key in ("train", "validation"):
            assert os.path.exists(os.path.join(ROOT, config["data"][key])), (name, key)


@pytest.mark.skipif(not os.path.exists("/usr/share/dictd/foldoc.index") or
                    not os.path.exists("/usr/share/games/fortunes/fortunes"),
                    reason="fortunes / dict-foldoc not installed (scripts/setup.sh installs them)")
def test_make_sh_regenerates_the_committed_files(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(TINY, "make_data.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for sub, names in (("data", sorted(os.listdir(DATA))), ("tokenizer", sorted(os.listdir(TOK)))):
        assert sorted(os.listdir(tmp_path / sub)) == names
        for name in names:
            assert filecmp.cmp(tmp_path / sub / name, os.path.join(TINY, sub, name), shallow=False), name
