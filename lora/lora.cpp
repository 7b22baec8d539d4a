// LoRA targeting, the adapter's forward pass, attaching and merging (lora/lora.h). Each rule names
// the PEFT 0.21 function it mirrors (peft/tuners/tuners_utils.py, peft/utils/other.py,
// peft/tuners/lora/{layer,dora,variants}.py) so the two can be compared line by line.
#include "lora/lora.h"

#include <ATen/ATen.h>
#include <torch/nn/init.h>

#include <cmath>
#include <regex>
#include <stdexcept>

namespace anvil::lora {

namespace {

const char kFilePrefix[] = "base_model.model.";

// re.fullmatch(pattern, name); std::regex's ECMAScript grammar covers the patterns PEFT configs use
// (alternation, classes, escapes, quantifiers).
bool full_match(const std::string& pattern, const std::string& name) {
  return std::regex_match(name, std::regex(pattern));
}

// PEFT get_pattern_key: the first key with re.match(rf"(.*\.)?({key})$", name).
template <typename T>
const std::pair<std::string, T>* pattern_entry(const std::vector<std::pair<std::string, T>>& patterns,
                                               const std::string& name) {
  for (const auto& entry : patterns)
    if (full_match("(.*\\.)?(" + entry.first + ")", name)) return &entry;
  return nullptr;
}

bool is_floating(at::ScalarType t) { return at::isFloatingType(t); }


}  // namespace

void validate(const LoraConfig& c) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("LoraConfig: " + what); };
  auto check_regex = [&](const std::string& pattern, const std::string& what) {
    try {
      std::regex check(pattern);
    } catch (const std::regex_error& e) {
      fail(what + " \"" + pattern + "\" is not a valid regex: " + e.what());
    }
  };
  if (c.r <= 0) fail("r must be > 0, got " + std::to_string(c.r));
  if (!(c.lora_dropout >= 0.0 && c.lora_dropout < 1.0))
    fail("lora_dropout must be in [0, 1), got " + std::to_string(c.lora_dropout));
  if (c.init != "kaiming" && c.init != "gaussian") fail("init must be \"kaiming\" or \"gaussian\", got \"" + c.init + "\"");
  const auto& t = c.target_modules;
  if (t.kind == TargetModules::Kind::kList && t.names.empty()) fail("target_modules is an empty list");
  if (t.kind == TargetModules::Kind::kRegex) check_regex(t.regex, "target_modules regex");
  for (const auto& [key, rank] : c.rank_pattern) {
    if (rank <= 0) fail("rank_pattern[\"" + key + "\"] must be > 0, got " + std::to_string(rank));
    check_regex(key, "rank_pattern key");
  }
  for (const auto& entry : c.alpha_pattern) check_regex(entry.first, "alpha_pattern key");
}

bool is_target(const LoraConfig& c, const std::string& name, bool is_output_layer) {
  const auto& t = c.target_modules;
  switch (t.kind) {
    case TargetModules::Kind::kAllLinear:
      // _maybe_include_all_linear_layers drops get_output_embeddings() (lm_head).
      return !is_output_layer;
    case TargetModules::Kind::kRegex:
      return full_match(t.regex, name);  // match_target_against_key
    case TargetModules::Kind::kList:
      for (const auto& entry : t.names) {  // check_target_module_exists
        if (name == entry) return true;
        if (name.size() > entry.size() && name.compare(name.size() - entry.size(), entry.size(), entry) == 0 &&
            name[name.size() - entry.size() - 1] == '.')
          return true;
      }
      return false;
  }
  return false;
}

int64_t rank_of(const LoraConfig& c, const std::string& name) {
  auto* e = pattern_entry(c.rank_pattern, name);
  return e ? e->second : c.r;
}

double alpha_of(const LoraConfig& c, const std::string& name) {
  auto* e = pattern_entry(c.alpha_pattern, name);
  return e ? e->second : c.lora_alpha;
}

double scaling_of(const LoraConfig& c, const std::string& name) {  // LoraLayer.update_layer
  const double r = double(rank_of(c, name));
  return alpha_of(c, name) / (c.use_rslora ? std::sqrt(r) : r);
}

// ---- the adapter ---------------------------------------------------------------------------------

at::Tensor LoraAdapter::delta_weight() const { return at::matmul(lora_B, lora_A) * scaling; }  // (out, in)

at::Tensor LoraAdapter::forward(const anvil::model::Linear& base, const at::Tensor& x, const at::Tensor& base_out) {
  // lora.Linear.forward: x cast to the adapter dtype; dropout only while training.
  auto xa = x.to(lora_A.scalar_type());  // (..., in) fp32
  const bool drop = base.is_training() && dropout > 0.0;
  auto xd = drop ? at::dropout(xa, dropout, /*train=*/true) : xa;
  auto lora_out = at::linear(at::linear(xd, lora_A), lora_B);  // (..., out) fp32
  if (!magnitude.defined()) return (base_out + lora_out * scaling).to(base_out.scalar_type());

  // DoraLinearLayer.forward: the row norm of W + s B A, detached (DoRA paper section 4.3).
  auto weight = base.weight.to(xa.scalar_type());  // (out, in)
  auto lora_weight = at::matmul(lora_B, lora_A).detach();
  auto weight_norm = at::linalg_vector_norm(weight + scaling * lora_weight, 2, {1}).detach();  // (out)
  auto mag_norm_scale = (magnitude / weight_norm).view({1, -1});
  at::Tensor base_result;
  if (drop) {
    base_result = at::linear(xd, weight);  // PEFT recomputes W x on the dropped-out input
  } else {
    base_result = base.bias.defined() ? base_out - base.bias : base_out;
  }
  auto dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_out * scaling;
  return (base_out + dora).to(base_out.scalar_type());
}

// ---- attach, enumerate, merge --------------------------------------------------------------------

std::vector<std::pair<std::string, std::shared_ptr<LoraAdapter>>> adapters_of(anvil::model::CausalLM& model) {
  std::vector<std::pair<std::string, std::shared_ptr<LoraAdapter>>> out;
  for (auto& [name, linear] : anvil::model::named_linears(model))
    if (auto a = std::dynamic_pointer_cast<LoraAdapter>(linear->adapter)) out.emplace_back(name, a);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> adapter_state(anvil::model::CausalLM& model, bool use_dora) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, a] : adapters_of(model)) {
    const std::string prefix = kFilePrefix + name;
    out.emplace_back(prefix + ".lora_A.weight", a->lora_A);
    out.emplace_back(prefix + ".lora_B.weight", a->lora_B);
    if (use_dora && a->magnitude.defined()) out.emplace_back(prefix + ".lora_magnitude_vector", a->magnitude);
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> apply_lora(anvil::model::CausalLM& model, const LoraConfig& config,
                                                           uint64_t seed) {
  validate(config);
  auto linears = anvil::model::named_linears(model);
  for (auto& [name, linear] : linears)
    if (linear->adapter) throw std::invalid_argument("apply_lora: module " + name + " already has an adapter");
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  int64_t attached = 0;
  for (auto& [name, linear] : linears) {
    if (!is_target(config, name, name == "lm_head")) continue;
    const int64_t r = rank_of(config, name);
    const int64_t out_f = linear->weight.size(0), in_f = linear->weight.size(1);
    if (!is_floating(linear->weight.scalar_type()))
      throw std::invalid_argument("apply_lora: module " + name + " has a non-floating weight");
    auto adapter = std::make_shared<LoraAdapter>();
    auto cpu = at::TensorOptions().dtype(at::kFloat);
    // reset_lora_parameters: kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)).
    at::Tensor a = at::empty({r, in_f}, cpu);
    if (config.init == "gaussian") {
      a.normal_(0.0, 1.0 / double(r), gen);
    } else {
      const double bound = 1.0 / std::sqrt(double(in_f));
      a.uniform_(-bound, bound, gen);
    }
    adapter->lora_A = a.to(linear->weight.device());
    adapter->lora_B = at::zeros({out_f, r}, cpu.device(linear->weight.device()));
    adapter->scaling = scaling_of(config, name);
    adapter->dropout = config.lora_dropout;
    if (config.use_dora) {  // DoraLinearLayer.update_layer: ||W + s B A||_row with B = 0
      at::NoGradGuard no_grad;  // a leaf of its own, not a function of the (still trainable) weight
      adapter->magnitude = at::linalg_vector_norm(linear->weight.to(at::kFloat), 2, {1});
      adapter->magnitude.requires_grad_(true);
    }
    adapter->lora_A.requires_grad_(true);
    adapter->lora_B.requires_grad_(true);
    linear->adapter = adapter;
    ++attached;
  }
  if (attached == 0)
    throw std::invalid_argument("apply_lora: target_modules matched no Linear module of the model");
  for (auto& p : model.parameters()) p.requires_grad_(false);
  return adapter_state(model, config.use_dora);
}

void merge_adapter(anvil::model::CausalLM& model) {
  at::NoGradGuard no_grad;
  for (auto& [name, linear] : anvil::model::named_linears(model)) {
    auto a = std::dynamic_pointer_cast<LoraAdapter>(linear->adapter);
    if (!a) continue;
    auto& w = linear->weight;                      // (out, in) model dtype
    auto delta = a->delta_weight().to(w.device());  // (out, in) fp32
    if (a->magnitude.defined()) {
      // DoraLinearVariant.merge_unsafe: factor m / ||W + dW||_row on the unmerged W.
      auto merged = w.to(at::kFloat) + delta;
      auto norm = at::linalg_vector_norm(merged, 2, {1});
      auto factor = (a->magnitude / norm).view({-1, 1});
      w.copy_(factor * merged);
    } else {
      w.add_(delta);  // weight.data += delta_weight (computed in fp32, rounded once)
    }
    linear->adapter.reset();
  }
  for (auto& p : model.parameters()) p.requires_grad_(true);
}

}  // namespace anvil::lora
