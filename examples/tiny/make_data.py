"""Regenerates the embedded demo's data and tokenizer from Debian packages (run by make.sh).

Inputs (installed by scripts/setup.sh, nothing is downloaded here):
  fortunes, fortunes-min  /usr/share/games/fortunes/*  general English text: quotations, poems, jokes
                          (BSD-style licence, see /usr/share/doc/fortunes/copyright)
  dict-foldoc             /usr/share/dictd/foldoc.{index,dict.dz}  the Free On-line Dictionary of
                          Computing (GNU FDL 1.1+), the domain of the LoRA fine-tune

Outputs (all under examples/tiny/, committed; re-running gives the same bytes):
  data/general_train.jsonl, data/general_val.jsonl  {"text": fortune} lines: pretraining the base model
  data/foldoc_train.jsonl, data/foldoc_val.jsonl    the domain: {"prompt": "Q: What is <term>?\nA:",
                                                    "completion": "<first paragraph of its definition>"}
                                                    (no leading space: SentencePiece adds its own "▁"
                                                    when the completion is encoded on its own)
  tokenizer/  tokenizer.model (a SentencePiece BPE model trained here on both corpora), tokenizer.json
              (the same for transformers 5), tokenizer_config.json, special_tokens_map.json

Why these choices: splits are decided by a hash of the text (stable when the packages change a little),
definitions are cut to their first paragraph and at most kMaxCompletionChars so that a 2-minute CPU
fine-tune sees most of them, and the tokenizer is byte_fallback BPE, so no text is ever <unk>. FOLDOC's train split is capped at
kFoldocTrainMax entries (of about 11,000) to keep the committed file small; no term is in both splits.
"""
import argparse
import gzip
import hashlib
import json
import os
import re
import sys

FORTUNE_DIR = "/usr/share/games/fortunes"
# Files left out: pictures made of characters, a file of untranslated text, and the categories whose
# jokes are at someone's expense (Debian already moves the worst ones to fortunes-off, not installed).
FORTUNE_SKIP = {"ascii-art", "translate-me", "ethnic", "men-women", "drugs"}
FOLDOC_INDEX = "/usr/share/dictd/foldoc.index"
FOLDOC_DICT = "/usr/share/dictd/foldoc.dict.dz"
kMaxCompletionChars = 320
kMinCompletionChars = 30
kMaxTermChars = 40
kVocabSize = 4096
kValPercentGeneral = 2
kFoldocVal = 200  # validation examples (a fixed count, so a validation pass is quick on the CPU)
kFoldocTrainMax = 6000  # more than a 3-minute demo reads; keeps the committed file small


def bucket(text: str) -> int:
    """A stable number in 0..99 from the text (the split does not depend on Python's hash seed)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % 100


def read_fortunes():
    names = sorted(n for n in os.listdir(FORTUNE_DIR)
                   if "." not in n and n not in FORTUNE_SKIP and os.path.isfile(os.path.join(FORTUNE_DIR, n)))
    if not names:
        sys.exit(f"make_data: no fortune files in {FORTUNE_DIR} (apt-get install fortunes)")
    out = []
    for name in names:
        with open(os.path.join(FORTUNE_DIR, name), encoding="utf-8", errors="replace") as f:
            chunks = f.read().split("\n%\n")
        for chunk in chunks:
            text = "\n".join(line.rstrip() for line in chunk.expandtabs(8).split("\n")).strip("\n%")
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if len(text) >= 20 and "\ufffd" not in text:
                out.append(text)
    return out


def b64_number(s: str) -> int:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for c in s:
        n = n * 64 + digits.index(c)
    return n


def clean_definition(body: str) -> str:
    """The first paragraph of a FOLDOC body as one line: cross-reference braces, pronunciations and
    the leading <domain> tag's angle brackets become plain text ("(programming) A program ...")."""
    paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip()]
    if not paragraphs:
        return ""
    first = paragraphs[0]
    if re.fullmatch(r"\s*\(Note:.*", first, re.S) and len(paragraphs) > 1:
        first = paragraphs[1]
    text = " ".join(first.split())
    text = re.sub(r"^1\. ", "", text)  # numbered senses: keep the first
    text = re.sub(r"^<([^>]*)>\s*", r"(\1) ", text)
    text = re.sub(r"/[^/\s][^/]{0,40}/\s*", "", text, count=1) if re.match(r"^\([^)]*\) /", text) else text
    text = text.replace("{", "").replace("}", "")
    if len(text) > kMaxCompletionChars:  # cut at the last sentence end that fits
        cut = text[:kMaxCompletionChars]
        end = max(cut.rfind(". "), cut.rfind(".)"))
        text = cut[: end + 1] if end > kMinCompletionChars else ""
    return text


def read_foldoc():
    with gzip.open(FOLDOC_DICT, "rb") as f:
        data = f.read()
    seen, out = set(), []
    with open(FOLDOC_INDEX, encoding="utf-8") as f:
        for line in f:
            word, offset, length = line.rstrip("\n").split("\t")
            start, size = b64_number(offset), b64_number(length)
            if start in seen or word.startswith("00-database"):
                continue
            seen.add(start)
            entry = data[start:start + size].decode("utf-8", errors="replace")
            head, _, body = entry.partition("\n\n")
            term = head.split("\n")[0].strip()  # the first headword; the others are synonyms
            if not term or len(term) > kMaxTermChars or "\ufffd" in entry:
                continue
            definition = clean_definition(body)
            if len(definition) < kMinCompletionChars or definition.startswith("See ") or "\ufffd" in definition:
                continue
            out.append((term, definition))
    return out


def write_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    print(f"  {path}: {len(rows)} lines, {os.path.getsize(path) / 1e6:.2f} MB")


def train_tokenizer(texts, out_dir):
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    corpus = os.path.join(out_dir, "corpus.tmp.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for t in texts:
            for line in t.split("\n"):
                if line.strip():
                    f.write(line + "\n")
    prefix = os.path.join(out_dir, "tokenizer")
    # The model records its trainer's input and prefix paths: relative ones, from out_dir, so that the
    # file's bytes do not depend on where the repository is.
    cwd = os.getcwd()
    os.chdir(out_dir)
    try:
        spm.SentencePieceTrainer.train(
            input="corpus.tmp.txt", model_prefix="tokenizer", model_type="bpe", vocab_size=kVocabSize,
            character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            pad_piece="<pad>", input_sentence_size=2_000_000, shuffle_input_sentence=False,
            seed_sentencepiece_size=200_000, num_threads=2, minloglevel=2)
    finally:
        os.chdir(cwd)
    os.remove(corpus)
    os.remove(prefix + ".vocab")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = dict(special, add_bos_token=True, add_eos_token=False, clean_up_tokenization_spaces=False,
                  legacy=False, model_max_length=512, tokenizer_class="LlamaTokenizer")
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    write_tokenizer_json(prefix + ".model", out_dir)
    print(f"  {prefix}.model, tokenizer.json: vocab {kVocabSize}")


def write_tokenizer_json(model_file, out_dir):
    """tokenizer.json for transformers 5, which cannot read tokenizer.model without protobuf: the
    SentencePiece BPE's pieces and the merges they imply (transformers' own generate_merges) in its
    LlamaTokenizer pipeline (Metaspace, byte fallback). anvil keeps reading tokenizer.model (a
    SentencePiece-style tokenizer.json beside one is skipped); tests/python/test_demo_data.py checks
    that the two give the same ids."""
    import shutil
    import tempfile

    import sentencepiece as spm
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = transformers.LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), pad_token="<pad>", legacy=False,
                                     add_bos_token=True, add_eos_token=False)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "tokenizer.json"), encoding="utf-8") as f:
            text = json.dumps(json.load(f), ensure_ascii=False, indent=1, sort_keys=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--skip-tokenizer", action="store_true", help="only the JSONL files")
    args = parser.parse_args()
    data_dir = os.path.join(args.out, "data")
    os.makedirs(data_dir, exist_ok=True)

    fortunes = read_fortunes()
    general_val = [t for t in fortunes if bucket(t) < kValPercentGeneral]
    general_train = [t for t in fortunes if bucket(t) >= kValPercentGeneral]
    write_jsonl(os.path.join(data_dir, "general_train.jsonl"), [{"text": t} for t in general_train])
    write_jsonl(os.path.join(data_dir, "general_val.jsonl"), [{"text": t} for t in general_val])

    entries = read_foldoc()
    entries.sort(key=lambda e: hashlib.sha256(e[0].encode()).hexdigest())  # a stable shuffle
    val, train = entries[:kFoldocVal], entries[kFoldocVal:kFoldocVal + kFoldocTrainMax]
    example = lambda term, definition: {"prompt": f"Q: What is {term}?\nA:", "completion": definition}
    write_jsonl(os.path.join(data_dir, "foldoc_train.jsonl"), [example(*e) for e in train])
    write_jsonl(os.path.join(data_dir, "foldoc_val.jsonl"), [example(*e) for e in val])
    print(f"  FOLDOC: {len(entries)} usable entries, {len(train)} train, {len(val)} validation")

    if not args.skip_tokenizer:
        texts = general_train + [f"Q: What is {t}?\nA: {d}" for t, d in train]
        train_tokenizer(texts, os.path.join(args.out, "tokenizer"))


if __name__ == "__main__":
    main()
