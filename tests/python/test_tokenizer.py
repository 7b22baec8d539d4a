"""anvil's C++ tokenizers (anvil._C.Tokenizer, docs/FORMATS.md "Tokenizers") against the Python packages
that define them: `tokenizers` for tokenizer.json, `sentencepiece` for tokenizer.model, transformers'
AutoTokenizer for the config files and apply_chat_template (jinja2) for the chat formats.

The fixtures in tests/data/tokenizers/<family>/ are trained by make_fixtures.py with each family's
pipeline settings; the chat templates in tests/data/chat_templates/ are the real models' texts.
Identical ids and identical decoded text are required everywhere; no expected ids are hard-coded."""
import random
import time
import unicodedata
import warnings
from pathlib import Path

import pytest

import anvil._C as C

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURES = DATA / "tokenizers"
TEMPLATES = DATA / "chat_templates"
BPE_FAMILIES = ["gpt2", "llama3", "qwen2", "deepseek_v3"]
SAMPLE = (FIXTURES / "multilingual_sample.txt").read_text(encoding="utf-8")
# The sample plus what a text file cannot show plainly: CRLF, lone CR, tabs, unusual spaces, trailing runs.
SAMPLES = [
    SAMPLE,
    "line one\r\nline two\rthree\n\n\n  \t \n",
    "\u00a0non-breaking\u2009thin\u3000ideographic\u200bzero-width\u202fnarrow  ",
    "   ",
    "",
    "x",
    "12345678901234567890 3.14 ٣٤٥ ⅣⅤ 1e-9",
    "e\u0301 cafe\u0301 caf\u00e9 \ufb01 \u2126 \u212b",  # NFC changes these
    "def f(x):\n\treturn x**2  # comment\n" * 3,
    "😀👍🏽👨\u200d👩\u200d👧 🇯🇵" * 4,
]


def hf(family):
    return tokenizers.Tokenizer.from_file(str(FIXTURES / family / "tokenizer.json"))


def anvil_tok(family):
    return C.Tokenizer.load(str(FIXTURES / family))


def random_texts(seed, count, specials=()):
    """Random strings mixing ASCII, whitespace of every kind, digits, punctuation, accents, combining
    marks, CJK, emoji sequences, the family's added tokens and random assigned code points."""
    rng = random.Random(seed)
    pools = [" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u3000\u200b", "abcXYZ'sdtmlrve", "0123456789٣४",
             ".,;:!?-_()[]{}<>/\\\"'`~@#$%^&*+=|", "éèñüßÅçœ\u0301\u0308",
             "中文字机器学习ひらがなカタカナ한국어",
             "😀👍🏽❤️\u200d👨\U0001F1EB\U0001F1F7", "Ωπσжщة"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.1 and specials:
                parts.append(rng.choice(specials))
            elif r < 0.2:
                parts.append(random_assigned_char(rng))
            else:
                pool = rng.choice(pools)
                parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 6))))
        texts.append("".join(parts))
    return texts


def random_assigned_char(rng):
    # Characters assigned in Unicode 14 (Python 3.11's unicodedata, PCRE2 10.42's tables): later additions
    # may split differently, a documented difference (docs/FORMATS.md).
    while True:
        cp = rng.randint(0, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:
            continue
        if unicodedata.category(chr(cp)) != "Cn":
            return chr(cp)


def first_difference(a, b):
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))


def assert_same_ids(ours, ref, text):
    if ours != ref:
        i = first_difference(ours, ref)
        pytest.fail(f"ids differ at {i}: anvil {ours[max(0, i - 3):i + 4]} vs reference {ref[max(0, i - 3):i + 4]} "
                    f"for text {text[:120]!r}")


# ---- byte-level BPE (tokenizer.json) vs the `tokenizers` package -------------------------------------
@pytest.mark.parametrize("family", BPE_FAMILIES)
@pytest.mark.parametrize("add_special", [True, False])
def test_bpe_samples_match_tokenizers(family, add_special):
    ours, ref = anvil_tok(family), hf(family)
    for text in SAMPLES:
        ids = ref.encode(text, add_special_tokens=add_special).ids
        assert_same_ids(ours.encode(text, add_special), ids, text)
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_bpe_random_unicode_matches_tokenizers(family):
    ours, ref = anvil_tok(family), hf(family)
    specials = [t.content for t in ref.get_added_tokens_decoder().values()]
    specials += [" <mask>  ", "<sep/> \n", "cafe\u0301 au lait", "caf\u00e9 au lait", "  "]
    for text in random_texts(BPE_FAMILIES.index(family), 600, specials):
        ids = ref.encode(text).ids
        assert_same_ids(ours.encode(text), ids, text)
        assert ours.decode(ids, False) == ref.decode(ids, skip_special_tokens=False), text
        assert ours.decode(ids, True) == ref.decode(ids, skip_special_tokens=True), text


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_bpe_decode_of_random_ids_matches_tokenizers(family):
    """Arbitrary id sequences: partial UTF-8 must become U+FFFD exactly where the Rust crate puts it."""
    ours, ref = anvil_tok(family), hf(family)
    rng = random.Random(7)
    for _ in range(500):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 24))]
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_bpe_roundtrip_is_lossless(family):
    """Byte-level BPE keeps every byte; NFC (qwen2) changes text only where NFC does."""
    ours = anvil_tok(family)
    for text in SAMPLES + random_texts(11, 200):
        expected = unicodedata.normalize("NFC", text) if family == "qwen2" else text
        assert ours.decode(ours.encode(text, False), False) == expected


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_vocab_and_token_lookup_match_tokenizers(family):
    ours, ref = anvil_tok(family), hf(family)
    assert ours.vocab_size == ref.get_vocab_size(with_added_tokens=True)
    for token, i in list(ref.get_vocab(with_added_tokens=True).items())[::37]:
        assert ours.token_to_id(token) == i
        assert ours.id_to_token(i) == token
    assert ours.token_to_id("definitely not a token \u2603") is None
    with pytest.raises(IndexError, match="not in the vocabulary"):
        ours.id_to_token(ours.vocab_size)
    with pytest.raises(IndexError, match="id -1"):
        ours.decode([-1])


def test_encoding_a_megabyte_is_fast():
    tok = anvil_tok("llama3")
    text = (SAMPLE * (1_000_000 // len(SAMPLE) + 1))[:1_000_000]
    tok.encode(text[:10_000])
    start = time.perf_counter()
    ids = tok.encode(text)
    seconds = time.perf_counter() - start
    assert len(ids) > 100_000
    assert seconds < 1.0, f"encoding 1 MB took {seconds:.2f} s"


# ---- config files vs transformers' AutoTokenizer ------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2"])
def test_special_tokens_match_autotokenizer(family):
    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(FIXTURES / family))
    ours = anvil_tok(family)
    none_is_minus_one = lambda v: -1 if v is None else v  # noqa: E731
    assert ours.bos_id == none_is_minus_one(ref.bos_token_id)
    assert ours.eos_id == none_is_minus_one(ref.eos_token_id)
    assert ours.pad_id == none_is_minus_one(ref.pad_token_id)
    assert ours.vocab_size == len(ref)
    for text in SAMPLES[:3]:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text, False) == ref.encode(text, add_special_tokens=False)


def test_config_named_token_missing_from_vocab_is_appended_like_autotokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_bytes((FIXTURES / "gpt2" / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<pad>"}', encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text(
        (TEMPLATES / "qwen2.jinja").read_text(encoding="utf-8"), encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = C.Tokenizer.load(str(tmp_path))
    assert ours.pad_id == ref.pad_token_id and ours.vocab_size == len(ref)
    assert ours.encode("a<pad>b") == ref.encode("a<pad>b")
    assert ours.chat_format == "chatml"  # chat_template.jinja is read


def test_deepseek_v3_follows_tokenizer_json():
    """DeepSeek-V3's config names LlamaTokenizerFast; transformers 5 rebuilds a Llama pipeline from that
    class name, while the model's tokenizer.json (what vLLM, SGLang and transformers 4 run) defines the
    DeepSeek pre-tokenizer. anvil follows tokenizer.json; bos comes from add_bos_token."""
    ours, ref = anvil_tok("deepseek_v3"), hf("deepseek_v3")
    assert ours.bos_id == ref.token_to_id("<\uff5cbegin\u2581of\u2581sentence\uff5c>")
    assert ours.encode(SAMPLE)[0] == ours.bos_id
    assert ours.encode(SAMPLE) == ref.encode(SAMPLE).ids


def test_llama3_generation_eos_ids_come_from_generation_config():
    ours, ref = anvil_tok("llama3"), hf("llama3")
    assert ours.eos_ids == [ref.token_to_id("<|end_of_text|>"), ref.token_to_id("<|eot_id|>")]
    assert ours.eos_id == ref.token_to_id("<|eot_id|>")


# ---- SentencePiece vs the `sentencepiece` package -----------------------------------------------------
def sp_model():
    return spm.SentencePieceProcessor(model_file=str(FIXTURES / "llama2" / "tokenizer.model"))


def test_sentencepiece_samples_match():
    ours, ref = anvil_tok("llama2"), sp_model()
    assert ours.kind == "sentencepiece" and ours.vocab_size == ref.get_piece_size()
    assert (ours.bos_id, ours.eos_id, ours.unk_id) == (ref.bos_id(), ref.eos_id(), ref.unk_id())
    for text in SAMPLES:
        ids = ref.encode(text)
        assert_same_ids(ours.encode(text, False), ids, text)
        assert ours.encode(text, True) == [ref.bos_id()] + ids  # add_bos_token true, add_eos_token false
        assert ours.decode(ids, True) == ref.decode(ids)
        assert ours.decode([ref.bos_id()] + ids, True) == ref.decode(ids)


def test_sentencepiece_random_unicode_matches():
    ours, ref = anvil_tok("llama2"), sp_model()
    rng = random.Random(3)
    for text in random_texts(5, 600):
        ids = ref.encode(text)
        assert_same_ids(ours.encode(text, False), ids, text)
        assert ours.decode(ids, True) == ref.decode(ids), text
        random_ids = [rng.randrange(3, ours.vocab_size) for _ in range(rng.randint(0, 20))]
        assert ours.decode(random_ids, True) == ref.decode(random_ids), random_ids


def test_sentencepiece_special_strings_become_ids():
    """As transformers' Llama tokenizer: "<s>" in a rendered chat is bos, each text piece gets its own prefix."""
    ours, ref = anvil_tok("llama2"), sp_model()
    text = "<s>[INST] hi [/INST] ok </s><s>[INST] more"
    expected = ([1] + ref.encode("[INST] hi [/INST] ok ") + [2, 1] + ref.encode("[INST] more"))
    assert ours.encode(text, False) == expected
    # Kept special tokens keep the text piece's prefix space after them (transformers' LlamaTokenizerFast).
    assert ours.decode(expected, False) == "<s> [INST] hi [/INST] ok </s><s> [INST] more"
    assert ours.decode(expected, True) == ref.decode(expected)


# ---- chat templates vs transformers' apply_chat_template ----------------------------------------------
CHAT_FORMATS = {"llama2": "llama2", "mistral": "mistral", "mistral_v1": "mistral-v1", "llama3": "llama3",
                "llama3_1": "llama3.1",
                "qwen2": "chatml", "qwen2_5": "qwen2.5", "qwen3": "qwen3", "deepseek_v2": "deepseek-v2",
                "deepseek_v3": "deepseek-v3", "smollm2": "smollm2"}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "  Hi there \n"},
     {"role": "assistant", "content": " Hello! \u3000"}, {"role": "user", "content": "中文 😀\n\ndef f(): pass"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nb"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>x</think>d"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "q\x1f"},
     {"role": "assistant", "content": "r", "reasoning_content": "because"}],
    [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "3"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "5"}],
    [{"role": "assistant", "content": "starts with the assistant"}],
    [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "u"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "{\"t\": 21}\n\\ \x01 é"}, {"role": "tool", "content": "sunny"},
     {"role": "user", "content": "ok"}],
]


@pytest.fixture(scope="module")
def renderer():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(FIXTURES / "qwen2"))


@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_chat_template_detected(name):
    assert C.detect_chat_format((TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")) == CHAT_FORMATS[name]


@pytest.mark.parametrize("name", list(CHAT_FORMATS))
def test_chat_rendering_matches_apply_chat_template(renderer, name):
    template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    compared = 0
    for conv in CONVERSATIONS:
        for gen in (False, True):
            for thinking in (None, False, True):
                extra = {} if thinking is None else {"enable_thinking": thinking}
                try:
                    ref = renderer.apply_chat_template(conv, chat_template=template, tokenize=False,
                                                       add_generation_prompt=gen, bos_token="<s>",
                                                       eos_token="</s>", **extra)
                except Exception:  # the template raises (roles that must alternate...): so must anvil
                    with pytest.raises(ValueError, match=r"messages\[\d+\]"):
                        C.render_chat(CHAT_FORMATS[name], conv, gen, thinking, "<s>", "</s>")
                    continue
                assert C.render_chat(CHAT_FORMATS[name], conv, gen, thinking, "<s>", "</s>") == ref, (conv, gen)
                compared += 1
    assert compared >= 6


@pytest.mark.parametrize("family", ["llama3", "qwen2", "deepseek_v3", "llama2"])
def test_tokenizer_render_chat_uses_its_template_and_tokens(renderer, family):
    ours = anvil_tok(family)
    conv = CONVERSATIONS[1]
    ref = renderer.apply_chat_template(conv, chat_template=ours.chat_template, tokenize=False,
                                       add_generation_prompt=True, bos_token=ours.bos_token,
                                       eos_token=ours.eos_token)
    text = ours.render_chat(conv, True)
    assert text == ref
    ids = ours.encode(text, False)
    if family != "llama2":
        assert ids == hf(family).encode(text, add_special_tokens=False).ids
    if ours.bos_token and ours.bos_token in text:
        assert ids[0] == ours.bos_id  # the rendered bos text tokenizes as the bos id


def test_unknown_template_error_names_what_was_found():
    with pytest.raises(RuntimeError, match="Llama-3.2 style"):
        C.detect_chat_format("<|start_header_id|>Cutting Knowledge Date{{ strftime_now('%d %b %Y') }}<|eot_id|>")
    with pytest.raises(RuntimeError, match="no known markers.*begins \"{% for m in messages %}"):
        C.detect_chat_format("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="known: llama2"):
        C.render_chat("vicuna", [{"role": "user", "content": "x"}])
    tok = anvil_tok("gpt2")
    with pytest.raises(RuntimeError, match="no chat_template"):
        tok.render_chat([{"role": "user", "content": "x"}])
    tok.set_chat_format("chatml")
    assert tok.render_chat([{"role": "user", "content": "x"}], True).endswith("<|im_start|>assistant\n")


# ---- the fixtures themselves --------------------------------------------------------------------------
def test_fixtures_are_small():
    for path in FIXTURES.rglob("*"):
        if path.is_file():
            assert path.stat().st_size < 1_000_000, path


def test_fixtures_regenerate_identically():
    """make_fixtures.py reproduces the committed files byte for byte (about two seconds)."""
    import subprocess
    import sys
    pytest.importorskip("jinja2")
    result = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--check"], capture_output=True,
                            text=True)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the command line ---------------------------------------------------------------------------------
def anvil_binary():
    import anvil
    return Path(anvil.executable())  # the build tree's bin/anvil, or the installed wheel's


def test_cli_tokenize_matches_tokenizers():
    import subprocess
    binary, ref = anvil_binary(), hf("qwen2")
    text = SAMPLES[0][:400]
    out = subprocess.run([str(binary), "tokenize", "--model", str(FIXTURES / "qwen2"), "--file",
                          str(FIXTURES / "multilingual_sample.txt")],
                         capture_output=True, encoding="utf-8", check=True)
    assert [int(x) for x in out.stdout.split()] == ref.encode(SAMPLE).ids
    ids = ref.encode(text).ids
    out = subprocess.run([str(binary), "tokenize", "--model", str(FIXTURES / "qwen2"), "--decode",
                          ",".join(map(str, ids))], capture_output=True, encoding="utf-8", check=True)
    assert out.stdout == ref.decode(ids, skip_special_tokens=False) + "\n"
    bad = subprocess.run([str(binary), "tokenize", "--model", str(FIXTURES / "qwen2"), "--decode", "1,x"],
                         capture_output=True, encoding="utf-8")
    assert bad.returncode == 2 and "'x' is not an integer id" in bad.stderr
