// LoRA targeting, the adapter's forward pass, attaching and merging (lora/lora.h). Each rule names
// the PEFT 0.21 function it mirrors (peft/tuners/tuners_utils.py, peft/utils/other.py,
// peft/tuners/lora/{layer,dora,variants}.py) so the two can be compared line by line.
#include "lora/lora.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
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

namespace {

// a @ b with an fp32 result (for adapter gradients from half-precision activations): cuBLAS accumulates
// in fp32 and writes fp32, so the gradient is not rounded to bf16 on the way.
at::Tensor mm_fp32(const at::Tensor& a, const at::Tensor& b) {
  if (a.is_cuda() && a.scalar_type() != at::kFloat) return at::mm(a, b, at::kFloat);
  return at::mm(a.to(at::kFloat), b.to(at::kFloat));
}

// The LoRA branch s * (x A^T) B^T of a plain adapter, computed in x's dtype with a hand-written backward.
// Why not the autograd of at::linear: PEFT's path (x cast to the fp32 adapter dtype) keeps an fp32 copy
// of x per adapted module for the backward, and q/k/v (and gate/up) each keep their own although they
// read the same x. Here the saved tensors are x itself (one storage, shared by every module that reads
// it, and by the base layer's own backward) and x A^T (T, r): the memory of the fine-tune's activations
// drops by a third to a half on a Llama. In fp32 (the CPU oracle tests) it computes what PEFT does; in
// bf16 the adapter weights are rounded to bf16 for the forward GEMMs (as Unsloth does), while their
// gradients come out of the GEMMs in fp32.
class LoraBranch : public torch::autograd::Function<LoraBranch> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling) {
    const auto a = lora_A.to(x.scalar_type());                // (r, in)
    const auto b_scaled = (lora_B * scaling).to(x.scalar_type());  // (out, r), s folded in
    const auto xa = at::matmul(x, a.t());                     // (..., r)
    ctx->save_for_backward({x, xa, a, b_scaled});
    ctx->saved_data["scaling"] = scaling;
    return at::matmul(xa, b_scaled.t());  // (..., out)
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& xa = saved[1];
    const auto& a = saved[2];
    const auto& b_scaled = saved[3];
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const int64_t in = x.size(-1), r = a.size(0), out = b_scaled.size(0);
    const auto g = grads[0].reshape({-1, out}).to(x.scalar_type());  // (T, out)
    const auto x2 = x.reshape({-1, in});                             // (T, in)
    const auto gb = at::mm(g, b_scaled);                             // (T, r) = s g B
    // (..., in); not wanted for the first layer's q/k/v, whose input comes from the frozen embedding
    const auto dx = ctx->needs_input_grad(0) ? at::mm(gb, a).view(x.sizes()) : at::Tensor();
    const auto d_a = mm_fp32(gb.t(), x2);                           // (r, in) = s (g B)^T x
    const auto d_b = mm_fp32(g.t(), xa.reshape({-1, r})) * scaling;  // (out, r) = s g^T (x A^T)
    return {dx, d_a, d_b, at::Tensor()};
  }
};

}  // namespace

at::Tensor LoraAdapter::forward(const anvil::model::Linear& base, const at::Tensor& x, const at::Tensor& base_out) {
  const bool drop = base.is_training() && dropout > 0.0;
  if (!magnitude.defined()) {
    // lora.Linear.forward, with the branch in x's dtype (LoraBranch says why); dropout only while training.
    const auto xd = drop ? at::dropout(x, dropout, /*train=*/true) : x;
    return base_out + LoraBranch::apply(xd, lora_A, lora_B, scaling).to(base_out.scalar_type());
  }
  // DoRA: PEFT's path, x cast to the adapter dtype.
  auto xa = x.to(lora_A.scalar_type());  // (..., in) fp32
  auto xd = drop ? at::dropout(xa, dropout, /*train=*/true) : xa;
  auto lora_out = at::linear(at::linear(xd, lora_A), lora_B);  // (..., out) fp32

  // DoraLinearLayer.forward: the row norm of W + s B A, detached (DoRA paper section 4.3).
  auto weight = base.dense_weight(xa.scalar_type());  // (out, in), dequantized over a quantized base
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
    if (linear->weight_format().empty() && !is_floating(linear->weight.scalar_type()))
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
      adapter->magnitude = at::linalg_vector_norm(linear->dense_weight(at::kFloat), 2, {1});
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
    if (!linear->weight_format().empty())
      throw std::invalid_argument("merge_adapter: module " + name + " has a " + linear->weight_format() +
                                  " base weight; merge into a dense base (load the base model without quantization)");
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
