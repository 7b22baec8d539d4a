// The vocabulary mapping of a distillation (anvil/train/vocab.h): which rows are compared for equal heads, padded
// heads on either side and both, and the config errors for what cannot be compared (each naming the key, the
// folders, the sizes and the first differing token); the shared tokens of two vocabularies; the byte-offset
// alignment and the merge of aligned groups on hand-made cases (tests/python/test_distill_vocab.py compares them
// with TRL's GOLD).
#include "anvil/train/vocab.h"

#include <gtest/gtest.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace anvil::train {
namespace {

// A vocabulary of spelled tokens; only the lookups the mapping uses.
class FakeTokenizer : public data::Tokenizer {
 public:
  explicit FakeTokenizer(std::vector<std::string> tokens) : tokens_(std::move(tokens)) {}
  std::vector<int32_t> encode(const std::string&, bool) const override { return {}; }
  std::string decode(const std::vector<int32_t>&, bool) const override { return ""; }
  int64_t vocab_size() const override { return int64_t(tokens_.size()); }
  std::optional<int32_t> token_to_id(const std::string& t) const override {
    for (size_t i = 0; i < tokens_.size(); ++i)
      if (tokens_[i] == t) return int32_t(i);
    return std::nullopt;
  }
  std::string id_to_token(int32_t id) const override { return tokens_.at(size_t(id)); }
  std::string kind() const override { return "fake"; }

 private:
  std::vector<std::string> tokens_;
};

std::vector<std::string> spelled(int n, const std::string& prefix = "t") {
  std::vector<std::string> v;
  for (int i = 0; i < n; ++i) v.push_back(prefix + std::to_string(i));
  return v;
}

VocabSide side(int64_t rows, const data::Tokenizer* tok, const std::string& folder, const std::string& key) {
  VocabSide s;
  s.rows = rows, s.tokenizer = tok, s.folder = folder, s.key = key;
  return s;
}

void expect_refused(const VocabSide& t, const VocabSide& s, const std::vector<std::string>& words) {
  try {
    plan_vocabularies(t, s);
    ADD_FAILURE() << "accepted; expected an error mentioning " << words.front();
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "lacks '" << w << "': " << msg;
  }
}

TEST(Vocab, SameAndPaddedOnEitherSideAndBoth) {
  const FakeTokenizer tok(spelled(100));
  auto p = plan_vocabularies(side(100, &tok, "T", "teacher.path"), side(100, nullptr, "S", "student.path"));
  EXPECT_EQ(p.mapping, VocabMapping::kSame);
  EXPECT_EQ(p.compared, 100);
  EXPECT_NE(p.line.find("vocabulary: same, 100 rows"), std::string::npos) << p.line;
  // No tokenizer at all (pre-tokenized data), equal rows: every row.
  p = plan_vocabularies(side(64, nullptr, "T", "teacher.path"), side(64, nullptr, "S", "student.path"));
  EXPECT_EQ(p.mapping, VocabMapping::kSame);
  EXPECT_EQ(p.compared, 64);
  // Qwen2.5's shapes, scaled: teacher 128 rows, student 112, the tokenizer 100 ids.
  p = plan_vocabularies(side(128, &tok, "T", "teacher.path"), side(112, nullptr, "S", "student.path"));
  EXPECT_EQ(p.mapping, VocabMapping::kPadded);
  EXPECT_EQ(p.compared, 100);
  EXPECT_NE(p.line.find("the teacher's 28 and the student's 12 padded rows"), std::string::npos) << p.line;
  p = plan_vocabularies(side(100, &tok, "T", "teacher.path"), side(128, &tok, "S", "student.path"));  // the reverse
  EXPECT_EQ(p.compared, 100);
  // Equal rows, both padded past the tokenizer: the real tokens only.
  p = plan_vocabularies(side(128, &tok, "T", "teacher.path"), side(128, nullptr, "S", "student.path"));
  EXPECT_EQ(p.mapping, VocabMapping::kPadded);
  EXPECT_EQ(p.compared, 100);
  // The student's own tokenizer, when it is the teacher's, is fine; only the student's tokenizer: it says.
  const FakeTokenizer same(spelled(100));
  p = plan_vocabularies(side(128, nullptr, "T", "teacher.path"), side(112, &same, "S", "student.path"));
  EXPECT_EQ(p.compared, 100);
}

TEST(Vocab, WhatCannotBeComparedIsAnErrorNamingWhatDiffers) {
  const FakeTokenizer tok(spelled(100));
  auto other = spelled(100);
  other[37] = "x37";
  const FakeTokenizer differs(other);
  expect_refused(side(100, &tok, "T/", "teacher.path"), side(100, &differs, "S/", "student.path"),
                 {"config key student.path", "S/", "T/", "id 37", "\"t37\" in the teacher's", "\"x37\" in the student's",
                  "ULD"});
  const FakeTokenizer longer(spelled(110));  // a prefix of the other: the first id past the shorter
  expect_refused(side(128, &tok, "T/", "teacher.path"), side(128, &longer, "S/", "student.path"),
                 {"id 100", "(none: 100 ids)", "\"t100\""});
  expect_refused(side(128, &tok, "T/", "teacher.path"), side(96, nullptr, "S/", "student.config"),
                 {"config key student.config", "ids 96..99 have no row in the student's head", "100 ids"});
  expect_refused(side(96, &tok, "T/", "teacher.path"), side(128, nullptr, "S/", "student.path"),
                 {"ids 96..99 have no row in the teacher's head"});
  expect_refused(side(128, nullptr, "T/", "teacher.path"), side(112, nullptr, "S/", "student.path"),
                 {"vocab_size 128", "112", "neither folder has a tokenizer"});
  EXPECT_EQ(first_differing_token(tok, differs), 37);
  EXPECT_EQ(first_differing_token(tok, FakeTokenizer(spelled(100))), -1);
}

TEST(Vocab, SharedTokensMapTeacherIdsToStudentIds) {
  const FakeTokenizer teacher({"a", "b", "c", "d", "only_t"});
  const FakeTokenizer student({"d", "x", "b", "a", "only_s", "y"});
  const auto s = shared_tokens(teacher, student);
  EXPECT_TRUE(at::equal(s.teacher_ids, at::tensor({0, 1, 3}, at::kLong)));
  EXPECT_TRUE(at::equal(s.student_ids, at::tensor({3, 2, 0}, at::kLong)));
  const auto none = shared_tokens(FakeTokenizer({"p"}), FakeTokenizer({"q"}));
  EXPECT_EQ(none.teacher_ids.numel(), 0);
}

TEST(Vocab, ByteOffsetAlignmentAndMerge) {
  // "hello world": student "hel|lo| world" (3 tokens), teacher "hello| wor|ld" (3 tokens).
  const std::vector<std::pair<int64_t, int64_t>> so = {{0, 3}, {3, 5}, {5, 11}}, to = {{0, 5}, {5, 9}, {9, 11}};
  const auto [sg, tg] = align_by_byte_offsets(so, to);
  EXPECT_EQ(sg, (std::vector<std::vector<int64_t>>{{0, 1}, {2}}));
  EXPECT_EQ(tg, (std::vector<std::vector<int64_t>>{{0}, {1, 2}}));
  // A teacher cut short: the remainder is one last group pair.
  const auto [sg2, tg2] = align_by_byte_offsets(so, {{0, 5}});
  EXPECT_EQ(sg2, (std::vector<std::vector<int64_t>>{{0, 1}, {2}}));
  EXPECT_EQ(tg2, (std::vector<std::vector<int64_t>>{{0}, {}}));
  const auto probs = at::softmax(at::randn({3, 5}, at::kDouble), 1);
  const std::vector<int64_t> ids = {4, 2, 1};
  const auto observed = merge_aligned_probabilities(probs, sg, ids, "observed");
  EXPECT_TRUE(at::allclose(observed[0], probs[0] * probs[1][2]));  // the first row x p(the second token)
  EXPECT_TRUE(at::allclose(observed[1], probs[2]));
  const auto bayesian = merge_aligned_probabilities(probs, sg, ids, "bayesian");
  EXPECT_TRUE(at::allclose(bayesian[0], probs[1] * probs[0][4]));  // the last row x p(the first token)
  const auto empty = merge_aligned_probabilities(probs, tg2, ids, "observed");
  EXPECT_EQ(empty[1].abs().sum().item<double>(), 0.0);
  EXPECT_THROW(merge_aligned_probabilities(probs, sg, ids, "mean"), std::invalid_argument);
  EXPECT_THROW(merge_aligned_probabilities(probs, {{0, 1}}, {}, "observed"), c10::Error);
}

}  // namespace
}  // namespace anvil::train
