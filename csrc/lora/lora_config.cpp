// The LoRA configuration apart from the tensors (anvil/lora/lora.h): validation, PEFT 0.21's targeting rules
// (which module an adapter goes on, with which rank and alpha) and adapter_config.json's text, written and read.
// Plain C++ over std types, in a file of its own so that the libFuzzer harness tests/fuzz/fuzz_lora_config.cpp
// runs exactly this code on hostile adapter_config.json files, without the model or the tensors behind it.
//
// Reading is strict: a key anvil implements is interpreted; a key that only records provenance
// (peft_version, inference_mode, revision, ...) is ignored; every other key must hold its "off" value
// (null, false, {} or []), else the load fails naming the key.
#include "anvil/lora/lora.h"

#include "lora/lora_internal.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <regex>
#include <set>
#include <stdexcept>

namespace anvil::lora {

// re.fullmatch(pattern, name); std::regex's ECMAScript grammar covers the patterns PEFT configs use
// (alternation, classes, escapes, quantifiers).
bool full_match(const std::string& pattern, const std::string& name) {
  return std::regex_match(name, std::regex(pattern));
}

// "pissa_niter_N" -> N (digits only, as int() of PEFT's split("_niter_")[-1] accepts them); -1 for "pissa";
// throws for anything else starting with "pissa".
int64_t pissa_niter(const std::string& init) {
  if (init == "pissa") return -1;
  const std::string prefix = "pissa_niter_";
  const std::string digits = init.rfind(prefix, 0) == 0 ? init.substr(prefix.size()) : std::string();
  if (digits.empty() || digits.size() > 6 || digits.find_first_not_of("0123456789") != std::string::npos)
    throw std::invalid_argument("LoraConfig: init must be \"kaiming\", \"gaussian\", \"pissa\" or \"pissa_niter_N\" "
                                "(N >= 0 subspace iterations), got \"" + init + "\"");
  return std::stoll(digits);
}

namespace {

using Json = nlohmann::ordered_json;

// PEFT get_pattern_key: the first key with re.match(rf"(.*\.)?({key})$", name).
template <typename T>
const std::pair<std::string, T>* pattern_entry(const std::vector<std::pair<std::string, T>>& patterns,
                                               const std::string& name) {
  for (const auto& entry : patterns)
    if (full_match("(.*\\.)?(" + entry.first + ")", name)) return &entry;
  return nullptr;
}

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

}  // namespace

void validate(const LoraConfig& c) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("LoraConfig: " + what); };
  auto check_regex = [&](const std::string& pattern, const std::string& what) {
    try {
      std::regex check(pattern);
    } catch (const std::regex_error& e) {
      fail(what + " \"" + pattern + "\" is not a valid regex: " + e.what());
    }
  };
  if (c.r <= 0) fail("r must be > 0, got " + std::to_string(c.r));
  if (!(c.lora_dropout >= 0.0 && c.lora_dropout < 1.0))
    fail("lora_dropout must be in [0, 1), got " + std::to_string(c.lora_dropout));
  if (c.init != "kaiming" && c.init != "gaussian") pissa_niter(c.init);  // throws unless pissa / pissa_niter_N
  if (is_pissa(c) && c.use_dora)
    fail("init \"" + c.init + "\" with use_dora: a PiSSA adapter is only usable on the original base once converted "
         "to a plain LoRA delta (PEFT's path_initial_model_for_weight_conversion), which cannot express DoRA's magnitude");
  if (is_pissa(c) && c.use_rslora && (!c.rank_pattern.empty() || !c.alpha_pattern.empty()))
    fail("init \"" + c.init + "\" with use_rslora and rank_pattern/alpha_pattern: PEFT cannot convert such a PiSSA "
         "adapter back to a LoRA of the original base (LoraModel._convert_state_dict_for_initial_model refuses it)");
  const auto& t = c.target_modules;
  if (t.kind == TargetModules::Kind::kList && t.names.empty()) fail("target_modules is an empty list");
  if (t.kind == TargetModules::Kind::kRegex) check_regex(t.regex, "target_modules regex");
  for (const auto& [key, rank] : c.rank_pattern) {
    if (rank <= 0) fail("rank_pattern[\"" + key + "\"] must be > 0, got " + std::to_string(rank));
    check_regex(key, "rank_pattern key");
  }
  for (const auto& entry : c.alpha_pattern) check_regex(entry.first, "alpha_pattern key");
}

bool is_pissa(const LoraConfig& c) { return c.init.rfind("pissa", 0) == 0; }

bool is_target(const LoraConfig& c, const std::string& name, bool is_output_layer) {
  const auto& t = c.target_modules;
  switch (t.kind) {
    case TargetModules::Kind::kAllLinear:
      // _maybe_include_all_linear_layers drops get_output_embeddings() (lm_head).
      return !is_output_layer;
    case TargetModules::Kind::kRegex:
      return full_match(t.regex, name);  // match_target_against_key
    case TargetModules::Kind::kList:
      for (const auto& entry : t.names) {  // check_target_module_exists
        if (name == entry) return true;
        if (name.size() > entry.size() && name.compare(name.size() - entry.size(), entry.size(), entry) == 0 &&
            name[name.size() - entry.size() - 1] == '.')
          return true;
      }
      return false;
  }
  return false;
}

int64_t rank_of(const LoraConfig& c, const std::string& name) {
  auto* e = pattern_entry(c.rank_pattern, name);
  return e ? e->second : c.r;
}

double alpha_of(const LoraConfig& c, const std::string& name) {
  auto* e = pattern_entry(c.alpha_pattern, name);
  return e ? e->second : c.lora_alpha;
}

double scaling_of(const LoraConfig& c, const std::string& name) {  // LoraLayer.update_layer
  const double r = double(rank_of(c, name));
  return alpha_of(c, name) / (c.use_rslora ? std::sqrt(r) : r);
}

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

}  // namespace anvil::lora
