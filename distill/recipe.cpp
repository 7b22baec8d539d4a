// The `anvil distill` recipe (distill/recipe.h), top to bottom: the teacher loaded and frozen, the student
// (derived from it, loaded, or random; adapters attached with a lora section), one vocabulary checked; the
// tokenizer (the teacher's) and data; the memory plan for both models (and --dry-run); the trainer opened (or
// resumed); generations of both; the loop on (1 - kd_ratio) CE + kd_ratio KD, validated as the student's loss,
// KL to the teacher and top-1 agreement; the student written as a Hugging Face folder (with LoRA: merged, and
// the PEFT adapter beside it); the two models side by side at the end.
#include "distill/recipe.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/derive.h"
#include "anvil/train/setup.h"

#include <ATen/ATen.h>

#include <cstdio>
#include <iostream>
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

// The student: the teacher's kept layers, a checkpoint, or transformers' random init from a config.json.
std::shared_ptr<model::CausalLM> build_student(const RecipeConfig& c, const train::Teacher& teacher,
                                               const std::string& teacher_path, at::ScalarType dtype, at::Device device) {
  const auto& s = c.student;
  if (s.init == "derived") {
    const auto keep = s.layers.empty() ? model::every_nth_layer(teacher.model->config().num_hidden_layers, s.every_nth)
                                       : s.layers;
    const std::string what = s.layers.empty() ? "config key student.every_nth" : "config key student.layers";
    const auto options = at::TensorOptions().dtype(dtype).device(device);
    // A quantized teacher (teacher.base_weights): the student comes from a dense copy of its checkpoint.
    for (auto& [name, linear] : model::named_linears(*teacher.model))
      if (!linear->weight_format().empty())
        return model::derive_by_layers(*model::load_causal_lm(teacher_path, dtype, at::kCPU, "dense"), keep, options, what);
    return model::derive_by_layers(*teacher.model, keep, options, what);
  }
  train::ModelSection m;
  m.init = s.init, m.path = s.init == "pretrained" ? resolve_path("student.path", s.path) : "", m.config = s.config, m.dtype = s.dtype, m.device = s.device, m.base_weights = "dense";
  m.tokenizer = teacher_path;
  return train::build_model(m, train::resolve_model_paths(m), dtype, device, c.train.seed, "dense");
}

// One vocabulary for both: the KD losses compare distributions over the same token ids.
void check_vocabularies(const RecipeConfig& c, const model::CausalLM& teacher, const model::CausalLM& student) {
  const int64_t vt = teacher.config().vocab_size, vs = student.config().vocab_size;
  if (vt == vs) return;
  const std::string key = c.student.init == "random" ? "student.config" : "student.path";
  config_error(key, "the student's vocabulary (vocab_size " + std::to_string(vs) + ") must be the teacher's (" +
               c.teacher.path + ": vocab_size " + std::to_string(vt) + "); vocabularies that differ (padded rows, "
               "other tokenizers) are not yet supported", c.student.init == "random" ? c.student.config : c.student.path);
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

}  // namespace

int run_recipe(const RecipeConfig& c, const train::RunOptions& options) {
  const at::Device device = model::parse_device(c.student.device, "config key student.device");
  const at::Device teacher_device = model::parse_device(c.teacher.device, "config key teacher.device");
  const bool mixed = c.train.mixed_precision == "bf16";
  // Mixed precision keeps fp32 master weights and computes in bf16 under autocast (the trainer's).
  const at::ScalarType dtype = mixed ? at::kFloat : model::dtype_from_name(c.student.dtype);

  // ---- teacher (frozen), student, tokenizer ----
  at::manual_seed(c.train.seed);
  const std::string teacher_path = resolve_path("teacher.path", c.teacher.path);
  const auto teacher = train::freeze_teacher(
      model::load_causal_lm(teacher_path, model::dtype_from_name(c.teacher.dtype), teacher_device, c.teacher.base_weights),
      device);
  auto student = build_student(c, teacher, teacher_path, dtype, device);
  student->train();  // dropout on for every kind of student (build_model does this; a derived one is new)
  check_vocabularies(c, *teacher.model, *student);
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
  student->model->set_gradient_checkpointing(c.train.grad_checkpointing);
  auto tok = train::load_tokenizer_if_present(teacher_path, c.eval);

  // ---- memory plan (student trained, teacher frozen beside it), dry run ----
  auto plan = train::memory_inputs(c.use_lora ? "distill, lora r " + std::to_string(c.lora.r) : "distill, full student",
                                   c.train, c.data, trainable);
  if (c.use_lora) {
    plan.trainable_are_weights = false;
    plan.extra_activations_per_token = lora::activation_elems_per_token(student->config(), c.lora);
  }
  train::add_frozen_model(plan, *teacher.model, *student, "teacher", c.kd.chunk);
  const auto estimate = train::estimate_memory(*student, plan, device);
  std::cerr << "teacher: " << teacher.model->config().architecture << ", " << teacher.model->config().num_hidden_layers
            << " layers (" << model::dtype_name(teacher.model->dtype()) << ", " << teacher_device.str() << "); student: "
            << student->config().num_hidden_layers << " layers\n";
  // ---- data (distill.mode "sequence": the teacher's completions of the prompts, generated first) ----
  train::DataSection data_section = c.data;
  if (c.mode == "sequence") {
    if (options.dry_run && !io::path_exists(c.sequence.output)) {
      std::cout << "dry run: distill.mode \"sequence\": the teacher's completions of " << c.sequence.prompts
                << " (not yet generated) go to " << c.sequence.output << "; the plan for the training after it:\n"
                << train::format_estimate(estimate, plan);
      return train::kExitOk;
    }
    if (!options.dry_run) write_sequence_data(c, *teacher.model, tok.get());
    data_section.train = c.sequence.output;
  }
  const auto data = train::read_training_data(data_section, tok.get(), c.train.seed, student->config().vocab_size);
  data::BatchStream stream(data.train, c.data.seq_len, data.pad_id, c.train.batch_size, c.train.seed);
  const int64_t total_steps = train::count_steps(c.train, stream);

  train::print_run_summary("distill", *student, device, trainable, data, total_steps);
  if (options.dry_run) {
    std::cout << train::format_estimate(estimate, plan);
    return train::kExitOk;
  }

  // ---- the trainer: output.dir, resume ----
  train::Trainer trainer(train::loop_settings("distill", c.train, c.eval, c.output, total_steps, c.resolved, kSameRun),
                         trainable, device);
  trainer.open(options.resume, stream);
  const auto teacher_says = train::generate_for_prompts(*teacher.model, tok.get(), c.eval);
  const auto before = train::generate_for_prompts(*student, tok.get(), c.eval);

  // ---- the loop ----
  const auto loss = distill_loss_fn(c, *student, teacher, tok.get(), data.pad_id, stream, device);
  const auto evaluate = train::kd_eval_fn(*student, teacher, data, c.train, c.eval, c.kd.chunk, device);
  const int status = trainer.fit(stream, loss, evaluate, options.on_step, [&] {
    return train::memory_advice(estimate, plan, ", distill.chunk (now " + std::to_string(c.kd.chunk) + ")");
  });
  if (status != train::kExitOk) return status;

  // ---- outputs ----
  if (mixed) student->to(model::dtype_from_name(c.student.dtype));
  if (c.use_lora) {
    lora::save_adapter(*student, lora, trainer.path("adapter"));
    if (c.student.init != "pretrained") {  // the adapter's base exists nowhere else
      model::save_causal_lm(*student, trainer.path("student_base"));  // adapters are not in state_tensors
      io::copy_model_side_files(teacher_path, trainer.path("student_base"));
    }
    lora::merge_adapter(*student);
  }
  const std::string model_dir = trainer.path("model");
  model::save_causal_lm(*student, model_dir);
  io::copy_model_side_files(teacher_path, model_dir);
  if (tok && !c.eval.prompts.empty())
    train::print_generations(c.eval.prompts, {{"teacher", teacher_says}, {"before", before},
                                              {"after", train::generate_for_prompts(*student, tok.get(), c.eval)}},
                             c.eval.max_new_tokens);
  if (data.validation_rows.rows > 0)
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
