// The `anvil distill` recipe (distill/recipe.h), top to bottom: the teacher loaded and frozen, the student
// (derived from it, loaded, or random; adapters attached with a lora section), the vocabularies mapped; the
// tokenizer (the teacher's) and data; the memory plan for both models (and --dry-run); the trainer opened (or
// resumed); generations of both; the loop on (1 - kd_ratio) CE + kd_ratio KD, validated as the student's loss,
// KL to the teacher and top-1 agreement; the student written as a Hugging Face folder (with LoRA: merged, and
// the PEFT adapter beside it); the two models side by side at the end.
#include "distill/recipe.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/derive.h"
#include "anvil/train/distributed.h"
#include "anvil/train/hidden_loss.h"
#include "anvil/train/setup.h"
#include "anvil/train/teacher_cache.h"
#include "anvil/train/vocab.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <stdexcept>

namespace anvil::distill {

namespace {

using train::config_error;

// What a resumed run must share with its checkpoint's run, besides train.batch_size, grad_accum and seed.
const std::vector<std::string> kSameRun = {"teacher", "student", "data", "distill", "lora", "sequence", "on_policy"};

// A folder named by a config key, resolved (a hub id becomes its snapshot); errors name the key.
std::string resolve_path(const std::string& key, const std::string& path) {
  try {
    return io::resolve_model_path(path);
  } catch (const std::exception& e) {
    throw std::invalid_argument("config key " + key + ": " + e.what());
  }
}

// ---- width pruning (student.intermediate_size, ...): Minitron's activation importance on the first
// student.prune_calibration rows of the training data's first epoch, the top channels and heads kept ----
std::shared_ptr<model::CausalLM> prune_student(const RecipeConfig& c, model::CausalLM& source,
                                               const std::vector<int64_t>& keep, const at::TensorOptions& options,
                                               const data::BatchStream& stream, const std::string& what) {
  const auto w = model::resolve_widths(source.config(), c.student.width, "config key student.");
  const auto rows = stream.pack_epoch(0);
  const int64_t n = std::min(rows.rows, c.student.prune_calibration);
  std::vector<at::Tensor> batches;  // (B, S) int64 each, every row one sequence from position 0
  for (int64_t begin = 0; begin < n; begin += c.train.batch_size) {
    const auto b = data::slice_rows(rows, begin, std::min(n, begin + c.train.batch_size));
    batches.push_back(at::from_blob(const_cast<int32_t*>(b.ids.data()), {b.rows, b.length}, at::kInt)
                          .to(source.device(), at::kLong));
  }
  const auto importance = model::activation_importance(source, batches);
  std::cerr << model::pruning_summary(source.config(), w, importance);
  return model::derive_pruned(source, keep, w, model::select_top(source.config(), importance, w), options, what);
}

// The hidden-state loss of distill.hidden_* with its projections, or null (hidden_loss "none").
std::unique_ptr<train::HiddenLoss> make_hidden_loss(const RecipeConfig& c, const model::CausalLM& teacher,
                                                    const model::CausalLM& student, at::ScalarType dtype,
                                                    at::Device device) {
  const auto& h = c.hidden;
  if (h.type == "none") return nullptr;
  const int64_t ls = student.config().num_hidden_layers, lt = teacher.config().num_hidden_layers;
  const auto map = h.uniform ? train::uniform_layer_map(ls, lt) : h.layers;
  train::check_layer_map(map, ls, lt, "config key distill.hidden_layers");
  return std::make_unique<train::HiddenLoss>(train::parse_hidden_loss(h.type, "config key distill.hidden_loss"),
                                             h.weight, map, student.config().hidden_size, teacher.config().hidden_size,
                                             at::TensorOptions().dtype(dtype).device(device), c.train.seed + 7919);
}

// The student: the teacher's kept layers (narrowed with a width), a checkpoint, or transformers' random init
// from a config.json.
std::shared_ptr<model::CausalLM> build_student(const RecipeConfig& c, const train::Teacher& teacher,
                                               const std::string& teacher_path, at::ScalarType dtype, at::Device device,
                                               const data::BatchStream& stream) {
  const auto& s = c.student;
  if (s.init == "derived") {
    const int64_t layers = teacher.model->config().num_hidden_layers;
    const auto keep = !s.layers.empty() ? s.layers : model::every_nth_layer(layers, s.every_nth > 0 ? s.every_nth : 1);
    const std::string what = !s.layers.empty() ? "config key student.layers" : "config key student.every_nth";
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    std::shared_ptr<model::CausalLM> source = teacher.model;
    // A quantized teacher (teacher.base_weights): the student comes from a dense copy of its checkpoint.
    for (auto& [name, linear] : model::named_linears(*teacher.model))
      if (!linear->weight_format().empty()) {
        source = model::load_causal_lm(teacher_path, dtype, at::kCPU, "dense");
        break;
      }
    if (s.width.any()) return prune_student(c, *source, keep, options, stream, what);
    return model::derive_by_layers(*source, keep, options, what);
  }
  train::ModelSection m;
  m.init = s.init, m.path = s.init == "pretrained" ? resolve_path("student.path", s.path) : "", m.config = s.config, m.dtype = s.dtype, m.device = s.device, m.base_weights = "dense";
  m.tokenizer = c.cross.on ? "" : teacher_path;  // across tokenizers the student's folder has its own
  return train::build_model(m, train::resolve_model_paths(m), dtype, device, c.train.seed, "dense");
}

// The student's own folder (student.path, or the folder of student.config): its tokenizer and side files.
std::string student_folder(const RecipeConfig& c) {
  if (c.student.init == "pretrained") return resolve_path("student.path", c.student.path);
  return io::is_directory(c.student.config) ? c.student.config : io::parent_dir(c.student.config);
}

// distill.vocab "cross-tokenizer": both models over their whole heads, each with its own tokenizer (the student's
// returned in student_tok); the line printed says what ULD compares.
train::VocabPlan plan_cross_vocabulary(const RecipeConfig& c, const std::string& teacher_path,
                                       const data::Tokenizer* teacher_tok, std::unique_ptr<data::Tokenizer>& student_tok) {
  const std::string dir = c.student.init == "pretrained" ? resolve_path("student.path", c.student.path)
                                                         : c.student.config;  // config.json or its folder
  const std::string folder = student_folder(c);
  if (!teacher_tok)
    config_error("distill.vocab", "\"cross-tokenizer\" tokenizes every document with both tokenizers, and the "
                 "teacher's folder (" + teacher_path + ") has none", c.resolved["distill"]["vocab"]);
  student_tok = train::load_tokenizer_if_present(folder, {});
  if (!student_tok)
    config_error("distill.vocab", "\"cross-tokenizer\" is for a student with its own tokenizer, and " + folder +
                 " has none (no tokenizer.json or tokenizer.model)", c.resolved["distill"]["vocab"]);
  train::VocabPlan p;
  p.teacher_rows = model::load_model_config(teacher_path).vocab_size;
  p.student_rows = model::load_model_config(dir).vocab_size;
  p.compared = 0;  // every row of both heads: ULD compares sorted distributions, GOLD's whole logits
  if (teacher_tok->vocab_size() > p.teacher_rows)
    config_error("teacher.path", teacher_path + ": the tokenizer has " + std::to_string(teacher_tok->vocab_size()) +
                 " ids but the head only " + std::to_string(p.teacher_rows) + " rows", teacher_path);
  const auto shared = train::shared_tokens(*teacher_tok, *student_tok);
  p.line = "vocabulary: cross-tokenizer (experimental, TRL GOLD's ULD): the teacher's tokenizer has " +
           std::to_string(teacher_tok->vocab_size()) + " ids (" + teacher_path + ", " + std::to_string(p.teacher_rows) +
           " head rows), the student's " + std::to_string(student_tok->vocab_size()) + " (" + folder + ", " +
           std::to_string(p.student_rows) + " rows); " + std::to_string(shared.teacher_ids.numel()) +
           " tokens spelled alike" + (c.cross.options.uld.hybrid ? " compared id by id (hybrid), the rest sorted"
                                                                  : " (all sorted: uld_use_hybrid_loss is off)");
  return p;
}

// The vocabulary mapping (anvil/train/vocab.h): which rows of both heads the losses compare, decided from the
// two configs and tokenizers before either model is loaded (the offline cache is written over those rows).
train::VocabPlan plan_vocabulary(const RecipeConfig& c, const std::string& teacher_path,
                                 const data::Tokenizer* teacher_tok) {
  train::VocabSide t, s;
  t.rows = model::load_model_config(teacher_path).vocab_size, t.tokenizer = teacher_tok;
  t.folder = teacher_path, t.key = "teacher.path";
  std::unique_ptr<data::Tokenizer> own;  // the student folder's own tokenizer, compared with the teacher's
  if (c.student.init == "derived") {
    s.rows = t.rows, s.folder = "derived from the teacher", s.key = "student.init";
  } else {
    const bool pretrained = c.student.init == "pretrained";
    const std::string dir = pretrained ? resolve_path("student.path", c.student.path) : c.student.config;
    s.rows = model::load_model_config(dir).vocab_size, s.folder = dir;
    s.key = pretrained ? "student.path" : "student.config";
    own = train::load_tokenizer_if_present(pretrained || io::is_directory(dir) ? dir : io::parent_dir(dir), {});
    s.tokenizer = own.get();
  }
  auto plan = train::plan_vocabularies(t, s);
  // On-policy batches feed the student's samples to the teacher: an id past the teacher's rows has no embedding.
  if (c.use_on_policy && s.rows > t.rows)
    config_error("on_policy", "the student has " + std::to_string(s.rows) + " head rows and the teacher only " +
                 std::to_string(t.rows) + ": a sampled padded id would have no teacher embedding", c.resolved.at("on_policy"));
  return plan;
}

// ---- the generation modes (train/kd_generation.h) ----

// distill.mode "sequence": the teacher's completions of sequence.prompts written to sequence.output (rows already
// there kept), the file the student then trains on.
void write_sequence_data(const RecipeConfig& c, model::CausalLM& teacher, const data::Tokenizer* tok) {
  if (!tok)
    config_error("distill.mode", "\"sequence\" needs the teacher's tokenizer (the prompts are text); " + c.teacher.path +
                 " has none", c.mode);
  train::TeacherDataOptions o;
  o.prompts = c.sequence.prompts;
  o.prompts_what = c.resolved.at("sequence").at("prompts") == "" ? "config key data.train (the prompts of distill.mode "
                                                                   "\"sequence\")" : "config key sequence.prompts";
  o.output = c.sequence.output;
  o.batch_size = c.sequence.batch_size;
  o.generate.max_new_tokens = c.sequence.max_new_tokens;
  o.generate.temperature = c.sequence.temperature;
  o.generate.top_k = c.sequence.top_k;
  o.generate.top_p = c.sequence.top_p;
  o.generate.seed = c.sequence.seed;
  o.generate.pad_token_id = tok->pad_id() >= 0 ? tok->pad_id() : -1;
  const auto r = train::write_teacher_completions(teacher, *tok, o);
  std::cerr << "teacher data: " << c.sequence.output << ", " << r.rows << " rows (" << r.kept << " kept from an earlier run, "
            << r.generated_tokens << " tokens generated now)\n";
}

// The loss of the loop: online KD, or with an on_policy section a fraction lambda of student generations (GKD).
train::LossFn distill_loss_fn(const RecipeConfig& c, model::CausalLM& student, const train::Teacher& teacher,
                              const data::Tokenizer* tok, int32_t pad_id, const data::BatchStream& stream,
                              at::Device device) {
  if (!c.use_on_policy) return train::kd_loss_fn(student, teacher, c.kd, c.kd_ratio, c.train.loss_chunk, device);
  auto o = c.on_policy;
  o.pad_id = pad_id;
  if (tok)
    for (const auto id : tok->eos_ids()) o.stop_tokens.push_back(id);
  return train::on_policy_loss_fn(student, teacher, c.kd, c.kd_ratio, c.train.loss_chunk, device, o, stream);
}

void print_comparison(const train::EvalResult& teacher, const train::EvalResult& student) {
  std::printf("\non the validation set (%lld target tokens):\n", static_cast<long long>(student.targets));
  std::printf("           %10s %12s %14s %10s\n", "loss", "perplexity", "kl to teacher", "top-1");
  std::printf("  teacher  %10.4f %12.3f %14s %10s\n", teacher.loss, teacher.ppl, "0", "1");
  std::printf("  student  %10.4f %12.3f %14.4f %10.4f\n", student.loss, student.ppl, student.terms.at(0).second,
              student.terms.at(1).second);
}

// ---- offline: the teacher cache (anvil/train/teacher_cache.h) ----

train::CacheOptions cache_options(const RecipeConfig& c) {
  train::CacheOptions o;
  o.dir = c.teacher.cache, o.k = c.teacher.cache_k, o.temperature = c.kd.temperature;
  o.dtype = model::dtype_from_name(c.teacher.cache_dtype);
  o.shard_tokens = c.teacher.cache_shard_tokens, o.batch_size = c.train.batch_size, o.chunk = c.kd.chunk;
  return o;
}

// The documents a cache covers (train, then validation) and the fingerprint of teacher, tokenizer and data.
struct CacheInputs {
  int64_t vocab = 0;
  train::TrainingData data;
  std::vector<data::Example> docs;
  nlohmann::json fingerprint;
};
CacheInputs cache_inputs(const RecipeConfig& c, const std::string& teacher_path, const data::Tokenizer* tok,
                         int64_t vocab) {
  CacheInputs in;
  in.vocab = vocab;  // the compared vocabulary (plan_vocabulary): the cache holds log-probs over these rows
  in.data = train::read_training_data(c.data, tok, c.train.seed, in.vocab);
  in.docs = in.data.train;
  in.docs.insert(in.docs.end(), in.data.validation.begin(), in.data.validation.end());
  in.fingerprint = {{"teacher", train::teacher_fingerprint(teacher_path, c.teacher.dtype, c.teacher.base_weights)},
                    {"tokenizer", train::tokenizer_fingerprint(teacher_path)},
                    {"data", train::data_fingerprint(c.data, in.docs)}};
  return in;
}

// The teacher cache of the run's data, written first where shards are missing (the teacher loaded only then),
// its fingerprint checked; the teacher is not in the process afterwards. The teacher pass (cache_only) also
// scores the rollouts of on-policy rounds; a training run reads the latest round when it has an on_policy section.
std::unique_ptr<train::TeacherCache> open_teacher_cache(const RecipeConfig& c, const std::string& teacher_path,
                                                        at::Device teacher_device, at::Device device,
                                                        const data::Tokenizer* tok, int64_t vocab,
                                                        const train::DistEnv& launch) {
  const auto in = cache_inputs(c, teacher_path, tok, vocab);
  const auto& fingerprint = in.fingerprint;
  auto o = cache_options(c);
  o.on_policy_rows = c.use_on_policy;
  train::TeacherCacheWriter writer(o, fingerprint, in.docs, c.data.seq_len, in.data.pad_id, vocab);
  const auto& m = writer.manifest();
  // The compared vocabulary follows from the teacher's config and tokenizer (fingerprinted), yet a cache written
  // before vocabularies were planned holds the teacher's padded rows too.
  if (m["vocab_size"].get<int64_t>() != vocab)
    config_error("teacher.cache", o.dir + " holds log-probabilities over " + std::to_string(m["vocab_size"].get<int64_t>()) +
                 " rows, this run compares " + std::to_string(vocab) + " (the real vocabulary): write it again in a new "
                 "folder", o.dir);
  if (launch.world_size > 1 && writer.missing_shards() > 0)
    // The teacher pass is one process's (the shards are written in order, and a rank would wait for it past
    // train.dist_timeout_s): under a launch every rank only reads a complete cache.
    config_error("teacher.cache", o.dir + " lacks " + std::to_string(writer.missing_shards()) + " of its shards, and a " +
                 "multi-process launch (WORLD_SIZE " + std::to_string(launch.world_size) + ") only reads a complete " +
                 "cache: write it first with one process (anvil distill --teacher.cache_only=true, the same config)",
                 o.dir);
  if (writer.missing_shards() > 0 || (c.teacher.cache_only && writer.unscored_rollouts() > 0)) {
    const auto teacher = train::freeze_teacher(
        model::load_causal_lm(teacher_path, model::dtype_from_name(c.teacher.dtype), teacher_device,
                              c.teacher.base_weights), device, vocab);
    const auto st = writer.write(teacher, device);
    std::fprintf(stderr, "teacher cache %s: wrote %lld of %lld shards (%lld complete already), %lld positions, "
                 "%.1f bytes/token, %.0f tokens/s\n", o.dir.c_str(), (long long)st.written, (long long)st.shards,
                 (long long)st.skipped, (long long)st.targets, st.targets ? double(st.bytes) / double(st.targets) : 0.0,
                 st.seconds > 0 ? double(st.targets) / st.seconds : 0.0);
    if (st.scored > 0)
      std::fprintf(stderr, "teacher cache %s: scored %lld rollout shards of on-policy rounds\n", o.dir.c_str(),
                   (long long)st.scored);
  }
  int64_t bytes = 0;
  for (const auto& s : m["shards"]) bytes += s["bytes"].get<int64_t>();
  const int64_t targets = m["targets"].get<int64_t>();
  std::fprintf(stderr, "teacher cache %s: complete, %lld shards, %lld positions, k %lld, %s log-probs, %.1f "
               "bytes/token\n", o.dir.c_str(), (long long)m["shards"].size(), (long long)targets, (long long)o.k,
               c.teacher.cache_dtype.c_str(), targets ? double(bytes) / double(targets) : 0.0);
  if (c.teacher.cache_only) return nullptr;
  auto cache = std::make_unique<train::TeacherCache>(o, fingerprint);
  if (cache->on_policy_round() > 0) {
    const auto& r = cache->on_policy_round_entry();
    std::fprintf(stderr, "on-policy rows: round %lld of the cache, %lld documents regenerated by the student %s "
                 "(lambda %g, temperature %g), KD alone over their %s\n", (long long)cache->on_policy_round(),
                 (long long)cache->on_policy_documents(), r.at("student").value("source", std::string("?")).c_str(),
                 r.at("generation").at("lambda").get<double>(), r.at("generation").at("temperature").get<double>(),
                 "generated tokens");
  } else if (c.use_on_policy) {
    std::fprintf(stderr, "on-policy rows: the cache %s holds no round yet, so every document trains on the teacher's "
                 "rows (write one: --on_policy.refresh_from=checkpoint, then the teacher pass with "
                 "--teacher.cache_only=true)\n", o.dir.c_str());
  }
  return cache;
}

// on_policy.refresh_from: `student` completes the prompts of a fraction on_policy.lambda of the training documents
// into a new on-policy round of the cache (or finishes an interrupted one). No teacher in the process.
int write_on_policy_round(const RecipeConfig& c, const std::string& teacher_path, model::CausalLM& student,
                          const nlohmann::json& student_id, const data::Tokenizer* tok, int64_t vocab) {
  const auto in = cache_inputs(c, teacher_path, tok, vocab);
  train::TeacherCacheWriter writer(cache_options(c), in.fingerprint, in.docs, c.data.seq_len, in.data.pad_id, in.vocab);
  train::RefreshOptions r;
  r.lambda = c.on_policy.lambda;
  r.batch_size = c.on_policy.batch_size > 0 ? c.on_policy.batch_size : c.train.batch_size;
  auto& g = r.generate;
  g.max_new_tokens = c.on_policy.max_new_tokens, g.temperature = c.on_policy.temperature;
  g.top_k = c.on_policy.top_k, g.top_p = c.on_policy.top_p, g.seed = c.train.seed;
  g.pad_token_id = in.data.pad_id;
  if (tok)
    for (const auto id : tok->eos_ids()) g.stop_tokens.push_back(id);
  const auto st = writer.write_rollouts(student, student_id, r, int64_t(in.data.train.size()));
  if (st.up_to_date)
    std::fprintf(stderr, "on-policy refresh: round %lld of %s already holds this student's rollouts (%lld documents); "
                 "nothing to do\n", (long long)st.round, c.teacher.cache.c_str(), (long long)st.documents);
  else
    std::fprintf(stderr, "on-policy refresh: round %lld of %s, %lld documents (lambda %g) in %lld shards: wrote %lld "
                 "(%lld complete already), %lld tokens generated, %.0f tokens/s\n", (long long)st.round,
                 c.teacher.cache.c_str(), (long long)st.documents, r.lambda, (long long)st.shards, (long long)st.written,
                 (long long)st.skipped, (long long)st.generated_tokens,
                 st.seconds > 0 ? double(st.generated_tokens) / st.seconds : 0.0);
  std::fprintf(stderr, "next: the teacher pass scores them (--teacher.cache_only=true), then training reads them\n");
  return train::kExitOk;
}

void print_offline_comparison(const train::EvalResult& student) {
  std::printf("\non the validation set (%lld target tokens; the teacher from its cache):\n",
              static_cast<long long>(student.targets));
  std::printf("           %10s %12s %14s %10s\n", "loss", "perplexity", "kl to teacher", "top-1");
  std::printf("  student  %10.4f %12.3f %14.4f %10.4f\n", student.loss, student.ppl, student.terms.at(0).second,
              student.terms.at(1).second);
}

}  // namespace

int run_recipe(const RecipeConfig& c, const train::RunOptions& options) {
  // A torchrun launch (train/distributed.h): data parallel online distillation, each rank on cuda:LOCAL_RANK
  // running the frozen teacher on its own rows only (offline: reading a complete cache for them); rank 0 prints and
  // writes. What a launch cannot run yet is
  // refused by the key that asks for it (distill/README.md "Not yet").
  const auto launch = train::read_dist_env();
  if (launch.launched && launch.world_size > 1) {
    const std::string why = " is not supported under a multi-process launch yet (WORLD_SIZE " +
                            std::to_string(launch.world_size) + "); run it as one process";
    if (c.teacher.cache_only)
      config_error("teacher.cache_only", "the teacher pass (the cache is written by one process)" + why, true);
    if (c.mode == "sequence")
      config_error("distill.mode", "\"sequence\" (the teacher's completions are generated by one process)" + why, c.mode);
    if (c.use_on_policy)
      config_error("on_policy", "on-policy distillation (the student's generations)" + why, c.resolved["on_policy"]);
    if (c.cross.on)
      config_error("distill.vocab", "\"cross-tokenizer\"" + why, c.resolved["distill"]["vocab"]);
  }
  const bool main_rank = launch.rank == 0;
  const at::Device device =
      train::device_for_rank(model::parse_device(c.student.device, "config key student.device"), launch, "student.device");
  const at::Device teacher_device =
      train::device_for_rank(model::parse_device(c.teacher.device, "config key teacher.device"), launch, "teacher.device");
  const bool mixed = c.train.mixed_precision == "bf16";
  // Mixed precision keeps fp32 master weights and computes in bf16 under autocast (the trainer's).
  const at::ScalarType dtype = mixed ? at::kFloat : model::dtype_from_name(c.student.dtype);

  // ---- teacher (frozen), student, tokenizer ----
  at::manual_seed(c.train.seed);
  const std::string teacher_path = resolve_path("teacher.path", c.teacher.path);
  const bool offline = !c.teacher.cache.empty();
  // The tokenizer (the teacher's) and the vocabulary mapping come first: both models are compared over its rows.
  auto tok = train::load_tokenizer_if_present(teacher_path, c.eval);
  std::unique_ptr<data::Tokenizer> student_tok;  // distill.vocab "cross-tokenizer": the student's own
  const auto vocab = c.cross.on ? plan_cross_vocabulary(c, teacher_path, tok.get(), student_tok)
                                : plan_vocabulary(c, teacher_path, tok.get());
  if (main_rank) std::cerr << vocab.line << "\n";
  // The tokenizer of the data and of the student's generations: the student's own across tokenizers.
  const data::Tokenizer* data_tok = c.cross.on ? student_tok.get() : tok.get();
  if (offline && c.mode == "sequence")
    throw std::invalid_argument("config key teacher.cache: an offline run cannot generate the teacher's completions "
                                "(distill.mode \"sequence\"): that needs the teacher in the process");
  if (c.use_on_policy && c.hidden.type != "none")
    throw std::invalid_argument("config key distill.hidden_loss: not with an on_policy section (the generated batches "
                                "carry no teacher hidden states)");
  if (offline && c.hidden.type != "none")
    throw std::invalid_argument("config key distill.hidden_loss: \"" + c.hidden.type +
                                "\" needs the teacher's hidden states, but teacher.cache makes the run offline");
  const bool refresh = !c.refresh_from.empty() && !options.dry_run;
  if (refresh && c.refresh_from != "checkpoint") {  // the student of a model folder: no teacher in the process
    const auto path = resolve_path("on_policy.refresh_from", c.refresh_from);
    auto student = model::load_causal_lm(path, dtype, device, "dense");
    const int64_t rows = student->config().vocab_size, teacher_rows = model::load_model_config(teacher_path).vocab_size;
    if (rows < vocab.compared || rows > teacher_rows)  // every real token, and no sampled id past the teacher's rows
      config_error("on_policy.refresh_from", path + " has " + std::to_string(rows) + " head rows; a student that "
                   "generates rollouts needs the " + std::to_string(vocab.compared) + " real tokens and at most the "
                   "teacher's " + std::to_string(teacher_rows), c.refresh_from);
    return write_on_policy_round(c, teacher_path, *student, train::model_student_fingerprint(path, c.student.dtype),
                                 tok.get(), vocab.compared);
  }
  std::unique_ptr<train::TeacherCache> cache;  // offline: the teacher's top-k cache instead of the teacher
  if (offline && !options.dry_run && !refresh) {  // a dry run only plans: it writes no cache
    cache = open_teacher_cache(c, teacher_path, teacher_device, device, tok.get(), vocab.compared, launch);
    if (c.teacher.cache_only) return train::kExitOk;
  }
  train::Teacher teacher;  // offline: loaded only to derive the student from
  if (!offline || c.student.init == "derived")
    teacher = train::freeze_teacher(model::load_causal_lm(teacher_path, model::dtype_from_name(c.teacher.dtype),
                                                          teacher_device, c.teacher.base_weights), device, vocab.compared);
  // The data comes before the student: a pruned student is scored on training rows.
  // distill.mode "sequence": the teacher's completions of the prompts are the training data, written first.
  train::DataSection data_section = c.data;
  if (c.mode == "sequence") {
    if (options.dry_run && !io::path_exists(c.sequence.output)) {
      std::cout << "dry run: distill.mode \"sequence\": the teacher's completions (not yet generated) go to "
                << c.sequence.output << "; the plan below reads data.train in their place\n";
    } else {
      if (!options.dry_run) write_sequence_data(c, *teacher.model, tok.get());
      data_section.train = c.sequence.output;
    }
  }
  // Across tokenizers every document is tokenized by both, so each micro-batch is packed again for the teacher
  // (read first: a line that cannot be tokenized twice is refused as such).
  const auto cross_docs = c.cross.on ? train::read_cross_documents(c.data, *student_tok, *tok) : nullptr;
  if (cross_docs)
    std::cerr << "cross-tokenizer documents: " << cross_docs->size() << " distinct, tokenized by both tokenizers "
              << "with byte offsets\n";
  const auto data = train::read_training_data(data_section, data_tok, c.train.seed,
                                              c.cross.on ? vocab.student_rows : vocab.compared);
  data::BatchStream stream(data.train, c.data.seq_len, data.pad_id, c.train.batch_size, c.train.seed);
  auto student = build_student(c, teacher, teacher_path, dtype, device, stream);
  student->train();  // dropout on for every kind of student (build_model does this; a derived one is new)
  if (student->config().vocab_size != vocab.student_rows)  // the plan read the student's config.json
    throw std::logic_error("anvil distill: the student has " + std::to_string(student->config().vocab_size) +
                           " rows, its plan " + std::to_string(vocab.student_rows));
  if (offline) teacher = train::Teacher{};  // the teacher leaves the process
  lora::LoraConfig lora = c.lora;
  train::NamedTensors trainable;
  if (c.use_lora) {
    lora.base_model_name_or_path = c.student.init == "pretrained" ? c.student.path : c.output.dir + "/student_base";
    trainable = lora::apply_lora(*student, lora, c.train.seed);
  } else {
    for (auto& p : student->named_parameters(/*recurse=*/true)) {
      p.value().set_requires_grad(true);
      trainable.emplace_back(p.key(), p.value());
    }
  }
  if (refresh) {  // "checkpoint": the run's student as its last checkpoint holds it
    const auto dir = train::find_checkpoint(c.output.dir);
    train::check_same_run(c.resolved, train::checkpoint_config(dir), {"student", "lora"});
    train::load_checkpoint_weights(dir, trainable, "config key on_policy.refresh_from");
    return write_on_policy_round(c, teacher_path, *student, train::checkpoint_student_fingerprint(dir), tok.get(),
                                 vocab.compared);
  }
  student->model->set_gradient_checkpointing(c.train.grad_checkpointing);
  // The hidden-state loss's projections train with the student (and resume with it); they are not exported.
  const auto hidden = make_hidden_loss(c, *teacher.model, *student, dtype, device);
  if (hidden)
    for (const auto& p : hidden->parameters()) trainable.push_back(p);

  // ---- data ----
  const int64_t total_steps = train::count_steps(c.train, stream);

  // ---- memory plan (student trained, teacher frozen beside it), dry run ----
  auto plan = train::memory_inputs(c.use_lora ? "distill, lora r " + std::to_string(c.lora.r) : "distill, full student",
                                   c.train, c.data, trainable, launch.world_size);
  if (c.use_lora) {
    plan.trainable_are_weights = false;
    plan.extra_activations_per_token = lora::activation_elems_per_token(student->config(), c.lora);
  }
  if (!offline) train::add_frozen_model(plan, *teacher.model, *student, "teacher", c.kd.chunk);
  const auto estimate = train::estimate_memory(*student, plan, device);
  if (main_rank && offline)
    std::cerr << "teacher: offline, from the cache " << c.teacher.cache << " (k " << c.teacher.cache_k << "); student: "
              << student->config().num_hidden_layers << " layers\n";
  else if (main_rank)
    std::cerr << "teacher: " << teacher.model->config().architecture << ", " << teacher.model->config().num_hidden_layers
            << " layers (" << model::dtype_name(teacher.model->dtype()) << ", " << teacher_device.str() << "); student: "
            << student->config().num_hidden_layers << " layers\n";
  if (main_rank) train::print_run_summary("distill", *student, device, trainable, data, total_steps);
  if (options.dry_run) {  // under torchrun every rank plans the same: rank 0 prints
    if (main_rank) std::cout << train::format_estimate(estimate, plan);
    return train::kExitOk;
  }

  // ---- the trainer: output.dir, resume ----
  auto settings = train::loop_settings("distill", c.train, c.eval, c.output, total_steps, c.resolved, kSameRun);
  settings.dist = train::connect_if_launched(c.train, device);
  train::Trainer trainer(std::move(settings), trainable, device);
  trainer.open(options.resume, stream);
  // Rank 0 alone prints the generations (the weights are the same on every rank).
  const auto teacher_says = cache || !main_rank ? std::vector<std::string>()
                                                : train::generate_for_prompts(*teacher.model, tok.get(), c.eval);
  const auto before = main_rank ? train::generate_for_prompts(*student, data_tok, c.eval) : std::vector<std::string>();

  // ---- the loop ----
  const auto shared = c.cross.on ? train::shared_tokens(*tok, *student_tok) : train::SharedTokens{};
  const auto loss = cache  ? train::kd_cache_loss_fn(*student, *cache, c.kd, c.kd_ratio, c.train.loss_chunk, device)
                    : hidden ? train::kd_hidden_loss_fn(*student, teacher, c.kd, c.kd_ratio, c.train.loss_chunk, device, *hidden)
                    : cross_docs ? train::cross_loss_fn(*student, teacher, *cross_docs, shared, c.cross.options,
                                                        c.kd_ratio, c.train.loss_chunk, device)
                             : distill_loss_fn(c, *student, teacher, tok.get(), data.pad_id, stream, device);
  // Across tokenizers the teacher's next-token distribution is over other tokens: validation is the student's CE.
  const auto evaluate = cache ? train::kd_cache_eval_fn(*student, *cache, data, c.train, c.eval, c.kd.chunk, device)
                        : cross_docs ? train::causal_lm_eval_fn(*student, data, c.train, c.eval, device)
                              : train::kd_eval_fn(*student, teacher, data, c.train, c.eval, c.kd.chunk, device);
  const int status = trainer.fit(stream, loss, evaluate, options, [&] {
    return train::memory_advice(estimate, plan, ", distill.chunk (now " + std::to_string(c.kd.chunk) + ")");
  });
  if (status != train::kExitOk) return status;
  if (!trainer.is_main()) return train::kExitOk;  // rank 0 writes the outputs (the weights are the same on all)

  // ---- outputs ----
  // The student's tokenizer and side files: the teacher's, or across tokenizers its own folder's.
  const std::string side_files = c.cross.on ? student_folder(c) : teacher_path;
  if (mixed) student->to(model::dtype_from_name(c.student.dtype));
  if (c.use_lora) {
    lora::save_adapter(*student, lora, trainer.path("adapter"));
    if (c.student.init != "pretrained") {  // the adapter's base exists nowhere else
      model::save_causal_lm(*student, trainer.path("student_base"));  // adapters are not in state_tensors
      io::copy_model_side_files(side_files, trainer.path("student_base"));
    }
    lora::merge_adapter(*student);
  }
  const std::string model_dir = trainer.path("model");
  model::save_causal_lm(*student, model_dir);
  io::copy_model_side_files(side_files, model_dir);
  if (tok && !c.eval.prompts.empty() && cache)
    train::print_generations(c.eval.prompts, before, train::generate_for_prompts(*student, tok.get(), c.eval),
                             c.eval.max_new_tokens);
  else if (tok && !c.eval.prompts.empty())
    train::print_generations(c.eval.prompts, {{"teacher", teacher_says}, {"before", before},
                                              {"after", train::generate_for_prompts(*student, data_tok, c.eval)}},
                             c.eval.max_new_tokens);
  if (data.validation_rows.rows > 0 && cache)
    print_offline_comparison(train::evaluate_against_cache(*student, *cache, data.validation_rows, c.train.batch_size,
                                                           c.eval.max_batches, c.kd.chunk, device));
  else if (data.validation_rows.rows > 0 && c.cross.on) {  // the two models' losses are over other tokens
    const auto r = train::evaluate_causal_lm(*student, data.validation_rows, c.train.batch_size, c.eval.max_batches,
                                             c.train.loss_chunk, device);
    std::printf("\non the validation set (%lld target tokens of the student's tokenizer): student loss %.4f, "
                "perplexity %.3f\n", static_cast<long long>(r.targets), r.loss, r.ppl);
  }
  else if (data.validation_rows.rows > 0)
    print_comparison(train::evaluate_causal_lm(*teacher.model, data.validation_rows, c.train.batch_size, c.eval.max_batches,
                                               c.train.loss_chunk, teacher_device),
                     train::evaluate_against_teacher(*student, teacher, data.validation_rows, c.train.batch_size,
                                                     c.eval.max_batches, c.kd.chunk, device));
  std::cout << "wrote " << model_dir << (c.use_lora ? ", " + trainer.path("adapter") : "") << ", "
            << trainer.path("metrics.jsonl") << (c.output.plot ? ", " + trainer.path("loss.svg") : "") << ", "
            << trainer.path("checkpoint") << "\n";
  return train::kExitOk;
}

}  // namespace anvil::distill
