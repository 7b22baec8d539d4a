// Cross-tokenizer distillation (experimental): a student whose tokenizer is not the teacher's, distilled with
// TRL 1.16 GOLD's extended Universal Logit Distillation (trl/experimental/gold/gold_trainer.py, ULDLoss with
// use_extended_uld), online: both models see the same documents, each through its own tokenizer.
//
// Per document (GOLD's _compute_distillation_loss, read line by line):
//   1. the answer span of each side: from its first target token, as many tokens as it has targets (GOLD's
//      _get_start_and_size_answers; targets are the document's trained tokens, unshifted: token k itself), less
//      the last (the eos) with uld_skip_*_eos;
//   2. the logits rows: "observed" the span's own positions, "bayesian" one earlier (probs[k] predicts token k;
//      a span from position 0 drops its first aligned group pair, which has no predictor);
//   3. softmax(z / T) per side (uld_student_temperature, uld_teacher_temperature);
//   4. the span tokens grouped where both tokenizations reach the same byte (train/vocab.h align_by_byte_offsets
//      over the tokens' byte offsets, data/token_offsets.h), pairs with an empty side dropped;
//   5. each side's group rows merged (merge_aligned_probabilities, uld_token_merge_strategy);
//   6. the per-document loss: the mean over groups of uld_divergence_probs (hybrid with uld_use_hybrid_loss).
// GOLD's distillation term is the mean over a batch's documents x uld_distillation_weight. Here a micro-batch's
// term is that mean x its share of the optimizer step's targets (so micro-batches weigh as CE's do; one
// micro-batch per step is GOLD's value exactly), and the total is (1 - kd_ratio) CE + kd_ratio ULD: GOLD's
// uld_crossentropy_weight c and uld_distillation_weight d are kd_ratio = d / (c + d), a total smaller by c + d.
//
// How documents get to both models: every line of the data files is tokenized by both tokenizers ("text" and
// "prompt"/"completion" lines, with byte offsets in one coordinate: the text, or prompt then completion), kept by
// the student's ids; the student trains on its packed batches as in any run, and each micro-batch's documents are
// found by their ids and packed again for the teacher, one row per document in the same order, the teacher's
// tokens cut where the student's row cut the document (at the student's last kept byte).
#pragma once

#include "anvil/data/batches.h"
#include "anvil/data/token_offsets.h"
#include "anvil/model/transformer.h"
#include "anvil/train/config.h"
#include "anvil/train/kd_loss.h"
#include "anvil/train/trainer.h"
#include "anvil/train/vocab.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace anvil::train {

/// GOLDConfig's ULD keys (distill.uld_* in anvil distill; defaults GOLD's).
struct CrossVocabOptions {
  UldOptions uld;                   ///< temperatures, hybrid, matched/unmatched weights, the matched JSD's beta
  double distillation_weight = 1.0; ///< uld_distillation_weight: the ULD term's factor
  bool skip_student_eos = true;     ///< uld_skip_student_eos: the answer span's last token left out
  bool skip_teacher_eos = true;     ///< uld_skip_teacher_eos
  std::string merge = "observed";   ///< uld_token_merge_strategy: "observed" | "bayesian"
  int64_t chunk = 1024;             ///< aligned rows per uld_divergence call
};

/// One document as both tokenizers see it: ids, which tokens are targets (trained on), the byte span of each
/// token in the document's text (prompt then completion).
struct CrossSide {
  std::vector<int32_t> ids;
  std::vector<uint8_t> target;
  std::vector<data::ByteSpan> offsets;
};
struct CrossDocument {
  CrossSide student, teacher;
};

/// A document of a "text" or "prompt"/"completion" JSONL line through one tokenizer, as data::tokenize_example
/// tokenizes it (bos where the tokenizer adds one, the eos appended with add_eos), with byte offsets. A "messages"
/// or pre-tokenized line is an error naming `what` and `where` (not yet supported across tokenizers).
CrossSide cross_side(const std::string& json_line, const data::Tokenizer& tok, const data::ReadOptions& options,
                     const std::string& what, const std::string& where);

/// The documents of JSONL files through both tokenizers, looked up by the student's ids as a packed row holds
/// them (cut to seq_len).
class CrossDocuments {
 public:
  CrossDocuments(const data::Tokenizer& student, const data::Tokenizer& teacher, const data::ReadOptions& options,
                 int64_t seq_len);
  /// Every non-blank line of `path`; `what` names it in errors ("config key data.train").
  void add_file(const std::string& path, const std::string& what);
  void add_line(const std::string& line, const std::string& what, const std::string& where);
  /// The document whose student ids (cut to seq_len) are ids[0, n), or null.
  const CrossDocument* find(const int32_t* ids, int64_t n) const;
  int64_t size() const { return int64_t(docs_.size()); }
  int32_t teacher_pad_id() const { return teacher_pad_; }

 private:
  const data::Tokenizer &student_, &teacher_;
  data::ReadOptions options_;
  int64_t seq_len_;
  int32_t teacher_pad_ = 0;
  std::unordered_map<std::string, CrossDocument> docs_;
};

/// The documents of data.train and data.validation (when given) through both tokenizers, read with the data
/// section's loss_on and add_eos as read_training_data reads them for the student.
std::unique_ptr<CrossDocuments> read_cross_documents(const DataSection& d, const data::Tokenizer& student,
                                                     const data::Tokenizer& teacher);

/// GOLD's loss of one document pair from both models' logits over it: student_logits (Ns, Vs) at the student's
/// tokens (its whole document as fed), teacher_logits (Nt, Vt) likewise; the shared ids (train/vocab.h
/// shared_tokens) for the hybrid. Returns () the mean over aligned groups (0 with a graph when nothing aligns),
/// with autograd to student_logits. The reference the recipe's path is tested against (and what it calls).
at::Tensor cross_document_loss(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                               const CrossSide& student, const CrossSide& teacher, const at::Tensor& shared_student_ids,
                               const at::Tensor& shared_teacher_ids, const CrossVocabOptions& o);

/// One micro-batch: total = (1 - kd_ratio) ce + kd_ratio uld. ce the student's CE over the batch (/ normalizer);
/// uld = distillation_weight x the mean of cross_document_loss over the batch's documents x b.targets /
/// normalizer. The teacher (frozen, Teacher::head its whole head) runs under no grad over its own ids.
struct CrossBatchLoss {
  at::Tensor total, uld, ce;  ///< () fp32; total with autograd
  int64_t documents = 0;
};
CrossBatchLoss cross_batch_loss(model::CausalLM& student, const Teacher& teacher, const CrossDocuments& docs,
                                const SharedTokens& shared, const data::Batch& b, double normalizer,
                                const CrossVocabOptions& o, double kd_ratio, int64_t ce_chunk, at::Device device);

/// cross_batch_loss as the trainer's loss callback, terms "uld" and "ce".
LossFn cross_loss_fn(model::CausalLM& student, const Teacher& teacher, const CrossDocuments& docs,
                     const SharedTokens& shared, const CrossVocabOptions& o, double kd_ratio, int64_t ce_chunk,
                     at::Device device);

}  // namespace anvil::train
