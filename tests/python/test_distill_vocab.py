"""Teacher and student vocabularies in `anvil distill` (anvil/train/vocab.h), on the CPU.

(a) Padded rows: a teacher whose heads have 64 rows past its tokenizer (4096 ids, the demo's) distilled into a
    student without them, and the reverse, online, offline (the top-k cache) and with the hidden-state loss: the
    recipe prints the mapping, and its step-0 validation KL and loss equal a reference computed here with
    transformers (both models' logits cut to the tokenizer's 4096 columns before the softmax; the student's CE
    over all its rows). One cache serves students with different padding. The chunked loss with a padded student
    head equals autograd through the sliced formula.
(b) What cannot be compared is a config error naming what differs: tokenizers that differ (the first differing id
    and both tokens), a tokenizer with ids past a head, different sizes with no tokenizer.
(c) Different tokenizers (experimental): the ULD term (sorted L1, GOLD's hybrid with the shared tokens' JSD), the
    shared-token mapping, the byte-offset alignment and the merge of aligned groups equal TRL 1.16's GOLD
    (trl/experimental/gold/gold_trainer.py ULDLoss, called on CPU tensors), values and gradients.
"""
import json
import os
import shutil
import types

import pytest
import torch
import torch.nn.functional as F

import anvil
from hf_models import randomize
from test_distill import distill_config, metrics, token_examples
from test_train import check_ok, run_cli, write_config, write_jsonl

transformers = pytest.importorskip("transformers")
_C = anvil._C
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TINY_BASE = os.path.join(ROOT, "examples", "tiny", "base")
REAL = 4096  # the demo tokenizer's ids
PADDED = REAL + 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def small_llama(vocab, layers, seed):
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2, pad_token_id=3)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(torch.float32)
    randomize(m, seed=seed)
    return m


def model_dir(path, vocab, layers, seed, tokenizer=True):
    small_llama(vocab, layers, seed).save_pretrained(str(path))
    if tokenizer:
        for f in TOKENIZER_FILES:
            shutil.copy(os.path.join(TINY_BASE, f), os.path.join(str(path), f))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return types.SimpleNamespace(
        d=d,
        teacher_padded=model_dir(d / "teacher_padded", PADDED, 3, 11),
        teacher=model_dir(d / "teacher", REAL, 3, 11),
        student=model_dir(d / "student", REAL, 2, 12),
        student_padded=model_dir(d / "student_padded", PADDED, 2, 12),
        train=write_jsonl(d / "train.jsonl", token_examples(40, 1)),
        val=write_jsonl(d / "val.jsonl", token_examples(8, 2)))


def reference(teacher, student, val_path):
    """Step-0 validation KL(teacher || student) per target over the first REAL columns, and the student's CE over
    all its columns, from transformers on each validation document (packed documents attend only to themselves)."""
    t = transformers.AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    s = transformers.AutoModelForCausalLM.from_pretrained(student, dtype=torch.float64).eval()
    kl = ce = n = 0.0
    with open(val_path) as f:
        for line in f:
            ids = torch.tensor([json.loads(line)["input_ids"]])
            with torch.no_grad():
                zt, zs = t(ids).logits[0, :-1], s(ids).logits[0, :-1]  # (n - 1, V) each: the targets' rows
            lt, ls = F.log_softmax(zt[:, :REAL], -1), F.log_softmax(zs[:, :REAL], -1)
            kl += (lt.exp() * (lt - ls)).sum().item()
            ce += F.cross_entropy(zs, ids[0, 1:], reduction="sum").item()
            n += ids.size(1) - 1
    return kl / n, ce / n


def step0(out):
    return next(m for m in metrics(out) if m.get("step") == 0 and "val_kl" in m)


def run_distill(folders, name, teacher_path, student, **sections):
    cfg = distill_config(teacher_path, folders.train, folders.val, folders.d / name,
                         student={"init": "pretrained", "path": student}, train={"steps": 2}, **sections)
    cfg["student"].pop("layers", None)
    return run_cli("distill", "--config", write_config(folders.d / (name + ".json"), cfg)), folders.d / name


@pytest.mark.parametrize("case", ["teacher_padded", "student_padded"])
def test_padded_rows_online_equal_the_sliced_reference(folders, case):
    teacher = folders.teacher_padded if case == "teacher_padded" else folders.teacher
    student = folders.student if case == "teacher_padded" else folders.student_padded
    result, out = run_distill(folders, "online_" + case, teacher, student)
    check_ok(result)
    assert "vocabulary: padded, compared over the tokenizer's 4096 real tokens" in result.stderr
    assert ("the teacher's 64 and the student's 0 padded rows" if case == "teacher_padded" else
            "the teacher's 0 and the student's 64 padded rows") in result.stderr
    kl, ce = reference(teacher, student, folders.val)
    m = step0(out)
    assert m["val_kl"] == pytest.approx(kl, rel=1e-5)
    assert m["val_loss"] == pytest.approx(ce, rel=1e-5)
    losses = [x for x in metrics(out) if "kd" in x]
    assert losses and all(x["kd"] > 0 and x["ce"] > 0 for x in losses)


def test_same_vocabulary_is_said_and_unchanged(folders):
    result, out = run_distill(folders, "same", folders.teacher, folders.student)
    check_ok(result)
    assert "vocabulary: same, 4096 rows in both models, one tokenizer (4096 ids)" in result.stderr
    kl, ce = reference(folders.teacher, folders.student, folders.val)
    assert step0(out)["val_kl"] == pytest.approx(kl, rel=1e-5)


def test_padded_rows_with_the_hidden_state_loss(folders):
    result, out = run_distill(folders, "hidden", folders.teacher_padded, folders.student,
                              distill={"hidden_loss": "mse", "hidden_weight": 0.5})
    check_ok(result)
    kl, _ = reference(folders.teacher_padded, folders.student, folders.val)
    assert step0(out)["val_kl"] == pytest.approx(kl, rel=1e-5)
    assert any("hidden" in x for x in metrics(out))


def test_padded_rows_offline_and_one_cache_for_students_of_any_padding(folders):
    cache = folders.d / "cache"
    teacher = dict(cache=str(cache), cache_k=REAL, cache_dtype="float32")
    result, out = run_distill(folders, "offline_a", folders.teacher_padded, folders.student, teacher=teacher)
    check_ok(result)
    assert ": wrote" in result.stderr
    manifest = json.load(open(cache / "manifest.json"))
    assert manifest["vocab_size"] == REAL
    # k = the compared vocabulary: every id is a real token, and the step-0 KL is the online one exactly.
    from safetensors.torch import load_file
    ids = torch.cat([load_file(str(cache / s["file"]))["ids"] for s in manifest["shards"]])
    assert ids.max().item() < REAL and ids.min().item() >= 0
    kl, ce = reference(folders.teacher_padded, folders.student, folders.val)
    assert step0(out)["val_kl"] == pytest.approx(kl, rel=1e-5)
    assert step0(out)["val_loss"] == pytest.approx(ce, rel=1e-5)
    # A student with 64 padded rows trains from the same cache: nothing rewritten.
    result, out = run_distill(folders, "offline_b", folders.teacher_padded, folders.student_padded, teacher=teacher)
    check_ok(result)
    assert ": wrote" not in result.stderr and "complete, " in result.stderr
    kl, ce = reference(folders.teacher_padded, folders.student_padded, folders.val)
    assert step0(out)["val_kl"] == pytest.approx(kl, rel=1e-5)
    assert step0(out)["val_loss"] == pytest.approx(ce, rel=1e-5)
    # A cache written over the teacher's padded rows too (as before vocabularies were planned) is refused.
    manifest["vocab_size"] = PADDED
    with open(cache / "manifest.json", "w") as f:
        json.dump(manifest, f)
    result, _ = run_distill(folders, "offline_c", folders.teacher_padded, folders.student, teacher=teacher)
    assert result.returncode != 0
    assert "teacher.cache" in result.stderr and "4160 rows, this run compares 4096" in result.stderr


def test_chunked_loss_with_a_padded_student_head_equals_the_sliced_formula():
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(9, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    ws = torch.randn(13, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    ht, wt = torch.randn(9, 5, dtype=torch.float64, generator=g), torch.randn(10, 5, dtype=torch.float64, generator=g)
    for loss in ("forward_kl", "jsd", "tv"):
        got = _C.kd_loss(hs, ws, ht, wt, 4.0, loss=loss, temperature=1.5, chunk=4)
        ref = _C.kd_divergence_from_logits((hs @ ws.T)[:, :10], ht @ wt.T, loss=loss, temperature=1.5).sum() / 4.0
        assert got.item() == pytest.approx(ref.item(), rel=1e-12)
        ga, gr = torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(ref, (hs, ws))
        assert torch.allclose(ga[0], gr[0], rtol=1e-9, atol=1e-12) and torch.allclose(ga[1], gr[1], rtol=1e-9, atol=1e-12)
        assert ga[1][10:].abs().max().item() == 0  # the padded rows: no divergence gradient


# ---- (b) what cannot be compared ---------------------------------------------------------------------

BPE_SIZE = 300


def train_bpe(path, size):
    """A byte-level BPE of `size` tokens trained on demo text, saved as the tokenizer.json `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = []
    data = os.path.join(ROOT, "examples", "tiny", "data")
    for name in sorted(os.listdir(data)):
        if name.endswith(".jsonl"):
            with open(os.path.join(data, name)) as f:
                lines += [json.dumps(json.loads(l)) for l, _ in zip(f, range(300))]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of BPE_SIZE tokens trained here on demo text (a tokenizer.json both readers take whole, so
    that edits of its vocabulary reach both)."""
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json", BPE_SIZE)


def edited_tokenizer(folder, src, edit):
    """The tokenizer.json `src` edited into `folder`."""
    os.makedirs(folder, exist_ok=True)
    t = json.load(open(src))
    edit(t)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(t, f)


def swap_two_tokens(t):
    v = t["model"]["vocab"]
    a, b = [k for k, i in v.items() if i in (100, 101)]
    v[a], v[b] = v[b], v[a]


def test_mismatched_vocabularies_are_config_errors(folders, bpe):
    d = folders.d
    # Another tokenizer in the student's folder: the first differing id and both tokens, both folders.
    teacher = model_dir(d / "teacher_bpe", BPE_SIZE, 3, 11, tokenizer=False)
    edited_tokenizer(teacher, bpe, lambda t: None)
    other = model_dir(d / "student_other_tok", BPE_SIZE, 2, 12, tokenizer=False)
    edited_tokenizer(other, bpe, swap_two_tokens)
    tok = _C.Tokenizer.load(teacher)
    result, _ = run_distill(folders, "err_tok", teacher, other)
    assert result.returncode != 0
    err = result.stderr
    assert "config key student.path" in err and "is not the teacher's" in err and "id 100 is" in err
    assert f'"{tok.id_to_token(100)}" in the teacher\'s and "{tok.id_to_token(101)}" in the student\'s' in err
    assert "ULD" in err and 'set distill.vocab "cross-tokenizer"' in err
    # A student head without rows for some of the tokenizer's ids.
    short = model_dir(d / "student_short", REAL - 96, 2, 12)
    result, _ = run_distill(folders, "err_short", folders.teacher, short)
    assert result.returncode != 0
    assert "ids 4000..4095 have no row in the student's head" in result.stderr
    # Different sizes and no tokenizer anywhere: nothing says which rows are real.
    bare_t, bare_s = model_dir(d / "bare_t", PADDED, 3, 11, False), model_dir(d / "bare_s", REAL, 2, 12, False)
    result, _ = run_distill(folders, "err_bare", bare_t, bare_s)
    assert result.returncode != 0
    assert "vocab_size 4160" in result.stderr and "student (" in result.stderr and "neither folder has a tokenizer" in result.stderr
    assert _C.first_differing_token(tok, _C.Tokenizer.load(other)) == 100
    assert _C.first_differing_token(tok, _C.Tokenizer.load(teacher)) == -1


# ---- (c) different tokenizers: ULD against TRL's GOLD ----------------------------------------------------

def gold():
    return pytest.importorskip("trl.experimental.gold.gold_trainer")


def uld_config(**kw):
    c = dict(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
             use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False,
             uld_hybrid_matched_weight=None, uld_hybrid_unmatched_weight=None, beta=0.5)
    c.update(kw)
    return types.SimpleNamespace(**c)


def add_tokens(n, tag):
    def edit(t):
        v = t["model"]["vocab"]
        base = max([max(v.values())] + [a["id"] for a in t["added_tokens"]]) + 1
        for i in range(n):
            v[f"<{tag}{i}>"] = base + i
    return edit


def permute_then_add(n, tag, seed):
    def edit(t):
        v = t["model"]["vocab"]
        keys = [k for k, i in v.items() if i >= 1]  # the special token (0) stays
        ids = [v[k] for k in keys]
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
        for k, j in zip(keys, perm):
            v[k] = ids[j]
        add_tokens(n, tag)(t)
    return edit


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("tokenizers")
    edited_tokenizer(str(d / "teacher"), bpe, add_tokens(10, "t"))
    edited_tokenizer(str(d / "student"), bpe, permute_then_add(20, "s", 4))
    hf = [transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / n / "tokenizer.json")) for n in ("teacher", "student")]
    return _C.Tokenizer.load(str(d / "teacher")), _C.Tokenizer.load(str(d / "student")), hf


def test_shared_tokens_are_golds_vocabulary_mapping(two_tokenizers):
    ours_t, ours_s, (hf_t, hf_s) = two_tokenizers
    uld = gold().ULDLoss(uld_config(uld_use_hybrid_loss=True), student_tokenizer=hf_s, teacher_tokenizer=hf_t)
    tid, sid = _C.shared_tokens(ours_t, ours_s)
    want = sorted(uld._vocab_mapping.items())
    assert len(want) == BPE_SIZE  # the common tokens; the 10 and 20 added ones are unmatched
    assert tid.tolist() == [k for k, _ in want] and sid.tolist() == [v for _, v in want]


@pytest.mark.parametrize("hybrid", [False, True])
@pytest.mark.parametrize("beta,temps,weights", [(0.5, (1.0, 1.0), (None, None)), (0.0, (2.0, 1.5), (None, None)),
                                                (1.0, (1.0, 1.0), (0.7, 0.4)), (0.3, (0.8, 1.2), (0.2, 0.9))])
def test_uld_equals_golds_loss_with_gradients(two_tokenizers, hybrid, beta, temps, weights):
    ours_t, ours_s, (hf_t, hf_s) = two_tokenizers
    cfg = uld_config(uld_use_hybrid_loss=hybrid, beta=beta, uld_student_temperature=temps[0],
                     uld_teacher_temperature=temps[1], uld_hybrid_matched_weight=weights[0],
                     uld_hybrid_unmatched_weight=weights[1])
    uld = gold().ULDLoss(cfg, student_tokenizer=hf_s, teacher_tokenizer=hf_t)
    g = torch.Generator().manual_seed(int(beta * 10) + hybrid)
    vs, vt = ours_s.vocab_size + 8, ours_t.vocab_size + 3  # heads with padded rows too
    b, s = 2, 7
    zs = (torch.randn(b, s, vs, dtype=torch.float64, generator=g) * 3).requires_grad_(True)
    zt = torch.randn(b, s, vt, dtype=torch.float64, generator=g) * 3
    # Answers: student positions 2.. of row 0 and 1.. of row 1; the teacher's shifted by one (another tokenization).
    sl = torch.full((b, s), -100)
    tl = torch.full((b, s), -100)
    sl[0, 2:], sl[1, 1:6], tl[0, 1:], tl[1, 2:] = 1, 1, 1, 1
    ids = torch.zeros(b, s, dtype=torch.long)
    want = uld(zs, zt, sl, tl, ids, ids)
    gw = torch.autograd.grad(want, zs)[0]
    tid, sid = _C.shared_tokens(ours_t, ours_s)
    per_seq = []
    for i in range(b):  # GOLD's alignment without extended ULD: each side's answer rows, cut to the shorter
        ss, ts = sl[i].ne(-100).nonzero()[:, 0], tl[i].ne(-100).nonzero()[:, 0]
        n = min(len(ss), len(ts))
        rows = _C.uld_divergence(zs[i, ss[:n]], zt[i, ts[:n]], sid, tid, student_temperature=temps[0],
                                 teacher_temperature=temps[1], hybrid=hybrid, beta=beta,
                                 matched_weight=-1.0 if weights[0] is None else weights[0],
                                 unmatched_weight=-1.0 if weights[1] is None else weights[1])
        per_seq.append(rows.mean())
    got = torch.stack(per_seq).mean()
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    gg = torch.autograd.grad(got, zs)[0]
    assert torch.allclose(gg, gw, rtol=1e-8, atol=1e-12), (gg - gw).abs().max()


def test_uld_float32_and_errors():
    z, zt = torch.randn(4, 30), torch.randn(4, 50)
    got = _C.uld_divergence(z, zt, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    q = F.pad(F.softmax(z, -1).sort(-1, descending=True).values, (0, 20))  # zero-padded to the teacher's 50
    p = F.softmax(zt, -1).sort(-1, descending=True).values
    assert got.dtype == torch.float32 and got.shape == (4,)
    assert torch.allclose(got, (q - p).abs().sum(-1), rtol=1.3e-6, atol=1e-5)
    with pytest.raises(Exception, match="same aligned rows"):
        _C.uld_divergence(z, torch.randn(3, 50), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long))
    with pytest.raises(Exception, match="both be set"):
        _C.uld_divergence(z, torch.randn(4, 50), torch.tensor([1]), torch.tensor([2]), matched_weight=0.5)
    with pytest.raises(Exception, match="outside the logits"):
        _C.uld_divergence(z, torch.randn(4, 50), torch.tensor([30]), torch.tensor([2]))


def test_byte_offset_alignment_and_merge_equal_golds():
    uld_cls = gold().ULDLoss
    g = torch.Generator().manual_seed(9)
    for trial in range(20):
        # Two tokenizations of one 40-byte text: random cut points, shared ones where both cut.
        cuts = lambda: sorted(set(torch.randint(1, 40, (int(torch.randint(3, 15, (1,), generator=g)),), generator=g).tolist()) | {40})
        def offsets(c):
            return [(a, b) for a, b in zip([0] + c[:-1], c)]
        so, to = offsets(cuts()), offsets(cuts())
        if trial % 5 == 0:
            to = to[:-1]  # a teacher sequence cut short: the trailing remainder group
        want = uld_cls._align_by_byte_offsets([list(x) for x in so], [list(x) for x in to])
        got = _C.align_by_byte_offsets(so, to)
        assert [list(x) for x in got[0]] == want[0] and [list(x) for x in got[1]] == want[1]
        probs = F.softmax(torch.randn(len(so), 11, dtype=torch.float64, generator=g), -1).requires_grad_(True)
        ids = torch.randint(0, 11, (len(so),), generator=g).tolist()
        for strategy in ("observed", "bayesian"):
            ref = uld_cls._merge_probabilities_with_alignment_groups(
                types.SimpleNamespace(token_merge_strategy=strategy), probs, want[0], ids)
            ours = _C.merge_aligned_probabilities(probs, got[0], ids, strategy)
            assert torch.allclose(ours, ref, rtol=1e-12, atol=0)
            w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
            assert torch.allclose(torch.autograd.grad((ours * w).sum(), probs)[0],
                                  torch.autograd.grad((ref * w).sum(), probs)[0], rtol=1e-12, atol=1e-15)
    with pytest.raises(Exception, match="observed"):
        _C.merge_aligned_probabilities(torch.rand(3, 4), [[0, 1]], [1, 2, 3], "mean")


# ---- (d) different tokenizers in the recipe: distill.vocab "cross-tokenizer" (anvil/train/cross_vocab.h) --------

FIXTURES = os.path.join(ROOT, "tests", "data", "tokenizers")


def offset_texts():
    texts = ["Hello world, déjà vu 中文 😀\n\ndef f(): pass", "  leading  spaces\tand tabs ", "x", "a<|endoftext|>b",
             "\u00a0non-breaking\u3000ideographic space", "emoji 👩‍👩‍👧 and ZWJ"]
    with open(os.path.join(FIXTURES, "multilingual_sample.txt")) as f:
        texts += [line.rstrip("\n") for line in f if line.strip()][:40]
    return texts


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2"])
def test_byte_offsets_equal_golds_encode_with_byte_offsets(family):
    """GOLD's own offsets: trl.experimental.utils.encode_with_byte_offsets (return_offsets_mapping in bytes,
    normalised) on the `tokenizers` package's encoding of the same tokenizer.json."""
    from tokenizers import Tokenizer
    from trl.experimental.utils import encode_with_byte_offsets
    path = os.path.join(FIXTURES, family, "tokenizer.json")
    backend, ours = Tokenizer.from_file(path), _C.Tokenizer.from_tokenizer_json(path)
    texts = offset_texts()
    for special in (True, False):
        for text, (ids, offs) in zip(texts, encode_with_byte_offsets(backend, texts, add_special_tokens=special)):
            got_ids, got_offs = ours.encode_with_offsets(text, special)
            assert got_ids == list(ids), text
            assert [tuple(o) for o in got_offs] == [tuple(o) for o in offs], text


def sentencepiece_spans(sp, text):
    """(id, begin, end) of each piece from SentencePiece's own SentencePieceText (its serialized proto, read here:
    the protobuf package is not installed): byte spans in the text."""
    from protobuf_wire import fields_of
    spans = []
    for f, v in fields_of(sp.encode_as_serialized_proto(text)):
        if f == 2:  # SentencePieceText.pieces: piece 1, id 2, surface 3, begin 4, end 5
            d = dict(fields_of(v))
            spans.append((d.get(2, 0), d.get(4, 0), d.get(5, 0)))
    return spans


def test_sentencepiece_offsets_equal_sentencepieces_spans():
    """SentencePiece's own spans, except that a character spelled by byte-fallback pieces is split into its bytes
    (SentencePiece gives it all to the last piece): those runs are compared as one span."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(FIXTURES, "llama2", "tokenizer.model"))
    ours = _C.Tokenizer.load(os.path.join(FIXTURES, "llama2"))
    byte_piece = lambda i: sp.id_to_piece(i).startswith("<0x")
    checked_bytes = 0
    for text in offset_texts():
        want = sentencepiece_spans(sp, text)
        ids, offs = ours.encode_with_offsets(text, False)
        assert ids == [w[0] for w in want], text
        k = 0
        while k < len(ids):
            e = k + 1
            if byte_piece(ids[k]):
                while e < len(ids) and byte_piece(ids[e]) and want[e - 1][2] == want[e][1] == want[k][1]:
                    e += 1
                checked_bytes += e - k > 1
            assert (offs[k][0], offs[e - 1][1]) == (want[k][1], want[e - 1][2]), (text, k)
            k = e
        assert offs[-1][1] == len(text.encode())
    assert checked_bytes > 0  # some characters went through byte fallback
    ids, offs = ours.encode_with_offsets("Hi", True)  # <s> is not in the text: an empty span
    assert ids[0] == ours.bos_id and tuple(offs[0]) == (0, 0)


CROSS_TEACHER, CROSS_STUDENT = 420, 300  # two BPEs of the same text: different cuts, 300 tokens spelled alike


def cross_model_dir(path, size, layers, seed):
    os.makedirs(str(path), exist_ok=True)
    train_bpe(os.path.join(str(path), "tokenizer.json"), size)
    with open(os.path.join(str(path), "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
    small_llama(size, layers, seed).save_pretrained(str(path))
    return str(path)


def fortunes(n, skip):
    with open(os.path.join(ROOT, "examples", "tiny", "data", "general_train.jsonl")) as f:
        lines = [json.loads(l)["text"] for l in f]
    short = [t for t in lines if 40 <= len(t) <= 140]
    return [{"text": t} for t in short[skip:skip + n]]


@pytest.fixture(scope="module")
def cross(tmp_path_factory):
    d = tmp_path_factory.mktemp("cross")
    return types.SimpleNamespace(
        d=d, teacher=cross_model_dir(d / "teacher", CROSS_TEACHER, 3, 21),
        student=cross_model_dir(d / "student", CROSS_STUDENT, 2, 22),
        train=write_jsonl(d / "train.jsonl", fortunes(8, 0)), val=write_jsonl(d / "val.jsonl", fortunes(4, 40)))


def hf_tok(folder):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "tokenizer.json"),
                                                eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def cross_config(cross, out, student=None, train_path=None, distill=None, **sections):
    cfg = distill_config(cross.teacher, train_path or cross.train, cross.val, out,
                         student={"init": "pretrained", "path": student or cross.student},
                         distill=dict({"vocab": "cross-tokenizer"}, **(distill or {})), **sections)
    cfg["student"].pop("layers", None)
    cfg["distill"].pop("loss")  # the same-vocabulary divergence: an error across tokenizers
    cfg["data"]["seq_len"] = sections.get("data", {}).get("seq_len", 128)  # 128: no document cut
    return cfg


def run_cross(cross, name, distill=None, **sections):
    cfg = cross_config(cross, cross.d / name, distill=distill, **sections)
    return run_cli("distill", "--config", write_config(cross.d / (name + ".json"), cfg)), cross.d / name


def gold_sides(tok, texts):
    """GOLD's inputs for text documents: each text's ids with the eos appended (every token an answer: labels = ids)
    and byte offsets from GOLD's encode_with_byte_offsets, the eos at (len, len) as build_teacher_inputs_from_texts
    puts it; right-padded as GOLD's collators pad."""
    from trl.experimental.utils import encode_with_byte_offsets, pad_byte_offsets
    encs = encode_with_byte_offsets(tok.backend_tokenizer, texts, add_special_tokens=True)
    seqs = [list(ids) + [tok.eos_token_id] for ids, _ in encs]
    offs = [list(map(tuple, o)) + [(len(t.encode()), len(t.encode()))] for (_, o), t in zip(encs, texts)]
    n = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (n - len(s)) for s in seqs])
    labels = torch.tensor([s + [-100] * (n - len(s)) for s in seqs])
    mask = labels.ne(-100).long()
    return ids, labels, mask, torch.stack([pad_byte_offsets(o, n, "right") for o in offs])


def test_cross_tokenizer_step_loss_equals_golds_uld_loss(cross):
    """The recipe's first step (every training document in one micro-batch, the models as loaded) against TRL's
    GOLD ULDLoss (use_extended_uld, hybrid, GOLD's weights) on the same documents through transformers: GOLD's
    uld_crossentropy_weight 1 - kd_ratio and uld_distillation_weight kd_ratio x ours."""
    kd_ratio, weight = 0.6, 2.0
    result, out = run_cross(cross, "gold", distill={"kd_ratio": kd_ratio, "uld_use_hybrid_loss": True,
                                                    "uld_distillation_weight": weight, "jsd_beta": 0.3},
                            train={"steps": 1, "batch_size": 8, "grad_accum": 1, "warmup_steps": 0})
    check_ok(result)
    assert "vocabulary: cross-tokenizer (experimental, TRL GOLD's ULD)" in result.stderr
    assert f"{CROSS_STUDENT} tokens spelled alike compared id by id" in result.stderr
    step = next(m for m in metrics(out) if m.get("step") == 1 and "uld" in m)
    texts = [json.loads(l)["text"] for l in open(cross.train)]
    ts, tt = hf_tok(cross.student), hf_tok(cross.teacher)
    s_ids, s_labels, s_mask, s_offs = gold_sides(ts, texts)
    t_ids, t_labels, t_mask, t_offs = gold_sides(tt, texts)
    student = transformers.AutoModelForCausalLM.from_pretrained(cross.student, dtype=torch.float32).eval()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(cross.teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        zs = student(input_ids=s_ids, attention_mask=s_mask).logits
        zt = teacher(input_ids=t_ids, attention_mask=t_mask).logits
    cfg = uld_config(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, use_extended_uld=True,
                     uld_skip_student_eos=True, uld_skip_teacher_eos=True, uld_use_hybrid_loss=True, beta=0.3)
    uld = gold().ULDLoss(cfg, student_tokenizer=ts, teacher_tokenizer=tt)
    want_uld = uld(zs, zt, s_labels, t_labels, s_ids, t_ids, s_offs, t_offs).item()
    ce = gold().ULDLoss(uld_config(uld_crossentropy_weight=1.0, uld_distillation_weight=0.0, use_extended_uld=True,
                                   uld_skip_student_eos=True, uld_skip_teacher_eos=True),
                        student_tokenizer=ts, teacher_tokenizer=tt)
    want_ce = ce(zs, zt, s_labels, t_labels, s_ids, t_ids, s_offs, t_offs).item()
    assert step["uld"] == pytest.approx(weight * want_uld, rel=1e-4)
    assert step["ce"] == pytest.approx(want_ce, rel=1e-4)
    assert step["loss"] == pytest.approx((1 - kd_ratio) * want_ce + kd_ratio * weight * want_uld, rel=1e-4)
    # The student written keeps its own tokenizer.
    assert json.load(open(out / "model" / "tokenizer.json")) == json.load(open(os.path.join(cross.student, "tokenizer.json")))


@pytest.mark.parametrize("merge", ["observed", "bayesian"])
@pytest.mark.parametrize("hybrid,skip", [(False, True), (True, False), (True, True)])
def test_cross_document_loss_equals_golds_with_gradients(cross, merge, hybrid, skip):
    """One document pair, random logits: our loss and its gradient wrt the student's logits against GOLD's
    ULDLoss (extended ULD) for both merge strategies, hybrid or not, the eos skipped or not; a prompt the answer
    follows (labels -100 on it), so the bayesian shift has a predictor."""
    ts, tt = hf_tok(cross.student), hf_tok(cross.teacher)
    ours_s, ours_t = _C.Tokenizer.load(cross.student), _C.Tokenizer.load(cross.teacher)
    text = "Q: what is an algorithm? A: a finite sequence of well-defined instructions, typically to solve a problem."
    s_ids, s_labels, _, s_offs = gold_sides(ts, [text])
    t_ids, t_labels, _, t_offs = gold_sides(tt, [text])
    cut = len("Q: what is an algorithm?")  # the prompt: no answers before this byte
    s_labels[0, s_offs[0, :, 1] <= cut], t_labels[0, t_offs[0, :, 1] <= cut] = -100, -100
    g = torch.Generator().manual_seed(5 + hybrid + 2 * skip)
    zs = (torch.randn(1, s_ids.size(1), CROSS_STUDENT, dtype=torch.float64, generator=g) * 2).requires_grad_(True)
    zt = torch.randn(1, t_ids.size(1), CROSS_TEACHER, dtype=torch.float64, generator=g) * 2
    cfg = uld_config(use_extended_uld=True, uld_token_merge_strategy=merge, uld_use_hybrid_loss=hybrid, beta=0.5,
                     uld_skip_student_eos=skip, uld_skip_teacher_eos=skip, uld_student_temperature=1.3,
                     uld_teacher_temperature=0.8)
    want = gold().ULDLoss(cfg, student_tokenizer=ts, teacher_tokenizer=tt)(zs, zt, s_labels, t_labels, s_ids, t_ids,
                                                                          s_offs, t_offs)
    tid, sid = _C.shared_tokens(ours_t, ours_s)
    for side, ours in ((s_ids, ours_s), (t_ids, ours_t)):  # our offsets are GOLD's
        ids, offs = ours.encode_with_offsets(text, True)
        assert ids == side[0, :len(ids)].tolist()
    got = _C.cross_document_loss(
        zs[0], zt[0], s_ids[0].tolist(), s_labels[0].ne(-100).tolist(), [tuple(o) for o in s_offs[0].tolist()],
        t_ids[0].tolist(), t_labels[0].ne(-100).tolist(), [tuple(o) for o in t_offs[0].tolist()], sid, tid,
        student_temperature=1.3, teacher_temperature=0.8, hybrid=hybrid, beta=0.5, skip_student_eos=skip,
        skip_teacher_eos=skip, merge=merge, chunk=3)
    assert got.item() == pytest.approx(want.item(), rel=1e-10)
    gw, gg = torch.autograd.grad(want, zs)[0], torch.autograd.grad(got, zs)[0]
    assert torch.allclose(gg, gw, rtol=1e-8, atol=1e-12), (gg - gw).abs().max()


def test_cross_tokenizer_run_trains_and_its_uld_falls(cross):
    # Rows of 48 student tokens cut most documents: the teacher's side is cut at the same byte.
    result, out = run_cross(cross, "trains", distill={"kd_ratio": 1.0, "uld_use_hybrid_loss": True},
                            train={"steps": 24, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "warmup_steps": 0},
                            eval={"every": 12}, data={"seq_len": 48})
    check_ok(result)
    lines = [m for m in metrics(out) if "uld" in m]
    assert len(lines) == 24 and all(m["uld"] > 0 for m in lines)
    first, last = sum(m["uld"] for m in lines[:4]) / 4, sum(m["uld"] for m in lines[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert any("val_loss" in m for m in metrics(out))
    assert "student loss" in result.stdout
    transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"))  # a model transformers loads


def test_cross_tokenizer_errors_name_the_key(cross, tmp_path):
    # A student folder without a tokenizer.
    bare = str(tmp_path / "bare")
    small_llama(CROSS_STUDENT, 2, 3).save_pretrained(bare)
    cfg = cross_config(cross, tmp_path / "o1", student=bare)
    result = run_cli("distill", "--config", write_config(tmp_path / "c1.json", cfg))
    assert result.returncode != 0 and "config key distill.vocab" in result.stderr and "has none" in result.stderr
    # Chat lines: each side would render its own template.
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    cfg = cross_config(cross, tmp_path / "o2", train_path=chat)
    result = run_cli("distill", "--config", write_config(tmp_path / "c2.json", cfg))
    assert result.returncode != 0 and "config key data.train" in result.stderr and "chat.jsonl:1" in result.stderr
    # Without the key, another tokenizer is refused with the first differing token, naming the key.
    result, _ = run_cross(cross, "refused", distill={"vocab": "same"})
    assert result.returncode != 0 and "config key student.path" in result.stderr
    assert 'set distill.vocab "cross-tokenizer"' in result.stderr
    # A uld_* key without the mode, and a combination not yet supported.
    result, _ = run_cross(cross, "k1", distill={"vocab": "same", "uld_teacher_temperature": 2.0})
    assert result.returncode != 0 and "config key distill.uld_teacher_temperature: is for distill.vocab" in result.stderr
    result, _ = run_cross(cross, "k2", teacher={"cache": str(tmp_path / "cache")})
    assert result.returncode != 0 and "config key teacher.cache" in result.stderr
    result, _ = run_cross(cross, "k3", distill={"temperature": 2.0})
    assert result.returncode != 0 and "config key distill.temperature: is not used with" in result.stderr
