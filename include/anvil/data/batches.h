// What a training recipe reads: JSONL examples (text for the tokenizer, or pre-tokenized ids), a
// deterministic validation split, and micro-batches of packed rows in a resumable order.
// Plain C++ with std types, like the rest of anvil/data.
//
// Resumable order: epoch e packs the examples in the order shuffled_order(n, epoch_seed(seed, e)), so an
// epoch's rows are a pure function of (seed, epoch) and a position (epoch, micro-batch index) is all a
// checkpoint needs to continue the stream exactly; packing is recomputed on resume, never stored.
#pragma once

#include "anvil/data/dataset.h"
#include "anvil/data/tokenizer.h"

#include <cstdint>
#include <string>
#include <functional>
#include <vector>

namespace anvil::data {

/// One JSONL line: pre-tokenized {"input_ids": [...], "labels": [...]?} (labels as transformers takes them:
/// the token itself or -100; every token is a target without labels), else an example for `tok`
/// (tokenize_example's shapes). `tok` may be null when every line is pre-tokenized. `where` ("file:line")
/// starts every error.
Example read_example_line(const std::string& line, const Tokenizer* tok, const ReadOptions& options,
                          const std::string& where);

/// Calls `each(line, where)` for every non-blank line of a JSONL file, `where` being "path:line"; `what` names the
/// file in the error when it cannot be opened ("config key data.train"). Returns the number of lines given.
int64_t for_each_jsonl_line(const std::string& path, const std::string& what,
                            const std::function<void(const std::string& line, const std::string& where)>& each);

/// Every non-blank line of a JSONL file. `what` names the source in errors about the file as a whole
/// ("config key data.train"); errors about a line name file:line.
std::vector<Example> read_examples(const std::string& path, const Tokenizer* tok, const ReadOptions& options,
                                   const std::string& what);

/// A deterministic validation split: a seeded permutation's first round(fraction * n) examples (at least
/// one, and at least one left to train on) move from `train` to `validation`, both kept in file order.
void split_validation(std::vector<Example>& train, std::vector<Example>& validation, double fraction, uint64_t seed);

/// One micro-batch, on the host: `rows` rows of `length` tokens, row-major.
struct Batch {
  int64_t rows = 0, length = 0;
  std::vector<int32_t> ids, labels, positions, doc_ids;
  int64_t targets = 0, tokens = 0;  ///< labels != -100; non-padding tokens
  bool packed = false;              ///< some row holds a second document (doc id > 0)
};

/// Rows [begin, end) of packed rows as a batch (its counts filled in).
Batch slice_rows(const PackedRows& rows, int64_t begin, int64_t end);

/// A data parallel rank's share of a micro-batch: rows rank, rank + world, rank + 2 world, ... (its counts
/// filled in); no rows when the batch has at most `rank` rows. Every rank takes its rows of the same batch, so
/// the data order does not depend on the number of ranks.
Batch shard_rows(const Batch& batch, int64_t rank, int64_t world);

// ---- batches of generated text (on-policy distillation, train/kd_generation.h) ----------------------

/// The prompt of each document of a batch, row after row, document after document: its tokens up to its first
/// target (the prompt of a prompt/completion or chat example). A document whose every token after the first is
/// a target (plain text, or loss_on "all") gives its first half (at least one token); one without targets none.
std::vector<std::vector<int64_t>> document_prompts(const Batch& batch);

/// One row per prompt: prompt + completion, right-padded with pad_id to the longest row; the completion's tokens
/// are the targets (labels[i] = ids[i + 1] from the prompt's last token on), positions from 0, doc id 0 on
/// tokens and -1 on padding, not packed. Every completion needs >= 1 token.
Batch completion_batch(const std::vector<std::vector<int64_t>>& prompts,
                       const std::vector<std::vector<int64_t>>& completions, int32_t pad_id);

/// Micro-batches of packed rows, epoch after epoch, from a position (epoch, index).
class BatchStream {
 public:
  /// `examples` must outlive the stream.
  BatchStream(const std::vector<Example>& examples, int64_t seq_len, int32_t pad_id, int64_t batch_size, uint64_t seed);

  static uint64_t epoch_seed(uint64_t seed, int64_t epoch) { return seed * 1000003ULL + uint64_t(epoch) + 1; }
  PackedRows pack_epoch(int64_t epoch) const;
  int64_t batches_in_epoch(int64_t epoch) const;

  /// Continue from micro-batch `index` of `epoch` (a resumed run).
  void seek(int64_t epoch, int64_t index);
  int64_t epoch() const { return epoch_; }
  int64_t index() const { return index_; }
  /// The next micro-batch (the first of the next epoch after an epoch's last).
  Batch next();

 private:
  const std::vector<Example>& examples_;
  int64_t seq_len_;
  int32_t pad_id_;
  int64_t batch_size_;
  uint64_t seed_;
  int64_t epoch_ = 0, index_ = 0;
  PackedRows rows_;
};

}  // namespace anvil::data
