// The steps a training recipe shares before and around its loop: the device and model from the model
// section (loaded, or built with transformers' random init), the tokenizer, the data read and split, the
// step count; a causal LM's loss, validation and generations on packed batches; and the memory plan that
// --dry-run prints and an out-of-memory error repeats.
#pragma once

#include "anvil/data/batches.h"
#include "anvil/data/tokenizer.h"
#include "anvil/model/transformer.h"
#include "anvil/train/config.h"
#include "anvil/train/trainer.h"

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

namespace anvil::train {

// ---- setup ---------------------------------------------------------------------------------------------

/// The model section's folders, resolved once (a hub id becomes its cached snapshot): the model's
/// (init "pretrained"; "" for "random") and the tokenizer's (model.tokenizer, else model.config's folder for
/// init "random", else the model's).
struct ModelPaths {
  std::string model, tokenizer;
};
ModelPaths resolve_model_paths(const ModelSection& m);

/// The model section's model: loaded from paths.model (init "pretrained"; `base_weights` as load_causal_lm
/// takes it), or built from model.config with transformers' _init_weights (init "random": Linear and
/// Embedding weights normal(0, initializer_range), biases zero, norms one) drawn on the CPU from a
/// generator seeded with `seed`, so a seed gives the same model on any device. In training mode.
/// `shapes_only` (a --dry-run's plan) with init "random": the model on the meta device, no weights drawn, so a 7B
/// plan takes no memory and no time.
std::shared_ptr<model::CausalLM> build_model(const ModelSection& m, const ModelPaths& paths, at::ScalarType dtype,
                                             at::Device device, uint64_t seed, const std::string& base_weights,
                                             bool shapes_only = false);

/// The folder's tokenizer, or null when it has none (pre-tokenized data needs none). Throws naming
/// eval.prompts when `e` has prompts to generate from and the folder has no tokenizer.
std::unique_ptr<data::Tokenizer> load_tokenizer_if_present(const std::string& dir, const EvalSection& e);

/// The examples of the data section: data.train, and data.validation or a data.validation_fraction split
/// of data.train (seeded by `seed`), packed with the tokenizer's pad id (else eos, else 0). Every id must be
/// below `vocab_size` (the model's vocabulary): an error names the file and line of the first that is not.
struct TrainingData {
  std::vector<data::Example> train, validation;
  data::PackedRows validation_rows;
  int32_t pad_id = 0;
};
TrainingData read_training_data(const DataSection& d, const data::Tokenizer* tok, uint64_t seed, int64_t vocab_size);

/// train.steps, or every epoch's micro-batches / grad_accum (at least 1).
int64_t count_steps(const TrainSection& t, const data::BatchStream& stream);

// ---- a causal LM on packed batches ---------------------------------------------------------------------

/// The batch's ids, positions, doc ids and labels as one (4, B, S) int64 tensor on `device`: one copy
/// (pinned and non-blocking for CUDA, so the host does not wait for the device's queue).
at::Tensor batch_to_device(const data::Batch& b, at::Device device);

/// Sum of the batch's target losses / normalizer through the chunked loss over the LM head (the head's
/// full forward and at::cross_entropy when lm_head carries an adapter).
at::Tensor causal_lm_batch_loss(model::CausalLM& model, const data::Batch& b, double normalizer, int64_t chunk,
                                at::Device device);

/// Mean target loss and perplexity over packed rows, batch_size rows at a time (max_batches > 0: at most
/// that many batches); eval mode and no grad inside, train mode after.
/// `shard`: only this rank's batches (the trainer sums the ranks' results).
EvalResult evaluate_causal_lm(model::CausalLM& model, const data::PackedRows& rows, int64_t batch_size,
                              int64_t max_batches, int64_t chunk, at::Device device, const EvalShard& shard = {});

/// causal_lm_batch_loss as the trainer's loss callback (no extra terms).
LossFn causal_lm_loss_fn(model::CausalLM& model, int64_t chunk, at::Device device);

/// evaluate_causal_lm over the data's validation rows as the trainer's eval callback (train.batch_size
/// rows at a time, eval.max_batches); null when there are no validation rows.
EvalFn causal_lm_eval_fn(model::CausalLM& model, const TrainingData& data, const TrainSection& t,
                         const EvalSection& e, at::Device device);

/// Greedy continuations of each prompt, at most max_new_tokens, stopped at an eos id.
std::vector<std::string> generate_texts(model::CausalLM& model, const data::Tokenizer& tok,
                                        const std::vector<std::string>& prompts, int64_t max_new_tokens);

/// generate_texts of eval.prompts (eval.max_new_tokens); empty without prompts.
std::vector<std::string> generate_for_prompts(model::CausalLM& model, const data::Tokenizer* tok, const EvalSection& e);

/// The eval.prompts' generations now beside `before` (print_generations); nothing without prompts.
void print_generations_after(model::CausalLM& model, const data::Tokenizer* tok, const EvalSection& e,
                             const std::vector<std::string>& before);

/// "generations (greedy, N new tokens at most):" and each prompt with its text before and after, on stdout.
void print_generations(const std::vector<std::string>& prompts, const std::vector<std::string>& before,
                       const std::vector<std::string>& after, int64_t max_new_tokens);

/// The same with any labelled columns, e.g. {"before", ...}, {"after", ...}, {"teacher", ...}: each prompt, then
/// one line per column.
void print_generations(const std::vector<std::string>& prompts,
                       const std::vector<std::pair<std::string, std::vector<std::string>>>& columns,
                       int64_t max_new_tokens);

// ---- the memory plan -----------------------------------------------------------------------------------

/// What training holds besides the model's weights.
struct MemoryInputs {
  std::string what;                  ///< "lora r 16", "full training": the plan's heading
  int64_t batch_size = 0, seq_len = 0, loss_chunk = 0;
  bool bf16_autocast = false;        ///< train.mixed_precision "bf16": activations in bf16 over fp32 weights
  bool grad_checkpointing = false;
  int64_t trainable_numel = 0, trainable_elsize = 4;
  bool trainable_are_weights = true;  ///< false: adapters, tensors beside the weights
  double extra_activations_per_token = 0;  ///< elements per token per layer the trainable side path keeps
  /// A frozen model run beside the trained one (a distillation teacher; add_frozen_model fills these in).
  std::string frozen_what;        ///< "teacher"; "" for none
  double frozen_weights = 0;      ///< its weights, bytes
  double frozen_activations_per_token = 0;  ///< what its no-grad forward holds at its peak, bytes per token
  /// A second loss's per-chunk buffers (KD's two models' logits): kd_chunk_rows rows (at most the rank's tokens) of
  /// kd_bytes_per_row, and kd_bytes_per_token over all the rank's tokens. Zero rows: none.
  double kd_chunk_rows = 0, kd_bytes_per_row = 0, kd_bytes_per_token = 0;
  /// Data parallel: the plan is one rank's. Each rank runs batch_size / world_size rows (rounded up) of a step.
  int64_t world_size = 1, zero_stage = 0;
  double bucket_bytes = 25 << 20;  ///< train.dist_bucket_mb: ZeRO-2's two buckets in flight
};

/// One rank's bytes (the whole process's at world size 1).
struct MemoryEstimate {
  double weights = 0, trainable = 0, gradients = 0, optimizer = 0, activations = 0, activations_ckpt = 0,
         loss_chunk = 0, frozen_weights = 0, frozen_activations = 0, total = 0, total_ckpt = 0;  ///< bytes
  /// The total a rank holds (with the run's grad_checkpointing) at ZeRO stage s (row s, 0-2) and world size 1, 2,
  /// 4 and 8 (columns), the rest of the inputs as given: what --dry-run prints to choose a stage and a rank count.
  std::vector<std::vector<double>> by_stage_and_world;
};
inline constexpr int64_t kPlanWorldSizes[] = {1, 2, 4, 8};

/// A model of what training holds, in bytes: activations per token per layer counted from the tensors
/// autograd keeps for a Llama-style layer (norm inputs, q/k/v, attention output, the MLP's gate, up and
/// product) plus the side path's, the per-document mask where packing uses one, the loss chunk's logits.
/// Per rank under data parallel: the rank's rows of the batch; AdamW state / world_size at ZeRO stage >= 1;
/// gradients / world_size plus two buckets in flight at stage 2 (train/distributed.h).
MemoryEstimate estimate_memory(const model::CausalLM& model, const MemoryInputs& in, at::Device device);

/// MemoryInputs with the train and data sections' sizes, the trainable tensors' count and the launch's world size
/// (1 when not launched) filled in.
MemoryInputs memory_inputs(const std::string& what, const TrainSection& t, const DataSection& d,
                           const NamedTensors& trainable, int64_t world_size = 1);

/// Adds a frozen model's share to `in`: its weights; its no-grad forward (the final hidden states of the batch
/// and one layer's temporaries, nothing kept for backward); `chunk_rows` rows of both models' logits for a
/// distillation loss over `trained`'s and its heads (model dtype, and the fp32 log-probabilities, mixture and
/// gradient buffers of train/kd_loss.h).
void add_frozen_model(MemoryInputs& in, const model::CausalLM& frozen, const model::CausalLM& trained,
                      const std::string& what, int64_t chunk_rows);

/// The plan as a table (GiB, or MiB below one GiB).
std::string format_estimate(const MemoryEstimate& m, const MemoryInputs& in);

/// What an out-of-memory error prints: the plan and the keys that lower it (with their values), then
/// `more` (a recipe's own knobs, e.g. ", lora.r (now 16)").
std::string memory_advice(const MemoryEstimate& m, const MemoryInputs& in, const std::string& more = "");

/// The run's one-line summary on stderr: "anvil <recipe>: <architecture> (<dtype>, <device>), N trainable
/// tensors (P parameters), E training examples, V validation examples, S steps".
void print_run_summary(const std::string& recipe, const model::CausalLM& model, at::Device device,
                       const NamedTensors& trainable, const TrainingData& data, int64_t total_steps);

}  // namespace anvil::train
