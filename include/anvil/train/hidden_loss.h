// Hidden-state distillation losses: the student's intermediate hidden states pulled towards the teacher's
// over a map of layer pairs (TinyBERT's and MiniLM-era "hidden" losses; Minitron distils with one too), beside
// the logit KD loss of kd_loss.h. Each pair (student layer s, teacher layer t) indexes
// anvil/model/layer_outputs.h's list: 0 the embedding output, i the output of decoder layer i - 1
// (before the final norm), so 0..num_hidden_layers.
//
// Per target token (the rows kd_loss uses) and pair, with h_s (Hs) the student's and h_t (Ht) the teacher's
// state and P the pair's projection:
//   mse:    mean over the Ht channels of (P h_s - h_t)^2
//   cosine: 1 - cos(P h_s, h_t)
// summed over the target rows, / normalizer (the step's target count), averaged over the pairs, times the
// weight. P is the identity when Hs == Ht, else a learned linear map Ht x Hs with a bias (nn.Linear's init,
// seeded): its tensors train with the student (in the optimizer, saved in the training checkpoint, so resume
// restores them) and are no part of the exported student.
#pragma once

#include "anvil/train/checkpoint.h"
#include "anvil/train/kd_loss.h"

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace anvil::train {

enum class HiddenLossType { kMse, kCosine };

/// "mse" | "cosine"; throws std::invalid_argument naming `what`.
HiddenLossType parse_hidden_loss(const std::string& name, const std::string& what);

using LayerMap = std::vector<std::pair<int64_t, int64_t>>;  ///< (student index, teacher index) pairs

/// Student outputs 1..Ls each paired with teacher output round(i * Lt / Ls) (the last layers meet; DistilBERT /
/// TinyBERT's uniform map).
LayerMap uniform_layer_map(int64_t student_layers, int64_t teacher_layers);

/// Throws std::invalid_argument naming `what` when a pair is out of 0..layers (either side) or the map is empty.
void check_layer_map(const LayerMap& map, int64_t student_layers, int64_t teacher_layers, const std::string& what);

/// Per row: student (N, H) (projected already), teacher (N, H) -> (N) in the student's dtype (fp32 for reduced
/// precision). Differentiable plain ATen ops.
at::Tensor hidden_divergence(const at::Tensor& student, const at::Tensor& teacher, HiddenLossType type);

/// The loss with its projections.
class HiddenLoss {
 public:
  /// One projection per pair when student_width != teacher_width, parameters in `options` (device, dtype), drawn
  /// from a generator seeded with `seed`.
  HiddenLoss(HiddenLossType type, double weight, LayerMap map, int64_t student_width, int64_t teacher_width,
             const at::TensorOptions& options, uint64_t seed);

  const LayerMap& map() const { return map_; }
  double weight() const { return weight_; }
  HiddenLossType type() const { return type_; }

  /// The trainable projection tensors by name ("hidden_projection.{pair}.weight" (Ht, Hs), ".bias" (Ht)),
  /// requiring grad; empty when the widths are equal.
  const NamedTensors& parameters() const { return parameters_; }

  /// weight * mean over pairs of sum over rows of hidden_divergence(P h_s, h_t) / normalizer: a () fp32 scalar
  /// (fp64 for fp64 input) with autograd to the student states and the projections. student_layers and
  /// teacher_layers are LayerOutputsScope's lists ((B, S, H) each); rows (T) the flattened target rows.
  at::Tensor operator()(const std::vector<at::Tensor>& student_layers, const std::vector<at::Tensor>& teacher_layers,
                        const at::Tensor& rows, double normalizer) const;

  /// The pair's projection of h (..., Hs) -> (..., Ht); h itself when there is none.
  at::Tensor project(size_t pair, const at::Tensor& h) const;

 private:
  HiddenLossType type_;
  double weight_;
  LayerMap map_;
  NamedTensors parameters_;
};

// ---- with the logit losses: a student and a frozen teacher on packed batches --------------------------------

/// kd_batch_loss (kd_loss.h) with the hidden-state loss added: total = (1 - kd_ratio) ce + kd_ratio kd + hidden,
/// hidden = `hidden` over both models' per-layer states of the same forwards (recorded by LayerOutputsScope; the
/// teacher is run for them at kd_ratio 0 too). Returns the KdBatchLoss and the detached hidden term.
struct KdHiddenBatchLoss {
  KdBatchLoss logits;  ///< total includes the hidden term
  at::Tensor hidden;   ///< () fp32, detached
};
KdHiddenBatchLoss kd_hidden_batch_loss(model::CausalLM& student, const Teacher& teacher, const data::Batch& b,
                                       double normalizer, const KdOptions& o, double kd_ratio, int64_t ce_chunk,
                                       at::Device device, const HiddenLoss& hidden);

/// kd_hidden_batch_loss as the trainer's loss callback: terms "kd" (kd_ratio > 0), "ce" and "hidden". `hidden`
/// must outlive it.
LossFn kd_hidden_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& o, double kd_ratio,
                         int64_t ce_chunk, at::Device device, const HiddenLoss& hidden);

}  // namespace anvil::train
