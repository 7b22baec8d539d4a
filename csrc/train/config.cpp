// Recipe configs (include/anvil/train/config.h): merging over the schema, overrides, typed getters and the
// readers of the sections every training recipe shares.
#include "anvil/train/config.h"

#include "anvil/io/fs.h"
#include "anvil/io/json.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <stdexcept>

namespace anvil::train {

using nlohmann::json;

// A value as the user wrote it, for messages; never throws (invalid UTF-8 shows as U+FFFD).
std::string shown(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

void config_error(const std::string& key, const std::string& rule, const json& got) {
  throw std::invalid_argument("config key " + key + ": " + rule + ", got " + shown(got));
}

namespace {

std::string key_list(const json& object) {
  std::string out;
  for (auto it = object.begin(); it != object.end(); ++it) out += (out.empty() ? "" : ", ") + it.key();
  return out;
}

}  // namespace

json merge_over_defaults(const ConfigSchema& schema, const json& user) {
  json merged = schema.defaults;
  if (!user.is_object()) throw std::invalid_argument("config: the top level must be a JSON object, got " + shown(user));
  for (auto section = user.begin(); section != user.end(); ++section) {
    if (!merged.contains(section.key())) {
      bool foreign_and_empty = false;
      for (const auto& [name, reason] : schema.foreign_sections) {
        if (name != section.key()) continue;
        const json& keys = section.value();
        foreign_and_empty = keys.is_object() && keys.empty();  // "lora": {} asks for nothing
        if (foreign_and_empty) break;
        const std::string key = keys.is_object() ? name + "." + keys.begin().key() : name;
        throw std::invalid_argument("config key " + key + ": " + reason + " (leave the " + name + " section out)");
      }
      if (foreign_and_empty) continue;
      throw std::invalid_argument("config: unknown section '" + section.key() + "' (sections: " + key_list(merged) + ")");
    }
    if (!section.value().is_object())
      throw std::invalid_argument("config section " + section.key() + ": must be a JSON object, got " +
                                  shown(section.value()));
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

void apply_override(json& config, const std::string& assignment) {
  // Command-line bytes are the one way text that is not UTF-8 could enter a config (a config file goes
  // through the JSON parser, which refuses it); config.json and every message must stay writable.
  try {
    (void)json(assignment).dump();
  } catch (const json::type_error&) {
    const std::string quoted = shown(json(assignment));  // "..." with U+FFFD for the bad bytes
    throw std::invalid_argument("override '--" + quoted.substr(1, quoted.size() - 2) + "': not valid UTF-8");
  }
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

json read_config_file(const std::string& path) {
  std::string text;
  try {
    text = io::read_text_file(path, 16 << 20);
  } catch (const c10::Error& e) {
    throw std::invalid_argument("--config: " + std::string(e.what_without_backtrace()));
  }
  try {
    return io::parse_json_strict(text, "--config " + path, /*allow_comments=*/true);
  } catch (const c10::Error& e) {
    throw std::invalid_argument(e.what_without_backtrace());
  }
}

// ---- ConfigReader ------------------------------------------------------------------------------------

const json& ConfigReader::at(const std::string& key) const {
  const auto dot = key.find('.');
  return config_.at(key.substr(0, dot)).at(key.substr(dot + 1));
}

std::string ConfigReader::string(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_string()) config_error(key, "must be a string", v);
  return v.get<std::string>();
}

std::string ConfigReader::string_in(const std::string& key, const std::vector<std::string>& allowed) const {
  const auto& v = at(key);
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "\"" : ", \"") + a + "\"";
  if (!v.is_string()) config_error(key, "must be one of " + list, v);
  for (const auto& a : allowed)
    if (v.get<std::string>() == a) return a;
  config_error(key, "must be one of " + list, v);
}

bool ConfigReader::boolean(const std::string& key) const {
  const auto& v = at(key);
  if (!v.is_boolean()) config_error(key, "must be true or false", v);
  return v.get<bool>();
}

int64_t ConfigReader::int_at_least(const std::string& key, int64_t lo) const {
  const auto& v = at(key);
  const std::string rule = "must be an integer >= " + std::to_string(lo);
  if (!v.is_number_integer()) {
    // 8.0 is accepted as 8: JSON writers (and overrides like 1e3) produce whole floats.
    if (v.is_number_float() && std::floor(v.get<double>()) == v.get<double>() && v.get<double>() >= double(lo) &&
        v.get<double>() < 9.0e18)
      return static_cast<int64_t>(v.get<double>());
    config_error(key, rule, v);
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo) config_error(key, rule, v);
  return x;
}

double ConfigReader::number_in(const std::string& key, double lo, double hi, bool hi_open,
                               const std::string& range) const {
  const auto& v = at(key);
  if (!v.is_number()) config_error(key, "must be a number in " + range, v);
  const double x = v.get<double>();
  if (!std::isfinite(x) || x < lo || (hi_open ? x >= hi : x > hi)) config_error(key, "must be a number in " + range, v);
  return x;
}

std::vector<std::string> ConfigReader::strings(const std::string& key) const {
  const json& v = at(key);
  if (!v.is_array()) config_error(key, "must be a list of strings", v);
  std::vector<std::string> out;
  for (const auto& s : v) {
    if (!s.is_string()) config_error(key, "must be a list of strings", v);
    out.push_back(s.get<std::string>());
  }
  return out;
}

// ---- the shared sections -----------------------------------------------------------------------------

json training_defaults(const std::string& output_dir) {
  return json{
      {"model",
       {{"path", ""}, {"init", "pretrained"}, {"config", ""}, {"tokenizer", ""}, {"dtype", "bfloat16"},
        {"device", "auto"}, {"base_weights", "auto"}}},
      {"data",
       {{"train", ""}, {"validation", ""}, {"validation_fraction", 0.0}, {"seq_len", 1024}, {"loss_on", "completion"},
        {"add_eos", true}}},
      {"train",
       {{"batch_size", 8}, {"grad_accum", 1}, {"epochs", 1}, {"steps", 0}, {"lr", 2e-4}, {"weight_decay", 0.0},
        {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"schedule", "cosine"}, {"warmup_steps", 0},
        {"min_lr_ratio", 0.0}, {"max_grad_norm", 1.0}, {"grad_checkpointing", false}, {"mixed_precision", "none"},
        {"loss_chunk", 4096}, {"seed", 0}, {"skip_nonfinite_steps", false},
        {"dist_backend", "auto"}, {"dist_timeout_s", 300.0}, {"zero_stage", 0},
        {"dist_bucket_mb", 25.0}}},
      {"eval", {{"every", 0}, {"max_batches", 0}, {"prompts", json::array()}, {"max_new_tokens", 48}}},
      {"output", {{"dir", output_dir}, {"save_every", 0}, {"log_every", 1}, {"plot", true}}},
  };
}

ModelSection read_model_section(const ConfigReader& r) {
  ModelSection m;
  m.path = r.string("model.path");
  m.init = r.string_in("model.init", {"pretrained", "random"});
  m.config = r.string("model.config");
  m.tokenizer = r.string("model.tokenizer");
  m.dtype = r.string_in("model.dtype", {"bfloat16", "float32", "float16"});
  m.device = r.string("model.device");
  m.base_weights = r.string_in("model.base_weights", {"auto", "dense", "fp8", "fp8-channel", "fp8-tensor", "w8a8", "int8", "int4"});
  const bool cuda_n = m.device.rfind("cuda:", 0) == 0 && m.device.size() > 5 &&
                      m.device.find_first_not_of("0123456789", 5) == std::string::npos;
  if (m.device != "auto" && m.device != "cpu" && m.device != "cuda" && !cuda_n)
    config_error("model.device", "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", m.device);
  if (m.init == "random" && m.config.empty())
    config_error("model.config", "must name a config.json when model.init is \"random\"", m.config);
  if (m.init == "pretrained" && m.path.empty())
    config_error("model.path", "is required (an HF model folder or cached hub id) when model.init is \"pretrained\"",
                 m.path);
  return m;
}

DataSection read_data_section(const ConfigReader& r) {
  DataSection d;
  d.train = r.string("data.train");
  if (d.train.empty()) config_error("data.train", "is required (a JSONL file)", d.train);
  d.validation = r.string("data.validation");
  d.validation_fraction = r.number_in("data.validation_fraction", 0.0, 1.0, true, "[0, 1)");
  d.seq_len = r.int_at_least("data.seq_len", 2);
  d.loss_on = r.string_in("data.loss_on", {"completion", "all"});
  d.add_eos = r.boolean("data.add_eos");
  return d;
}

void refuse_zero_stage_3(const TrainSection& t, const std::string& recipe) {
  if (t.zero_stage == 3)
    config_error("train.zero_stage", "3 (parameter sharding) is for anvil train (full fine-tuning); " + recipe +
                 " supports 0, 1 or 2 (optimizer state and gradients sharded)", t.zero_stage);
}

TrainSection read_train_section(const ConfigReader& r) {
  TrainSection t;
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
  t.loss_chunk = r.int_at_least("train.loss_chunk", 1);
  t.seed = static_cast<uint64_t>(r.int_at_least("train.seed", 0));
  t.skip_nonfinite_steps = r.boolean("train.skip_nonfinite_steps");
  t.dist_backend = r.string_in("train.dist_backend", {"auto", "gloo", "nccl"});
  t.zero_stage = r.int_at_least("train.zero_stage", 0);
  if (t.zero_stage > 3)
    config_error("train.zero_stage", "must be 0 (replicated optimizer state), 1 (optimizer state sharded across "
                 "ranks), 2 (optimizer state and gradients sharded) or 3 (and the parameters: anvil train)", t.zero_stage);
  t.dist_timeout_s = r.number_in("train.dist_timeout_s", 0.001, 86400.0, false, "[0.001, 86400] seconds");
  t.dist_bucket_mb = r.number_in("train.dist_bucket_mb", 0.0, 4096.0, false, "(0, 4096] MiB");
  if (t.dist_bucket_mb <= 0) config_error("train.dist_bucket_mb", "must be > 0 MiB", t.dist_bucket_mb);
  return t;
}

EvalSection read_eval_section(const ConfigReader& r) {
  EvalSection e;
  e.every = r.int_at_least("eval.every", 0);
  e.max_batches = r.int_at_least("eval.max_batches", 0);
  e.prompts = r.strings("eval.prompts");
  e.max_new_tokens = r.int_at_least("eval.max_new_tokens", 1);
  return e;
}

OutputSection read_output_section(const ConfigReader& r) {
  OutputSection o;
  o.dir = r.string("output.dir");
  if (o.dir.empty()) config_error("output.dir", "must name a directory", o.dir);
  o.save_every = r.int_at_least("output.save_every", 0);
  o.log_every = r.int_at_least("output.log_every", 1);
  o.plot = r.boolean("output.plot");
  return o;
}

}  // namespace anvil::train
