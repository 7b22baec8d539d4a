// The config of `anvil quantize` (quantize/recipe.h): sections "model", "quantize", "data", "output", and the
// rules between them (a calibrated scheme needs data.calib; the export format must hold the scheme).
#include "quantize/recipe.h"

#include "quantize/schemes.h"

#include <regex>
#include <stdexcept>

namespace anvil::quantize {

using nlohmann::json;
using train::config_error;

train::ConfigSchema config_schema() {
  train::ConfigSchema schema;
  schema.defaults["model"] = {{"path", ""}, {"dtype", "auto"}, {"device", "auto"}};
  schema.defaults["quantize"] = {{"scheme", "fp8-channel"}, {"ignore", json::array({"lm_head"})},
                                 {"misfit", "error"},       {"group_size", 128},
                                 {"act_order", false},      {"symmetric", true},
                                 {"dampening", 0.01},
                                 {"smoothquant_alpha", "auto"}};
  schema.defaults["data"] = {{"calib", ""},           {"calib_samples", 128}, {"calib_seq_len", 512},
                             {"calib_batch", 8},      {"eval", ""},           {"eval_seq_len", 512},
                             {"eval_max_tokens", 65536}};
  schema.defaults["output"] = {{"dir", ""},       {"overwrite", false},           {"format", "auto"},
                               {"reload", true},  {"max_shard_bytes", 2000000000}};
  for (const char* s : {"train", "eval", "lora", "teacher", "student", "distill"})
    schema.foreign_sections.emplace_back(s, "is not read by anvil quantize (its sections: model, quantize, data, output)");
  return schema;
}

RecipeConfig resolve_config(const json& user) {
  RecipeConfig c;
  c.resolved = train::merge_over_defaults(config_schema(), user);
  const train::ConfigReader r(c.resolved);
  c.model_path = r.string("model.path");
  if (c.model_path.empty())
    config_error("model.path", "is required (--model DIR): the Hugging Face folder of the model to quantize", c.model_path);
  c.dtype = r.string_in("model.dtype", {"auto", "float32", "bfloat16", "float16"});
  c.device = r.string("model.device");

  const Scheme& scheme = find_scheme(r.string("quantize.scheme"));
  c.scheme = scheme.name;
  c.ignore = r.strings("quantize.ignore");
  for (const auto& p : c.ignore) {
    if (p.empty()) config_error("quantize.ignore", "must not hold an empty name", r.at("quantize.ignore"));
    if (p.rfind("re:", 0) == 0) {
      try {
        std::regex(p.substr(3));
      } catch (const std::regex_error& e) {
        config_error("quantize.ignore", "\"" + p + "\" is not a valid regular expression (" + e.what() + ")",
                     r.at("quantize.ignore"));
      }
    }
  }
  c.misfit = r.string_in("quantize.misfit", {"error", "keep"});
  c.group_size = r.int_at_least("quantize.group_size", 1);
  if (c.group_size % 8 != 0)
    config_error("quantize.group_size", "must be a multiple of 8 (int4 values are packed eight to an int32)", c.group_size);
  c.act_order = r.boolean("quantize.act_order");
  c.symmetric = r.boolean("quantize.symmetric");
  if (!c.symmetric && scheme.granularity != "group")
    config_error("quantize.symmetric", "false (an int8 zero point per group) applies to the group schemes "
                 "int4-weight, gptq-int4 and gptq-int8 only, not " + scheme.name, false);
  c.dampening = r.number_in("quantize.dampening", 0.0, 1.0, false, "[0, 1]");
  const json& alpha = r.at("quantize.smoothquant_alpha");
  if (alpha.is_string() && alpha.get<std::string>() == "auto") c.smoothquant_alpha = -1;
  else c.smoothquant_alpha = r.number_in("quantize.smoothquant_alpha", 0.0, 1.0, false, "[0, 1] or \"auto\"");

  c.calib = r.string("data.calib");
  c.calib_samples = r.int_at_least("data.calib_samples", 1);
  c.calib_seq_len = r.int_at_least("data.calib_seq_len", 2);
  c.calib_batch = r.int_at_least("data.calib_batch", 1);
  c.eval = r.string("data.eval");
  c.eval_seq_len = r.int_at_least("data.eval_seq_len", 2);
  c.eval_max_tokens = r.int_at_least("data.eval_max_tokens", 0);
  if (scheme.algorithm != "rtn" && c.calib.empty())
    config_error("data.calib", "is required for " + scheme.name + " (--calib data.jsonl): " + scheme.algorithm +
                 " is calibrated on activations", c.calib);

  c.out = r.string("output.dir");
  if (c.out.empty()) config_error("output.dir", "is required (--out DIR): the folder the quantized model is written to", c.out);
  while (c.out.size() > 1 && c.out.back() == '/') c.out.pop_back();
  c.overwrite = r.boolean("output.overwrite");
  c.format = r.string_in("output.format", {"auto", "fp8", "compressed-tensors"});
  if (c.format == "fp8" && scheme.name != "fp8-block")
    config_error("output.format", "\"fp8\" (FineGrainedFP8) holds 128x128-block FP8 weights only: scheme fp8-block "
                 "(quantize.scheme is \"" + scheme.name + "\"); use \"compressed-tensors\" or \"auto\"", c.format);
  c.max_shard_bytes = r.int_at_least("output.max_shard_bytes", 1 << 20);
  c.reload = r.boolean("output.reload");
  return c;
}

}  // namespace anvil::quantize
