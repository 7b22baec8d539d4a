// Cross-tokenizer distillation (anvil/train/cross_vocab.h) and the byte offsets it aligns by
// (anvil/data/token_offsets.h), on the tokenizer fixtures of tests/data/tokenizers: gpt2 and qwen2 are two
// byte-level BPEs that cut the same text differently. GOLD equality (TRL's own code) is in
// tests/python/test_distill_vocab.py; here, the invariants and the errors.
#include "anvil/train/cross_vocab.h"

#include "anvil/data/token_offsets.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

namespace anvil::train {
namespace {

const std::string kData = std::string(ANVIL_TEST_DATA_DIR) + "/tokenizers/";

std::unique_ptr<data::Tokenizer> fixture(const std::string& family) { return data::load_tokenizer(kData + family); }

// The spans tile the text where tokens spell it, in order, each the token's own bytes.
void expect_spans_spell(const data::Tokenizer& tok, const std::string& text, bool special) {
  const auto e = data::encode_with_offsets(tok, text, special);
  ASSERT_EQ(e.ids.size(), e.offsets.size());
  int64_t cur = 0;
  std::string rebuilt;
  for (size_t i = 0; i < e.ids.size(); ++i) {
    const auto [a, b] = e.offsets[i];
    EXPECT_GE(a, cur) << tok.kind() << " token " << i;
    EXPECT_LE(b, int64_t(text.size()));
    rebuilt += text.substr(size_t(a), size_t(b - a));
    if (b > a) {
      EXPECT_EQ(text.substr(size_t(a), size_t(b - a)), data::token_bytes(tok, e.ids[i]).substr(
                    data::token_bytes(tok, e.ids[i]).size() - size_t(b - a)));
    }
    cur = b;
  }
  EXPECT_EQ(rebuilt, text) << "the spans of every token cover the text once";
}

TEST(TokenOffsets, SpansTileTheTextForEveryKind) {
  const std::string texts[] = {"Hello world, déjà vu 中文 😀\n\ndef f(): pass", "  leading spaces and\ttabs  ",
                               "<|endoftext|> inside", "x"};
  for (const char* family : {"gpt2", "qwen2", "llama3", "llama2"}) {
    const auto tok = fixture(family);
    for (const auto& t : texts) {
      SCOPED_TRACE(std::string(family) + ": " + t);
      expect_spans_spell(*tok, t, true);
      expect_spans_spell(*tok, t, false);
    }
  }
}

TEST(TokenOffsets, SpecialTokensOfThePostProcessorAreEmptySpans) {
  const auto tok = fixture("llama3");  // prepends <|begin_of_text|>
  const auto e = data::encode_with_offsets(*tok, "Hi there", true);
  ASSERT_GE(e.ids.size(), 2u);
  EXPECT_EQ(e.ids[0], tok->bos_id());
  EXPECT_EQ(e.offsets[0], (data::ByteSpan{0, 0}));
  EXPECT_EQ(e.offsets[1].first, 0);
  const auto sp = fixture("llama2");  // SentencePiece: <s>, and the dummy prefix not counted
  const auto f = data::encode_with_offsets(*sp, "Hi there", true);
  EXPECT_EQ(f.offsets[0], (data::ByteSpan{0, 0}));
  EXPECT_EQ(f.offsets[1].first, 0);
  EXPECT_EQ(f.offsets.back().second, 8);
}

TEST(TokenOffsets, ATokenThatDoesNotSpellTheTextIsAnError) {
  const auto tok = fixture("gpt2");
  const auto ids = tok->encode("abc", false);
  try {
    data::token_byte_offsets(*tok, "xyz", ids, "the doc");
    FAIL() << "no error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("the doc: token 0"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("does not spell the text at byte 0"), std::string::npos) << e.what();
  }
}

data::ReadOptions options() {
  data::ReadOptions o;
  o.loss_on = data::LossOn::kCompletion;
  return o;
}

TEST(CrossVocab, BothSidesShareOneByteCoordinate) {
  const auto s = fixture("gpt2"), t = fixture("qwen2");
  const std::string line = R"({"prompt": "Q: what is a hash?\nA:", "completion": " A function from keys to slots."})";
  const auto a = cross_side(line, *s, options(), "data", "f:1"), b = cross_side(line, *t, options(), "data", "f:1");
  const int64_t prompt = int64_t(std::string("Q: what is a hash?\nA:").size()), end = prompt + 31;
  for (const auto* side : {&a, &b}) {
    ASSERT_FALSE(side->ids.empty());
    EXPECT_EQ(side->offsets.back(), (data::ByteSpan{end, end})) << "the eos: an empty span at the end";
    EXPECT_EQ(side->target.back(), 1);
    for (size_t i = 0; i < side->ids.size(); ++i)  // the completion's tokens (and the eos) are the targets
      EXPECT_EQ(side->target[i] != 0, side->offsets[i].first >= prompt) << i;
  }
  EXPECT_NE(a.ids, b.ids);
  // The groups close where both tokenizers cut at one byte: every pair ends on the same byte.
  const auto [sg, tg] = align_by_byte_offsets(a.offsets, b.offsets);
  ASSERT_EQ(sg.size(), tg.size());
  for (size_t g = 0; g + 1 < sg.size(); ++g)
    EXPECT_EQ(a.offsets[size_t(sg[g].back())].second, b.offsets[size_t(tg[g].back())].second);
}

TEST(CrossVocab, LinesItCannotTokenizeTwiceAreErrorsNamingTheLine) {
  const auto s = fixture("gpt2");
  auto message = [&](const std::string& line) {
    try {
      cross_side(line, *s, options(), "config key data.train", "train.jsonl:3");
    } catch (const std::runtime_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message(R"({"input_ids": [1, 2]})").find("config key data.train: train.jsonl:3: a pre-tokenized line"),
            std::string::npos);
  EXPECT_NE(message(R"({"messages": [{"role": "user", "content": "hi"}]})").find("chat lines (\"messages\") are not yet"),
            std::string::npos);
  EXPECT_NE(message(R"({"words": "x"})").find("a line needs \"text\" or \"prompt\" + \"completion\""), std::string::npos);
}

TEST(CrossVocab, DocumentsAreFoundByTheStudentsIdsAsARowCutsThem) {
  const auto s = fixture("gpt2"), t = fixture("qwen2");
  CrossDocuments docs(*s, *t, options(), /*seq_len=*/6);
  const std::string long_line = R"({"text": "one two three four five six seven eight nine ten"})";
  docs.add_line(long_line, "data", "f:1");
  docs.add_line(R"({"text": "short"})", "data", "f:2");
  docs.add_line(R"({"text": "short"})", "data", "f:3");  // the same text: one entry
  EXPECT_EQ(docs.size(), 2);
  const auto ids = data::tokenize_example(long_line, *s, options(), "f:1").ids;
  ASSERT_GT(ids.size(), 6u);
  const auto* d = docs.find(ids.data(), 6);  // a row of 6 holds the first 6 tokens
  ASSERT_NE(d, nullptr);
  EXPECT_EQ(d->student.ids, ids);
  EXPECT_EQ(docs.find(ids.data(), 5), nullptr);
}

TEST(CrossVocab, OneTokenizerOnBothSidesIsTheLossOfAlignedRows) {
  // Both sides the same tokenization: every group one token, so the loss is the mean ULD of the span's rows.
  const auto s = fixture("gpt2");
  const auto side = cross_side(R"({"text": "the cat sat on the mat"})", *s, options(), "d", "f:1");
  const int64_t n = int64_t(side.ids.size()), v = s->vocab_size();
  at::manual_seed(7);
  const auto zs = at::randn({n, v}, at::kDouble).requires_grad_(true), zt = at::randn({n, v}, at::kDouble);
  CrossVocabOptions o;
  o.chunk = 2;  // chunks sum to the whole
  const auto empty = at::empty({0}, at::kLong);
  const auto got = cross_document_loss(zs, zt, side, side, empty, empty, o);
  // observed, eos skipped: rows 0 .. n - 2
  const auto want = uld_divergence(zs.narrow(0, 0, n - 1), zt.narrow(0, 0, n - 1), empty, empty, o.uld).mean();
  EXPECT_NEAR(got.item<double>(), want.item<double>(), 1e-12);
  o.merge = "bayesian";  // the span starts at 0: its first group has no predictor and is dropped
  const auto bay = cross_document_loss(zs, zt, side, side, empty, empty, o);
  const auto want_b = uld_divergence(zs.narrow(0, 0, n - 2), zt.narrow(0, 0, n - 2), empty, empty, o.uld).mean();
  EXPECT_NEAR(bay.item<double>(), want_b.item<double>(), 1e-12);
  o.merge = "mean";
  EXPECT_THROW(cross_document_loss(zs, zt, side, side, empty, empty, o), std::invalid_argument);
}

}  // namespace
}  // namespace anvil::train
