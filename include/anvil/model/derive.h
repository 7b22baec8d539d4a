// A smaller model derived from a larger one of the same family: a subset of its decoder layers, kept in
// order and renumbered, with the embeddings, final norm and LM head as they are. The starting point of a
// distillation student ("derived" students; DistilBERT's init, and the depth half of NVIDIA's Minitron).
// The config.json text is the source's with num_hidden_layers (and the per-layer keys that depend on a
// layer's index) rewritten, so the derived model saves as a Hugging Face folder that transformers loads.
//
// Width pruning (the width half of Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning
// and Knowledge Distillation", arXiv 2407.14679; Sreenivas et al. 2024, "LLM Pruning and Distillation in
// Practice: The Minitron Approach", arXiv 2408.11796): the teacher runs over a few calibration rows and each
// prunable axis gets an activation-based importance; the derived model keeps the top-scored channels and its
// weights are slices of the source's. The scores (activation_importance), with the aggregation the paper found
// best and NVIDIA Model-Optimizer's MegatronL2NormHook computes (modelopt/torch/nas/plugins/megatron_hooks.py):
// per channel, mean |activation| over the sequence, then the L2 norm over the rows (all calibration batches),
//   MLP neurons (intermediate channels): of down_proj's input, act(gate_proj x) * up_proj x, per layer;
//   attention heads: of o_proj's input (the attention output, heads concatenated), per layer, then the L2 norm
//                    of each head's head_dim values (one score per query head);
//   embedding channels (hidden_size): of both RMSNorm outputs of every layer (input_layernorm,
//                    post_attention_layernorm), the per-norm scores summed over norms and layers.
// The values are taken where the Linear layers see them (a recording LinearAdapter on q_proj, gate_proj,
// o_proj and down_proj), so no model code carries a hook.
// GQA rule (what GqaAttention supports: every query group the same size): the student keeps
// num_key_value_heads' whole KV groups and, in each kept group, num_attention_heads / num_key_value_heads of
// its query heads; a group's score is the sum of the scores of the heads it keeps; within a group the
// top-scored heads. Each layer picks its own heads and channels (counts are the same in every layer); hidden
// channels are one choice for the whole model (the residual stream is shared). Kept indices stay in their
// source order. head_dim is unchanged and written explicitly into config.json.
// Pruning an intermediate channel or a head is exact: the pruned model computes what the source computes with
// that channel's down_proj column / that head's o_proj columns zeroed. Pruning hidden channels is not (each
// RMSNorm's mean square is then over the kept channels), as in the paper; distillation recovers it.
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

// ---- width pruning ---------------------------------------------------------------------------------

/// The widths a derived model narrows to; 0 keeps the source's.
struct WidthOptions {
  int64_t intermediate_size = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t hidden_size = 0;
  bool any() const { return intermediate_size > 0 || num_attention_heads > 0 || num_key_value_heads > 0 || hidden_size > 0; }
};

/// The widths `w` resolved against `source` (zeros filled in: num_key_value_heads defaults to the source's, or
/// to num_attention_heads for a multi-head (not grouped) source; num_attention_heads to the source's heads per
/// group times num_key_value_heads) and checked: not larger than the source's, >= 1, num_attention_heads a
/// multiple of num_key_value_heads with no more heads per group than the source's; a dense GQA source (no MoE,
/// no MLA). Throws std::invalid_argument naming `key_prefix` + the key ("config key student." +
/// "intermediate_size").
WidthOptions resolve_widths(const ModelConfig& source, const WidthOptions& w, const std::string& key_prefix);

/// Activation-based importance scores (fp32, on the CPU), one tensor per source layer (see the file comment).
struct Importance {
  std::vector<at::Tensor> mlp;    ///< per layer (intermediate_size)
  std::vector<at::Tensor> heads;  ///< per layer (num_attention_heads)
  at::Tensor hidden;              ///< (hidden_size)
  int64_t rows = 0, tokens = 0;   ///< the calibration data seen
};

/// Runs `model` (dense GQA weights, no adapters attached) in eval mode under no grad over `batches` ((B, S) int64
/// token ids each; a row is one sequence from position 0) and scores every prunable channel. The model's mode and
/// adapters are restored after.
Importance activation_importance(CausalLM& model, const std::vector<at::Tensor>& batches);

/// The kept indices (int64, increasing, source numbering), per source layer where per layer.
struct PruneSelection {
  std::vector<at::Tensor> mlp;    ///< per layer (intermediate_size') of [0, intermediate_size)
  std::vector<at::Tensor> kv;     ///< per layer (num_key_value_heads') kept KV groups
  std::vector<at::Tensor> heads;  ///< per layer (num_attention_heads') kept query heads
  at::Tensor hidden;              ///< (hidden_size') kept embedding channels
};

/// The top-scored channels for the widths `w` (resolved: resolve_widths); ties go to the lower index.
PruneSelection select_top(const ModelConfig& source, const Importance& importance, const WidthOptions& w);

/// derived_config_json with the widths of `w` (resolved) written: intermediate_size, num_attention_heads,
/// num_key_value_heads, hidden_size, and head_dim explicitly.
std::string derived_config_json(const ModelConfig& source, const std::vector<int64_t>& keep, const WidthOptions& w,
                                const std::string& what);

/// derive_by_layers narrowed: the layers `keep`, each sliced to `selection`'s channels and heads of its source
/// layer (the embeddings, final norm and head to selection.hidden). `w` resolved, selection from select_top (or
/// any increasing indices of the right counts).
std::shared_ptr<CausalLM> derive_pruned(const CausalLM& source, const std::vector<int64_t>& keep, const WidthOptions& w,
                                        const PruneSelection& selection, const at::TensorOptions& options,
                                        const std::string& what);

/// One line per pruned axis: "intermediate_size 96/128 (75%)", "attention heads 4/8 (kv groups 2/4)",
/// "hidden_size 48/64" (a kept axis reads "kept"), the calibration data named.
std::string pruning_summary(const ModelConfig& source, const WidthOptions& w, const Importance& importance);

}  // namespace anvil::model
