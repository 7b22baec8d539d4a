// The training loop every recipe runs: for each optimizer step, grad_accum micro-batches through the
// recipe's loss (forward + backward), clipping, AdamW at the scheduled lr; the loss read back and checked
// on logged steps; evaluation, checkpoints and Ctrl-C at their cadence; a checkpoint that resumes
// bit for bit. The recipe says what a micro-batch's loss is (a callback) and what the trained tensors
// are; the trainer owns the rest.
//
// Host syncs: micro-batches are packed on the host, so the target count of a step (the loss normalizer)
// is known without touching the device; the loss is accumulated on the device and read back only on
// logged steps (output.log_every) and before a save.
//
// Non-finite steps: every step's loss and gradient norm are checked (on the device, read back with the
// loss). A checkpoint holds only weights that have since given a finite loss: the save due after step k
// is written during step k+1, once that step's loss is known finite and before its update (the weights
// and optimizer state are still step k's; the data position and generator states were taken at the end
// of step k). A non-finite loss stops the run naming that checkpoint, which resumes finite; with
// train.skip_nonfinite_steps such a step makes no update instead (a host sync every step), and 8 in a
// row stop the run.
#pragma once

#include "anvil/data/batches.h"
#include "anvil/train/checkpoint.h"
#include "anvil/train/config.h"
#include "anvil/train/distributed.h"
#include "anvil/train/metrics.h"
#include "anvil/train/optim.h"
#include "anvil/train/zero3.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

/// Exit statuses of a recipe: finished (or a dry run), failed (non-finite loss, out of memory: the message
/// says what to do), interrupted by Ctrl-C (a checkpoint was saved). Other errors throw.
constexpr int kExitOk = 0, kExitFailed = 1, kExitInterrupted = 130;

/// A micro-batch's loss, as the recipe's loss callback returns it.
struct Loss {
  at::Tensor value;    ///< () fp32 with autograd: sum of the batch's target losses / the step's target count
  NamedTensors terms;  ///< () detached parts logged beside the loss as step means ("kd", "ce"); may be empty
};
/// The loss of one micro-batch; `normalizer` is the number of targets of the whole optimizer step.
using LossFn = std::function<Loss(const data::Batch& batch, double normalizer)>;

/// Mean loss and perplexity over a validation set, and any further measures of it (a distiller's "kl" to
/// its teacher), written to metrics.jsonl as "val_<name>" and printed beside the loss.
/// Under a launch each rank evaluates a share of the batches and the trainer sums loss * targets, targets and
/// term * targets over the ranks: every term must be a mean per target token (as "kl" and "top1" are).
struct EvalResult {
  double loss = 0, ppl = 0;
  int64_t targets = 0;
  std::vector<std::pair<std::string, double>> terms;
};
/// The validation batches a rank evaluates: batch i (of train.batch_size rows, counted before eval.max_batches
/// stops the loop) when i % world == rank. {0, 1}: all of them.
struct EvalShard {
  int64_t rank = 0, world = 1;
  bool mine(int64_t batch) const { return batch % world == rank; }
};
using EvalFn = std::function<EvalResult(const EvalShard& shard)>;

/// What the step callback sees, on every logged step (output.log_every).
struct StepReport {
  int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, grad_norm = 0;                  ///< loss: mean over the steps since the last report
  std::vector<std::pair<std::string, double>> terms;      ///< the loss callback's terms, same means
  int64_t tokens = 0, tokens_this_run = 0;                 ///< non-padding tokens trained on (all runs; this one)
  double tokens_per_s = 0, elapsed_s = 0, peak_mem_gib = -1;  ///< rate of this run; elapsed over resumes; -1 off CUDA
};
using StepCallback = std::function<void(const StepReport&)>;

/// The progress line on stderr (step, loss, lr, tokens/s, ETA, CUDA memory) as a step callback; it prints
/// its last line when the report's step reaches total_steps.
StepCallback progress_line(const std::string& label, int64_t total_steps, int64_t start_step);

/// Why a run stopped early (kExitFailed: a non-finite loss, out of memory; kExitInterrupted: Ctrl-C, the
/// checkpoint saved), in the words printed on stderr, for a front end that has no terminal (Python's exception).
using StopCallback = std::function<void(int status, const std::string& message)>;

/// What the front end (the command line, Python) gives every recipe.
struct RunOptions {
  bool resume = false;    ///< continue from output.dir's checkpoint (the config must be the same run's)
  bool dry_run = false;   ///< print the memory estimate and return kExitOk without training
  StepCallback on_step;   ///< null: progress_line
  StopCallback on_stop;   ///< may be null; called on rank 0 before fit returns kExitFailed or kExitInterrupted
};

/// Everything the loop needs to know besides the tensors.
struct LoopSettings {
  std::string recipe;        ///< "lora": messages say "anvil lora", the progress line "lora"
  std::string out_dir;       ///< output.dir
  TrainSection train;        ///< optimizer, schedule, accumulation, clipping, mixed precision
  int64_t total_steps = 0;   ///< train.steps, or the epochs' micro-batches / grad_accum
  int64_t eval_every = 0;    ///< eval.every
  int64_t save_every = 0;    ///< output.save_every
  int64_t log_every = 1;     ///< output.log_every
  bool plot = true;          ///< output.plot: loss.svg after a finished run
  nlohmann::json config;     ///< the resolved config: config.json, every checkpoint
  std::vector<std::string> same_run_sections;  ///< config sections a resumed run must share (check_same_run)
  /// A torchrun launch's process group (connect_if_launched), or null: one process. With it, each rank trains
  /// on its rows of every micro-batch (data::shard_rows), the gradients are summed over ranks while backward
  /// runs (GradientSync), and only rank 0 writes output.dir and reports.
  std::shared_ptr<Distributed> dist;
  /// train.zero_stage 3 under a launch: the model whose parameters (`trainable` is all of them) the trainer
  /// shards by decoder layer (ParameterShards); anvil train sets it. Null: stage 3 is refused naming the key.
  model::CausalLM* shard_model = nullptr;
};

/// LoopSettings from a recipe's shared sections.
LoopSettings loop_settings(const std::string& recipe, const TrainSection& train, const EvalSection& eval,
                           const OutputSection& output, int64_t total_steps, const nlohmann::json& config,
                           std::vector<std::string> same_run_sections);

/// Sets autocast to bf16 on `type` for its lifetime when `on` (train.mixed_precision "bf16").
class AutocastGuard {
 public:
  AutocastGuard(bool on, at::DeviceType type);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_, was_ = false;
  at::DeviceType type_;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

class Trainer {
 public:
  /// AdamW (train.beta1, beta2, eps, weight_decay) over `trainable`, which must require grad.
  Trainer(LoopSettings settings, NamedTensors trainable, at::Device device);

  /// A file written into every checkpoint beside the trainable tensors (PiSSA's initial factors).
  void add_checkpoint_file(CheckpointFile file);

  /// Opens output.dir. Resuming: finds the checkpoint, checks it is the same run, loads tensors, optimizer
  /// and generator states, seeks `stream` and cuts metrics.jsonl back to the checkpoint's step. Else: refuses
  /// a folder that already holds a run and starts an empty metrics.jsonl. Then writes config.json.
  void open(bool resume, data::BatchStream& stream);

  /// Trains until total_steps. `evaluate` (may be null) runs at step 0 and every eval_every steps when
  /// eval_every > 0, and at the end; a finished run writes loss.svg (output.plot); `oom_advice` (may be null)
  /// says what to lower after CUDA runs out of memory. `options`' callbacks see the logged steps and an early
  /// stop. Returns kExitOk (a final checkpoint saved), kExitInterrupted or kExitFailed.
  int fit(data::BatchStream& stream, const LossFn& loss, const EvalFn& evaluate, const RunOptions& options,
          const std::function<std::string()>& oom_advice = nullptr);

  const TrainState& state() const { return state_; }
  /// Whether this process reports and writes outputs: true alone, rank 0 under a launch.
  bool is_main() const { return !s_.dist || s_.dist->is_main(); }
  const NamedTensors& trainable() const { return trainable_; }
  std::string path(const std::string& name) const;  ///< a file in output.dir

 private:
  double run_eval(const EvalFn& evaluate, std::optional<MetricsLog>& metrics);
  void zero_grads();
  /// ZeRO-1: every tensor's AdamW state gathered from its owner, on rank 0 (null elsewhere); collective.
  std::unique_ptr<AdamW> consolidated_optimizer();  ///< the validation loss (0 without `evaluate`)

  LoopSettings s_;
  NamedTensors trainable_;
  std::vector<at::Tensor> params_;
  at::Device device_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<GradientSync> sync_;  ///< data parallel, stages 0-2
  std::unique_ptr<ParameterShards> zero3_;  ///< data parallel, stage 3: AdamW updates its shards
  AdamWOptions adamw_;
  std::vector<int64_t> owner_;        ///< ZeRO-1: the rank that holds each tensor's AdamW state; empty otherwise
  std::vector<int64_t> local_index_;  ///< ZeRO-1: each tensor's index in this rank's AdamW, -1 if not its own
  std::vector<CheckpointFile> extra_files_;
  TrainState state_;
  bool resumed_ = false;
  double elapsed_before_ = 0;  ///< state_.elapsed when this run started
};

}  // namespace anvil::train
