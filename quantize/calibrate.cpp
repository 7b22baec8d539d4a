// Layer-by-layer quantization (quantize/calibrate.h): the shard-at-a-time source, the observers that watch each
// Linear's inputs, the per-scheme dispatch of a weight's quantization, and the loop over decoder layers.
#include "quantize/calibrate.h"

#include "anvil/io/fs.h"
#include "anvil/model/moe.h"
#include "anvil/model/transformer.h"
#include "quantize/gptq.h"
#include "quantize/smoothquant.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <regex>
#include <stdexcept>

namespace anvil::quantize {

// ---- the source ---------------------------------------------------------------------------------------------------

SourceModel::SourceModel(const std::string& dir) : dir_(dir) {
  const std::string single = io::join_path(dir, "model.safetensors");
  const std::string index = io::join_path(dir, "model.safetensors.index.json");
  if (io::is_regular_file(single)) {
    auto f = std::make_shared<io::SafetensorsFile>(single);
    for (const auto& e : f->entries()) {
      keys_.push_back(e.name);
      shard_of_[e.name] = single;
      bytes_ += int64_t(e.nbytes());
    }
    open_.emplace_back(single, f);
  } else if (io::is_regular_file(index)) {
    const auto j = nlohmann::json::parse(io::read_text_file(index));
    if (!j.contains("weight_map") || !j["weight_map"].is_object())
      throw std::runtime_error(index + ": no \"weight_map\" object");
    std::map<std::string, bool> files;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos) throw std::runtime_error(index + ": shard '" + file + "' is not in " + dir);
      keys_.push_back(it.key());
      shard_of_[it.key()] = io::join_path(dir, file);
      files[io::join_path(dir, file)] = true;
    }
    for (const auto& [file, unused] : files) {  // sizes: one shard mapped at a time
      io::SafetensorsFile f(file);
      for (const auto& e : f.entries()) bytes_ += int64_t(e.nbytes());
    }
  } else {
    throw std::runtime_error("config key model.path: " + dir + " holds neither model.safetensors nor model.safetensors.index.json");
  }
  std::sort(keys_.begin(), keys_.end());
}

at::Tensor SourceModel::tensor(const std::string& name) {
  auto where = shard_of_.find(name);
  if (where == shard_of_.end()) throw std::runtime_error(dir_ + ": the checkpoint has no tensor '" + name + "'");
  for (size_t i = 0; i < open_.size(); ++i) {
    if (open_[i].first != where->second) continue;
    auto hit = open_[i];
    open_.erase(open_.begin() + long(i));
    open_.push_back(hit);
    return hit.second->tensor(name);
  }
  open_.emplace_back(where->second, std::make_shared<io::SafetensorsFile>(where->second));
  if (open_.size() > 2) open_.erase(open_.begin());  // views already handed out keep their mapping alive
  return open_.back().second->tensor(name);
}

std::unordered_map<std::string, at::Tensor> SourceModel::with_prefix(const std::string& prefix) {
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& k : keys_)
    if (k.compare(0, prefix.size(), prefix) == 0) out.emplace(k, tensor(k));
  return out;
}

bool is_ignored(const std::string& module, const std::vector<std::string>& patterns) {
  for (const auto& p : patterns) {
    if (p.rfind("re:", 0) == 0) {  // Python's re.match, as compressed-tensors reads the export's ignore list
      if (std::regex_search(module, std::regex(p.substr(3)), std::regex_constants::match_continuous)) return true;
    } else if (module == p || (module.size() > p.size() && module.compare(module.size() - p.size(), p.size(), p) == 0 &&
                               module[module.size() - p.size() - 1] == '.')) {
      return true;
    }
  }
  return false;
}

namespace {

using Clock = std::chrono::steady_clock;

// Watches one Linear's inputs while the dense layer runs: token count, per-channel max |x| and a sample of rows
// (SmoothQuant's statistics and its alpha search) and, for GPTQ, the Hessian 2 X^T X / n (quantize/gptq.h).
class Observer : public model::LinearAdapter {
 public:
  static constexpr int64_t kSampleRows = 1024;
  Observer(int64_t k, bool hessian, bool sample, at::Device device) : absmax(at::zeros({k}, at::kFloat)), sample_(sample) {
    if (hessian) this->hessian = std::make_unique<HessianAccumulator>(k, device);
  }
  at::Tensor forward(const model::Linear&, const at::Tensor& x, const at::Tensor& base_out) override {
    const auto x2 = x.reshape({-1, x.size(-1)}).to(at::kFloat);  // (T, K)
    tokens += x2.size(0);
    if (absmax.device() != x2.device()) absmax = absmax.to(x2.device());
    absmax = at::maximum(absmax, x2.abs().amax(0));
    if (hessian) hessian->add(x2);
    if (sample_ && sampled_ < kSampleRows) {
      const int64_t take = std::min(kSampleRows - sampled_, x2.size(0));
      samples.push_back(x2.slice(0, 0, take).clone());
      sampled_ += take;
    }
    return base_out;
  }
  int64_t tokens = 0;
  at::Tensor absmax;
  std::unique_ptr<HessianAccumulator> hessian;
  std::vector<at::Tensor> samples;  // (<= kSampleRows in all, K)

 private:
  bool sample_;
  int64_t sampled_ = 0;
};

// The quantized layer's product as the engine computes it: activations quantized by the scheme, weights as exported
// (the dequantized weight sits in the Linear); it also measures the product's SQNR against the dense weight on the
// same inputs.
class QuantizedProduct : public model::LinearAdapter {
 public:
  QuantizedProduct(const Scheme& s, at::Tensor dense) : scheme_(s), dense_(std::move(dense)) {}
  at::Tensor forward(const model::Linear& base, const at::Tensor& x, const at::Tensor&) override {
    auto y = at::linear(fake_quantize_activations(scheme_, x), base.weight, base.bias);
    auto ref = at::linear(x, dense_, base.bias);
    signal += ref.square().sum(at::kFloat).item<double>();  // fp32 sums: a report figure, not a test oracle
    noise += (ref - y).square().sum(at::kFloat).item<double>();
    return y;
  }
  double sqnr_db() const { return noise > 0 ? 10.0 * std::log10(signal / noise) : INFINITY; }

 private:
  const Scheme& scheme_;
  at::Tensor dense_;
  double signal = 0, noise = 0;
};

// The one place a weight's quantization is chosen by the scheme's algorithm and export.
// SmoothQuant has already moved the activation ranges into the weights (smooth_layer), so w8a8 is RTN here.
// - GPTQ: quantize/gptq.h (llm-compressor's GPTQ, scales fixed by its observer in the model dtype).
// - Round to nearest for a compressed-tensors export: llm-compressor's own, through the core (model::ct): the
//   min-max observer in the weight's dtype (a bf16 model gets bf16 scales, which is what llm-compressor writes and
//   what transformers and vLLM load) and compress against that rounded scale, so the export is bit-equal to
//   llm-compressor's for any model dtype (int8: amax / 127.5, as its observer; not the ops' amax / 127).
// - Round to nearest for FineGrainedFP8: the core ops (fp32 weight_scale_inv, as DeepSeek-V3 and transformers'
//   FP8Linear hold it).
QuantizedWeight quantize_weight(const StreamOptions& o, const std::string& module, const at::Tensor& w,
                                const Observer* observed, bool* rtn_fallback) {
  const Scheme& s = *o.scheme;
  QuantizedWeight q;
  if (s.algorithm == "gptq") {
    GptqOptions g;
    g.bits = weight_bits(s), g.group_size = o.group_size, g.act_order = o.act_order, g.dampening = o.dampening;
    g.scale_dtype = o.dtype, g.symmetric = o.symmetric;
    TORCH_CHECK(observed && observed->hessian, module, ": GPTQ needs calibration (data.calib)");
    const GptqResult r = gptq_quantize(w, observed->hessian->hessian(), g);
    if (rtn_fallback) *rtn_fallback = r.rtn_fallback;
    q.q = r.q, q.scale = r.scale.contiguous(), q.group_size = o.group_size;
    if (r.zero_point.defined()) q.zero_point = r.zero_point.contiguous();
  } else if (o.format == "compressed-tensors") {
    const auto cts = ct_scheme(s, o.group_size, false, o.symmetric);
    const auto qp = model::ct::observe_weight(w, *cts.weights, module);
    q.q = model::ct::compress_module(w, qp.scale, qp.zero_point, cts, "naive-quantized", module).at("weight");  // (N, K) fp8 / int8
    q.scale = qp.scale, q.zero_point = qp.zero_point, q.group_size = s.granularity == "group" ? o.group_size : 0;
  } else {
    q = quantize_rtn(s, w);
  }
  if (!at::isfinite(q.scale).all().item<bool>() || !(q.scale > 0).all().item<bool>())
    throw std::runtime_error(module + ": a quantization scale is zero or NaN; refusing to export it");
  return q;
}

// SmoothQuant (w8a8-int8): for each norm and the Linears it feeds (q/k/v after input_layernorm, gate/up after
// post_attention_layernorm in dense MLPs), s from the calibration statistics and alpha (given, or searched on the
// sampled rows), folded into the norm's weight and the consumers' columns. Returns the alpha of each group.
std::vector<std::pair<std::string, double>> smooth_layer(model::DecoderLayer& layer, const std::string& prefix,
                                                         const std::map<std::string, Observer*>& observed,
                                                         const std::map<std::string, std::shared_ptr<model::Linear>>& linears,
                                                         double alpha) {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> kGroups = {
      {"input_layernorm", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}},
      {"post_attention_layernorm", {"mlp.gate_proj", "mlp.up_proj"}}};
  std::vector<std::pair<std::string, double>> alphas;
  for (const auto& [norm_name, consumers] : kGroups) {
    std::vector<at::Tensor> weights;
    for (const auto& c : consumers)
      if (observed.count(prefix + c)) weights.push_back(linears.at(prefix + c)->weight);
    if (weights.size() != consumers.size()) continue;  // a consumer kept dense, or not this architecture
    std::shared_ptr<model::RmsNorm> norm;
    for (const auto& ch : layer.named_children())
      if (ch.key() == norm_name) norm = std::dynamic_pointer_cast<model::RmsNorm>(ch.value());
    if (!norm) continue;
    const Observer* first = observed.at(prefix + consumers[0]);
    double a = alpha;
    if (a < 0) {
      std::vector<double> grid;
      for (int i = 0; i <= 10; ++i) grid.push_back(0.1 * i);
      a = search_smoothquant_alpha(at::cat(first->samples).to(weights[0].device()), weights, grid, first->absmax).alpha;
    }
    const auto scales = smoothquant_scales(first->absmax.to(weights[0].device()), consumer_weight_absmax(weights), a);
    const auto smoothed = apply_smoothing(norm->weight, weights, scales);
    norm->weight.copy_(smoothed.norm_weight);
    for (size_t i = 0; i < consumers.size(); ++i) linears.at(prefix + consumers[i])->weight.copy_(smoothed.weights[i]);
    alphas.emplace_back(prefix + norm_name, a);
  }
  return alphas;
}

template <class T>
std::shared_ptr<T> child(torch::nn::Module& m, const std::string& name) {
  for (const auto& c : m.named_children())
    if (c.key() == name) return std::dynamic_pointer_cast<T>(c.value());
  return nullptr;
}

// The observing pass of a MoE layer: attention as the layer runs it, then every expert on every token.
void observe_moe_layer(model::DecoderLayer& layer, const std::string& moe_name, const at::Tensor& x,
                       const model::DecoderLayerInputs& in, std::vector<ExpertTokens>& experts) {
  auto in_norm = child<model::RmsNorm>(layer, "input_layernorm");
  auto post_norm = child<model::RmsNorm>(layer, "post_attention_layernorm");
  auto gqa = child<model::GqaAttention>(layer, "self_attn");
  auto mla = child<model::MlaAttention>(layer, "self_attn");
  auto moe = child<model::MoeBlock>(layer, moe_name);
  const auto n1 = in_norm->forward(x);
  const auto h = x + (mla ? mla->forward(n1, in.cos, in.sin, in.mask, nullptr) : gqa->forward(n1, in.cos, in.sin, in.mask, nullptr));
  const auto flat = post_norm->forward(h).reshape({-1, x.size(-1)});  // (T, H)
  auto [weights, indices] = moe->route(flat);
  const auto routed = at::bincount(indices.flatten().to(at::kLong).cpu(), {}, int64_t(experts.size()));
  for (const auto& m : moe->named_modules("", /*include_self=*/false)) {
    auto mlp = std::dynamic_pointer_cast<model::SwiGluMlp>(m.value());
    if (!mlp) continue;
    mlp->forward(flat);  // every token to every expert (and the shared experts)
    static const std::regex kExpert(R"(^experts\.(\d+)$)");
    std::smatch match;
    if (std::regex_match(m.key(), match, kExpert)) experts.at(std::stoul(match[1])).calibrated += flat.size(0);
  }
  for (size_t e = 0; e < experts.size(); ++e) experts[e].routed += routed[long(e)].item<int64_t>();
}

}  // namespace

StreamResult quantize_streaming(const model::ModelConfig& config, SourceModel& src, const StreamOptions& o,
                                const std::string& dir, const std::function<void(const std::string&)>& progress) {
  at::NoGradGuard no_grad;
  const auto start = Clock::now();
  const Scheme& scheme = *o.scheme;
  const auto options = at::TensorOptions().dtype(o.dtype).device(o.device);
  StreamResult result;
  result.bytes_before = src.bytes();
  ShardedWriter writer(dir, o.max_shard_bytes);
  const bool calibrate = !o.calib_rows.empty();

  // ---- embeddings: the first layer's inputs ----
  std::vector<at::Tensor> hidden;  // (B, S, H) per calibration batch, on the host between layers
  {
    const auto embed = src.tensor("model.embed_tokens.weight").to(o.dtype);  // (V, H); its shard unmapped after
    writer.add("model.embed_tokens.weight", embed);
    for (size_t i = 0; i < o.calib_rows.size(); i += size_t(o.calib_batch)) {
      std::vector<at::Tensor> rows(o.calib_rows.begin() + long(i),
                                   o.calib_rows.begin() + long(std::min(o.calib_rows.size(), i + size_t(o.calib_batch))));
      hidden.push_back(at::embedding(embed, at::stack(rows)));
    }
  }

  for (int64_t li = 0; li < config.num_hidden_layers; ++li) {
    const auto layer_start = Clock::now();
    const std::string prefix = "model.layers." + std::to_string(li) + ".";
    auto layer = model::load_decoder_layer(config, li, src.with_prefix(prefix), options);
    const bool moe = config.is_moe_layer(li);
    const std::string moe_name = config.family == model::ModelFamily::kMixtral ? "block_sparse_moe" : "mlp";
    std::vector<ExpertTokens> experts;
    if (moe) {
      for (int64_t e = 0; e < config.num_experts; ++e) experts.push_back({li, e, 0, 0});
      result.kept.push_back(prefix + moe_name + ".gate");  // the router stays in high precision
    }

    // Which Linears are quantized.
    struct Target {
      std::string name;
      std::shared_ptr<model::Linear> linear;
      std::shared_ptr<Observer> observer;
      size_t report;
    };
    std::vector<Target> targets;
    for (auto& [rel, linear] : model::named_linears(*layer)) {
      LinearReport rep;
      rep.name = prefix + rel;
      rep.out_features = linear->weight.size(0);
      rep.in_features = linear->weight.size(1);
      const std::string misfit = shape_misfit(scheme, rep.out_features, rep.in_features, o.group_size);
      if (moe && rel == moe_name + ".shared_expert_gate") {
        // Qwen2-MoE's (1, H) shared-expert gate is a router too: vLLM runs it as a plain unquantized Linear
        // (llm-compressor's Qwen-MoE recipes ignore it), and observe_moe_layer does not run it.
        rep.kept_because = "a router (Qwen2-MoE's shared-expert gate) stays in high precision";
      } else if (is_ignored(rep.name, o.ignore)) {
        rep.kept_because = "quantize.ignore";
      } else if (!misfit.empty()) {
        if (o.misfit == "error")
          throw std::invalid_argument(rep.name + " (" + std::to_string(rep.out_features) + ", " + std::to_string(rep.in_features) +
                                      ") does not fit quantize.scheme " + scheme.name + ": " + misfit +
                                      "; add it to quantize.ignore or set quantize.misfit \"keep\" to leave such layers in "
                                      "high precision");
        rep.kept_because = misfit;
      } else {
        rep.quantized = true;
      }
      if (!rep.quantized) result.kept.push_back(rep.name);
      result.linears.push_back(rep);
      if (rep.quantized) targets.push_back({rep.name, linear, nullptr, result.linears.size() - 1});
    }

    // ---- observe the dense layer on the calibration inputs ----
    if (calibrate) {
      for (auto& t : targets) {
        t.observer = std::make_shared<Observer>(t.linear->weight.size(1), scheme.algorithm == "gptq",
                                                 scheme.algorithm == "smoothquant", o.device);
        t.linear->adapter = t.observer;
      }
      for (auto& h : hidden) {
        const auto x = h.to(o.device);
        const auto positions = at::arange(x.size(1), options.dtype(at::kLong)).unsqueeze(0).expand({x.size(0), x.size(1)});
        const auto in = model::decoder_layer_inputs(config, li, positions, o.dtype);
        if (moe) observe_moe_layer(*layer, moe_name, x, in, experts);
        else layer->forward(x, in.cos, in.sin, in.mask, nullptr);
      }
      for (auto& t : targets) {
        t.linear->adapter = nullptr;
        if (t.observer->tokens == 0)
          throw std::runtime_error(t.name + " saw no calibration token: it would be exported uncalibrated");
        if (!at::isfinite(t.observer->absmax).all().item<bool>() ||
            (t.observer->hessian && !at::isfinite(t.observer->hessian->hessian()).all().item<bool>()))
          throw std::runtime_error(t.name + ": its calibration inputs hold NaN or inf");
        result.linears[t.report].tokens = t.observer->tokens;
      }
      for (const auto& e : experts)
        if (e.calibrated == 0) throw std::runtime_error(prefix + " expert " + std::to_string(e.expert) + " was not calibrated");
    }

    // ---- SmoothQuant (w8a8-int8): activation ranges moved into the weights and the norms ----
    if (scheme.algorithm == "smoothquant") {
      std::map<std::string, Observer*> observed;
      std::map<std::string, std::shared_ptr<model::Linear>> linears;
      for (auto& t : targets) observed[t.name] = t.observer.get(), linears[t.name] = t.linear;
      for (const auto& [norm, alpha] : smooth_layer(*layer, prefix, observed, linears, o.smoothquant_alpha))
        result.smoothing.emplace_back(norm, alpha);
    }

    // ---- quantize; the Linears hold the weights as exported from here on ----
    std::unordered_map<std::string, QuantizedWeight> quantized;
    double worst = INFINITY;
    // The quantized tensors go to the host at once (the writer copies them there anyway). Calibrating, the Linear
    // then computes with its dequantized weight to make the next layer's inputs; without calibration nothing runs
    // the layer again, so each dense weight is released as soon as it is quantized and the device holds at most
    // the layer plus one weight's quantization (bench/quantize_model's peak).
    for (auto& t : targets) {
      const auto dense = calibrate ? t.linear->weight.detach().clone() : t.linear->weight.detach();
      bool fallback = false;
      auto q = quantize_weight(o, t.name, dense, t.observer.get(), &fallback);
      if (fallback) result.rtn_fallbacks.push_back(t.name);
      {
        const auto deq = q.dequantize(o.dtype);
        result.linears[t.report].weight_sqnr_db = sqnr_db(dense, deq);
        if (calibrate) t.linear->weight.copy_(deq);
      }
      worst = std::min(worst, result.linears[t.report].weight_sqnr_db);
      if (calibrate) t.linear->adapter = std::make_shared<QuantizedProduct>(scheme, dense);
      else t.linear->weight.set_data(at::empty({0}, t.linear->weight.options()));
      q.to_host();
      quantized.emplace(t.name, std::move(q));
    }

    // ---- the quantized layer makes the next layer's inputs ----
    if (calibrate) {
      for (auto& h : hidden) {
        const auto x = h.to(o.device);
        const auto positions = at::arange(x.size(1), options.dtype(at::kLong)).unsqueeze(0).expand({x.size(0), x.size(1)});
        const auto in = model::decoder_layer_inputs(config, li, positions, o.dtype);
        h = layer->forward(x, in.cos, in.sin, in.mask, nullptr).to(at::kCPU);
      }
      for (auto& t : targets) {
        result.linears[t.report].output_sqnr_db = std::static_pointer_cast<QuantizedProduct>(t.linear->adapter)->sqnr_db();
        t.linear->adapter = nullptr;
      }
    }

    // ---- write the layer: quantized modules in the export's layout, the rest as they are ----
    std::vector<std::pair<std::string, at::Tensor>> state;
    for (const auto& p : layer->named_parameters(/*recurse=*/true)) state.emplace_back(prefix + p.key(), p.value());
    for (const auto& b : layer->named_buffers(/*recurse=*/true)) state.emplace_back(prefix + b.key(), b.value());
    for (const auto& [name, t] : state) {
      const std::string module = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 ? name.substr(0, name.size() - 7) : "";
      auto it = module.empty() ? quantized.end() : quantized.find(module);
      if (it == quantized.end()) {
        writer.add(name, t);
        continue;
      }
      const auto tensors = module_tensors(o.format, scheme, module, it->second);
      check_module_keys(o.format, scheme, module, o.group_size, tensors, o.symmetric);
      for (const auto& [n, x] : tensors) writer.add(n, x);
    }
    result.experts.insert(result.experts.end(), experts.begin(), experts.end());

    const double secs = std::chrono::duration<double>(Clock::now() - layer_start).count();
    const double total = std::chrono::duration<double>(Clock::now() - start).count();
    char line[256];
    std::snprintf(line, sizeof line, "layer %lld/%lld  %zu linears quantized  worst weight SQNR %.1f dB  %.1f s  ETA %.0f s",
                  static_cast<long long>(li + 1), static_cast<long long>(config.num_hidden_layers), targets.size(), worst,
                  secs, total / double(li + 1) * double(config.num_hidden_layers - li - 1));
    progress(line);
  }

  writer.add("model.norm.weight", src.tensor("model.norm.weight").to(o.dtype));
  if (!config.tie_word_embeddings) writer.add("lm_head.weight", src.tensor("lm_head.weight").to(o.dtype));
  result.kept.push_back("lm_head");
  writer.finish();
  result.bytes_after = writer.total_bytes();
  result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return result;
}

}  // namespace anvil::quantize
