// AdamW, learning-rate schedules and gradient clipping (include/anvil/train/optim.h).
//
// The update is ATen's fused AdamW (the kernel torch.optim.AdamW(fused=True) runs), called once per
// (device, dtype) group of parameters that have a gradient; lr is passed as a double so no device
// tensor has to be read back.
#include "anvil/train/optim.h"

#include <cmath>
#include <map>
#include <stdexcept>
#include <tuple>

namespace anvil::train {

AdamW::AdamW(std::vector<at::Tensor> params, AdamWOptions options) : params_(std::move(params)), options_(options) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& p = params_[i];
    TORCH_CHECK(p.defined() && at::isFloatingType(p.scalar_type()), "AdamW: parameter ", i,
                " must be a defined floating-point tensor");
    exp_avg_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(at::zeros_like(p, at::MemoryFormat::Preserve));
    // The step count as torch.optim keeps it for the fused kernel: an fp32 scalar on the device.
    steps_.push_back(at::zeros({}, p.options().dtype(at::kFloat)));
  }
}

void AdamW::step(double lr) {
  // Group by (device, dtype): the fused kernel takes lists of one device and one dtype.
  struct Group {
    std::vector<at::Tensor> p, g, m, v, s;
  };
  std::map<std::tuple<int, int, int>, Group> groups;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto& grad = params_[i].grad();
    if (!grad.defined()) continue;
    auto& g = groups[{int(params_[i].device().type()), int(params_[i].device().index()), int(params_[i].scalar_type())}];
    g.p.push_back(params_[i]);
    g.g.push_back(grad);
    g.m.push_back(exp_avg_[i]);
    g.v.push_back(exp_avg_sq_[i]);
    g.s.push_back(steps_[i]);
  }
  at::NoGradGuard no_grad;
  for (auto& [key, g] : groups) {
    at::_foreach_add_(g.s, 1);  // the kernel reads the already-incremented step, as torch.optim does
    at::_fused_adamw_(g.p, g.g, g.m, g.v, /*max_exp_avg_sqs=*/{}, g.s, lr, options_.beta1, options_.beta2,
                      options_.weight_decay, options_.eps, /*amsgrad=*/false, /*maximize=*/false);
  }
}

void AdamW::zero_grad() {
  for (auto& p : params_) p.mutable_grad() = at::Tensor();
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const auto n = std::to_string(i);
    out.emplace_back("exp_avg." + n, exp_avg_[i]);
    out.emplace_back("exp_avg_sq." + n, exp_avg_sq_[i]);
    out.emplace_back("step." + n, steps_[i]);
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::map<std::string, at::Tensor> by_name(tensors.begin(), tensors.end());
  at::NoGradGuard no_grad;
  for (auto& [name, target] : state_tensors()) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw std::runtime_error("optimizer state: tensor '" + name + "' is missing");
    if (it->second.sizes() != target.sizes())
      throw std::runtime_error("optimizer state: tensor '" + name + "' has shape " + c10::str(it->second.sizes()) +
                               ", the parameter needs " + c10::str(target.sizes()));
    auto t = target;  // a handle to the state tensor: copy_ writes into it
    t.copy_(it->second);
  }
}

int64_t AdamW::state_numel() const {
  int64_t n = 0;
  for (const auto& p : params_) n += 2 * p.numel();
  return n;
}

double lr_at(const ScheduleOptions& o, int64_t step) {
  if (o.kind != "cosine" && o.kind != "linear" && o.kind != "constant")
    throw std::invalid_argument("schedule: unknown kind '" + o.kind + "' (cosine, linear, constant)");
  if (o.warmup_steps > 0 && step < o.warmup_steps) return o.lr * double(step) / double(o.warmup_steps);
  const double progress =
      double(step - o.warmup_steps) / double(std::max<int64_t>(1, o.total_steps - o.warmup_steps));
  double decay;
  if (o.kind == "cosine") {
    decay = std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
  } else if (o.kind == "linear") {
    decay = std::max(0.0, 1.0 - progress);
  } else if (o.kind == "constant") {
    decay = 1.0;
  } else {
    throw std::invalid_argument("schedule: unknown kind '" + o.kind + "' (cosine, linear, constant)");
  }
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay);
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm,
                          const std::function<void(at::Tensor&)>& sum_over_ranks) {
  std::vector<at::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  return clip_gradients(grads, max_norm, sum_over_ranks, params.empty() ? at::TensorOptions() : params[0].options());
}

at::Tensor clip_gradients(const std::vector<at::Tensor>& grads, double max_norm,
                          const std::function<void(at::Tensor&)>& sum_over_ranks, const at::TensorOptions& options) {
  at::NoGradGuard no_grad;
  at::Tensor total;  // () fp32
  if (sum_over_ranks) {
    // A rank may own no gradient at all; it still joins the sum.
    auto sq = grads.empty() ? at::zeros({}, options.dtype(at::kFloat))
                            : at::stack(at::_foreach_norm(grads, 2)).to(at::kFloat).square().sum();
    sum_over_ranks(sq);
    total = sq.sqrt();
  } else {
    if (grads.empty()) return at::zeros({}, at::kFloat);
    // torch.nn.utils.clip_grad_norm_: per-tensor norms, the norm of those, one multiply by the clamped
    // coefficient (always, so that there is no host sync on the comparison).
    auto norms = at::_foreach_norm(grads, 2);
    total = at::linalg_vector_norm(at::stack(norms).to(at::kFloat), 2);
  }
  if (max_norm > 0) {
    auto coef = (max_norm / (total + 1e-6)).clamp_max(1.0);
    for (auto& g : grads) g.mul_(coef.to(g.scalar_type()));
  }
  return total;
}

}  // namespace anvil::train
