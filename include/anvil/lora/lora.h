// LoRA adapters for anvil's causal LMs, in PEFT's format and with PEFT's semantics (peft 0.21).
//
// An adapter is a LoraAdapter attached to an anvil::model::Linear through the core's LinearAdapter
// hook: y = W x + b + scaling * B(A(dropout(x))), with A (r, in) and B (out, r) kept in fp32 (PEFT
// creates them in the base dtype and then, with its default autocast_adapter_dtype=True, upcasts
// fp16/bf16 adapters to fp32; x is cast to the adapter dtype and the sum back to the base dtype).
// DoRA adds the magnitude vector m (out): y = W x + b + (m / ||W + s B A||_row - 1) (W x) +
// (m / ||W + s B A||_row) s B(A(x)), the norm detached, as PEFT's DoraLinearLayer computes it.
//
// Module names are the checkpoint's ("model.layers.0.self_attn.q_proj"), so PEFT's targeting rules
// apply to them unchanged and the adapter file's keys are "base_model.model.<name>.lora_A.weight".
// Everything the format allows but anvil does not implement (fan_in_fan_out, bias, layers_to_transform,
// modules_to_save, other PEFT types, ...) is refused on load with the key named, never ignored.
#pragma once

#include "anvil/model/attention.h"
#include "anvil/model/transformer.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace anvil::lora {

/// Which Linear modules get an adapter (PEFT's target_modules).
struct TargetModules {
  enum class Kind { kList, kRegex, kAllLinear };
  Kind kind = Kind::kList;
  /// kList: a module matches when its name equals an entry or ends with "." + entry.
  std::vector<std::string> names;
  /// kRegex: a module matches when the regex matches its whole name (Python re.fullmatch).
  std::string regex;
};

/// PEFT's LoraConfig, the subset anvil implements.
struct LoraConfig {
  int64_t r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0.0;
  bool use_rslora = false;  ///< scaling alpha / sqrt(r) instead of alpha / r
  bool use_dora = false;
  /// kAllLinear = every Linear but lm_head (routed experts included: anvil's per-expert Linears are
  /// the modules transformers 4.x had, on which PEFT's all-linear reached them).
  TargetModules target_modules;
  /// Per-module rank and alpha: keys are regexes matched as PEFT's get_pattern_key does
  /// (re.match("(.*\.)?(key)$", name)), the first matching key in order wins.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  /// "kaiming" (PEFT's init_lora_weights=True: A kaiming_uniform(a=sqrt(5)), B zeros),
  /// "gaussian" (A normal with std 1/r, B zeros), or PiSSA: "pissa" (full SVD of W) or
  /// "pissa_niter_N" (torch.svd_lowrank with N subspace iterations), which set A and B to W's top-r
  /// singular triplets and replace W by the residual W - scaling B A (PEFT's LoraLayer.pissa_init).
  std::string init = "kaiming";
  std::string base_model_name_or_path;  ///< written to adapter_config.json (null when empty)
};

/// Throws std::invalid_argument naming the field when a value is out of range (r <= 0, dropout
/// outside [0, 1), empty target list, bad regex, unknown init, ...).
void validate(const LoraConfig& config);

/// Whether `module_name` is targeted (`is_output_layer`: lm_head, excluded by all-linear).
bool is_target(const LoraConfig& config, const std::string& module_name, bool is_output_layer);
/// The rank and alpha of one module (rank_pattern / alpha_pattern, else r / lora_alpha).
int64_t rank_of(const LoraConfig& config, const std::string& module_name);
double alpha_of(const LoraConfig& config, const std::string& module_name);
/// alpha / r, or alpha / sqrt(r) with use_rslora.
double scaling_of(const LoraConfig& config, const std::string& module_name);

/// One module's adapter. Parameters are plain tensors (not registered on the Linear, whose names
/// stay the checkpoint's); apply_lora hands them out by PEFT name.
class LoraAdapter : public anvil::model::LinearAdapter {
 public:
  at::Tensor lora_A;     ///< (r, in) fp32
  at::Tensor lora_B;     ///< (out, r) fp32
  at::Tensor magnitude;  ///< (out) fp32, DoRA only (PEFT "lora_magnitude_vector")
  /// PiSSA only: the initial factors as the SVD gave them, before lora_A/lora_B were rounded to the
  /// base dtype (fp32 bases: equal to the initial lora_A/lora_B). The base weight holds
  /// W - scaling * pissa_B0 pissa_A0, so these two tensors (not a new SVD) rebuild the residual on resume.
  at::Tensor pissa_A0;  ///< (r, in) fp32, no grad
  at::Tensor pissa_B0;  ///< (out, r) fp32, no grad
  double scaling = 1.0;
  double dropout = 0.0;  ///< applied to x in training mode (the Linear's is_training())

  at::Tensor forward(const anvil::model::Linear& base, const at::Tensor& x, const at::Tensor& base_out) override;
  /// scaling * B A (out, in) fp32: what merging adds to W.
  at::Tensor delta_weight() const;
};

/// The activations the adapters of a Llama-style layer keep per token, in elements (for memory plans):
/// x A of each of the 7 linears (rank r), and the dropped-out inputs when lora_dropout > 0 (the branch
/// otherwise saves the layer's own input, already counted) per distinct input of the layer.
double activation_elems_per_token(const anvil::model::ModelConfig& model, const LoraConfig& config);

/// Whether config.init is PiSSA ("pissa" or "pissa_niter_N").
bool is_pissa(const LoraConfig& config);

/// Attaches an adapter to every targeted Linear of `model` (initialised per config.init from a
/// generator seeded with `seed`; DoRA magnitudes = row norms of W), sets requires_grad false on every
/// base parameter, and returns the trainable tensors by their PEFT file name
/// ("base_model.model.<module>.lora_A.weight", ...), in module order. Throws when nothing matches,
/// when the model already has adapters, or when the config is invalid.
///
/// PiSSA (config.init "pissa" / "pissa_niter_N") as PEFT 0.21's pissa_init: W (fp32) = U S Vh;
/// A = diag(sqrt(S_r / scaling)) Vh_r, B = U_r diag(sqrt(S_r / scaling)); W <- (W - scaling B A) in W's
/// dtype; A and B are then rounded to W's dtype and kept in fp32 (PEFT's move to the base dtype and
/// autocast_adapter_dtype). The randomized variant draws its Gaussian test matrix from the same seeded
/// CPU generator, module after module. `pissa_factors` (by PEFT file name, the unrounded pissa_A0 /
/// pissa_B0 of an earlier run, as pissa_initial_factors returns them) replaces the SVD: the residual is
/// then rebuilt bit for bit (resume). Refused, naming the module: quantized base weights (the residual
/// needs a dense writable W), weights other than fp32/bf16/fp16 (PEFT's rule), a targeted lm_head (its
/// weight may be tied to the embedding), r > min(out, in); and DoRA (validate).
std::vector<std::pair<std::string, at::Tensor>> apply_lora(
    anvil::model::CausalLM& model, const LoraConfig& config, uint64_t seed = 0,
    const std::vector<std::pair<std::string, at::Tensor>>* pissa_factors = nullptr);

/// The PiSSA adapters' unrounded initial factors (pissa_A0 as "...lora_A.weight", pissa_B0 as
/// "...lora_B.weight"), in module order; empty without PiSSA adapters.
std::vector<std::pair<std::string, at::Tensor>> pissa_initial_factors(anvil::model::CausalLM& model);

/// The attached adapters by module name, in module order.
std::vector<std::pair<std::string, std::shared_ptr<LoraAdapter>>> adapters_of(anvil::model::CausalLM& model);

/// The adapter tensors by PEFT file name (what save_adapter writes), in module order.
std::vector<std::pair<std::string, at::Tensor>> adapter_state(anvil::model::CausalLM& model, bool use_dora);

/// adapter_config.json text for `config`, as PEFT 0.21's save_pretrained writes it (sorted keys,
/// indent 2). all-linear is written expanded to the module names it matched in `model`, as PEFT does.
std::string adapter_config_json(const LoraConfig& config, const std::vector<std::string>& all_linear_names = {});

/// Parses an adapter_config.json; throws std::runtime_error naming `source` and the key for anything
/// anvil cannot reproduce exactly (peft_type other than LORA, fan_in_fan_out true, bias other than
/// "none", layers_to_transform, modules_to_save, any other non-default option).
LoraConfig parse_adapter_config(const std::string& json_text, const std::string& source = "adapter_config.json");

/// Writes adapter_config.json and adapter_model.safetensors into `dir` (created), each atomically.
/// With a PiSSA config this is the raw PiSSA adapter (init_lora_weights "pissa"...): it belongs on the
/// residual base; PEFT's from_pretrained rebuilds that residual with its own SVD of the original base
/// (close for "pissa", a different random basis for "pissa_niter_N").
void save_adapter(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir);

/// PiSSA -> LoRA, as PEFT 0.21's save_pretrained(path_initial_model_for_weight_conversion=...) writes it
/// (LoraModel.subtract_mutated_init): the adapter becomes the plain LoRA delta B A - B0 A0 of rank 2r,
/// lora_A = [A; A0] (2r, in), lora_B = [B | -B0] (out, 2r), with A0/B0 the initial adapter (rounded to the
/// base dtype, as PEFT's initial adapter holds them), r and rank_pattern doubled, lora_alpha and
/// alpha_pattern doubled (lora_alpha times sqrt 2 with rsLoRA), init_lora_weights true. It loads on the
/// ORIGINAL base model (W + scaling (B A - B0 A0) = W_res + scaling B A). Throws unless the adapters
/// are PiSSA adapters; rsLoRA with rank/alpha patterns is refused as PEFT refuses it.
void save_pissa_as_lora(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir);

/// The initial PiSSA adapter (A0, B0 rounded to the base dtype) with init_lora_weights true: PEFT's
/// `path_initial_model_for_weight_conversion` folder, from which PEFT itself can convert the raw adapter.
void save_pissa_initial_adapter(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir);

/// Reads a PEFT adapter directory and attaches it to `model` (freezing the base as apply_lora does).
/// A raw PiSSA adapter (init_lora_weights "pissa...") is refused: it needs the residual base; load the
/// converted adapter (save_pissa_as_lora) on the original base instead.
/// Every targeted module must have its tensors in the file and every tensor must belong to a targeted
/// module, with the shapes the config implies; errors name the key, and nothing is attached on error.
/// A targeted lm_head's "base_layer.weight" (PEFT's save_embedding_layers) replaces the base weight.
/// Returns the config.
LoraConfig load_adapter(anvil::model::CausalLM& model, const std::string& dir);

/// Folds every adapter into its base weight (LoRA: W += scaling B A; DoRA: PEFT's merge,
/// W = m / ||W + dW||_row * (W + dW)), in the weight's dtype, and detaches the adapters, so
/// save_causal_lm writes a plain checkpoint. Base parameters get requires_grad back.
void merge_adapter(anvil::model::CausalLM& model);

}  // namespace anvil::lora
