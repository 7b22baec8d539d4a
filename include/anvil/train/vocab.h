// Teacher and student vocabularies: which rows of the two LM heads a distillation compares, decided once from the
// two configs and tokenizers, and the pieces of cross-tokenizer distillation (TRL GOLD's ULD) that do not need the
// recipe.
//
// Why it is built this way:
// - Padded rows. Models pad their embedding matrix past the tokenizer for kernel-friendly shapes: Qwen2.5-7B/14B
//   have 152064 rows, Qwen2.5-0.5B..3B 151936, one tokenizer of 151665 ids (torchtune#2119, trl#3028). No token id
//   reaches those rows, so a distribution over them is noise the teacher happens to emit. The compared vocabulary
//   is the tokenizer's size: both models' logits are cut to those columns before the softmax, so both
//   distributions renormalise over the real tokens (what torchtune's maintainers advise in #2119/#2416, LMOps#331
//   and Model-Optimizer#2489 do by hand, cutting to the smaller model's rows). Cutting to the tokenizer rather than
//   to the smaller head leaves out the smaller model's padding as well, so the result does not depend on which
//   side has more padding, and the offline cache (written before the student is known) holds ids < the tokenizer
//   size only. The student's cross-entropy still sees all its rows (train/kd_loss.h).
// - Automatic: the mapping follows from the configs and tokenizer files, printed as one line; anything that
//   cannot be compared exactly (sizes that no tokenizer explains, tokenizers that differ) is a config error
//   naming both sides, the sizes and the first differing token (never a silent mismatch: trl#4562).
// - Different tokenizers (experimental): the shared-token mapping and the byte-offset alignment of TRL 1.16's
//   GOLDTrainer (trl/experimental/gold/gold_trainer.py, ULDLoss._initialize_vocabulary_mapping,
//   _align_by_byte_offsets, _merge_probabilities_with_alignment_groups) are here and tested against TRL; the loss
//   term is uld_divergence (train/kd_loss.h); train/cross_vocab.h wires them into anvil distill (distill.vocab
//   "cross-tokenizer").
#pragma once

#include "anvil/data/tokenizer.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

/// One side of a distillation: its LM head's rows (config.json vocab_size) and the tokenizer its folder holds.
struct VocabSide {
  int64_t rows = 0;                             ///< vocab_size: LM-head (and embedding) rows
  const data::Tokenizer* tokenizer = nullptr;   ///< the folder's own tokenizer, or null (none, or the other side's)
  std::string folder;                           ///< for messages: where rows and tokenizer come from
  std::string key;                              ///< the config key naming the folder (teacher.path, student.path)
};

enum class VocabMapping {
  kSame,    ///< one tokenizer, every head row a token (or no tokenizer and equal rows): all rows compared
  kPadded,  ///< one tokenizer, at least one head with rows past it: the first `compared` rows of both compared
};

struct VocabPlan {
  VocabMapping mapping = VocabMapping::kSame;
  int64_t compared = 0;                   ///< rows of both heads compared: the shared real vocabulary
  int64_t teacher_rows = 0, student_rows = 0;
  std::string line;                       ///< what the recipe prints: the mapping, the sizes, what is left out
};

/// The mapping for teacher and student. The tokenizer is the teacher's, else the student's; a student tokenizer
/// that differs from the teacher's (first_differing_token) is an error naming both folders, the sizes and the first
/// differing id, pointing to distill.vocab "cross-tokenizer" (train/cross_vocab.h, which does not call this). Equal rows: kSame, or kPadded when the
/// tokenizer has fewer ids than the rows. Different rows: kPadded over the tokenizer's ids, which must be <= both
/// (else an error naming the side and the ids without a row); without any tokenizer, an error (nothing says which
/// rows are real). std::invalid_argument naming the student's key.
VocabPlan plan_vocabularies(const VocabSide& teacher, const VocabSide& student);

/// The first id whose token differs between two tokenizers (their spellings, id_to_token), or the smaller size
/// when one is a prefix of the other; -1 when they are the same (same size, same token at every id).
int64_t first_differing_token(const data::Tokenizer& a, const data::Tokenizer& b);

// ---- different tokenizers (experimental: TRL GOLD) ------------------------------------------------------

/// The tokens both vocabularies spell the same, as GOLD's ULDLoss._initialize_vocabulary_mapping (over
/// get_vocab(): base and added tokens): teacher_ids (M) int64 ascending and student_ids (M) int64, the student id
/// of each. Empty (M = 0) when nothing is shared.
struct SharedTokens {
  at::Tensor teacher_ids, student_ids;
};
SharedTokens shared_tokens(const data::Tokenizer& teacher, const data::Tokenizer& student);

/// GOLD's _align_by_byte_offsets: the positions of two tokenizations of one text grouped where both reach the
/// same byte boundary ([start, end) byte offsets per token, in order); a trailing remainder forms one last group
/// pair. Returns (student groups, teacher groups), one list of positions per group, equally many.
std::pair<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>> align_by_byte_offsets(
    const std::vector<std::pair<int64_t, int64_t>>& student_offsets,
    const std::vector<std::pair<int64_t, int64_t>>& teacher_offsets);

/// GOLD's _merge_probabilities_with_alignment_groups: probs (S, V) -> (groups, V). A one-token group keeps its
/// row; a longer one is, "observed", its first row times the probabilities of the actual later tokens
/// (token_ids[i], clamped at 1e-8), or, "bayesian", its last row times those of the actual earlier tokens; an empty
/// group is zeros. Differentiable (ATen ops). An unknown strategy or an id outside the rows is an error.
at::Tensor merge_aligned_probabilities(const at::Tensor& probs, const std::vector<std::vector<int64_t>>& groups,
                                       const std::vector<int64_t>& token_ids, const std::string& strategy = "observed");

}  // namespace anvil::train
