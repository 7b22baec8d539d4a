// A smaller model derived from a larger one of the same family: a subset of its decoder layers, kept in
// order and renumbered, with the embeddings, final norm and LM head as they are. The starting point of a
// distillation student ("derived" students; DistilBERT's init, and the depth half of NVIDIA's Minitron).
// The config.json text is the source's with num_hidden_layers (and the per-layer keys that depend on a
// layer's index) rewritten, so the derived model saves as a Hugging Face folder that transformers loads.
#pragma once

#include "anvil/model/transformer.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace anvil::model {

/// Layers 0, n, 2n, ... below num_layers (n >= 1).
std::vector<int64_t> every_nth_layer(int64_t num_layers, int64_t n);

/// The config.json text of `source` with only the layers `keep` (strictly increasing indices into its
/// layers): num_hidden_layers = keep.size(); a layer_types list (or the sliding-window layers that
/// max_window_layers implies) subset and written as layer_types; DeepSeek's first_k_dense_replace set to
/// the number of kept dense layers; num_nextn_predict_layers (DeepSeek-V3's MTP layers, not kept) set to 0.
/// Throws std::invalid_argument naming `what` ("config key student.layers") for an empty, unordered or
/// out-of-range list.
std::string derived_config_json(const ModelConfig& source, const std::vector<int64_t>& keep, const std::string& what);

/// A new model in `options` with `source`'s weights for the layers `keep` (model.layers.{keep[j]}.* becomes
/// model.layers.{j}.*) and its embeddings, norm and head; in training mode. `source` must hold dense weights.
std::shared_ptr<CausalLM> derive_by_layers(const CausalLM& source, const std::vector<int64_t>& keep,
                                           const at::TensorOptions& options, const std::string& what);

}  // namespace anvil::model
