// The recipe config (lora/recipe_config.h): defaults, overrides, validation, the typed view.
//
// Validation reads the merged JSON one key at a time through small typed getters (string_in,
// int_at_least, number_in, ...) so that every error message has the same shape:
//   "config key train.schedule: must be one of \"cosine\", \"linear\", \"constant\", got \"cos\"".
#include "lora/recipe_config.h"

#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace anvil::lora {

using nlohmann::json;

json default_config() {
  return json{
      {"model",
       {{"path", ""}, {"init", "pretrained"}, {"config", ""}, {"tokenizer", ""}, {"dtype", "bfloat16"},
        {"device", "auto"}, {"base_weights", "auto"}}},
      {"data",
       {{"train", ""}, {"validation", ""}, {"validation_fraction", 0.0}, {"seq_len", 1024}, {"loss_on", "completion"},
        {"add_eos", true}}},
      {"lora",
       {{"r", 16}, {"alpha", 32}, {"dropout", 0.0}, {"rslora", false}, {"dora", false}, {"targets", "all-linear"},
        {"target_regex", ""}, {"rank_pattern", json::object()}, {"alpha_pattern", json::object()}, {"init", "kaiming"}}},
      {"train",
       {{"batch_size", 8}, {"grad_accum", 1}, {"epochs", 1}, {"steps", 0}, {"lr", 2e-4}, {"weight_decay", 0.0},
        {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"schedule", "cosine"}, {"warmup_steps", 0},
        {"min_lr_ratio", 0.0}, {"max_grad_norm", 1.0}, {"grad_checkpointing", false}, {"mixed_precision", "none"},
        {"loss_chunk", 4096}, {"seed", 0}}},
      {"eval", {{"every", 0}, {"max_batches", 0}, {"prompts", json::array()}, {"max_new_tokens", 48}}},
      {"output",
       {{"dir", "runs/lora"}, {"save_every", 0}, {"log_every", 1}, {"plot", true}, {"save_initial_adapter", false}, {"save_pissa_adapter", false}}},
  };
}

namespace {

[[noreturn]] void fail(const std::string& key, const std::string& rule, const json& got) {
  throw std::invalid_argument("config key " + key + ": " + rule + ", got " + got.dump());
}

std::string key_list(const json& object) {
  std::string out;
  for (auto it = object.begin(); it != object.end(); ++it) out += (out.empty() ? "" : ", ") + it.key();
  return out;
}

// The user's JSON over the defaults, refusing unknown sections and keys.
json merge_over_defaults(const json& user) {
  json merged = default_config();
  if (!user.is_object()) throw std::invalid_argument("config: the top level must be a JSON object, got " + user.dump());
  for (auto section = user.begin(); section != user.end(); ++section) {
    if (!merged.contains(section.key()))
      throw std::invalid_argument("config: unknown section '" + section.key() + "' (sections: " + key_list(merged) + ")");
    if (!section.value().is_object())
      throw std::invalid_argument("config section " + section.key() + ": must be a JSON object, got " +
                                  section.value().dump());
    json& target = merged[section.key()];
    for (auto key = section.value().begin(); key != section.value().end(); ++key) {
      if (!target.contains(key.key()))
        throw std::invalid_argument("config: unknown key '" + section.key() + "." + key.key() + "' (keys of " +
                                    section.key() + ": " + key_list(target) + ")");
      target[key.key()] = key.value();
    }
  }
  return merged;
}

// Typed getters: each checks the value and names "section.key" when it is wrong.
class Reader {
 public:
  explicit Reader(const json& config) : config_(config) {}

  const json& at(const std::string& key) const {
    const auto dot = key.find('.');
    return config_.at(key.substr(0, dot)).at(key.substr(dot + 1));
  }
  std::string string(const std::string& key) const {
    const auto& v = at(key);
    if (!v.is_string()) fail(key, "must be a string", v);
    return v.get<std::string>();
  }
  std::string string_in(const std::string& key, const std::vector<std::string>& allowed) const {
    const auto& v = at(key);
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "\"" : ", \"") + a + "\"";
    if (!v.is_string()) fail(key, "must be one of " + list, v);
    for (const auto& a : allowed)
      if (v.get<std::string>() == a) return a;
    fail(key, "must be one of " + list, v);
  }
  bool boolean(const std::string& key) const {
    const auto& v = at(key);
    if (!v.is_boolean()) fail(key, "must be true or false", v);
    return v.get<bool>();
  }
  int64_t int_at_least(const std::string& key, int64_t lo) const {
    const auto& v = at(key);
    const std::string rule = "must be an integer >= " + std::to_string(lo);
    if (!v.is_number_integer()) {
      // 8.0 is accepted as 8: JSON writers (and overrides like 1e3) produce whole floats.
      if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && v.get<double>() >= double(lo) &&
          v.get<double>() < 9.0e18)
        return static_cast<int64_t>(v.get<double>());
      fail(key, rule, v);
    }
    const int64_t x = v.get<int64_t>();
    if (x < lo) fail(key, rule, v);
    return x;
  }
  // lo <= x (< hi or <= hi), finite.
  double number_in(const std::string& key, double lo, double hi, bool hi_open, const std::string& range) const {
    const auto& v = at(key);
    if (!v.is_number()) fail(key, "must be a number in " + range, v);
    const double x = v.get<double>();
    if (!std::isfinite(x) || x < lo || (hi_open ? x >= hi : x > hi)) fail(key, "must be a number in " + range, v);
    return x;
  }

 private:
  const json& config_;
};

constexpr double kInf = 1e308;

void read_model(const Reader& r, RecipeMode mode, ModelSection& m) {
  m.path = r.string("model.path");
  m.init = r.string_in("model.init", {"pretrained", "random"});
  m.config = r.string("model.config");
  m.tokenizer = r.string("model.tokenizer");
  m.dtype = r.string_in("model.dtype", {"bfloat16", "float32", "float16"});
  m.device = r.string("model.device");
  m.base_weights = r.string_in("model.base_weights", {"auto", "dense", "fp8", "int8"});
  if ((m.base_weights == "fp8" || m.base_weights == "int8") && mode == RecipeMode::kFull)
    fail("model.base_weights", "\"fp8\" and \"int8\" hold a frozen base for anvil lora; anvil train updates every weight",
         m.base_weights);
  const bool cuda_n = m.device.rfind("cuda:", 0) == 0 && m.device.size() > 5 &&
                      m.device.find_first_not_of("0123456789", 5) == std::string::npos;
  if (m.device != "auto" && m.device != "cpu" && m.device != "cuda" && !cuda_n)
    fail("model.device", "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", m.device);
  if (m.init == "random" && mode == RecipeMode::kLora)
    fail("model.init", "\"random\" is for anvil train (full training); anvil lora needs \"pretrained\"", m.init);
  if (m.init == "random" && m.config.empty())
    fail("model.config", "must name a config.json when model.init is \"random\"", m.config);
  if (m.init == "pretrained" && m.path.empty())
    fail("model.path", "is required (an HF model folder or cached hub id) when model.init is \"pretrained\"", m.path);
}

void read_data(const Reader& r, DataSection& d) {
  d.train = r.string("data.train");
  if (d.train.empty()) fail("data.train", "is required (a JSONL file)", d.train);
  d.validation = r.string("data.validation");
  d.validation_fraction = r.number_in("data.validation_fraction", 0.0, 1.0, true, "[0, 1)");
  d.seq_len = r.int_at_least("data.seq_len", 2);
  d.loss_on = r.string_in("data.loss_on", {"completion", "all"});
  d.add_eos = r.boolean("data.add_eos");
}

void read_lora(const Reader& r, RecipeMode mode, LoraConfig& l) {
  if (mode == RecipeMode::kFull) {
    const json defaults = default_config()["lora"];
    for (auto it = defaults.begin(); it != defaults.end(); ++it)
      if (r.at("lora." + it.key()) != it.value())
        fail("lora." + it.key(), "is for anvil lora; anvil train trains every parameter (leave the lora section out)",
             r.at("lora." + it.key()));
    return;
  }
  l.r = r.int_at_least("lora.r", 1);
  l.lora_alpha = r.number_in("lora.alpha", 0.0, kInf, false, "(0, inf)");
  if (l.lora_alpha <= 0) fail("lora.alpha", "must be a number in (0, inf)", r.at("lora.alpha"));
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
    fail("lora.init", "must be \"kaiming\", \"gaussian\", \"pissa\" or \"pissa_niter_N\" (N >= 0 subspace iterations "
         "of the randomized SVD)", r.at("lora.init"));
  }
  const std::string regex = r.string("lora.target_regex");
  const json& targets = r.at("lora.targets");
  if (!regex.empty()) {
    l.target_modules.kind = TargetModules::Kind::kRegex;
    l.target_modules.regex = regex;
  } else if (targets.is_string() && targets.get<std::string>() == "all-linear") {
    l.target_modules.kind = TargetModules::Kind::kAllLinear;
  } else if (targets.is_array() && !targets.empty()) {
    l.target_modules.kind = TargetModules::Kind::kList;
    for (const auto& t : targets) {
      if (!t.is_string() || t.get<std::string>().empty())
        fail("lora.targets", "must be \"all-linear\" or a non-empty list of module names like [\"q_proj\", \"v_proj\"]",
             targets);
      l.target_modules.names.push_back(t.get<std::string>());
    }
  } else {
    fail("lora.targets", "must be \"all-linear\" or a non-empty list of module names like [\"q_proj\", \"v_proj\"]",
         targets);
  }
  const json& ranks = r.at("lora.rank_pattern");
  if (!ranks.is_object()) fail("lora.rank_pattern", "must be an object {\"regex\": rank >= 1}", ranks);
  for (auto it = ranks.begin(); it != ranks.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 1)
      fail("lora.rank_pattern." + it.key(), "must be an integer >= 1", it.value());
    l.rank_pattern.emplace_back(it.key(), it.value().get<int64_t>());
  }
  const json& alphas = r.at("lora.alpha_pattern");
  if (!alphas.is_object()) fail("lora.alpha_pattern", "must be an object {\"regex\": alpha > 0}", alphas);
  for (auto it = alphas.begin(); it != alphas.end(); ++it) {
    if (!it.value().is_number() || !(it.value().get<double>() > 0))
      fail("lora.alpha_pattern." + it.key(), "must be a number > 0", it.value());
    l.alpha_pattern.emplace_back(it.key(), it.value().get<double>());
  }
}

void read_train(const Reader& r, RecipeMode mode, TrainSection& t) {
  t.batch_size = r.int_at_least("train.batch_size", 1);
  t.grad_accum = r.int_at_least("train.grad_accum", 1);
  t.epochs = r.int_at_least("train.epochs", 1);
  t.steps = r.int_at_least("train.steps", 0);
  t.lr = r.number_in("train.lr", 0.0, kInf, false, "[0, inf)");
  t.weight_decay = r.number_in("train.weight_decay", 0.0, kInf, false, "[0, inf)");
  t.beta1 = r.number_in("train.beta1", 0.0, 1.0, true, "[0, 1)");
  t.beta2 = r.number_in("train.beta2", 0.0, 1.0, true, "[0, 1)");
  t.eps = r.number_in("train.eps", 0.0, kInf, false, "[0, inf)");
  t.schedule = r.string_in("train.schedule", {"cosine", "linear", "constant"});
  t.warmup_steps = r.int_at_least("train.warmup_steps", 0);
  t.min_lr_ratio = r.number_in("train.min_lr_ratio", 0.0, 1.0, false, "[0, 1]");
  t.max_grad_norm = r.number_in("train.max_grad_norm", 0.0, kInf, false, "[0, inf) (0 = no clipping)");
  t.grad_checkpointing = r.boolean("train.grad_checkpointing");
  t.mixed_precision = r.string_in("train.mixed_precision", {"none", "bf16"});
  if (t.mixed_precision != "none" && mode == RecipeMode::kLora)
    fail("train.mixed_precision", "is for anvil train; LoRA adapters are fp32 over a base in model.dtype already",
         r.at("train.mixed_precision"));
  t.loss_chunk = r.int_at_least("train.loss_chunk", 1);
  t.seed = static_cast<uint64_t>(r.int_at_least("train.seed", 0));
}

void read_eval(const Reader& r, EvalSection& e) {
  e.every = r.int_at_least("eval.every", 0);
  e.max_batches = r.int_at_least("eval.max_batches", 0);
  const json& prompts = r.at("eval.prompts");
  if (!prompts.is_array()) fail("eval.prompts", "must be a list of strings", prompts);
  for (const auto& p : prompts) {
    if (!p.is_string()) fail("eval.prompts", "must be a list of strings", prompts);
    e.prompts.push_back(p.get<std::string>());
  }
  e.max_new_tokens = r.int_at_least("eval.max_new_tokens", 1);
}

void read_output(const Reader& r, OutputSection& o) {
  o.dir = r.string("output.dir");
  if (o.dir.empty()) fail("output.dir", "must name a directory", o.dir);
  o.save_every = r.int_at_least("output.save_every", 0);
  o.log_every = r.int_at_least("output.log_every", 1);
  o.plot = r.boolean("output.plot");
  o.save_initial_adapter = r.boolean("output.save_initial_adapter");
  o.save_pissa_adapter = r.boolean("output.save_pissa_adapter");
}

}  // namespace

void apply_override(json& config, const std::string& assignment) {
  const auto eq = assignment.find('=');
  const std::string key = assignment.substr(0, eq);
  const auto dot = key.find('.');
  if (eq == std::string::npos || dot == std::string::npos || dot == 0 || dot + 1 == key.size() ||
      key.find('.', dot + 1) != std::string::npos)
    throw std::invalid_argument("override '--" + assignment + "': must have the form --section.key=value");
  const std::string text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;  // not JSON: a plain string (cosine, runs/x, ...)
  if (!config.is_object()) config = json::object();
  json& section = config[key.substr(0, dot)];
  if (!section.is_object()) section = json::object();
  section[key.substr(dot + 1)] = value;
}

RecipeConfig resolve_config(const json& user, RecipeMode mode) {
  RecipeConfig c;
  c.mode = mode;
  c.resolved = merge_over_defaults(user);
  if (mode == RecipeMode::kFull && !(user.contains("output") && user["output"].contains("dir")))
    c.resolved["output"]["dir"] = "runs/train";
  const Reader r(c.resolved);
  read_model(r, mode, c.model);
  read_data(r, c.data);
  read_lora(r, mode, c.lora);
  read_train(r, mode, c.train);
  read_eval(r, c.eval);
  read_output(r, c.output);
  if (mode == RecipeMode::kFull && c.output.save_initial_adapter)
    fail("output.save_initial_adapter", "is for anvil lora (anvil train has no adapter)", true);
  if (c.output.save_pissa_adapter && (mode == RecipeMode::kFull || !is_pissa(c.lora)))
    fail("output.save_pissa_adapter", "is for anvil lora with lora.init \"pissa\" or \"pissa_niter_N\"", true);
  if (mode == RecipeMode::kLora && is_pissa(c.lora)) {
    if (c.model.base_weights == "fp8" || c.model.base_weights == "int8")
      fail("lora.init", "\"" + c.lora.init + "\" rewrites the base weights into the residual W - scaling B A, which needs "
           "dense weights; model.base_weights \"" + c.model.base_weights + "\" quantizes them (use \"dense\")",
           c.resolved["lora"]["init"]);
    if (c.lora.use_dora)
      fail("lora.dora", "cannot be combined with PiSSA: the PiSSA adapter is written converted to a plain LoRA delta of "
           "the original base (PEFT's conversion), which cannot express DoRA's magnitude", true);
    if (c.lora.use_rslora && (!c.lora.rank_pattern.empty() || !c.lora.alpha_pattern.empty()))
      fail("lora.rslora", "with rank_pattern/alpha_pattern cannot be combined with PiSSA: PEFT cannot convert such an "
           "adapter back to a LoRA of the original base", true);
  }
  return c;
}

json read_config_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("--config: cannot open " + path);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return json::parse(text.str(), nullptr, true, /*ignore_comments=*/true);
  } catch (const json::parse_error& e) {
    throw std::invalid_argument("--config " + path + ": not valid JSON: " + e.what());
  }
}

RecipeConfig load_config(const std::string& path, const std::vector<std::string>& overrides, RecipeMode mode) {
  json user = path.empty() ? json::object() : read_config_file(path);
  for (const auto& o : overrides) apply_override(user, o);
  return resolve_config(user, mode);
}

}  // namespace anvil::lora
