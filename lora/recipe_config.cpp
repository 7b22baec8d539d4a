// The config of `anvil lora` (lora/recipe.h): the shared training sections, the "lora" section (PEFT's
// LoraConfig fields under anvil's key names) and the rules between them.
#include "lora/recipe.h"

#include "anvil/train/lora_section.h"

#include <stdexcept>

namespace anvil::lora {

using nlohmann::json;
using train::config_error;

train::ConfigSchema config_schema() {
  train::ConfigSchema schema;
  schema.defaults = train::training_defaults("runs/lora");
  schema.defaults["lora"] = train::lora_section_defaults();
  schema.defaults["output"]["save_initial_adapter"] = false;
  schema.defaults["output"]["save_pissa_adapter"] = false;
  return schema;
}

RecipeConfig resolve_config(const json& user) {
  RecipeConfig c;
  c.resolved = train::merge_over_defaults(config_schema(), user);
  const train::ConfigReader r(c.resolved);
  c.model = train::read_model_section(r);
  if (c.model.init == "random")
    config_error("model.init", "\"random\" is for anvil train (full training); anvil lora needs \"pretrained\"",
                 c.model.init);
  c.data = train::read_data_section(r);
  c.lora = train::read_lora_section(r);
  c.train = train::read_train_section(r);
  train::refuse_zero_stage_3(c.train, "anvil lora");
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
