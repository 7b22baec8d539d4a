// The `anvil train` recipe (finetune/recipe.h), top to bottom: the model (loaded dense, or random), every
// parameter trainable, the tokenizer and data; the memory plan (and --dry-run); the trainer opened (or
// resumed); generations from eval.prompts; the loop; the model folder (weights in model.dtype, config.json,
// the tokenizer's files), the generations again.
#include "finetune/recipe.h"

#include "anvil/io/fs.h"
#include "anvil/train/setup.h"

#include <ATen/ATen.h>

#include <iostream>
#include <stdexcept>

namespace anvil::finetune {

namespace {

using train::config_error;

// What a resumed run must share with its checkpoint's run, besides train.batch_size, grad_accum and seed.
const std::vector<std::string> kSameRun = {"model", "data"};

}  // namespace

train::ConfigSchema config_schema() {
  train::ConfigSchema schema;
  schema.defaults = train::training_defaults("runs/train");
  schema.foreign_sections = {{"lora", "is for anvil lora; anvil train trains every parameter"}};
  return schema;
}

RecipeConfig resolve_config(const nlohmann::json& user) {
  RecipeConfig c;
  c.resolved = train::merge_over_defaults(config_schema(), user);
  const train::ConfigReader r(c.resolved);
  c.model = train::read_model_section(r);
  if (c.model.base_weights == "fp8" || c.model.base_weights == "int8")
    config_error("model.base_weights", "\"fp8\" and \"int8\" hold a frozen base for anvil lora; anvil train updates "
                 "every weight", c.model.base_weights);
  c.data = train::read_data_section(r);
  c.train = train::read_train_section(r);
  c.eval = train::read_eval_section(r);
  c.output = train::read_output_section(r);
  return c;
}

int run_recipe(const RecipeConfig& c, const train::RunOptions& options) {
  // A torchrun launch (train/distributed.h): each rank on cuda:LOCAL_RANK; only rank 0 prints and writes.
  const auto launch = train::read_dist_env();
  const bool main_rank = launch.rank == 0;
  const at::Device device =
      train::device_for_rank(model::parse_device(c.model.device, "config key model.device"), launch, "model.device");
  const bool mixed = c.train.mixed_precision == "bf16";
  // Mixed precision keeps fp32 master weights and computes in bf16 under autocast (the trainer's).
  const at::ScalarType dtype = mixed ? at::kFloat : model::dtype_from_name(c.model.dtype);

  // ---- model, tokenizer ----
  at::manual_seed(c.train.seed);
  // Every weight is updated, so FP8 / INT8 checkpoints are dequantized.
  const auto paths = train::resolve_model_paths(c.model);  // once: a hub id becomes its snapshot folder
  // A dry run of a random init plans on the meta device: a 7B shape's plan takes no memory.
  auto model = train::build_model(c.model, paths, dtype, device, c.train.seed, "dense", options.dry_run);
  train::NamedTensors trainable;
  for (auto& p : model->named_parameters(/*recurse=*/true)) {
    p.value().set_requires_grad(true);
    trainable.emplace_back(p.key(), p.value());
  }
  model->model->set_gradient_checkpointing(c.train.grad_checkpointing);
  auto tok = train::load_tokenizer_if_present(paths.tokenizer, c.eval);

  // ---- data ----
  const auto data = train::read_training_data(c.data, tok.get(), c.train.seed, model->config().vocab_size);
  data::BatchStream stream(data.train, c.data.seq_len, data.pad_id, c.train.batch_size, c.train.seed);
  const int64_t total_steps = train::count_steps(c.train, stream);

  // ---- memory plan, dry run ----
  const auto plan = train::memory_inputs("full training", c.train, c.data, trainable, launch.world_size);
  const auto estimate = train::estimate_memory(*model, plan, device);
  if (main_rank) train::print_run_summary("train", *model, device, trainable, data, total_steps);
  if (options.dry_run) {  // under torchrun every rank plans the same: rank 0 prints
    if (main_rank) std::cout << train::format_estimate(estimate, plan);
    return train::kExitOk;
  }

  // ---- the trainer: output.dir, resume ----
  auto settings = train::loop_settings("train", c.train, c.eval, c.output, total_steps, c.resolved, kSameRun);
  settings.dist = train::connect_if_launched(c.train, device);
  // train.zero_stage 3: the trainer shards the model's parameters by decoder layer and runs each layer through
  // gradient checkpointing itself, whatever train.grad_checkpointing says (docs/CLI.md).
  settings.shard_model = model.get();
  train::Trainer trainer(std::move(settings), trainable, device);
  trainer.open(options.resume, stream);
  const auto before = main_rank ? train::generate_for_prompts(*model, tok.get(), c.eval) : std::vector<std::string>();

  // ---- the loop ----
  const auto loss = train::causal_lm_loss_fn(*model, c.train.loss_chunk, device);
  const auto evaluate = train::causal_lm_eval_fn(*model, data, c.train, c.eval, device);
  const int status = trainer.fit(stream, loss, evaluate, options,
                                 [&] { return train::memory_advice(estimate, plan); });
  if (status != train::kExitOk) return status;
  if (!trainer.is_main()) return train::kExitOk;  // rank 0 writes the outputs (the weights are the same on all)

  // ---- outputs ----
  if (mixed) model->to(model::dtype_from_name(c.model.dtype));
  const std::string model_dir = trainer.path("model");
  model::save_causal_lm(*model, model_dir);
  io::copy_model_side_files(paths.tokenizer, model_dir);
  train::print_generations_after(*model, tok.get(), c.eval, before);
  std::cout << "wrote " << model_dir << ", " << trainer.path("metrics.jsonl")
            << (c.output.plot ? ", " + trainer.path("loss.svg") : "") << ", " << trainer.path("checkpoint") << "\n";
  return train::kExitOk;
}

}  // namespace anvil::finetune
