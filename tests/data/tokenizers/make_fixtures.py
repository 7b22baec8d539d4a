#!/usr/bin/env python3
"""Train the small tokenizer fixtures under tests/data/tokenizers/<family>/.

Real tokenizer files cannot be downloaded here, so each family's tokenizer is trained locally with the
Python `tokenizers` / `sentencepiece` packages, using that family's published pipeline settings
(normalizer, pre-tokenizer regexes, post-processor, decoder, special and added tokens, BPE options),
on a corpus that lives in the repository (multilingual_sample.txt, corpus_cjk.txt) plus Python source
shipped by installed packages (jinja2, markupsafe: code, docstrings, licenses). Vocabularies are small
(a few thousand entries), so every file stays well under 1 MB.

The output is committed; CI does not retrain. Run again with:
    .venv/bin/python tests/data/tokenizers/make_fixtures.py          # rewrite the fixtures
    .venv/bin/python tests/data/tokenizers/make_fixtures.py --check  # exit 1 if they would change
Training is single-threaded and deterministic, so a rerun reproduces the files byte for byte with the
package versions of GENERATED_WITH (the corpus includes jinja2's and markupsafe's sources); with other
versions --check exits 3 without comparing.
"""
import argparse
import importlib.metadata
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # deterministic merges in the tokenizers trainer

import jinja2
import markupsafe
import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# The versions the committed fixtures were made with (requirements.txt pins the first two).
GENERATED_WITH = {"tokenizers": "0.23.2", "sentencepiece": "0.2.2", "jinja2": "3.1.6", "markupsafe": "3.0.4"}

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE.parent / "chat_templates"

# The pre-tokenizer regexes of each family's tokenizer.json.
GPT2_STYLE = None  # ByteLevel(use_regex=True) carries the GPT-2 pattern itself
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_V3_PATTERNS = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
     r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
]


def corpus_lines():
    """The training text: the repository's samples (CJK weighted up) plus installed packages' Python files."""
    texts = [(HERE / "multilingual_sample.txt").read_text(encoding="utf-8")]
    texts += [(HERE / "corpus_cjk.txt").read_text(encoding="utf-8")] * 4
    for package in (jinja2, markupsafe):
        root = Path(package.__file__).parent
        for path in sorted(root.glob("*.py")):
            texts.append(path.read_text(encoding="utf-8"))
    lines = []
    for t in texts:
        lines.extend(t.splitlines(keepends=True))
    return lines


def template(name):
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def train_byte_level(lines, vocab_size, normalizer, pre_tokenizer, ignore_merges=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    return tok


def write_json(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def make_gpt2(out, lines):
    """GPT-2: ByteLevel(use_regex) alone, merges stored as legacy "a b" strings, an lstrip added token."""
    tok = train_byte_level(lines, 2000, None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.add_special_tokens([AddedToken("<mask>", special=True, lstrip=True, normalized=False)])
    tok.add_tokens([AddedToken("<sep/>", special=False, rstrip=True, normalized=False)])
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]  # the older file format
    write_json(out / "tokenizer.json", data)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "model_max_length": 1024})


def make_llama3(out, lines):
    """Llama-3: Split(regex, Isolated) + ByteLevel(no regex), ignore_merges, bos by TemplateProcessing."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok = train_byte_level(lines, 3000, None, pre, ignore_merges=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|reserved_special_token_2|>", "<|eot_id|>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True, "model_max_length": 131072,
        "chat_template": template("llama3")})
    write_json(out / "generation_config.json", {
        "bos_token_id": tok.token_to_id(bos),
        "eos_token_id": [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]})


def make_qwen2(out, lines):
    """Qwen2/Qwen3: NFC, Split(regex) + ByteLevel, no bos, ChatML specials, non-special think tags."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok = train_byte_level(lines, 3000, normalizers.NFC(), pre)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
    tok.add_tokens([AddedToken(s, special=False, normalized=False)
                    for s in ["<tool_call>", "</tool_call>", "<think>", "</think>"]])
    # A normalized added token: matched after NFC, so the decomposed spelling finds it too.
    tok.add_tokens([AddedToken("caf\u00e9 au lait", special=False, normalized=True)])
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "errors": "replace", "model_max_length": 131072, "chat_template": template("qwen3")})


def make_deepseek_v3(out, lines):
    """DeepSeek-V3: empty normalizer Sequence, three Splits + ByteLevel, bos template, non-special role tokens."""
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False) for p in DEEPSEEK_V3_PATTERNS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok = train_byte_level(lines, 3000, normalizers.Sequence([]), pre)
    bos, eos = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in [bos, eos, "<\uff5c\u2581pad\u2581\uff5c>"]])
    tok.add_tokens([AddedToken(s, special=False, normalized=True)
                    for s in ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": bos, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "eos_token": {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "pad_token": {"__type": "AddedToken", "content": eos, "lstrip": False, "normalized": True,
                      "rstrip": False, "single_word": False},
        "legacy": True, "model_max_length": 131072, "chat_template": template("deepseek_v3")})


def make_llama2(out, lines):
    """Llama-2 / Mistral: a sentencepiece BPE model with byte fallback and split digits, bos by config."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([l.rstrip("\n") for l in lines if l.strip()]), model_writer=model,
        model_type="bpe", vocab_size=2000, character_coverage=0.9995, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, hard_vocab_limit=False, max_sentence_length=16384, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "legacy": True, "model_max_length": 4096, "chat_template": template("llama2")})
    write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


FAMILIES = {"gpt2": make_gpt2, "llama3": make_llama3, "qwen2": make_qwen2,
            "deepseek_v3": make_deepseek_v3, "llama2": make_llama2}


def build(root):
    lines = corpus_lines()
    for name, make in FAMILIES.items():
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        make(out, lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare")
    args = parser.parse_args()
    if not args.check:
        build(HERE)
        return 0
    installed = {name: importlib.metadata.version(name) for name in GENERATED_WITH}
    if installed != GENERATED_WITH:
        print(f"cannot check: fixtures were made with {GENERATED_WITH}, installed are {installed}")
        return 3
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp))
        bad = [str(p.relative_to(tmp)) for p in sorted(Path(tmp).rglob("*")) if p.is_file()
               and (HERE / p.relative_to(tmp)).read_bytes() != p.read_bytes()]
    if bad:
        print("fixtures differ from a fresh run:", ", ".join(bad))
        return 1
    print("fixtures reproduce identically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
