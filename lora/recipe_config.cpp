// The config of `anvil lora` (lora/recipe.h): the shared training sections, the "lora" section (PEFT's
// LoraConfig fields under anvil's key names) and the rules between them.
#include "lora/recipe.h"

#include <stdexcept>

namespace anvil::lora {

using nlohmann::json;
using train::config_error;

train::ConfigSchema config_schema() {
  train::ConfigSchema schema;
  schema.defaults = train::training_defaults("runs/lora");
  schema.defaults["lora"] = {{"r", 16},          {"alpha", 32},           {"dropout", 0.0},
                             {"rslora", false},  {"dora", false},         {"targets", "all-linear"},
                             {"target_regex", ""}, {"rank_pattern", json::object()}, {"alpha_pattern", json::object()},
                             {"init", "kaiming"}};
  schema.defaults["output"]["save_initial_adapter"] = false;
  schema.defaults["output"]["save_pissa_adapter"] = false;
  return schema;
}

namespace {

LoraConfig read_lora_section(const train::ConfigReader& r) {
  LoraConfig l;
  l.r = r.int_at_least("lora.r", 1);
  l.lora_alpha = r.number_in("lora.alpha", 0.0, train::kInf, false, "(0, inf)");
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

}  // namespace

RecipeConfig resolve_config(const json& user) {
  RecipeConfig c;
  c.resolved = train::merge_over_defaults(config_schema(), user);
  const train::ConfigReader r(c.resolved);
  c.model = train::read_model_section(r);
  if (c.model.init == "random")
    config_error("model.init", "\"random\" is for anvil train (full training); anvil lora needs \"pretrained\"",
                 c.model.init);
  c.data = train::read_data_section(r);
  c.lora = read_lora_section(r);
  c.train = train::read_train_section(r);
  if (c.train.mixed_precision != "none")
    config_error("train.mixed_precision", "is for anvil train; LoRA adapters are fp32 over a base in model.dtype already",
                 r.at("train.mixed_precision"));
  c.eval = train::read_eval_section(r);
  c.output = train::read_output_section(r);
  c.save_initial_adapter = r.boolean("output.save_initial_adapter");
  c.save_pissa_adapter = r.boolean("output.save_pissa_adapter");
  if (c.save_pissa_adapter && !is_pissa(c.lora))
    config_error("output.save_pissa_adapter", "is for anvil lora with lora.init \"pissa\" or \"pissa_niter_N\"", true);
  if (is_pissa(c.lora)) {
    if (c.model.base_weights == "fp8" || c.model.base_weights == "int8")
      config_error("lora.init", "\"" + c.lora.init + "\" rewrites the base weights into the residual W - scaling B A, which "
                   "needs dense weights; model.base_weights \"" + c.model.base_weights + "\" quantizes them (use \"dense\")",
                   c.resolved["lora"]["init"]);
    if (c.lora.use_dora)
      config_error("lora.dora", "cannot be combined with PiSSA: the PiSSA adapter is written converted to a plain LoRA "
                   "delta of the original base (PEFT's conversion), which cannot express DoRA's magnitude", true);
    if (c.lora.use_rslora && (!c.lora.rank_pattern.empty() || !c.lora.alpha_pattern.empty()))
      config_error("lora.rslora", "with rank_pattern/alpha_pattern cannot be combined with PiSSA: PEFT cannot convert such "
                   "an adapter back to a LoRA of the original base", true);
  }
  return c;
}

}  // namespace anvil::lora
