// Distillation on generated text: the two modes of GKD's paper (Agarwal et al. 2024, "On-Policy Distillation of
// Language Models") that need generation, built on model::generate's padded batches.
//
// Sequence-level KD: the teacher answers the prompts of a JSONL file, in batches (rows of their own lengths,
// left-padded), and its answers become SFT data in the format anvil's recipes read ({"prompt", "completion"} or
// {"messages"} lines, data/dataset.h), so that the student then trains on them with cross-entropy (and, if
// kd_ratio > 0, the online KD term too): TRL GKDTrainer's seq_kd, with the teacher's text written once instead of regenerated
// every step. The file is rewritten atomically (io::write_text_atomically) at most every flush_seconds and at
// the end; a rerun keeps the rows already written (each must carry its prompt: another prompts file is an error)
// and generates only the rest.
//
// On-policy: a fraction lambda of the micro-batches is replaced by the student's own completions of the
// batch's prompts (data::document_prompts), scored by the teacher with the configured KD divergence, as
// TRL's GKDTrainer.training_step does (`random.random() <= lmbda`: the student generates from the prompts,
// sampling with temperature, top_k 0, top_p 1; labels -100 on the prompt and after the first EOS, which is kept;
// compute_loss is the divergence alone, no CE). Here the draw is not a global RNG but a hash of the train seed,
// the stream position and the micro-batch's tokens, and the generation seed is the same hash: a resumed run
// makes the same choices and samples the same tokens with nothing added to the checkpoint. An on-policy
// micro-batch has its own target count; its loss is its mean per generated token weighted by the replaced
// micro-batch's share of the step's targets, so each micro-batch keeps its weight in the step.
#pragma once

#include "anvil/data/batches.h"
#include "anvil/data/tokenizer.h"
#include "anvil/model/generate.h"
#include "anvil/train/kd_loss.h"

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::train {

// ---- sequence-level KD ---------------------------------------------------------------------------------

struct TeacherDataOptions {
  /// JSONL: a {"prompt": "..."} line (other keys ignored) or a {"messages": [...]} line (data::chat_prompt: the
  /// chat template with the generation prompt, a trailing assistant turn dropped)
  std::string prompts;
  std::string prompts_what;  ///< names the file in errors ("config key sequence.prompts")
  /// the JSONL written, in prompt order: {"prompt", "completion"} for a prompt line, {"messages": the turns +
  /// {"role": "assistant", "content": reply}} for a messages line
  std::string output;
  int64_t batch_size = 16;   ///< prompts generated together (one left-padded batch)
  model::GenerateOptions generate;  ///< stop_tokens empty: the tokenizer's eos ids; seed + the batch's first row
  double flush_seconds = 30;        ///< the output is rewritten at most this often, and at the end
};

struct TeacherDataResult {
  int64_t rows = 0;              ///< rows in the output now
  int64_t kept = 0;              ///< rows found already written (a rerun)
  int64_t generated_tokens = 0;  ///< tokens the teacher generated in this call
};

/// Generates the teacher's completion of every prompt not yet in o.output and writes the file (a progress line
/// on stderr: rows, tokens/s, ETA). The completion is the decoded new tokens up to the first stop token
/// (excluded: the data reader's add_eos, or the chat template, puts it back). Throws naming the file and line for
/// a missing or unreadable prompts file, a line with neither a string "prompt" nor valid "messages" (or one the
/// chat template refuses), an empty prompts file, or an output whose rows do not answer the first prompts.
TeacherDataResult write_teacher_completions(model::CausalLM& teacher, const data::Tokenizer& tok,
                                            const TeacherDataOptions& o);

// ---- on-policy (GKD) ------------------------------------------------------------------------------------

struct OnPolicyOptions {
  double lambda = 0;            ///< [0, 1]: the fraction of micro-batches replaced by student generations
  int64_t max_new_tokens = 64;  ///< >= 1
  double temperature = 0.9;     ///< sampling temperature (TRL GKDConfig's default); 0: greedy
  int64_t top_k = 0;
  double top_p = 1.0;
  int64_t batch_size = 0;  ///< prompts generated together (0: all of a micro-batch at once)
  uint64_t seed = 0;       ///< the train seed
  int32_t pad_id = 0;
  std::vector<int64_t> stop_tokens;  ///< the tokenizer's eos ids
};

/// The hash that decides a micro-batch (on-policy when hash / 2^64 < lambda) and seeds its generation: of the
/// seed, the stream position after the step's micro-batches and the micro-batch's token ids.
uint64_t on_policy_hash(const data::Batch& batch, uint64_t seed, int64_t epoch, int64_t index);

/// kd_loss_fn with a fraction lambda of the micro-batches on-policy (above): there the student (in eval mode,
/// restored after) generates from the micro-batch's document prompts, and the loss is the KD divergence alone on
/// the generated tokens. Terms "kd", "ce" and "on_policy" (the share of the step's targets replaced: its step sum
/// is the fraction of the step that was on-policy). `stream` is read for its position only and must outlive it.
LossFn on_policy_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& kd, double kd_ratio,
                         int64_t ce_chunk, at::Device device, const OnPolicyOptions& o,
                         const data::BatchStream& stream);

}  // namespace anvil::train
