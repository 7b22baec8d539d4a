// The per-layer hidden states of a model's forward, for hidden-state distillation losses
// (anvil/train/hidden_loss.h). A scope registers a sink for one TransformerModel on this thread; while it
// lives, that model's forward appends to it the embedding output and each decoder layer's output (B, S, H),
// before the final norm: num_hidden_layers + 1 tensors, index i the input of layer i (transformers'
// output_hidden_states numbering but for the last, which transformers takes after the norm), with autograd as
// computed. It is a registry beside the model, not a member, so that the model's header (included by most of
// the core) stays as it is; a thread-local list, since a forward runs on the thread that called it.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace anvil::model {

class TransformerModel;

class LayerOutputsScope {
 public:
  /// sink null: records nothing (a scope that does nothing, for optional recording).
  LayerOutputsScope(const TransformerModel& model, std::vector<at::Tensor>* sink);
  ~LayerOutputsScope();
  LayerOutputsScope(const LayerOutputsScope&) = delete;
  LayerOutputsScope& operator=(const LayerOutputsScope&) = delete;

 private:
  const TransformerModel* model_;
  bool active_;
};

/// The sink registered for `model` on this thread, or null (TransformerModel::forward's lookup).
std::vector<at::Tensor>* layer_outputs_sink(const TransformerModel& model);

}  // namespace anvil::model
