// The gguf-* schemes of `anvil quantize` (quantize/gguf.h): export through anvil::model::export_gguf, read back
// through anvil's GGUF reader, report like the other schemes.
#include "quantize/gguf.h"

#include "anvil/data/gguf_vocab.h"
#include "anvil/data/tokenizer.h"
#include "anvil/io/fs.h"
#include "anvil/io/gguf.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/gguf_export.h"
#include "anvil/model/gguf_model.h"
#include "anvil/model/transformer.h"
#include "quantize/export.h"
#include "quantize/report.h"

#include <iostream>
#include <map>
#include <stdexcept>

namespace anvil::quantize {

namespace {

using nlohmann::json;

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_quantized_type(const std::string& ggml_type) {
  return ggml_type != "F32" && ggml_type != "F16" && ggml_type != "BF16";
}

// Each 2-D weight of the file against the source's: weight SQNR, and whether it was quantized (a row that is not a
// whole number of 32-blocks stays F16). Compared in the file's row order (q/k permuted), one tensor at a time.
std::vector<LinearReport> tensor_reports(const std::string& source, const std::string& gguf_path,
                                         const model::ModelConfig& config) {
  const io::Checkpoint ckpt(source);
  const io::GgufFile f(gguf_path);
  std::vector<LinearReport> out;
  for (const auto& info : f.tensors()) {
    if (info.dims.size() != 2) continue;
    const std::string hf = model::gguf_to_hf_name(info.name);
    if (hf.empty() || !ckpt.contains(hf)) continue;
    at::Tensor ref = ckpt.tensor(hf).to(at::kFloat);  // (out, in)
    if (ends_with(info.name, ".attn_q.weight")) ref = model::gguf_permute_qk(ref, config.num_attention_heads);
    if (ends_with(info.name, ".attn_k.weight")) ref = model::gguf_permute_qk(ref, config.num_key_value_heads);
    const at::Tensor got = f.tensor(info.name);  // (out, in) fp32, dequantized as ggml does
    LinearReport r;
    r.name = hf.substr(0, hf.size() - 7);  // without ".weight"
    r.out_features = ref.size(0), r.in_features = ref.size(1);
    const std::string type = io::ggml_type_name(info.type);
    r.quantized = is_quantized_type(type);
    if (!r.quantized) r.kept_because = type + ": the row of " + std::to_string(r.in_features) + " is not a whole number of 32-blocks";
    r.weight_sqnr_db = sqnr_db(ref, got);
    out.push_back(r);
  }
  return out;
}

}  // namespace

bool is_gguf_scheme(const Scheme& s) { return s.format == "gguf"; }

std::string gguf_export_type(const Scheme& s) {
  TORCH_CHECK(is_gguf_scheme(s), "gguf_export_type: scheme ", s.name, " is not a gguf-* scheme");
  return s.name.substr(5);  // "gguf-"
}

int run_gguf_recipe(const RecipeConfig& c, const train::RunOptions& options, const std::string& source,
                    const model::ModelConfig& config, const Scheme& scheme) {
  // llama-quantize's mixes fix every tensor's type and need no activations: the options that steer the other
  // schemes would be silently ignored, so they are refused.
  if (!c.calib.empty())
    throw std::invalid_argument("config key data.calib: " + scheme.name + " is not calibrated (llama-quantize's "
                                "types without an importance matrix); drop --calib");
  if (c.ignore != std::vector<std::string>{"lm_head"})
    throw std::invalid_argument("config key quantize.ignore: " + scheme.name + " takes llama-quantize's tensor types "
                                "(the output matrix Q6_K or Q8_0, norms F32); it cannot keep other modules dense");
  if (c.format != "auto")
    throw std::invalid_argument("config key output.format: " + scheme.name + " writes GGUF; \"" + c.format +
                                "\" is another format (use \"auto\")");
  const std::string type = gguf_export_type(scheme);
  const bool to_file = ends_with(c.out, ".gguf");
  const at::ScalarType dtype = c.dtype == "auto" ? at::kFloat : model::dtype_from_name(c.dtype);
  const at::Device device = model::parse_device(c.device, "config key model.device");

  std::unique_ptr<data::Tokenizer> tok;
  std::vector<at::Tensor> eval_windows;
  if (!c.eval.empty()) {
    tok = data::load_tokenizer(source);
    eval_windows = read_token_windows(c.eval, *tok, c.eval_seq_len, c.eval_max_tokens / c.eval_seq_len,
                                      config.vocab_size, "data.eval");
  }
  std::cerr << "quantize: " << config.architecture << ", " << config.num_hidden_layers << " layers, scheme "
            << scheme.name << " -> GGUF " << type << (to_file ? " file " : " in folder ") << c.out << "; "
            << eval_windows.size() << " evaluation windows\n";
  if (options.dry_run) {
    std::cout << "dry run: " << scheme.name << " (" << scheme.summary << "), export gguf into " << c.out << "\n";
    return train::kExitOk;
  }

  // ---- the export: one file, written atomically by export_gguf ----
  std::string tmp, gguf_path, report_path;
  if (to_file) {
    gguf_path = c.out;
    report_path = c.out.substr(0, c.out.size() - 5) + ".report.json";
  } else {
    tmp = temporary_dir(c.out);
    io::remove_tree(tmp);  // a run killed before its rename
    io::make_directories(tmp);
    gguf_path = io::join_path(tmp, "model.gguf");
    report_path = io::join_path(tmp, "report.json");
  }
  model::GgufExportOptions o;
  o.type = type;
  o.overwrite = c.overwrite;
  o.tokenizer_metadata = [&](int64_t vocab) { return data::gguf_tokenizer_metadata(source, vocab); };
  model::GgufExportReport exported;
  StreamResult result;
  try {
    exported = model::export_gguf(source, gguf_path, o);
    result.linears = tensor_reports(source, gguf_path, config);
  } catch (...) {
    if (!tmp.empty()) io::remove_tree(tmp);
    throw;
  }
  result.bytes_before = static_cast<int64_t>(exported.source_bytes);
  result.bytes_after = static_cast<int64_t>(exported.bytes);
  result.seconds = exported.seconds;
  for (const auto& l : result.linears)
    if (!l.quantized) result.kept.push_back(l.name);

  // ---- read back through anvil's GGUF loader and evaluated ----
  EvalFigures figures;
  const bool evaluate = c.reload && !eval_windows.empty();
  if (evaluate) {
    std::cerr << "evaluating the GGUF file against the unquantized model on " << eval_windows.size() << " windows\n";
    auto before = model::load_causal_lm(source, dtype, device, "dense");
    auto after = model::load_causal_lm(gguf_path, dtype, device, "dense");
    figures = evaluate_pair(*before, *after, eval_windows);
  }
  json report = report_json(scheme.name, "gguf", result, evaluate ? &figures : nullptr);
  std::map<std::string, std::string> types;  // HF module -> ggml type
  for (const auto& [name, t] : exported.tensor_types) {
    const std::string hf = model::gguf_to_hf_name(name);
    if (!hf.empty()) types[hf.substr(0, hf.size() - 7)] = t;
  }
  for (auto* list : {&report["layers"], &report["kept_high_precision"]})
    for (auto& l : *list)
      if (types.count(l["name"].get<std::string>())) l["ggml_type"] = types[l["name"].get<std::string>()];
  report["gguf"] = {{"file", to_file ? c.out : io::join_path(c.out, "model.gguf")},
                    {"type", type},
                    {"file_type", exported.file_type},
                    {"tensors", exported.tensors},
                    {"tensors_per_type", exported.tensors_per_type}};
  io::write_text_atomically(report_path, report.dump(2) + "\n");
  std::cout << format_report(report);
  if (!to_file) publish_dir(tmp, c.out, c.overwrite);
  std::cout << "wrote " << (to_file ? c.out : io::join_path(c.out, "model.gguf")) << " (GGUF " << type << ", "
            << exported.seconds << " s)\n";
  return train::kExitOk;
}

}  // namespace anvil::quantize
