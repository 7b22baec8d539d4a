// LoRA targeting, the adapter's forward pass, attaching and merging (anvil/lora/lora.h). Each rule names
// the PEFT 0.21 function it mirrors (peft/tuners/tuners_utils.py, peft/utils/other.py,
// peft/tuners/lora/{layer,dora,variants}.py) so the two can be compared line by line. PiSSA (pissa_init)
// replaces the base weight by its residual at attach time; the randomized SVD it may use is a port of
// torch.svd_lowrank, op for op, so the same Gaussian draws give PEFT's factors.
#include "anvil/lora/lora.h"

#include "lora/lora_internal.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/nn/init.h>

#include <ATen/CPUGeneratorImpl.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <tuple>

namespace anvil::lora {

namespace {

const char kFilePrefix[] = "base_model.model.";


bool is_floating(at::ScalarType t) { return at::isFloatingType(t); }



}  // namespace

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

// ---- PiSSA ---------------------------------------------------------------------------------------

namespace {

// torch.svd_lowrank(a, q, niter) (torch/_lowrank.py: Halko et al. 2009, algorithm 5.1 over the basis of
// algorithm 4.4), op for op, so that the same Gaussian draws give the same factors: -> (U (m, q), S (q),
// V (n, q)) with a ~= U diag(S) V^T. The test matrix is drawn on the CPU from `gen` (torch draws it on
// a's device from the default generator) and moved to a's device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_lowrank(const at::Tensor& a_in, int64_t q, int64_t niter,
                                                           at::Generator& gen) {
  const int64_t m = a_in.size(0), n = a_in.size(1);
  const auto a = m < n ? a_in.t() : a_in;  // (M, N) with M >= N
  const auto r = at::randn({a.size(1), q}, gen, at::TensorOptions().dtype(at::kFloat)).to(a.device());  // (N, q)
  auto qr_q = [](const at::Tensor& x) { return std::get<0>(at::linalg_qr(x)); };
  auto basis = qr_q(at::matmul(a, r));  // (M, q) get_approximate_basis
  for (int64_t i = 0; i < niter; ++i) {
    basis = qr_q(at::matmul(a.t(), basis));  // (N, q)
    basis = qr_q(at::matmul(a, basis));      // (M, q)
  }
  const auto b = at::matmul(basis.t(), a);  // (q, N)
  auto [u, s, vh] = at::linalg_svd(b, /*full_matrices=*/false);
  auto v = vh.t();                          // (N, q)
  u = basis.matmul(u);                      // (M, q)
  if (m < n) std::swap(u, v);
  return {u, s, v};
}

// PEFT's LoraLayer.pissa_init on one weight: -> (A (r, in), B (out, r)) fp32, unrounded.
std::pair<at::Tensor, at::Tensor> pissa_factors_of(const at::Tensor& weight, int64_t r, double scaling, int64_t niter,
                                                   at::Generator& gen) {
  const auto w = weight.to(at::kFloat);  // (out, in) fp32
  at::Tensor vr, sr, uhr;                // PEFT's names: W = V S Uh
  if (niter < 0) {
    auto [v, s, uh] = at::linalg_svd(w, /*full_matrices=*/false);
    vr = v.slice(1, 0, r), sr = s.slice(0, 0, r) / scaling, uhr = uh.slice(0, 0, r);
  } else {
    auto [v, s, u] = svd_lowrank(w, r, niter, gen);
    vr = v, sr = s / scaling, uhr = u.t();
  }
  const auto root = at::diag(at::sqrt(sr));  // (r, r)
  return {at::matmul(root, uhr), at::matmul(vr, root)};
}

std::string pissa_refusal(const std::string& module, const std::string& why) {
  return "apply_lora: init PiSSA cannot adapt module " + module + ": " + why;
}

}  // namespace

std::vector<std::pair<std::string, at::Tensor>> pissa_initial_factors(anvil::model::CausalLM& model) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (auto& [name, a] : adapters_of(model)) {
    if (!a->pissa_A0.defined()) continue;
    out.emplace_back(kFilePrefix + name + ".lora_A.weight", a->pissa_A0);
    out.emplace_back(kFilePrefix + name + ".lora_B.weight", a->pissa_B0);
  }
  return out;
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

std::vector<std::pair<std::string, at::Tensor>> apply_lora(
    anvil::model::CausalLM& model, const LoraConfig& config, uint64_t seed,
    const std::vector<std::pair<std::string, at::Tensor>>* pissa_factors) {
  validate(config);
  const bool pissa = is_pissa(config);
  const int64_t niter = pissa ? pissa_niter(config.init) : -1;
  auto linears = anvil::model::named_linears(model);
  for (auto& [name, linear] : linears)
    if (linear->adapter) throw std::invalid_argument("apply_lora: module " + name + " already has an adapter");
  std::map<std::string, at::Tensor> given;  // pissa_factors by PEFT file name
  if (pissa_factors) {
    if (!pissa) throw std::invalid_argument("apply_lora: pissa_factors given, but init is \"" + config.init + "\"");
    for (const auto& [key, t] : *pissa_factors) given[key] = t;
  }
  if (pissa) {  // every refusal before any weight is touched
    for (auto& [name, linear] : linears) {
      if (!is_target(config, name, name == "lm_head")) continue;
      if (!linear->weight_format().empty())
        throw std::invalid_argument(pissa_refusal(name, "its base weight is " + linear->weight_format() +
                                                           "-quantized, and the residual W - scaling B A needs a dense "
                                                           "weight (load the base dense: model.base_weights \"dense\")"));
      const auto dt = linear->weight.scalar_type();
      if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf)
        throw std::invalid_argument(pissa_refusal(name, std::string("its weight is ") + c10::toString(dt) +
                                                           "; PEFT initializes PiSSA under float32, float16 or bfloat16"));
      if (name == "lm_head")
        throw std::invalid_argument(pissa_refusal(name, "PiSSA rewrites the base weight, and lm_head's may be tied to "
                                                        "the input embedding; leave lm_head out of the targets"));
      const int64_t r = rank_of(config, name);
      if (r > std::min(linear->weight.size(0), linear->weight.size(1)))
        throw std::invalid_argument(pissa_refusal(name, "r = " + std::to_string(r) + " exceeds min(out, in) = " +
                                                           std::to_string(std::min(linear->weight.size(0), linear->weight.size(1)))));
      if (!pissa_factors) continue;
      const int64_t out_f = linear->weight.size(0), in_f = linear->weight.size(1);
      const std::string key_a = kFilePrefix + name + ".lora_A.weight", key_b = kFilePrefix + name + ".lora_B.weight";
      if (!given.count(key_a) || !given.count(key_b))
        throw std::invalid_argument("apply_lora: pissa_factors lack " + (given.count(key_a) ? key_b : key_a));
      if (given[key_a].sizes() != at::IntArrayRef{r, in_f} || given[key_b].sizes() != at::IntArrayRef{out_f, r})
        throw std::invalid_argument("apply_lora: pissa_factors of " + name + " have shapes " +
                                    c10::str(given[key_a].sizes()) + " and " + c10::str(given[key_b].sizes()) +
                                    ", the config implies (" + std::to_string(r) + ", " + std::to_string(in_f) +
                                    ") and (" + std::to_string(out_f) + ", " + std::to_string(r) + ")");
    }
  }
  // The adapters are initialised in fp32 on the host: a rank that cannot fit there is a config error named
  // as such, not an allocator abort (at 878962f lora.r = 1e9 ended in a c10 FATAL, exit 134).
  {
    double bytes = 0;
    for (auto& [name, linear] : linears)
      if (is_target(config, name, name == "lm_head"))
        bytes += 4.0 * double(rank_of(config, name)) * double(linear->weight.size(0) + linear->weight.size(1));
    const double host = double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
    if (host > 0 && bytes > host) {
      char msg[256];
      std::snprintf(msg, sizeof msg, "the adapters of r = %lld (lora.r) need %.1f GB of host memory to initialise, "
                    "more than this machine's %.1f GB: lower lora.r", static_cast<long long>(config.r), bytes / 1e9,
                    host / 1e9);
      throw std::invalid_argument(std::string("apply_lora: ") + msg);
    }
  }
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
    adapter->scaling = scaling_of(config, name);
    adapter->dropout = config.lora_dropout;
    if (pissa) {
      at::Tensor a0, b0;  // (r, in), (out, r) fp32, unrounded
      if (pissa_factors) {  // checked above; copied, so that nothing aliases the caller's tensors
        const auto device = linear->weight.device();
        a0 = given[kFilePrefix + name + ".lora_A.weight"].to(device, at::kFloat, /*non_blocking=*/false, /*copy=*/true);
        b0 = given[kFilePrefix + name + ".lora_B.weight"].to(device, at::kFloat, /*non_blocking=*/false, /*copy=*/true);
      } else {
        std::tie(a0, b0) = pissa_factors_of(linear->weight.detach(), r, adapter->scaling, niter, gen);
      }
      at::NoGradGuard no_grad;
      const auto dt = linear->weight.scalar_type();
      // weight - scaling * lora_B @ lora_A, in fp32 from the unrounded factors, then in W's dtype.
      linear->weight.copy_((linear->weight.to(at::kFloat) - at::matmul(b0 * adapter->scaling, a0)).to(dt));
      adapter->pissa_A0 = a0.contiguous(), adapter->pissa_B0 = b0.contiguous();
      // The base dtype, then autocast_adapter_dtype's fp32; a copy always (fp32 bases: .to is a no-op, and
      // the trained tensors must not alias the initial factors).
      adapter->lora_A = a0.to(dt).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
      adapter->lora_B = b0.to(dt).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    } else {
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
    }
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

double activation_elems_per_token(const anvil::model::ModelConfig& cfg, const LoraConfig& config) {
  const double h = double(cfg.hidden_size), inter = double(cfg.intermediate_size);
  const double q = double(cfg.num_attention_heads * cfg.head_dim);
  double per_token = 7.0 * double(config.r);                          // x A of each of the 7 linears
  if (config.lora_dropout > 0) per_token += h + q + h + inter;         // dropout(x) per distinct input
  return per_token;
}

}  // namespace anvil::lora
