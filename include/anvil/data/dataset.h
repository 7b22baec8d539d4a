// Training examples from JSONL files, and their packing into fixed-length rows: the data side of
// `anvil lora` (and of distillation). Plain C++ with std types, like the tokenizers.
//
// A line is one example, in one of three shapes (the ones TRL and torchtune read):
//   {"text": "..."}                                  every token is a target
//   {"prompt": "...", "completion": "..."}           the completion's tokens are the targets when
//                                                    loss_on = kCompletion, all tokens otherwise
//   {"messages": [{"role": ..., "content": ...}]}    rendered with the model's chat format; the assistant
//                                                    turns are the targets when loss_on = kCompletion
// Packing concatenates examples into rows of exactly `row_length` tokens without splitting an example
// (one longer than a row is cut to the row), restarts positions at 0 for each example and records a
// document id per token, so attention never crosses from one example into another (a per-document
// causal mask now; the varlen path of sparse attention when it lands).
#pragma once

#include "anvil/data/tokenizer.h"

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::data {

enum class LossOn { kAll, kCompletion };

/// The label of a position without a target (transformers' ignore_index; anvil::train::kIgnoreIndex).
constexpr int32_t kNoTarget = -100;

/// One tokenized example: ids and, per id, whether it is a training target.
struct Example {
  std::vector<int32_t> ids;
  std::vector<uint8_t> target;  ///< 1: the model is trained to predict this token
};

struct ReadOptions {
  LossOn loss_on = LossOn::kAll;
  bool add_eos = true;  ///< end text and prompt/completion examples with the tokenizer's eos (a target)
  int64_t vocab_size = 0;  ///< > 0: every id must be below it (the model's vocabulary), else an error naming file:line
};

/// Tokenizes one JSON object (a JSONL line) as described above. `where` names the line in errors.
Example tokenize_example(const std::string& json_line, const Tokenizer& tok, const ReadOptions& options,
                         const std::string& where);

/// A chat prompt to generate a reply for (sequence-level KD): the turns of a {"messages": [...]} line, a trailing
/// assistant turn dropped (that is the reply to generate anew), rendered with the generation prompt and tokenized
/// as tokenize_example (loss_on kCompletion) tokenizes those turns when an assistant reply follows: `ids` are the
/// first tokens of the SFT example of turns + reply. Throws std::runtime_error naming `where` (and the message)
/// for a line that is not such an object, or when no turn is left.
struct ChatPrompt {
  std::vector<ChatMessage> turns;
  std::vector<int32_t> ids;
};
ChatPrompt chat_prompt(const std::string& json_line, const Tokenizer& tok, const std::string& where);

/// Rows of packed examples, row-major (rows x row_length).
struct PackedRows {
  int64_t rows = 0, row_length = 0;
  std::vector<int32_t> ids;        ///< token ids; padding uses pad_id
  std::vector<int32_t> labels;     ///< the id to predict at this position (the next token), -100 where none
  std::vector<int32_t> positions;  ///< position within its example (restarts at 0)
  std::vector<int32_t> doc_ids;    ///< example index within the row (0, 1, ...), -1 on padding
};

/// Packs examples in the given order, first fit into the current row (a new row when the next example
/// does not fit). labels[i] = ids[i + 1] when token i + 1 is a target of the same example, else -100.
PackedRows pack_examples(const std::vector<Example>& examples, int64_t row_length, int32_t pad_id);

/// The order 0..n-1 shuffled deterministically by seed (Fisher-Yates over a 64-bit Mersenne twister), the
/// same on every platform.
std::vector<int64_t> shuffled_order(int64_t n, uint64_t seed);

}  // namespace anvil::data
