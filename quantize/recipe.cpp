// The `anvil quantize` recipe (quantize/recipe.h), top to bottom: the source model's config and the scheme; the
// output folder checked (an existing one is replaced only with --overwrite) and its temporary twin made; the
// calibration windows; the model quantized a decoder layer at a time into the twin (quantize/calibrate.h); its
// config.json with the quantization_config of the export, the tokenizer and generation files; the export read
// back and evaluated against the unquantized model (quantize/report.h); report.json; the twin renamed to OUT.
#include "quantize/recipe.h"

#include "anvil/data/tokenizer.h"
#include "anvil/io/fs.h"
#include "anvil/model/transformer.h"
#include "anvil/train/metrics.h"
#include "quantize/calibrate.h"
#include "quantize/export.h"
#include "quantize/gguf.h"
#include "quantize/report.h"
#include "quantize/schemes.h"

#include <iostream>
#include <set>
#include <stdexcept>

namespace anvil::quantize {

namespace {

using nlohmann::json;

// The export's list of Linear modules left in high precision: the user's patterns (compressed-tensors reads
// "re:" regexes; FineGrainedFP8 does not, so it gets the names they matched) and every module kept.
std::vector<std::string> export_ignore(const std::string& format, const RecipeConfig& c, const StreamResult& r) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  auto add = [&](const std::string& s) {
    if (seen.insert(s).second) out.push_back(s);
  };
  if (format == "compressed-tensors")
    for (const auto& p : c.ignore) add(p);
  for (const auto& k : r.kept) add(k);
  return out;
}

at::ScalarType choose_dtype(const RecipeConfig& c, const model::ModelConfig& config) {
  if (c.dtype != "auto") return model::dtype_from_name(c.dtype);
  if (config.fp8_checkpoint) return at::kBFloat16;
  if (!config.dtype.empty() && config.dtype != "auto") return model::dtype_from_name(config.dtype);
  return at::kFloat;
}

}  // namespace

int run_recipe(const RecipeConfig& c, const train::RunOptions& options) {
  // ---- the source, the scheme, the output folder ----
  std::string source;
  try {
    source = io::resolve_model_path(c.model_path);
  } catch (const std::exception& e) {
    throw std::invalid_argument("config key model.path: " + std::string(e.what()));
  }
  const model::ModelConfig config = model::load_model_config(source);
  const Scheme& scheme = find_scheme(c.scheme);
  if (is_gguf_scheme(scheme)) {  // one .gguf file, no calibration stream (quantize/gguf.h)
    if (io::path_exists(c.out) && !c.overwrite)
      throw std::invalid_argument("config key output.dir: " + c.out + " exists; pass --overwrite (output.overwrite) to replace it");
    return run_gguf_recipe(c, options, source, config, scheme);
  }
  const std::string format = export_format(c.format, scheme);
  const at::ScalarType dtype = choose_dtype(c, config);
  const at::Device device = model::parse_device(c.device, "config key model.device");
  if (io::path_exists(c.out) && !c.overwrite)
    throw std::invalid_argument("config key output.dir: " + c.out + " exists; pass --overwrite (output.overwrite) to replace it");
  if (io::real_path(c.out) == io::real_path(source))
    throw std::invalid_argument("config key output.dir: " + c.out + " is the source model's folder (model.path)");

  // ---- calibration and evaluation data ----
  std::unique_ptr<data::Tokenizer> tok;
  if (!c.calib.empty() || !c.eval.empty()) tok = data::load_tokenizer(source);
  StreamOptions so;
  so.scheme = &scheme, so.format = format, so.ignore = c.ignore, so.misfit = c.misfit, so.group_size = c.group_size;
  so.symmetric = c.symmetric;
  so.act_order = c.act_order, so.dampening = c.dampening, so.smoothquant_alpha = c.smoothquant_alpha;
  so.dtype = dtype, so.device = device, so.calib_batch = c.calib_batch, so.max_shard_bytes = c.max_shard_bytes;
  if (!c.calib.empty())
    so.calib_rows = read_token_windows(c.calib, *tok, c.calib_seq_len, c.calib_samples, config.vocab_size, "data.calib");
  std::vector<at::Tensor> eval_windows;
  if (!c.eval.empty())
    eval_windows = read_token_windows(c.eval, *tok, c.eval_seq_len, c.eval_max_tokens / c.eval_seq_len, config.vocab_size,
                                      "data.eval");
  std::cerr << "quantize: " << config.architecture << ", " << config.num_hidden_layers << " layers ("
            << model::dtype_name(dtype) << ", " << device.str() << "), scheme " << scheme.name << " -> " << format
            << "; " << so.calib_rows.size() << " calibration windows of " << c.calib_seq_len << " tokens, "
            << eval_windows.size() << " evaluation windows\n";
  if (options.dry_run) {
    std::cout << "dry run: " << scheme.name << " (" << scheme.summary << "), export " << format << " into " << c.out << "\n";
    return train::kExitOk;
  }

  // ---- quantize into OUT.tmp, a layer at a time ----
  const std::string tmp = temporary_dir(c.out);
  io::remove_tree(tmp);  // a run killed before its rename
  io::make_directories(tmp);
  SourceModel src(source);
  StreamResult result;
  try {
    result = quantize_streaming(config, src, so, tmp, [](const std::string& line) { std::cerr << line << "\n"; });
  } catch (...) {
    io::remove_tree(tmp);  // a refused layer leaves nothing behind (a kill's leftover is removed by the next run)
    throw;
  }
  const double peak_gib = train::peak_memory_gib(device);  // quantization's peak, before the evaluation's

  // ---- config.json, tokenizer and generation files ----
  json cj = json::parse(config.json);
  cj["dtype"] = model::dtype_name(dtype);
  if (cj.contains("torch_dtype")) cj["torch_dtype"] = model::dtype_name(dtype);
  cj["quantization_config"] = quantization_config(format, scheme, export_ignore(format, c, result), c.group_size, c.act_order,
                                                 c.symmetric);
  io::write_text_atomically(io::join_path(tmp, "config.json"), cj.dump(2) + "\n");
  io::copy_model_side_files(source, tmp);

  // ---- the export read back and evaluated; the report ----
  EvalFigures figures;
  const bool evaluate = c.reload && !eval_windows.empty();
  if (evaluate) {
    std::cerr << "evaluating the export against the unquantized model on " << eval_windows.size() << " windows\n";
    auto before = model::load_causal_lm(source, dtype, device, "dense");
    auto after = load_export_for_eval(source, tmp, format, scheme, dtype, device);
    figures = evaluate_pair(*before, *after, eval_windows);
  }
  json report = report_json(scheme.name, format, result, evaluate ? &figures : nullptr);
  report["peak_device_gib"] = peak_gib;
  io::write_text_atomically(io::join_path(tmp, "report.json"), report.dump(2) + "\n");
  std::cout << format_report(report);

  // ---- publish ----
  publish_dir(tmp, c.out, c.overwrite);
  std::cout << "wrote " << c.out << " (" << format << ", " << result.seconds << " s)\n";
  return train::kExitOk;
}

}  // namespace anvil::quantize
