// ZeRO-3 (train.zero_stage 3): the parameters of a CausalLM sharded across the ranks of a launch, FSDP's scheme,
// for full training (`anvil train`).
//
// Units: each decoder layer is one unit, everything else (embed_tokens, the final norm, lm_head: tied or not)
// the root unit. A unit's parameters, in the trainable list's order, are one flat vector padded to a multiple of
// WORLD_SIZE; each rank keeps slice `rank` of it (its shard: the tensor AdamW updates, fp32 state for it alone).
// The model's parameters hold their full values only while their unit is gathered: gathering all-gathers the
// shards into one buffer and points each parameter at its view of it (Variable::set_data, so autograd and
// the modules keep the same tensors); releasing points them at empty tensors, freeing the buffer.
//
// A step: the root is gathered at its start and kept through every micro-batch (the embedding is used first
// and, tied, last); its gradients accumulate in full and are reduce-scattered once at the step's end. Each
// layer runs through the model's layer wrapper (TransformerModel::set_layer_wrapper): forward gathers it,
// runs it under gradient checkpointing (no activation that references its weights is kept, only its input),
// and releases it; backward's recomputation gathers it again, back-propagates, then its gradients are
// reduce-scattered (each rank keeps the sum of its shard's part, accumulated over the micro-batches) and the
// buffer and full gradients are freed. While a unit's backward runs its parameters' gradients are views into
// one flat buffer (DDP's gradient_as_bucket_view: backward accumulates into it in place), which is what the
// reduce-scatter sends, so the full gradients are never held twice. Prefetch: the next unit's all-gather is issued before the current unit
// runs (forward order in forward, reverse in backward), at most one ahead; at most two reduce-scatters are in
// flight. Every rank issues the same collectives in the same order: a rank with no rows in a micro-batch runs
// the same sequence on no data (idle_micro_batch).
//
// Outside the steps (validation, generation, checkpoints, the final export) the whole model is gathered on
// every rank (gather_all): simple, and every rank's validation share may have another number of batches,
// which per-layer collectives could not follow.
#pragma once

#include "anvil/model/transformer.h"
#include "anvil/train/checkpoint.h"
#include "anvil/train/distributed.h"
#include "anvil/train/optim.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

namespace anvil::train {

class ParameterShards {
 public:
  /// `trainable`: every parameter of `model` (the full values, the same on every rank); sets the model's
  /// layer wrapper (removed by the destructor). Every parameter of a unit must have one dtype.
  ParameterShards(std::shared_ptr<Distributed> dist, model::CausalLM& model, const NamedTensors& trainable);
  ~ParameterShards();
  ParameterShards(const ParameterShards&) = delete;
  ParameterShards& operator=(const ParameterShards&) = delete;

  /// One (shard_numel,) tensor per unit (root first, then the layers), requiring grad: what AdamW updates and
  /// clipping measures. Their gradients are this rank's part of the step's summed gradient.
  const std::vector<at::Tensor>& shards() const { return shards_; }
  /// The shards' gradients (defined after finish_step) as views cut at the parameters' boundaries (the padding
  /// left out): what clipping measures, each piece one parameter's elements (clip_gradients says why).
  std::vector<at::Tensor> grad_pieces() const;

  /// Whether every parameter holds its full value now.
  bool full() const { return full_; }
  /// Not collective: copies this rank's slice of the full parameters into the shards (while full()).
  void shards_from_full();
  /// Not collective: this rank's slices of `full`'s state (an AdamW over the full parameters, as a 1-process
  /// checkpoint holds it) into `mine` (the AdamW over shards()). A unit's step count is its first tensor's.
  void state_from_full(const AdamW& full, AdamW& mine) const;
  /// Collective: the full AdamW state from every rank's `mine`, as an AdamW over the full parameters, on rank 0
  /// (null elsewhere). Needs full() (the parameters' shapes).
  std::unique_ptr<AdamW> consolidated(const AdamW& mine, const AdamWOptions& options);

  /// Collective unless full(): every unit gathered from the shards.
  void gather_all(const std::string& what);
  /// Not collective: every parameter pointed at an empty tensor (their full values dropped). After an update
  /// the gathered values are stale: the trainer calls this after every optimizer step.
  void release_all();

  /// Collective: the start of a step (releases a full model, gathers the root).
  void begin_step();
  /// Collective: after a step's backward passes: waits for the layers' reduce-scatters, reduce-scatters the
  /// root's gradients and releases it. Then shards()' gradients are this rank's part of the step's gradient.
  void finish_step(const std::string& what);
  /// Collective: a micro-batch this rank has no rows of: the gathers and reduce-scatters of a forward and
  /// backward (adding nothing), so that the ranks' collectives stay in step.
  void idle_micro_batch();
  /// Not collective: every gradient (shards' and parameters') undefined.
  void zero_grads();

  /// The most bytes of parameters this rank held at once in the steps (its shards, the gathered root, the
  /// gathered and prefetched layers), measured as each gather is issued; gather_all (validation, saves) not
  /// counted.
  int64_t peak_bytes() const { return peak_bytes_; }
  /// The most bytes of gradients (full ones of the gathered units, reduce-scatter buffers, the shards') held
  /// at once, measured as each reduce-scatter is issued.
  int64_t peak_grad_bytes() const { return peak_grad_bytes_; }

 private:
  struct Unit {
    std::vector<size_t> params;    // indices into params_
    std::vector<int64_t> offsets;  // element offset of each in the flat vector
    int64_t numel = 0, padded = 0; // elements; padded to a multiple of world
    at::Tensor buffer;             // (padded,) while gathered or gathering; empty otherwise
    Distributed::Waiter gathering; // set while its all-gather is in flight
    bool gathered = false;         // the parameters view `buffer`
    at::Tensor grads;              // (padded,) while its backward runs: the parameters' gradients are views of it
  };
  struct Scatter {
    size_t unit;
    at::Tensor in;   // (padded,) the unit's full gradients
    at::Tensor out;  // (shard,) this rank's sum
    Distributed::Waiter wait;
  };

  at::Tensor wrap(int64_t layer, const model::TransformerModel::LayerFn& forward, const at::Tensor& x);
  void launch_gather(size_t u);
  void ensure_gathered(size_t u);
  void release(size_t u);
  void launch_scatter(size_t u);
  void complete_scatter();
  void pre_forward(size_t u);
  void pre_backward(size_t u);
  void post_backward(size_t u);
  void arm_grads(size_t u);        // the parameters' gradients pointed at a zeroed `grads`
  at::Tensor flat_grad(size_t u);  // (padded,) the unit's full gradients, releasing them
  int64_t sizes_numel(size_t param) const;
  void note_bytes();

  friend struct ShardsBackwardHook;

  std::shared_ptr<Distributed> dist_;
  model::CausalLM& model_;
  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> sizes_;  // each parameter's full shape
  std::vector<size_t> unit_of_;              // each parameter's unit
  std::vector<Unit> units_;        // [0] the root, [1 + i] layer i
  std::vector<at::Tensor> shards_;
  std::deque<Scatter> scatters_;
  bool full_ = true;
  bool in_step_ = false;
  int64_t peak_bytes_ = 0, peak_grad_bytes_ = 0;
};

}  // namespace anvil::train
