// PEFT-format adapter files (anvil/lora/lora.h; docs/FORMATS.md "LoRA adapters (PEFT format)"):
// adapter_config.json, written with the key set and defaults of peft 0.21's LoraConfig (json.dumps
// with indent 2 and sorted keys), and adapter_model.safetensors with keys
// "base_model.model.<module>.lora_A.weight" / ".lora_B.weight" / ".lora_magnitude_vector" (DoRA).
//
// Reading is strict: a key anvil implements is interpreted; a key that only records provenance
// (peft_version, inference_mode, revision, ...) is ignored; every other key must hold its "off" value
// (null, false, {} or []), else the load fails naming the key. Adapter tensors must cover exactly
// the modules the config targets, with the shapes its ranks imply.
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

using Json = nlohmann::ordered_json;

const char kFilePrefix[] = "base_model.model.";
const char kConfigFile[] = "adapter_config.json";
const char kWeightsFile[] = "adapter_model.safetensors";

// Keys that only describe where the adapter came from or how PEFT runs it: no effect on the weights.
const std::set<std::string> kProvenanceKeys = {
    "peft_version", "inference_mode", "revision", "auto_mapping", "base_model_name_or_path",
    "megatron_core", "qalora_group_size", "ensure_weight_tying", "loftq_config"};

// The rest of peft 0.21's LoraConfig as save_pretrained writes it with every option off; reading
// requires these values (or null/false/{}/[]) and writing emits them.
Json peft_defaults() {
  Json j;
  j["alora_invocation_tokens"] = nullptr;
  j["arrow_config"] = nullptr;
  j["auto_mapping"] = nullptr;
  j["bias"] = "none";
  j["corda_config"] = nullptr;
  j["ensure_weight_tying"] = false;
  j["eva_config"] = nullptr;
  j["exclude_modules"] = nullptr;
  j["fan_in_fan_out"] = false;
  j["inference_mode"] = true;
  j["kasa_config"] = nullptr;
  j["layer_replication"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["loftq_config"] = Json::object();
  j["lora_bias"] = false;
  j["lora_ga_config"] = nullptr;
  j["megatron_config"] = nullptr;
  j["megatron_core"] = "megatron.core";
  j["modules_to_save"] = nullptr;
  j["monteclora_config"] = nullptr;
  j["peft_type"] = "LORA";
  j["peft_version"] = "0.21.0";
  j["qalora_group_size"] = 16;
  j["revision"] = nullptr;
  j["target_parameters"] = nullptr;
  j["task_type"] = "CAUSAL_LM";
  j["trainable_token_indices"] = nullptr;
  j["use_bdlora"] = nullptr;
  j["use_qalora"] = false;
  j["velora_config"] = nullptr;
  return j;
}

bool is_off(const Json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) || ((v.is_object() || v.is_array()) && v.empty());
}

// An integral alpha is written as a JSON integer, as Python writes the int PEFT's field is typed as.
Json number(double v) {
  if (std::floor(v) == v && std::fabs(v) < 9e15) return Json(int64_t(v));
  return Json(v);
}

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

std::string adapter_config_json(const LoraConfig& c, const std::vector<std::string>& all_linear_names) {
  Json j = peft_defaults();
  j["alpha_pattern"] = Json::object();
  for (const auto& [k, v] : c.alpha_pattern) j["alpha_pattern"][k] = number(v);
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? Json(nullptr) : Json(c.base_model_name_or_path);
  j["init_lora_weights"] = c.init == "kaiming" ? Json(true) : Json(c.init);  // "gaussian", "pissa", "pissa_niter_N"
  j["lora_alpha"] = number(c.lora_alpha);
  j["lora_dropout"] = c.lora_dropout;
  j["r"] = c.r;
  j["rank_pattern"] = Json::object();
  for (const auto& [k, v] : c.rank_pattern) j["rank_pattern"][k] = v;
  // PEFT keeps a list as a set (written in hash order); anvil writes it sorted.
  switch (c.target_modules.kind) {
    case TargetModules::Kind::kRegex:
      j["target_modules"] = c.target_modules.regex;
      break;
    case TargetModules::Kind::kList: {
      std::set<std::string> names(c.target_modules.names.begin(), c.target_modules.names.end());
      j["target_modules"] = Json(std::vector<std::string>(names.begin(), names.end()));
      break;
    }
    case TargetModules::Kind::kAllLinear: {  // _maybe_include_all_linear_layers expands to the names
      std::set<std::string> names(all_linear_names.begin(), all_linear_names.end());
      j["target_modules"] = Json(std::vector<std::string>(names.begin(), names.end()));
      break;
    }
  }
  j["use_dora"] = c.use_dora;
  j["use_rslora"] = c.use_rslora;
  // json.dumps(sort_keys=True, indent=2): nlohmann::json (std::map) sorts keys bytewise, as Python
  // does for ASCII keys.
  return nlohmann::json::parse(j.dump()).dump(2);
}

LoraConfig parse_adapter_config(const std::string& text, const std::string& source) {
  Json j;
  try {
    j = Json::parse(text);
  } catch (const std::exception& e) {
    throw std::runtime_error(source + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw std::runtime_error(source + ": the top level must be a JSON object");
  auto fail = [&](const std::string& key, const std::string& rule) {
    throw std::runtime_error(source + ": \"" + key + "\" " + rule);
  };
  auto get = [&](const std::string& key, auto fallback) {
    using T = decltype(fallback);
    if (!j.contains(key) || j[key].is_null()) return fallback;
    try {
      return j[key].get<T>();
    } catch (const std::exception&) {
      fail(key, "has the wrong type: " + j[key].dump());
    }
    return fallback;
  };

  const std::string peft_type = get("peft_type", std::string());
  if (peft_type != "LORA") fail("peft_type", "is \"" + peft_type + "\"; anvil reads only LORA adapters");
  if (j.contains("task_type") && !j["task_type"].is_null() && j["task_type"] != "CAUSAL_LM")
    fail("task_type", "is " + j["task_type"].dump() + "; anvil adapts causal LMs (CAUSAL_LM)");

  LoraConfig c;
  if (j.contains("r") && j["r"].is_number_float()) fail("r", "must be an integer, got " + j["r"].dump());
  c.r = get("r", int64_t(8));
  c.lora_alpha = get("lora_alpha", 8.0);
  c.lora_dropout = get("lora_dropout", 0.0);
  c.use_rslora = get("use_rslora", false);
  c.use_dora = get("use_dora", false);
  c.base_model_name_or_path = get("base_model_name_or_path", std::string());
  if (j.contains("init_lora_weights")) {
    const auto& v = j["init_lora_weights"];
    if (v.is_boolean()) c.init = "kaiming";
    else if (v == "gaussian") c.init = "gaussian";
    else if (v.is_string() && v.get<std::string>().rfind("pissa", 0) == 0) c.init = v.get<std::string>();  // validate() checks it
    else fail("init_lora_weights", "is " + v.dump() + "; anvil supports true, false, \"gaussian\", \"pissa\" and "
              "\"pissa_niter_N\" (OLoRA, LoftQ, EVA, CorDA, ... are not implemented)");
  }
  if (!j.contains("target_modules") || j["target_modules"].is_null())
    fail("target_modules", "is missing; anvil needs the targeted module names");
  const auto& t = j["target_modules"];
  if (t.is_string()) {
    const auto s = t.get<std::string>();
    std::string lower = s;
    std::transform(lower.begin(), lower.end(), lower.begin(), ::tolower);
    if (lower == "all-linear") c.target_modules.kind = TargetModules::Kind::kAllLinear;
    else c.target_modules = {TargetModules::Kind::kRegex, {}, s};
  } else if (t.is_array()) {
    c.target_modules.kind = TargetModules::Kind::kList;
    for (const auto& e : t) {
      if (!e.is_string()) fail("target_modules", "must hold strings, got " + e.dump());
      c.target_modules.names.push_back(e.get<std::string>());
    }
  } else {
    fail("target_modules", "must be a list of names or a regex string, got " + t.dump());
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_object()) fail(key, "must be an object {regex: value}");
    for (const auto& [k, v] : j[key].items()) {
      if (!v.is_number()) fail(std::string(key) + "." + k, "must be a number, got " + v.dump());
      if (std::string(key) == "rank_pattern") {
        if (!v.is_number_integer()) fail(std::string(key) + "." + k, "must be an integer, got " + v.dump());
        c.rank_pattern.emplace_back(k, v.get<int64_t>());
      } else {
        c.alpha_pattern.emplace_back(k, v.get<double>());
      }
    }
  }
  if (j.contains("bias") && j["bias"] != "none")
    fail("bias", "is " + j["bias"].dump() + "; anvil supports only \"none\" (no trained biases)");
  if (j.contains("megatron_core") && !j["megatron_core"].is_null() && !j["megatron_core"].is_string())
    fail("megatron_core", "must be a string");

  // Everything else: provenance keys pass; any other key must be off.
  static const std::set<std::string> kInterpreted = {
      "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules",
      "rank_pattern", "alpha_pattern", "init_lora_weights", "bias"};
  for (const auto& [key, value] : j.items()) {
    if (kInterpreted.count(key) || kProvenanceKeys.count(key)) continue;
    if (!is_off(value))
      fail(key, "is " + value.dump() + "; anvil does not support this option (it must be null, false or empty)");
  }
  if (j.contains("loftq_config") && !is_off(j["loftq_config"]))
    fail("loftq_config", "is set; LoftQ adapters need their quantized base, which anvil does not reproduce");
  try {
    validate(c);
  } catch (const std::invalid_argument& e) {
    throw std::runtime_error(source + ": " + e.what());
  }
  return c;
}

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
