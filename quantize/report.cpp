// The report of `anvil quantize` (quantize/report.h): data windows, the export read back for evaluation, the
// paired perplexity / KL pass, report.json and its printed table.
#include "quantize/report.h"

#include "anvil/data/batches.h"
#include "anvil/data/dataset.h"
#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/compressed_tensors.h"
#include "anvil/ops.h"
#include "quantize/export.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <sstream>
#include <stdexcept>

namespace anvil::quantize {

using nlohmann::json;

std::vector<at::Tensor> read_token_windows(const std::string& path, const data::Tokenizer& tok, int64_t seq_len,
                                           int64_t max_windows, int64_t vocab_size, const std::string& key) {
  if (!io::is_regular_file(path))
    throw std::invalid_argument("config key " + key + ": " + path + " is not a file");
  std::istringstream lines(io::read_text_file(path, uint64_t(1) << 34));
  data::ReadOptions options;
  options.add_eos = true;
  options.vocab_size = vocab_size;
  std::vector<int64_t> stream;
  std::string line;
  int64_t n = 0;
  const uint64_t want = max_windows > 0 ? uint64_t(max_windows * seq_len) : UINT64_MAX;
  while (std::getline(lines, line) && stream.size() < want) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto ex = data::read_example_line(line, &tok, options, path + ":" + std::to_string(n));  // text or input_ids
    stream.insert(stream.end(), ex.ids.begin(), ex.ids.end());
  }
  std::vector<at::Tensor> windows;
  for (size_t i = 0; i + size_t(seq_len) <= stream.size(); i += size_t(seq_len)) {
    if (max_windows > 0 && int64_t(windows.size()) == max_windows) break;
    windows.push_back(at::tensor(std::vector<int64_t>(stream.begin() + long(i), stream.begin() + long(i) + seq_len), at::kLong));
  }
  if (windows.empty())
    throw std::invalid_argument("config key " + key + ": " + path + " has no usable rows: its " + std::to_string(stream.size()) +
                                " tokens make no window of " + std::to_string(seq_len) + " (lower the *_seq_len key or add text)");
  return windows;
}

namespace {

// The scheme's activation quantization in front of a Linear whose weight is already the exported one.
class ActivationQuantization : public model::LinearAdapter {
 public:
  explicit ActivationQuantization(const Scheme& s) : scheme_(s) {}
  at::Tensor forward(const model::Linear& base, const at::Tensor& x, const at::Tensor&) override {
    return at::linear(fake_quantize_activations(scheme_, x), base.weight, base.bias);
  }

 private:
  const Scheme& scheme_;
};

// One quantized module of the export, dequantized as its loader does (compressed-tensors: model::ct's
// decompression, bit-equal to the package's); undefined when the export keeps it dense.
at::Tensor dequantize_module(const io::Checkpoint& ck, const model::ct::Config* ct_config, const std::string& module,
                             at::ScalarType dtype) {
  const std::string w = module + ".weight";
  if (!ct_config) {  // FineGrainedFP8
    if (!ck.contains(w + "_scale_inv")) return {};
    return anvil::ops::dequantize_fp8(ck.tensor(w), ck.tensor(w + "_scale_inv").to(at::kFloat), "block128x128", dtype);
  }
  const auto found = model::ct::scheme_for(*ct_config, module, {"Linear"});
  if (!found) return {};
  model::ct::ModuleTensors local;
  for (const char* key : {"weight", "weight_scale", "weight_zero_point", "weight_packed", "weight_shape", "weight_g_idx",
                          "input_scale", "input_zero_point"})
    if (ck.contains(module + "." + key)) local[key] = ck.tensor(module + "." + key);
  return model::ct::dequantize_module(local, *found->second, model::ct::effective_format(*ct_config, *found->second),
                                      dtype, module);
}

}  // namespace

std::shared_ptr<model::CausalLM> load_export_for_eval(const std::string& source_dir, const std::string& export_dir,
                                                      const std::string& format, const Scheme& scheme,
                                                      at::ScalarType dtype, at::Device device) {
  at::NoGradGuard no_grad;
  auto m = model::load_causal_lm(source_dir, dtype, device, "dense");
  const io::Checkpoint ck(export_dir);
  // The config as written: the export is read back by what it says, not by what the recipe meant to write.
  const auto config = nlohmann::json::parse(io::read_text_file(io::join_path(export_dir, "config.json")));
  std::optional<model::ct::Config> ct_config;
  if (format == "compressed-tensors") ct_config = model::ct::parse_quantization_config(config.at("quantization_config"));
  // Every tensor the export holds as it is (norms SmoothQuant rescaled, embeddings, biases) comes from the export.
  for (auto& [name, t] : m->state_tensors())
    if (ck.contains(name) && at::isFloatingType(ck.tensor(name).scalar_type()) &&
        ck.tensor(name).scalar_type() != at::kFloat8_e4m3fn && ck.tensor(name).sizes() == t.sizes())
      t.copy_(ck.tensor(name));
  int64_t n = 0;
  for (auto& [name, linear] : model::named_linears(*m)) {
    const auto w = dequantize_module(ck, ct_config ? &*ct_config : nullptr, name, dtype);
    if (!w.defined()) continue;
    linear->weight.copy_(w);
    if (!scheme.activations.empty()) linear->adapter = std::make_shared<ActivationQuantization>(scheme);
    ++n;
  }
  if (n == 0) throw std::runtime_error(export_dir + ": the export holds no quantized module");
  return m;
}

double EvalFigures::ppl_before() const { return std::exp(nll_before); }
double EvalFigures::ppl_after() const { return std::exp(nll_after); }
double EvalFigures::ppl_increase_pct() const { return 100.0 * (ppl_after() / ppl_before() - 1.0); }

EvalFigures evaluate_pair(model::CausalLM& before, model::CausalLM& after, const std::vector<at::Tensor>& windows) {
  at::NoGradGuard no_grad;
  EvalFigures f;
  double nll_b = 0, nll_a = 0, kl = 0;
  for (const auto& w : windows) {
    const auto ids = w.unsqueeze(0).to(before.device());                       // (1, S)
    const auto lb = at::log_softmax(before.forward(ids).to(at::kFloat)[0], -1);  // (S, V)
    const auto la = at::log_softmax(after.forward(ids).to(at::kFloat)[0], -1);
    const auto targets = ids[0].slice(0, 1).unsqueeze(1);                      // (S-1, 1)
    nll_b -= lb.slice(0, 0, -1).gather(1, targets).sum().item<double>();
    nll_a -= la.slice(0, 0, -1).gather(1, targets).sum().item<double>();
    const auto pb = lb.slice(0, 0, -1), pa = la.slice(0, 0, -1);  // the positions with a next token
    kl += (pb.exp() * (pb - pa)).sum().item<double>();
    f.tokens += w.size(0) - 1;
  }
  if (f.tokens > 0) {
    f.nll_before = nll_b / double(f.tokens);
    f.nll_after = nll_a / double(f.tokens);
    f.kl = kl / double(f.tokens);
  }
  return f;
}

json report_json(const std::string& scheme, const std::string& format, const StreamResult& r, const EvalFigures* eval) {
  json layers = json::array(), kept = json::array(), experts = json::array();
  std::vector<const LinearReport*> sorted;
  for (const auto& l : r.linears)
    if (l.quantized) sorted.push_back(&l);
    else kept.push_back({{"name", l.name}, {"reason", l.kept_because}});
  const bool calibrated = !sorted.empty() && sorted[0]->tokens > 0;
  std::stable_sort(sorted.begin(), sorted.end(), [&](auto* a, auto* b) {
    return calibrated ? a->output_sqnr_db < b->output_sqnr_db : a->weight_sqnr_db < b->weight_sqnr_db;
  });
  auto finite = [](double x) { return std::isfinite(x) ? json(x) : json(nullptr); };
  for (const auto* l : sorted)
    layers.push_back({{"name", l->name},
                      {"shape", {l->out_features, l->in_features}},
                      {"weight_sqnr_db", finite(l->weight_sqnr_db)},
                      {"output_sqnr_db", calibrated ? finite(l->output_sqnr_db) : json(nullptr)},
                      {"calibration_tokens", l->tokens}});
  for (const auto& e : r.experts)
    experts.push_back({{"layer", e.layer}, {"expert", e.expert}, {"calibrated_tokens", e.calibrated}, {"routed_tokens", e.routed}});
  json j = {{"scheme", scheme},
            {"format", format},
            {"seconds", r.seconds},
            {"bytes_before", r.bytes_before},
            {"bytes_after", r.bytes_after},
            {"size_ratio", r.bytes_before > 0 ? double(r.bytes_after) / double(r.bytes_before) : 0.0},
            {"layers", layers},
            {"kept_high_precision", kept},
            {"experts", experts},
            {"smoothquant", json::array()},
            {"gptq_rtn_fallbacks", r.rtn_fallbacks}};
  for (const auto& [norm, alpha] : r.smoothing) j["smoothquant"].push_back({{"norm", norm}, {"alpha", alpha}});
  if (eval)
    j["eval"] = {{"tokens", eval->tokens},         {"ppl_before", eval->ppl_before()}, {"ppl_after", eval->ppl_after()},
                 {"ppl_increase_pct", eval->ppl_increase_pct()}, {"kl_mean", eval->kl}};
  return j;
}

std::string format_report(const json& report, size_t rows) {
  std::ostringstream out;
  char line[256];
  const auto& layers = report.at("layers");
  out << "\nper-layer SQNR, worst first (" << layers.size() << " quantized linears):\n";
  std::snprintf(line, sizeof line, "  %-48s %14s %12s %12s\n", "linear", "shape", "weight dB", "output dB");
  out << line;
  for (size_t i = 0; i < layers.size() && i < rows; ++i) {
    const auto& l = layers[i];
    const std::string shape = std::to_string(l["shape"][0].get<int64_t>()) + "x" + std::to_string(l["shape"][1].get<int64_t>());
    auto db = [](const json& x) { return x.is_null() ? std::string("-") : std::to_string(x.get<double>()).substr(0, 6); };
    std::snprintf(line, sizeof line, "  %-48s %14s %12s %12s\n", l["name"].get<std::string>().c_str(), shape.c_str(),
                  db(l["weight_sqnr_db"]).c_str(), db(l["output_sqnr_db"]).c_str());
    out << line;
  }
  if (layers.size() > rows) out << "  ... (" << layers.size() - rows << " more in report.json)\n";
  if (!report.at("kept_high_precision").empty())
    out << "kept in high precision: " << report.at("kept_high_precision").size() << " linears (report.json lists them)\n";
  const double before = report.at("bytes_before").get<double>() / 1e6, after = report.at("bytes_after").get<double>() / 1e6;
  std::snprintf(line, sizeof line, "size: %.2f MB -> %.2f MB (%.3fx)\n", before, after, after / before);
  out << line;
  if (report.contains("eval")) {
    const auto& e = report["eval"];
    std::snprintf(line, sizeof line, "perplexity on %lld held-out tokens: %.4f -> %.4f (%+.3f%%), KL to the unquantized model %.5f nats/token\n",
                  static_cast<long long>(e["tokens"].get<int64_t>()), e["ppl_before"].get<double>(),
                  e["ppl_after"].get<double>(), e["ppl_increase_pct"].get<double>(), e["kl_mean"].get<double>());
    out << line;
  }
  return out.str();
}

}  // namespace anvil::quantize
