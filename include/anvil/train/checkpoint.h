// Training checkpoints: everything a run needs to continue bit for bit, written so that some complete
// checkpoint exists at every moment, and the check that a resumed run is the same run.
//
// output.dir/checkpoint/ = trainable.safetensors (the trained tensors, by name), optimizer.safetensors
// (AdamW state), rng.safetensors (the torch CPU and CUDA generator states: dropout draws from them),
// state.json (step, data position, tokens, elapsed time, the resolved config) and any files the recipe
// adds (PiSSA's initial factors, which define its residual base). Exactness rests on those: the data
// position is enough because an epoch's order is a pure function of (seed, epoch) (anvil/data/batches.h).
// A save writes checkpoint.tmp/ (state.json last, so a folder with state.json is complete), moves the old
// checkpoint/ to checkpoint.old/, renames the new one into place and removes the old one; a kill at any
// point leaves a complete checkpoint that find_checkpoint finds (and promotes to checkpoint/).
#pragma once

#include "anvil/train/optim.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

/// Where a run is.
struct TrainState {
  int64_t step = 0, epoch = 0, index = 0, tokens = 0;  ///< optimizer steps; data position; tokens seen
  double elapsed = 0;                                  ///< seconds of training so far, over every resume
};

/// A recipe's own file in every checkpoint: name ("pissa_init.safetensors") and tensors.
struct CheckpointFile {
  std::string name;
  NamedTensors tensors;
};

/// The torch CPU generator's state and, on CUDA, the device generator's ("cpu", "cuda"): what
/// rng.safetensors holds. Taken when a step ends, so that a checkpoint written later still holds them.
NamedTensors generator_states(at::Device device);

/// Writes out_dir/checkpoint/ as described above; `config` is the resolved config kept in state.json,
/// `generators` the generator_states of the moment `state` describes.
void save_training_checkpoint(const std::string& out_dir, const NamedTensors& trainable, const AdamW& optimizer,
                              const TrainState& state, const nlohmann::json& config, const NamedTensors& generators,
                              const std::vector<CheckpointFile>& extra = {});

/// The checkpoint folder a --resume continues from: out_dir/checkpoint/, after finishing a save that a
/// kill interrupted (a complete checkpoint.tmp/ or a lone checkpoint.old/ renamed into place, so the next
/// save starts from a clean rotation). Throws naming output.dir when there is no complete checkpoint.
std::string find_checkpoint(const std::string& out_dir);

/// The resolved config a checkpoint was made with (its state.json's "config").
nlohmann::json checkpoint_config(const std::string& checkpoint_dir);

/// The keys a resumed run must share with the checkpoint's run: every key of `sections` that `now` has
/// (what decides the data, the model, the trainable tensors and their shapes) and train.batch_size,
/// grad_accum and seed. Throws std::runtime_error "--resume: config key <key> is <now> but the checkpoint
/// was made with <then>".
void check_same_run(const nlohmann::json& now, const nlohmann::json& then, const std::vector<std::string>& sections);

/// Copies a checkpoint's trainable tensors (shapes checked), optimizer state and generator states into
/// place and returns its state. The caller has checked the config (check_same_run).
TrainState load_training_checkpoint(const std::string& checkpoint_dir, const NamedTensors& trainable,
                                    AdamW& optimizer, at::Device device);

/// Copies a checkpoint's trainable tensors into `trainable` (shapes checked) and nothing else: the weights of a
/// run at its last checkpoint (an on-policy refresh's student). Returns the checkpoint's step; errors start
/// with `what` and name the file and the tensor.
int64_t load_checkpoint_weights(const std::string& checkpoint_dir, const NamedTensors& trainable, const std::string& what);

/// A recipe's own file of a checkpoint (save_training_checkpoint's `extra`); throws naming the file and
/// `why_needed` when it is missing.
NamedTensors load_checkpoint_file(const std::string& checkpoint_dir, const std::string& name,
                                  const std::string& why_needed);

}  // namespace anvil::train
