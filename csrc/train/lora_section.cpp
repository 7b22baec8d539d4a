// The "lora" config section (include/anvil/train/lora_section.h).
#include "anvil/train/lora_section.h"

#include <stdexcept>

namespace anvil::train {

using nlohmann::json;

json lora_section_defaults() {
  return {{"r", 16},          {"alpha", 32},           {"dropout", 0.0},
          {"rslora", false},  {"dora", false},         {"targets", "all-linear"},
          {"target_regex", ""}, {"rank_pattern", json::object()}, {"alpha_pattern", json::object()},
          {"init", "kaiming"}};
}

lora::LoraConfig read_lora_section(const ConfigReader& r) {
  using namespace lora;
  LoraConfig l;
  l.r = r.int_at_least("lora.r", 1);
  l.lora_alpha = r.number_in("lora.alpha", 0.0, kInf, false, "(0, inf)");
  if (l.lora_alpha <= 0) config_error("lora.alpha", "must be a number in (0, inf)", r.at("lora.alpha"));
  l.lora_dropout = r.number_in("lora.dropout", 0.0, 1.0, true, "[0, 1)");
  l.use_rslora = r.boolean("lora.rslora");
  l.use_dora = r.boolean("lora.dora");
  l.init = r.string("lora.init");
  try {
    LoraConfig check;
    check.init = l.init;
    check.target_modules.kind = TargetModules::Kind::kAllLinear;  // valid: only init is under test
    validate(check);
  } catch (const std::invalid_argument&) {
    config_error("lora.init", "must be \"kaiming\", \"gaussian\", \"pissa\" or \"pissa_niter_N\" (N >= 0 subspace "
                 "iterations of the randomized SVD)", r.at("lora.init"));
  }
  const std::string regex = r.string("lora.target_regex");
  const json& targets = r.at("lora.targets");
  const std::string targets_rule = "must be \"all-linear\" or a non-empty list of module names like [\"q_proj\", \"v_proj\"]";
  if (!regex.empty()) {
    l.target_modules.kind = TargetModules::Kind::kRegex;
    l.target_modules.regex = regex;
  } else if (targets.is_string() && targets.get<std::string>() == "all-linear") {
    l.target_modules.kind = TargetModules::Kind::kAllLinear;
  } else if (targets.is_array() && !targets.empty()) {
    l.target_modules.kind = TargetModules::Kind::kList;
    for (const auto& t : targets) {
      if (!t.is_string() || t.get<std::string>().empty()) config_error("lora.targets", targets_rule, targets);
      l.target_modules.names.push_back(t.get<std::string>());
    }
  } else {
    config_error("lora.targets", targets_rule, targets);
  }
  const json& ranks = r.at("lora.rank_pattern");
  if (!ranks.is_object()) config_error("lora.rank_pattern", "must be an object {\"regex\": rank >= 1}", ranks);
  for (auto it = ranks.begin(); it != ranks.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 1)
      config_error("lora.rank_pattern." + it.key(), "must be an integer >= 1", it.value());
    l.rank_pattern.emplace_back(it.key(), it.value().get<int64_t>());
  }
  const json& alphas = r.at("lora.alpha_pattern");
  if (!alphas.is_object()) config_error("lora.alpha_pattern", "must be an object {\"regex\": alpha > 0}", alphas);
  for (auto it = alphas.begin(); it != alphas.end(); ++it) {
    if (!it.value().is_number() || !(it.value().get<double>() > 0))
      config_error("lora.alpha_pattern." + it.key(), "must be a number > 0", it.value());
    l.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
  }
  return l;
}


}  // namespace anvil::train
