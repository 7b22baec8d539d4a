// The config of `anvil distill` (distill/recipe.h): the shared training sections, "teacher", "student",
// "distill" and an optional "lora", and the rules between them.
#include "distill/recipe.h"

#include "anvil/train/lora_section.h"

#include <stdexcept>

namespace anvil::distill {

using nlohmann::json;
using train::config_error;

namespace {

// ---- width pruning (student.*) and the hidden-state loss (distill.hidden_*): their keys and rules ----

void add_pruning_defaults(json& d) {
  for (const char* key : {"intermediate_size", "num_attention_heads", "num_key_value_heads", "hidden_size"})
    d["student"][key] = 0;
  d["student"]["prune_calibration"] = 64;
  d["distill"]["hidden_loss"] = "none";
  d["distill"]["hidden_weight"] = 1.0;
  d["distill"]["hidden_layers"] = "uniform";
}

void read_student_width(const train::ConfigReader& r, StudentSection& s) {
  s.width.intermediate_size = r.int_at_least("student.intermediate_size", 0);
  s.width.num_attention_heads = r.int_at_least("student.num_attention_heads", 0);
  s.width.num_key_value_heads = r.int_at_least("student.num_key_value_heads", 0);
  s.width.hidden_size = r.int_at_least("student.hidden_size", 0);
  s.prune_calibration = r.int_at_least("student.prune_calibration", 1);
  if (s.init != "derived" && s.width.any()) {
    const char* key = s.width.intermediate_size ? "student.intermediate_size"
                      : s.width.num_attention_heads ? "student.num_attention_heads"
                      : s.width.num_key_value_heads ? "student.num_key_value_heads"
                                                    : "student.hidden_size";
    config_error(key, "is for student.init \"derived\" (width pruning of the teacher; student.init is \"" + s.init +
                      "\")", r.at(key));
  }
}

HiddenSection read_hidden_section(const train::ConfigReader& r) {
  HiddenSection h;
  h.type = r.string_in("distill.hidden_loss", {"none", "mse", "cosine"});
  h.weight = r.number_in("distill.hidden_weight", 0.0, train::kInf, false, "[0, inf)");
  const json& layers = r.at("distill.hidden_layers");
  const std::string rule = "must be \"uniform\" or a list of [student index, teacher index] pairs (0 the embeddings, "
                           "i the output of layer i - 1), like [[1, 2], [2, 4]]";
  if (layers.is_string()) {
    if (layers.get<std::string>() != "uniform") config_error("distill.hidden_layers", rule, layers);
    return h;
  }
  if (!layers.is_array() || layers.empty()) config_error("distill.hidden_layers", rule, layers);
  h.uniform = false;
  for (const auto& pair : layers) {
    if (!pair.is_array() || pair.size() != 2 || !pair[0].is_number_integer() || !pair[1].is_number_integer() ||
        pair[0].get<int64_t>() < 0 || pair[1].get<int64_t>() < 0)
      config_error("distill.hidden_layers", rule, layers);
    h.layers.emplace_back(pair[0].get<int64_t>(), pair[1].get<int64_t>());
  }
  return h;
}

// ---- distill.vocab "cross-tokenizer" (train/cross_vocab.h): GOLD's ULD keys, GOLDConfig's names and defaults ----

const std::vector<std::string> kUldKeys = {"uld_use_hybrid_loss",     "uld_hybrid_matched_weight",
                                           "uld_hybrid_unmatched_weight", "uld_distillation_weight",
                                           "uld_student_temperature", "uld_teacher_temperature",
                                           "uld_skip_student_eos",    "uld_skip_teacher_eos",
                                           "uld_token_merge_strategy"};

void add_uld_defaults(json& d) {
  d["distill"]["vocab"] = "same";
  d["distill"]["uld_use_hybrid_loss"] = false;
  d["distill"]["uld_hybrid_matched_weight"] = nullptr;  // null: GOLD's adaptive M / Vt (and 1 - that)
  d["distill"]["uld_hybrid_unmatched_weight"] = nullptr;
  d["distill"]["uld_distillation_weight"] = 1.0;
  d["distill"]["uld_student_temperature"] = 1.0;
  d["distill"]["uld_teacher_temperature"] = 1.0;
  d["distill"]["uld_skip_student_eos"] = true;
  d["distill"]["uld_skip_teacher_eos"] = true;
  d["distill"]["uld_token_merge_strategy"] = "observed";
}

double positive(const train::ConfigReader& r, const std::string& key) {
  const double v = r.number_in(key, 0.0, train::kInf, false, "(0, inf)");
  if (!(v > 0)) config_error(key, "must be a number in (0, inf)", v);
  return v;
}

CrossVocabSection read_cross_vocab(const train::ConfigReader& r) {
  CrossVocabSection x;
  x.on = r.string_in("distill.vocab", {"same", "cross-tokenizer"}) == "cross-tokenizer";
  if (!x.on) return x;
  auto& o = x.options;
  o.uld.hybrid = r.boolean("distill.uld_use_hybrid_loss");
  const json &m = r.at("distill.uld_hybrid_matched_weight"), &u = r.at("distill.uld_hybrid_unmatched_weight");
  if (m.is_null() != u.is_null())
    config_error(m.is_null() ? "distill.uld_hybrid_matched_weight" : "distill.uld_hybrid_unmatched_weight",  // the missing one
                 "must be set together with its pair (uld_hybrid_matched_weight and uld_hybrid_unmatched_weight both "
                 "null for GOLD's adaptive weighting, or both numbers >= 0)", m.is_null() ? m : u);
  if (!m.is_null()) {
    o.uld.matched_weight = r.number_in("distill.uld_hybrid_matched_weight", 0.0, train::kInf, false, "[0, inf)");
    o.uld.unmatched_weight = r.number_in("distill.uld_hybrid_unmatched_weight", 0.0, train::kInf, false, "[0, inf)");
    if (!o.uld.hybrid)
      config_error("distill.uld_hybrid_matched_weight", "weighs the hybrid loss's parts: it needs "
                   "distill.uld_use_hybrid_loss true", m);
  }
  o.distillation_weight = r.number_in("distill.uld_distillation_weight", 0.0, train::kInf, false, "[0, inf)");
  o.uld.student_temperature = positive(r, "distill.uld_student_temperature");
  o.uld.teacher_temperature = positive(r, "distill.uld_teacher_temperature");
  o.skip_student_eos = r.boolean("distill.uld_skip_student_eos");
  o.skip_teacher_eos = r.boolean("distill.uld_skip_teacher_eos");
  o.merge = r.string_in("distill.uld_token_merge_strategy", {"observed", "bayesian"});
  return x;
}

}  // namespace

train::ConfigSchema config_schema() {
  train::ConfigSchema schema;
  schema.defaults = train::training_defaults("runs/distill");
  schema.defaults.erase("model");
  schema.defaults["teacher"] = {{"path", ""}, {"dtype", "bfloat16"}, {"device", "auto"}, {"base_weights", "auto"},
                                {"cache", ""}, {"cache_k", 64}, {"cache_dtype", "float16"},
                                {"cache_shard_tokens", 1 << 20}, {"cache_only", false}};
  schema.defaults["student"] = {{"init", "derived"}, {"path", ""},          {"config", ""},  {"layers", json::array()},
                                {"every_nth", 0},    {"dtype", "bfloat16"}, {"device", "auto"}};
  schema.defaults["distill"] = {{"loss", "forward_kl"}, {"temperature", 1.0}, {"kd_ratio", 0.5},
                                {"skew_lambda", 0.1},   {"jsd_beta", 0.5},    {"chunk", 1024},
                                {"mode", "online"},     {"fused", true}};
  schema.defaults["sequence"] = {{"prompts", ""},       {"output", ""},  {"batch_size", 16}, {"max_new_tokens", 128},
                                 {"temperature", 0.0},  {"top_k", 0},    {"top_p", 1.0},     {"seed", 0}};
  schema.defaults["on_policy"] = {{"lambda", 0.5}, {"max_new_tokens", 128}, {"temperature", 0.9},
                                  {"top_k", 0},    {"top_p", 1.0},          {"batch_size", 0},
                                  {"refresh_from", ""}};
  add_pruning_defaults(schema.defaults);  // student.intermediate_size, ..., distill.hidden_*
  add_uld_defaults(schema.defaults);      // distill.vocab, distill.uld_* (kept by resolve_config where given)
  schema.defaults["lora"] = train::lora_section_defaults();
  schema.foreign_sections = {{"model", "is not read by anvil distill: its two models are the \"teacher\" and "
                                       "\"student\" sections"}};
  return schema;
}

namespace {

void check_device(const std::string& key, const std::string& d) {
  const bool cuda_n = d.rfind("cuda:", 0) == 0 && d.size() > 5 && d.find_first_not_of("0123456789", 5) == std::string::npos;
  if (d != "auto" && d != "cpu" && d != "cuda" && !cuda_n)
    config_error(key, "must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"", d);
}

TeacherSection read_teacher(const train::ConfigReader& r) {
  TeacherSection t;
  t.path = r.string("teacher.path");
  if (t.path.empty())
    config_error("teacher.path", "is required: the teacher's Hugging Face model folder (or cached hub id)", t.path);
  t.dtype = r.string_in("teacher.dtype", {"bfloat16", "float32", "float16"});
  t.device = r.string("teacher.device");
  check_device("teacher.device", t.device);
  t.base_weights = r.string_in("teacher.base_weights", {"auto", "dense", "fp8", "int8"});
  // offline: the teacher cache
  t.cache = r.string("teacher.cache");
  t.cache_k = r.int_at_least("teacher.cache_k", 1);
  t.cache_dtype = r.string_in("teacher.cache_dtype", {"float16", "bfloat16", "float32"});
  t.cache_shard_tokens = r.int_at_least("teacher.cache_shard_tokens", 1);
  t.cache_only = r.boolean("teacher.cache_only");
  if (t.cache_only && t.cache.empty())
    config_error("teacher.cache_only", "writes the teacher cache: it needs teacher.cache (a directory)", true);
  return t;
}

StudentSection read_student(const train::ConfigReader& r) {
  StudentSection s;
  s.init = r.string_in("student.init", {"derived", "pretrained", "random"});
  s.path = r.string("student.path");
  s.config = r.string("student.config");
  s.dtype = r.string_in("student.dtype", {"bfloat16", "float32", "float16"});
  s.device = r.string("student.device");
  check_device("student.device", s.device);
  const json& layers = r.at("student.layers");
  const std::string layers_rule = "must be a list of teacher layer indices >= 0, strictly increasing, like [0, 2]";
  if (!layers.is_array()) config_error("student.layers", layers_rule, layers);
  for (const auto& l : layers) {
    if (!l.is_number_integer() || l.get<int64_t>() < 0) config_error("student.layers", layers_rule, layers);
    if (!s.layers.empty() && l.get<int64_t>() <= s.layers.back()) config_error("student.layers", layers_rule, layers);
    s.layers.push_back(l.get<int64_t>());
  }
  s.every_nth = r.int_at_least("student.every_nth", 0);
  read_student_width(r, s);
  if (s.init == "pretrained" && s.path.empty())
    config_error("student.path", "is required when student.init is \"pretrained\" (an HF model folder)", s.path);
  if (s.init != "pretrained" && !s.path.empty())
    config_error("student.path", "is for student.init \"pretrained\" (student.init is \"" + s.init + "\")", s.path);
  if (s.init == "random" && s.config.empty())
    config_error("student.config", "must name a config.json when student.init is \"random\"", s.config);
  if (s.init != "random" && !s.config.empty())
    config_error("student.config", "is for student.init \"random\" (student.init is \"" + s.init + "\")", s.config);
  if (s.init == "derived") {
    if (s.layers.empty() && s.every_nth == 0 && !s.width.any())
      config_error("student.layers", "a derived student names the teacher layers it keeps: set student.layers "
                   "(e.g. [0, 2]) or student.every_nth (e.g. 2), or narrows the teacher (student.intermediate_size, "
                   "num_attention_heads, num_key_value_heads, hidden_size)", layers);
    if (!s.layers.empty() && s.every_nth != 0)
      config_error("student.every_nth", "cannot be combined with student.layers (give one of them)", s.every_nth);
  } else if (!s.layers.empty() || s.every_nth != 0) {
    config_error(s.layers.empty() ? "student.every_nth" : "student.layers",
                 "is for student.init \"derived\" (student.init is \"" + s.init + "\")",
                 s.layers.empty() ? json(s.every_nth) : layers);
  }
  return s;
}

// distill.mode "sequence": where the teacher's completions come from and go (train/kd_generation.h).
SequenceSection read_sequence(const train::ConfigReader& r) {
  SequenceSection q;
  q.prompts = r.string("sequence.prompts");
  q.output = r.string("sequence.output");
  q.batch_size = r.int_at_least("sequence.batch_size", 1);
  q.max_new_tokens = r.int_at_least("sequence.max_new_tokens", 1);
  q.temperature = r.number_in("sequence.temperature", 0.0, train::kInf, false, "[0, inf)");
  q.top_k = r.int_at_least("sequence.top_k", 0);
  q.top_p = r.number_in("sequence.top_p", 0.0, 1.0, false, "(0, 1]");
  if (!(q.top_p > 0)) config_error("sequence.top_p", "must be a number in (0, 1]", q.top_p);
  q.seed = uint64_t(r.int_at_least("sequence.seed", 0));
  return q;
}

// The "on_policy" section (GKD): TRL GKDConfig's lmbda, max_new_tokens, temperature.
train::OnPolicyOptions read_on_policy(const train::ConfigReader& r) {
  train::OnPolicyOptions o;
  o.lambda = r.number_in("on_policy.lambda", 0.0, 1.0, false, "[0, 1]");
  o.max_new_tokens = r.int_at_least("on_policy.max_new_tokens", 1);
  o.temperature = r.number_in("on_policy.temperature", 0.0, train::kInf, false, "[0, inf)");
  o.top_k = r.int_at_least("on_policy.top_k", 0);
  o.top_p = r.number_in("on_policy.top_p", 0.0, 1.0, false, "(0, 1]");
  if (!(o.top_p > 0)) config_error("on_policy.top_p", "must be a number in (0, 1]", o.top_p);
  o.batch_size = r.int_at_least("on_policy.batch_size", 0);
  return o;
}

}  // namespace

RecipeConfig resolve_config(const json& user) {
  RecipeConfig c;
  auto schema = config_schema();
  c.use_lora = user.is_object() && user.contains("lora");
  if (!c.use_lora) schema.defaults.erase("lora");  // no section: the student trains every parameter
  // The generation sections are kept only where they apply, so that an online run's config is as before.
  const bool sequence_mode = user.is_object() && user.contains("distill") && user.at("distill").is_object() &&
                             user.at("distill").contains("mode") && user.at("distill").at("mode") == "sequence";
  if (!sequence_mode && user.is_object() && user.contains("sequence"))
    config_error("sequence", "is for distill.mode \"sequence\" (the teacher's completions as training data); "
                 "distill.mode is \"online\"", user.at("sequence"));
  if (!sequence_mode) schema.defaults.erase("sequence");
  // distill.vocab and its uld_* keys are kept only where given, so that a run without them resolves as before.
  const json* user_distill = user.is_object() && user.contains("distill") && user.at("distill").is_object()
                                 ? &user.at("distill") : nullptr;
  const bool cross = user_distill && user_distill->contains("vocab") && user_distill->at("vocab") == "cross-tokenizer";
  if (!cross)
    for (const auto& k : kUldKeys) {
      if (user_distill && user_distill->contains(k))
        config_error("distill." + k, "is for distill.vocab \"cross-tokenizer\" (a student with its own tokenizer, "
                     "TRL GOLD's ULD); distill.vocab is " +
                     (user_distill->contains("vocab") ? user_distill->at("vocab").dump() : std::string("\"same\" (the default)")),
                     user_distill->at(k));
      schema.defaults["distill"].erase(k);
    }
  if (!(user_distill && user_distill->contains("vocab"))) schema.defaults["distill"].erase("vocab");
  c.use_on_policy = user.is_object() && user.contains("on_policy");
  if (!c.use_on_policy) schema.defaults.erase("on_policy");
  c.resolved = train::merge_over_defaults(schema, user);
  const train::ConfigReader r(c.resolved);
  c.teacher = read_teacher(r);
  c.student = read_student(r);
  c.kd.loss = train::parse_kd_loss(r.string("distill.loss"), "config key distill.loss");
  c.kd.temperature = r.number_in("distill.temperature", 0.0, train::kInf, false, "(0, inf)");
  if (!(c.kd.temperature > 0)) config_error("distill.temperature", "must be a number in (0, inf)", c.kd.temperature);
  c.kd_ratio = r.number_in("distill.kd_ratio", 0.0, 1.0, false, "[0, 1]");
  c.kd.skew_lambda = r.number_in("distill.skew_lambda", 0.0, 1.0, false, "[0, 1]");
  c.kd.jsd_beta = r.number_in("distill.jsd_beta", 0.0, 1.0, false, "[0, 1]");
  c.kd.chunk = r.int_at_least("distill.chunk", 1);
  c.kd.fused = r.boolean("distill.fused");
  c.hidden = read_hidden_section(r);
  if (c.resolved["distill"].contains("vocab")) c.cross = read_cross_vocab(r);
  c.cross.options.uld.jsd_beta = c.kd.jsd_beta;  // GOLD's beta: the matched tokens' JSD
  c.cross.options.chunk = c.kd.chunk;
  c.mode = r.string_in("distill.mode", {"online", "sequence"});
  if (c.mode == "sequence") c.sequence = read_sequence(r);
  if (c.use_on_policy) c.on_policy = read_on_policy(r);
  if (c.use_lora) {
    c.lora = train::read_lora_section(r);
    if (lora::is_pissa(c.lora))
      config_error("lora.init", "PiSSA is for anvil lora (not yet for a distillation student): use \"kaiming\" or "
                   "\"gaussian\"", c.lora.init);
    if (c.student.init == "random")
      config_error("lora", "a LoRA student needs a base worth keeping: student.init \"random\" trains every "
                   "parameter (leave the lora section out), or use \"derived\" / \"pretrained\"", c.resolved["lora"]);
  }
  c.data = train::read_data_section(r);
  c.train = train::read_train_section(r);
  train::refuse_zero_stage_3(c.train, "anvil distill");
  if (c.use_lora && c.train.mixed_precision != "none")
    config_error("train.mixed_precision", "is for a fully trained student; LoRA adapters are fp32 over a base in "
                 "student.dtype already", r.at("train.mixed_precision"));
  c.eval = train::read_eval_section(r);
  c.output = train::read_output_section(r);
  if (c.mode == "sequence") {
    if (c.sequence.prompts.empty()) c.sequence.prompts = c.data.train;
    if (c.sequence.output.empty()) c.sequence.output = c.output.dir + "/teacher_data.jsonl";
  }
  if (c.cross.on)  // the same-vocabulary divergence's keys do not apply: ULD has its own (uld_*)
    for (const char* k : {"loss", "temperature", "skew_lambda", "fused"})
      if (user_distill->contains(k))
        config_error(std::string("distill.") + k, std::string("is not used with distill.vocab \"cross-tokenizer\" (the "
                     "divergence is GOLD's ULD: distill.uld_*") + (std::string(k) == "temperature"
                         ? "; its temperatures are distill.uld_student_temperature and uld_teacher_temperature)" : ")"),
                     user_distill->at(k));
  if (c.cross.on) {  // online only for now: each refusal names the key that asks for the other mode
    const std::string why = " is not yet combined with distill.vocab \"cross-tokenizer\" (experimental: online, "
                            "token-level ULD only)";
    if (!c.teacher.cache.empty()) config_error("teacher.cache", "(offline, from the teacher's top-k cache)" + why, c.teacher.cache);
    if (c.mode == "sequence") config_error("distill.mode", "\"sequence\"" + why, c.mode);
    if (c.use_on_policy) config_error("on_policy", "(the student's generations)" + why, c.resolved["on_policy"]);
    if (c.hidden.type != "none") config_error("distill.hidden_loss", "(hidden states)" + why, c.hidden.type);
    if (c.student.init == "derived")
      config_error("student.init", "\"derived\" gives the student the teacher's tokenizer: distill.vocab "
                   "\"cross-tokenizer\" is for a student with its own (student.init \"pretrained\" or \"random\", "
                   "with the tokenizer in its folder)", c.student.init);
  }
  if (c.use_on_policy) {
    c.on_policy.seed = c.train.seed;
    c.refresh_from = r.string("on_policy.refresh_from");
    if (!c.refresh_from.empty() && c.teacher.cache.empty())
      config_error("on_policy.refresh_from", "refreshes the on-policy rows of a teacher cache: it needs teacher.cache "
                   "(online, on_policy generates every step)", c.refresh_from);
    if (!c.refresh_from.empty() && !(c.on_policy.lambda > 0))
      config_error("on_policy.lambda", "a refresh (on_policy.refresh_from) regenerates this fraction of the training "
                   "documents: it must be in (0, 1]", c.on_policy.lambda);
    if (!c.refresh_from.empty() && c.teacher.cache_only)
      config_error("on_policy.refresh_from", "is the student's pass (generation) and teacher.cache_only the teacher's "
                   "(scoring): run them one after the other, not in one process", c.refresh_from);
  }
  return c;
}

}  // namespace anvil::distill
