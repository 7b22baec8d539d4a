// The batch pieces of on-policy distillation (data::document_prompts, data::completion_batch) and its
// deterministic draw (train::on_policy_hash): prompts cut where each packed document's targets begin,
// generated rows whose labels are exactly the completion, and a draw that is a pure function of what a
// resumed run sees again. The recipe end to end: tests/python/test_distill_generation.py.
#include "anvil/train/kd_generation.h"

#include <gtest/gtest.h>

#include <stdexcept>

namespace anvil::train {
namespace {

using data::kNoTarget;

// Two rows of 8: row 0 packs a prompt/completion document (prompt 3 tokens) and a text document (every token
// a target); row 1 holds a document without targets and padding.
data::Batch packed_batch() {
  data::Batch b;
  b.rows = 2, b.length = 8;
  b.ids = {10, 11, 12, 13, 14, 20, 21, 22, /**/ 30, 31, 0, 0, 0, 0, 0, 0};
  b.doc_ids = {0, 0, 0, 0, 0, 1, 1, 1, /**/ 0, 0, -1, -1, -1, -1, -1, -1};
  b.positions = {0, 1, 2, 3, 4, 0, 1, 2, /**/ 0, 1, 0, 0, 0, 0, 0, 0};
  // labels[i] = ids[i + 1] where token i + 1 is a target: doc 0's targets are 13, 14; doc 1's 21, 22.
  b.labels = {kNoTarget, kNoTarget, 13, 14, kNoTarget, 21, 22, kNoTarget, /**/ kNoTarget, kNoTarget, kNoTarget,
              kNoTarget, kNoTarget, kNoTarget, kNoTarget, kNoTarget};
  b.targets = 4, b.tokens = 10, b.packed = true;
  return b;
}

TEST(KdGeneration, DocumentPromptsEndWhereTargetsBegin) {
  const auto prompts = data::document_prompts(packed_batch());
  ASSERT_EQ(prompts.size(), 2u);  // the document without targets gives none
  EXPECT_EQ(prompts[0], (std::vector<int64_t>{10, 11, 12}));
  EXPECT_EQ(prompts[1], (std::vector<int64_t>{20}));  // text: its first half (3 / 2 = 1 token)
}

TEST(KdGeneration, CompletionBatchTargetsOnlyTheCompletion) {
  const auto b = data::completion_batch({{1, 2, 3}, {4}}, {{5, 6}, {7, 8, 9}}, /*pad_id=*/0);
  EXPECT_EQ(b.rows, 2);
  EXPECT_EQ(b.length, 5);
  EXPECT_EQ(b.ids, (std::vector<int32_t>{1, 2, 3, 5, 6, /**/ 4, 7, 8, 9, 0}));
  EXPECT_EQ(b.labels, (std::vector<int32_t>{kNoTarget, kNoTarget, 5, 6, kNoTarget, /**/ 7, 8, 9, kNoTarget, kNoTarget}));
  EXPECT_EQ(b.positions, (std::vector<int32_t>{0, 1, 2, 3, 4, /**/ 0, 1, 2, 3, 0}));
  EXPECT_EQ(b.doc_ids, (std::vector<int32_t>{0, 0, 0, 0, 0, /**/ 0, 0, 0, 0, -1}));
  EXPECT_EQ(b.targets, 5);
  EXPECT_EQ(b.tokens, 9);
  EXPECT_FALSE(b.packed);
  EXPECT_THROW(data::completion_batch({{1}}, {{}}, 0), std::invalid_argument);
  EXPECT_THROW(data::completion_batch({{1}}, {}, 0), std::invalid_argument);
}

TEST(KdGeneration, OnPolicyHashIsAPureFunctionOfSeedPositionAndTokens) {
  const auto b = packed_batch();
  const uint64_t h = on_policy_hash(b, 5, 0, 3);
  EXPECT_EQ(h, on_policy_hash(b, 5, 0, 3));
  EXPECT_NE(h, on_policy_hash(b, 6, 0, 3));
  EXPECT_NE(h, on_policy_hash(b, 5, 1, 3));
  EXPECT_NE(h, on_policy_hash(b, 5, 0, 4));
  auto other = b;
  other.ids[0] = 99;
  EXPECT_NE(h, on_policy_hash(other, 5, 0, 3));
  // The draws are spread: of 2000 positions about half fall below 0.5.
  int below = 0;
  for (int i = 0; i < 2000; ++i) below += double(on_policy_hash(b, 5, 0, i) >> 11) * 0x1p-53 < 0.5;
  EXPECT_GT(below, 900);
  EXPECT_LT(below, 1100);
}

}  // namespace
}  // namespace anvil::train
