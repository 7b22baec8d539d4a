// PEFT-format adapter folders (anvil/lora/lora.h; docs/FORMATS.md "LoRA adapters (PEFT format)"):
// adapter_config.json (its text is lora_config.cpp's: written with the key set and defaults of peft 0.21's
// LoraConfig, read strictly) and adapter_model.safetensors with keys
// "base_model.model.<module>.lora_A.weight" / ".lora_B.weight" / ".lora_magnitude_vector" (DoRA).
// Adapter tensors must cover exactly the modules the config targets, with the shapes its ranks imply.
#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/lora/lora.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <set>
#include <stdexcept>
#include <unordered_map>

namespace anvil::lora {

namespace {

const char kFilePrefix[] = "base_model.model.";
const char kConfigFile[] = "adapter_config.json";
const char kWeightsFile[] = "adapter_model.safetensors";

std::string read_text(const std::string& path) {
  if (!anvil::io::is_regular_file(path)) throw std::runtime_error(path + ": missing (not a PEFT adapter directory?)");
  return anvil::io::read_text_file(path, 64 << 20);
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

}  // namespace

namespace {

// adapter_model.safetensors from `state` (plus lm_head's base layer, see below) and adapter_config.json
// for `config`, into `dir`.
void write_adapter(anvil::model::CausalLM& model, const LoraConfig& config,
                   const std::vector<std::pair<std::string, at::Tensor>>& state, const std::string& dir) {
  std::vector<std::string> names;
  for (auto& [name, a] : adapters_of(model)) names.push_back(name);
  anvil::io::make_directories(dir);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, t] : state) tensors.emplace_back(name, t.detach().to(at::kCPU).contiguous());
  // PEFT's get_peft_model_state_dict: with an embedding layer (lm_head) among the targets it also
  // saves that layer's base weight ("save_embedding_layers" auto), as "<module>.base_layer.weight".
  for (auto& [name, linear] : anvil::model::named_linears(model)) {
    if (name != "lm_head" || !linear->adapter) continue;
    tensors.emplace_back(kFilePrefix + name + ".base_layer.weight", linear->weight.detach().to(at::kCPU).contiguous());
    if (linear->bias.defined())
      tensors.emplace_back(kFilePrefix + name + ".base_layer.bias", linear->bias.detach().to(at::kCPU).contiguous());
  }
  anvil::io::save_safetensors(anvil::io::join_path(dir, kWeightsFile), tensors, {{"format", "pt"}});
  anvil::io::write_text_atomically(anvil::io::join_path(dir, kConfigFile), adapter_config_json(config, names));
}

// The PiSSA adapters of `model` with their initial factors rounded as PEFT's initial adapter holds them
// (the base dtype, then fp32): (module name, adapter, A0 (r, in), B0 (out, r)).
struct PissaModule {
  std::string name;
  std::shared_ptr<LoraAdapter> adapter;
  at::Tensor a0, b0;
};

std::vector<PissaModule> pissa_modules(anvil::model::CausalLM& model, const LoraConfig& config, const char* caller) {
  if (!is_pissa(config))
    throw std::invalid_argument(std::string(caller) + ": the config's init is \"" + config.init + "\", not PiSSA");
  std::vector<PissaModule> out;
  for (auto& [name, linear] : anvil::model::named_linears(model)) {
    auto a = std::dynamic_pointer_cast<LoraAdapter>(linear->adapter);
    if (!a) continue;
    if (!a->pissa_A0.defined())
      throw std::invalid_argument(std::string(caller) + ": module " + name + "'s adapter was not initialized by PiSSA");
    const auto dt = linear->weight.scalar_type();
    out.push_back({name, a, a->pissa_A0.to(dt).to(at::kFloat), a->pissa_B0.to(dt).to(at::kFloat)});
  }
  if (out.empty()) throw std::invalid_argument(std::string(caller) + ": the model has no LoRA adapters attached");
  return out;
}

}  // namespace

void save_adapter(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir) {
  auto state = adapter_state(model, config.use_dora);
  if (state.empty()) throw std::invalid_argument("save_adapter: the model has no LoRA adapters attached");
  write_adapter(model, config, state, dir);
}

void save_pissa_initial_adapter(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir) {
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (auto& m : pissa_modules(model, config, "save_pissa_initial_adapter")) {
    state.emplace_back(kFilePrefix + m.name + ".lora_A.weight", m.a0);
    state.emplace_back(kFilePrefix + m.name + ".lora_B.weight", m.b0);
  }
  LoraConfig initial = config;
  initial.init = "kaiming";  // PeftModel.save_pretrained writes the initial adapter with init_lora_weights = True
  write_adapter(model, initial, state, dir);
}

void save_pissa_as_lora(anvil::model::CausalLM& model, const LoraConfig& config, const std::string& dir) {
  if (config.use_rslora && (!config.rank_pattern.empty() || !config.alpha_pattern.empty()))
    throw std::invalid_argument("save_pissa_as_lora: rsLoRA with rank_pattern/alpha_pattern cannot be converted (PEFT "
                                "refuses it too: the doubled rank would need another alpha per pattern)");
  std::vector<std::pair<std::string, at::Tensor>> state;
  for (auto& m : pissa_modules(model, config, "save_pissa_as_lora")) {
    // LoraModel.subtract_mutated_init: dW = B A - B0 A0 = [B | -B0] [A; A0].
    state.emplace_back(kFilePrefix + m.name + ".lora_A.weight", at::cat({m.adapter->lora_A.detach(), m.a0}, 0));
    state.emplace_back(kFilePrefix + m.name + ".lora_B.weight", at::cat({m.adapter->lora_B.detach(), -m.b0}, 1));
  }
  // PeftModel.save_pretrained's bookkeeping for the converted config: the same scaling at twice the rank.
  LoraConfig converted = config;
  converted.init = "kaiming";
  converted.r *= 2;
  converted.lora_alpha *= config.use_rslora ? std::sqrt(2.0) : 2.0;
  for (auto& entry : converted.rank_pattern) entry.second *= 2;
  for (auto& entry : converted.alpha_pattern) entry.second *= 2;
  write_adapter(model, converted, state, dir);
}

LoraConfig load_adapter(anvil::model::CausalLM& model, const std::string& dir) {
  const auto config_path = anvil::io::join_path(dir, kConfigFile);
  LoraConfig config = parse_adapter_config(read_text(config_path), config_path);
  if (is_pissa(config))
    throw std::runtime_error(config_path + ": \"init_lora_weights\" is \"" + config.init + "\": a raw PiSSA adapter "
                             "belongs on the residual base W - scaling B0 A0, not on this model; load the converted "
                             "adapter (anvil lora writes it to adapter/; PEFT's path_initial_model_for_weight_conversion)");
  const auto weights_path = anvil::io::join_path(dir, kWeightsFile);
  if (!anvil::io::is_regular_file(weights_path))
    throw std::runtime_error(weights_path + ": missing (anvil reads the safetensors adapter format only)");
  anvil::io::SafetensorsFile file(weights_path);

  std::set<std::string> unused;
  for (const auto& e : file.entries()) unused.insert(e.name);
  auto take = [&](const std::string& key, std::vector<int64_t> shape) {
    if (!file.contains(key))
      throw std::runtime_error(weights_path + ": missing tensor " + key + " that adapter_config.json's targets imply");
    auto t = file.tensor(key);
    if (t.sizes().vec() != shape)
      throw std::runtime_error(weights_path + ": tensor " + key + " has shape " + shape_str(t.sizes()) + ", expected " +
                               shape_str(shape));
    if (!at::isFloatingType(t.scalar_type()))
      throw std::runtime_error(weights_path + ": tensor " + key + " is not floating point");
    unused.erase(key);
    return t;
  };

  auto linears = anvil::model::named_linears(model);
  for (auto& [name, linear] : linears)
    if (linear->adapter) throw std::invalid_argument("load_adapter: module " + name + " already has an adapter");
  struct Planned {
    std::shared_ptr<anvil::model::Linear> linear;
    std::shared_ptr<LoraAdapter> adapter;
    at::Tensor base_weight, base_bias;  // undefined unless the file carries the base layer
  };
  std::vector<Planned> planned;
  for (auto& [name, linear] : linears) {
    if (!is_target(config, name, name == "lm_head")) continue;
    const int64_t r = rank_of(config, name);
    const int64_t out_f = linear->weight.size(0), in_f = linear->weight.size(1);
    const auto device = linear->weight.device();
    const std::string prefix = kFilePrefix + name;
    auto adapter = std::make_shared<LoraAdapter>();
    adapter->lora_A = take(prefix + ".lora_A.weight", {r, in_f}).to(device, at::kFloat, false, true);
    adapter->lora_B = take(prefix + ".lora_B.weight", {out_f, r}).to(device, at::kFloat, false, true);
    if (config.use_dora)
      adapter->magnitude = take(prefix + ".lora_magnitude_vector", {out_f}).to(device, at::kFloat, false, true);
    adapter->scaling = scaling_of(config, name);
    adapter->dropout = config.lora_dropout;
    // A saved embedding layer (PEFT's save_embedding_layers, lm_head): it replaces the base weight.
    at::Tensor base_weight, base_bias;
    if (file.contains(prefix + ".base_layer.weight")) base_weight = take(prefix + ".base_layer.weight", {out_f, in_f});
    if (file.contains(prefix + ".base_layer.bias")) {
      if (!linear->bias.defined())
        throw std::runtime_error(weights_path + ": tensor " + prefix + ".base_layer.bias is for a module without bias");
      base_bias = take(prefix + ".base_layer.bias", {out_f});
    }
    planned.push_back({linear, adapter, base_weight, base_bias});
  }
  if (planned.empty())
    throw std::runtime_error(config_path + ": target_modules matches no Linear module of the model");
  if (!unused.empty())
    throw std::runtime_error(weights_path + ": tensor " + *unused.begin() + " belongs to no module that " +
                             "adapter_config.json targets (" + std::to_string(unused.size()) + " such tensors)");
  at::NoGradGuard no_grad;
  for (auto& [linear, adapter, base_weight, base_bias] : planned) {
    if (base_weight.defined()) linear->weight.copy_(base_weight);
    if (base_bias.defined()) linear->bias.copy_(base_bias);
    adapter->lora_A.requires_grad_(true);
    adapter->lora_B.requires_grad_(true);
    if (adapter->magnitude.defined()) adapter->magnitude.requires_grad_(true);
    linear->adapter = adapter;
  }
  for (auto& p : model.parameters()) p.requires_grad_(false);
  return config;
}

}  // namespace anvil::lora
