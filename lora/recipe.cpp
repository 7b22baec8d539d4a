// The `anvil lora` recipe (lora/recipe.h), top to bottom: the base model with adapters attached, the
// tokenizer and data; the memory plan (and --dry-run); the trainer opened (or resumed); generations from
// eval.prompts; the loop; the adapter written in PEFT's format, the generations again.
//
// PiSSA: the frozen base itself depends on the run (W - scaling B0 A0), so the initial factors travel in
// every checkpoint and a resumed run rebuilds the residual from them instead of from a new SVD; adapter/
// is the adapter converted to a plain LoRA of the original base (PEFT's
// path_initial_model_for_weight_conversion), so that it loads where every other adapter does.
#include "lora/recipe.h"

#include "anvil/io/fs.h"
#include "anvil/train/setup.h"

#include <ATen/ATen.h>

#include <iostream>
#include <stdexcept>

namespace anvil::lora {

namespace {

// checkpoint/'s file of PiSSA's initial factors.
const char kPissaInitFile[] = "pissa_init.safetensors";
// What a resumed run must share with its checkpoint's run, besides train.batch_size, grad_accum and seed.
const std::vector<std::string> kSameRun = {"model", "data", "lora"};

}  // namespace

int run_recipe(const RecipeConfig& c, const train::RunOptions& options) {
  // A torchrun launch (train/distributed.h): each rank on cuda:LOCAL_RANK; only rank 0 prints and writes.
  const auto launch = train::read_dist_env();
  const bool main_rank = launch.rank == 0;
  const at::Device device =
      train::device_for_rank(model::parse_device(c.model.device, "config key model.device"), launch, "model.device");
  const at::ScalarType dtype = model::dtype_from_name(c.model.dtype);

  // ---- model, adapters, tokenizer ----
  at::manual_seed(c.train.seed);  // dropout draws from the default generators
  const auto paths = train::resolve_model_paths(c.model);  // once: a hub id becomes its snapshot folder
  auto model = train::build_model(c.model, paths, dtype, device, c.train.seed, c.model.base_weights);
  LoraConfig lora = c.lora;
  lora.base_model_name_or_path = c.model.path;
  train::NamedTensors trainable;
  if (is_pissa(lora) && options.resume) {
    // The residual base from the checkpoint's initial factors, not from a new SVD: bit for bit the run's
    // own, on any machine and for the randomized variant too. The config check first, so that a changed
    // lora.r is named as such, not as a shape mismatch.
    const auto dir = train::find_checkpoint(c.output.dir);
    train::check_same_run(c.resolved, train::checkpoint_config(dir), kSameRun);
    const auto factors = train::load_checkpoint_file(
        dir, kPissaInitFile, "the checkpoint was not made by a PiSSA run (lora.init must match the run's)");
    trainable = apply_lora(*model, lora, c.train.seed, &factors);
  } else {
    trainable = apply_lora(*model, lora, c.train.seed);
  }
  const auto pissa_init = pissa_initial_factors(*model);  // empty unless PiSSA
  model->model->set_gradient_checkpointing(c.train.grad_checkpointing);
  auto tok = train::load_tokenizer_if_present(paths.tokenizer, c.eval);

  // ---- data ----
  const auto data = train::read_training_data(c.data, tok.get(), c.train.seed, model->config().vocab_size);
  data::BatchStream stream(data.train, c.data.seq_len, data.pad_id, c.train.batch_size, c.train.seed);
  const int64_t total_steps = train::count_steps(c.train, stream);

  // ---- memory plan, dry run ----
  auto plan = train::memory_inputs("lora r " + std::to_string(c.lora.r), c.train, c.data, trainable, launch.world_size);
  plan.trainable_are_weights = false;
  plan.extra_activations_per_token = activation_elems_per_token(model->config(), c.lora);
  const auto estimate = train::estimate_memory(*model, plan, device);
  if (main_rank) train::print_run_summary("lora", *model, device, trainable, data, total_steps);
  if (options.dry_run) {  // under torchrun every rank plans the same: rank 0 prints
    if (main_rank) std::cout << train::format_estimate(estimate, plan);
    return train::kExitOk;
  }

  // ---- the trainer: output.dir, resume ----
  auto settings = train::loop_settings("lora", c.train, c.eval, c.output, total_steps, c.resolved, kSameRun);
  settings.dist = train::connect_if_launched(c.train, device);
  train::Trainer trainer(std::move(settings), trainable, device);
  if (!pissa_init.empty()) trainer.add_checkpoint_file({kPissaInitFile, pissa_init});
  trainer.open(options.resume, stream);
  if (c.save_initial_adapter && !options.resume && trainer.is_main()) {
    if (pissa_init.empty()) save_adapter(*model, lora, trainer.path("initial_adapter"));
    else save_pissa_initial_adapter(*model, lora, trainer.path("initial_adapter"));
  }
  const auto before = main_rank ? train::generate_for_prompts(*model, tok.get(), c.eval) : std::vector<std::string>();

  // ---- the loop ----
  const auto loss = train::causal_lm_loss_fn(*model, c.train.loss_chunk, device);
  const auto evaluate = train::causal_lm_eval_fn(*model, data, c.train, c.eval, device);
  const int status = trainer.fit(stream, loss, evaluate, options, [&] {
    return train::memory_advice(estimate, plan, ", lora.r (now " + std::to_string(c.lora.r) + ")");
  });
  if (status != train::kExitOk) return status;
  if (!trainer.is_main()) return train::kExitOk;  // rank 0 writes the outputs (the weights are the same on all)

  // ---- outputs ----
  if (!pissa_init.empty()) {
    // PiSSA trained a residual base: adapter/ is the LoRA delta of the original base (PEFT's conversion).
    save_pissa_as_lora(*model, lora, trainer.path("adapter"));
    if (c.save_pissa_adapter) save_adapter(*model, lora, trainer.path("adapter_pissa"));
  } else {
    save_adapter(*model, lora, trainer.path("adapter"));
  }
  train::print_generations_after(*model, tok.get(), c.eval, before);
  std::cout << "wrote " << trainer.path("adapter") << ", " << trainer.path("metrics.jsonl")
            << (c.output.plot ? ", " + trainer.path("loss.svg") : "") << ", " << trainer.path("checkpoint") << "\n";
  return train::kExitOk;
}

}  // namespace anvil::lora
