// ZeRO-3 parameter sharding (include/anvil/train/zero3.h).
#include "anvil/train/zero3.h"

#include "anvil/model/checkpointing.h"

#include <torch/autograd.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <stdexcept>

namespace anvil::train {

namespace {

// The unit of a parameter: 1 + i for "model.layers.<i>.*", else 0 (the root).
size_t unit_of(const std::string& name, int64_t layers) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return 0;
  char* end = nullptr;
  const long long i = std::strtoll(name.c_str() + prefix.size(), &end, 10);
  if (end == name.c_str() + prefix.size() || *end != '.' || i < 0 || i >= layers) return 0;
  return size_t(i) + 1;
}

std::string unit_name(size_t u) { return u == 0 ? "the root unit" : "layer " + std::to_string(u - 1); }

int64_t bytes_of(const at::Tensor& t) { return t.defined() ? t.numel() * int64_t(t.element_size()) : 0; }

}  // namespace

// Identity in forward; its backward runs after the layer's checkpoint has back-propagated through the layer
// (the checkpoint's input is this function's output), which is when the unit's gradients are complete.
struct ShardsBackwardHook : torch::autograd::Function<ShardsBackwardHook> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, ParameterShards* self,
                            int64_t unit) {
    ctx->saved_data["self"] = int64_t(reinterpret_cast<intptr_t>(self));
    ctx->saved_data["unit"] = unit;
    return x.view_as(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* self = reinterpret_cast<ParameterShards*>(intptr_t(ctx->saved_data["self"].toInt()));
    self->post_backward(size_t(ctx->saved_data["unit"].toInt()));
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};

ParameterShards::ParameterShards(std::shared_ptr<Distributed> dist, model::CausalLM& model, const NamedTensors& trainable)
    : dist_(std::move(dist)), model_(model) {
  const int64_t world = dist_->world_size(), layers = model_.model->num_layers();
  units_.resize(size_t(layers) + 1);
  for (const auto& [name, t] : trainable) {
    const size_t u = unit_of(name, layers);
    auto& unit = units_[u];
    if (!unit.params.empty() && params_[unit.params[0]].scalar_type() != t.scalar_type())
      throw std::runtime_error("config key train.zero_stage: 3 shards each unit as one flat vector, and " + unit_name(u) +
                               " mixes " + std::string(c10::toString(params_[unit.params[0]].scalar_type())) + " (" +
                               names_[unit.params[0]] + ") with " + c10::toString(t.scalar_type()) + " (" + name + ")");
    unit_of_.push_back(u);
    unit.offsets.push_back(unit.numel);
    unit.params.push_back(params_.size());
    unit.numel += t.numel();
    params_.push_back(t);
    names_.push_back(name);
    sizes_.push_back(t.sizes().vec());
  }
  for (size_t u = 0; u < units_.size(); ++u) {
    auto& unit = units_[u];
    if (unit.params.empty())
      throw std::runtime_error("config key train.zero_stage: 3 needs every decoder layer's parameters trainable; " +
                               unit_name(u) + " has none");
    unit.padded = (unit.numel + world - 1) / world * world;
    const auto& p = params_[unit.params[0]];
    auto shard = at::zeros({unit.padded / world}, p.options().requires_grad(false));
    shard.set_requires_grad(true);
    shards_.push_back(shard);
  }
  model_.model->set_layer_wrapper([this](int64_t layer, const model::TransformerModel::LayerFn& forward,
                                         const at::Tensor& x) { return wrap(layer, forward, x); });
}

ParameterShards::~ParameterShards() { model_.model->set_layer_wrapper(nullptr); }

namespace {

// dst (len,) = elements [lo, lo + len) of a unit's flat vector, whose parameter j is full(j) at offset offsets[j];
// the padding past the last parameter is zero.
void copy_slice(const std::vector<size_t>& params, const std::vector<int64_t>& offsets, int64_t lo, at::Tensor dst,
                const std::function<at::Tensor(size_t)>& full) {
  at::NoGradGuard no_grad;
  const int64_t len = dst.numel();
  dst.zero_();
  for (size_t j = 0; j < params.size(); ++j) {
    const auto src = full(params[j]).reshape(-1);
    const int64_t a = std::max(lo, offsets[j]), b = std::min(lo + len, offsets[j] + src.numel());
    if (a < b) dst.narrow(0, a - lo, b - a).copy_(src.narrow(0, a - offsets[j], b - a));
  }
}

}  // namespace

void ParameterShards::shards_from_full() {
  TORCH_CHECK(full_, "ParameterShards::shards_from_full: the parameters are not full");
  for (size_t u = 0; u < units_.size(); ++u) {
    auto shard = shards_[u].detach();
    copy_slice(units_[u].params, units_[u].offsets, dist_->rank() * shard.numel(), shard,
               [&](size_t k) { return params_[k].detach(); });
  }
}

void ParameterShards::state_from_full(const AdamW& full, AdamW& mine) const {
  const auto all = full.state_tensors(), own = mine.state_tensors();  // 3 per tensor: exp_avg, exp_avg_sq, step
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) {
    const int64_t lo = dist_->rank() * shards_[u].numel();
    for (size_t k = 0; k < 2; ++k)
      copy_slice(units_[u].params, units_[u].offsets, lo, own[3 * u + k].second,
                 [&](size_t i) { return all[3 * i + k].second; });
    auto step = own[3 * u + 2].second;
    step.copy_(all[3 * units_[u].params[0] + 2].second);
  }
}

std::unique_ptr<AdamW> ParameterShards::consolidated(const AdamW& mine, const AdamWOptions& options) {
  TORCH_CHECK(full_, "ParameterShards::consolidated: gather the parameters first");
  std::unique_ptr<AdamW> out;
  if (dist_->is_main()) out = std::make_unique<AdamW>(params_, options);
  const auto all = out ? out->state_tensors() : std::vector<std::pair<std::string, at::Tensor>>();
  const auto own = mine.state_tensors();
  at::NoGradGuard no_grad;
  for (size_t u = 0; u < units_.size(); ++u) {
    const auto& unit = units_[u];
    for (size_t k = 0; k < 2; ++k) {
      auto flat = at::empty({unit.padded}, own[3 * u + k].second.options());  // (padded,) one moment, every rank's
      dist_->all_gather_async(flat, own[3 * u + k].second, "gathering the ZeRO-3 optimizer state of " + unit_name(u))();
      if (!out) continue;
      for (size_t j = 0; j < unit.params.size(); ++j) {
        const size_t i = unit.params[j];
        auto t = all[3 * i + k].second;
        t.copy_(flat.narrow(0, unit.offsets[j], t.numel()).view(t.sizes()));
      }
    }
    if (out)
      for (size_t i : unit.params) {
        auto step = all[3 * i + 2].second;
        step.copy_(own[3 * u + 2].second);  // every shard of a unit has taken the same steps
      }
  }
  return out;
}

void ParameterShards::note_bytes() {
  if (!in_step_) return;
  int64_t bytes = 0;
  for (const auto& s : shards_) bytes += bytes_of(s);
  for (const auto& unit : units_) bytes += bytes_of(unit.buffer);
  peak_bytes_ = std::max(peak_bytes_, bytes);
}

void ParameterShards::launch_gather(size_t u) {
  auto& unit = units_[u];
  if (unit.gathered || unit.gathering) return;
  unit.buffer = at::empty({unit.padded}, shards_[u].options().requires_grad(false));  // (padded,)
  unit.gathering = dist_->all_gather_async(unit.buffer, shards_[u].detach(), "the ZeRO-3 all-gather of " + unit_name(u));
  note_bytes();
}

void ParameterShards::ensure_gathered(size_t u) {
  auto& unit = units_[u];
  if (unit.gathered) return;
  launch_gather(u);
  auto wait = std::move(unit.gathering);
  unit.gathering = nullptr;
  wait();
  for (size_t j = 0; j < unit.params.size(); ++j) {
    const size_t i = unit.params[j];
    // The parameter's own TensorImpl takes the view: the modules and autograd keep the same tensor.
    params_[i].set_data(unit.buffer.narrow(0, unit.offsets[j], sizes_numel(i)).view(sizes_[i]));
  }
  unit.gathered = true;
}

int64_t ParameterShards::sizes_numel(size_t i) const { return c10::multiply_integers(sizes_[i]); }

void ParameterShards::release(size_t u) {
  auto& unit = units_[u];
  TORCH_CHECK(!unit.gathering, "ParameterShards: releasing ", unit_name(u), " while its all-gather is in flight");
  for (size_t i : unit.params) params_[i].set_data(at::empty({0}, params_[i].options().requires_grad(false)));
  unit.buffer = at::Tensor();
  unit.gathered = false;
}

void ParameterShards::gather_all(const std::string& what) {
  if (full_) return;
  dist_->set_phase(what);
  for (size_t u = 0; u < units_.size(); ++u) ensure_gathered(u);
  full_ = true;
}

void ParameterShards::release_all() {
  TORCH_CHECK(scatters_.empty(), "ParameterShards::release_all: reduce-scatters in flight");
  for (size_t u = 0; u < units_.size(); ++u) release(u);
  full_ = false;
}

void ParameterShards::arm_grads(size_t u) {
  auto& unit = units_[u];
  unit.grads = at::zeros({unit.padded}, shards_[u].options().requires_grad(false));  // (padded,)
  for (size_t j = 0; j < unit.params.size(); ++j) {
    const size_t i = unit.params[j];
    params_[i].mutable_grad() = unit.grads.narrow(0, unit.offsets[j], sizes_numel(i)).view(sizes_[i]);
  }
}

at::Tensor ParameterShards::flat_grad(size_t u) {
  auto& unit = units_[u];
  // (padded,) a unit whose gradients were never armed (none today) starts from zeros
  auto flat = unit.grads.defined() ? std::move(unit.grads) : at::zeros({unit.padded}, shards_[u].options().requires_grad(false));
  unit.grads = at::Tensor();
  at::NoGradGuard no_grad;
  for (size_t j = 0; j < unit.params.size(); ++j) {
    const auto& g = params_[unit.params[j]].grad();
    auto slot = flat.narrow(0, unit.offsets[j], sizes_numel(unit.params[j]));
    // Backward accumulates into the view in place; a gradient it replaced instead holds the whole sum.
    if (g.defined() && g.data_ptr() != slot.data_ptr()) slot.copy_(g.reshape(-1));
  }
  // The moment this rank holds the most gradients: every gathered unit's full ones (views of their flat
  // buffers, counted once), the shards' and the reduce-scatters' in flight.
  int64_t bytes = bytes_of(flat);
  for (const auto& other : units_) bytes += bytes_of(other.grads);
  for (size_t k = 0; k < params_.size(); ++k)
    if (unit_of_[k] != u && !units_[unit_of_[k]].grads.defined()) bytes += bytes_of(params_[k].grad());
  for (const auto& s : shards_) bytes += bytes_of(s.grad());
  for (const auto& s : scatters_) bytes += bytes_of(s.in) + bytes_of(s.out);
  peak_grad_bytes_ = std::max(peak_grad_bytes_, bytes);
  for (size_t i : unit.params) params_[i].mutable_grad() = at::Tensor();
  return flat;
}

void ParameterShards::launch_scatter(size_t u) {
  auto in = flat_grad(u);
  // At most two in flight: the oldest is added to its shard's gradient (its buffers freed) before a third.
  while (scatters_.size() >= 2) complete_scatter();
  Scatter s;
  s.unit = u, s.in = in;
  s.out = at::empty({shards_[u].numel()}, in.options());  // (shard,)
  s.wait = dist_->reduce_scatter_async(s.out, s.in, "the ZeRO-3 gradient reduce-scatter of " + unit_name(u));
  scatters_.push_back(std::move(s));
}

void ParameterShards::complete_scatter() {
  auto s = std::move(scatters_.front());
  scatters_.pop_front();
  s.wait();
  auto& shard = shards_[s.unit];
  at::NoGradGuard no_grad;
  // Summed over the micro-batches here: each micro-batch's backward reduce-scatters the layer's gradient anew.
  if (shard.grad().defined()) shard.mutable_grad().add_(s.out);
  else shard.mutable_grad() = s.out;
}

void ParameterShards::pre_forward(size_t u) {
  ensure_gathered(u);
  if (u + 1 < units_.size()) launch_gather(u + 1);  // the prefetch: in flight while layer u runs
}

void ParameterShards::pre_backward(size_t u) {
  ensure_gathered(u);
  arm_grads(u);
  if (u > 1) launch_gather(u - 1);  // backward goes down the layers (unit 0, the root, is gathered all step)
}

void ParameterShards::post_backward(size_t u) {
  launch_scatter(u);
  release(u);
}

at::Tensor ParameterShards::wrap(int64_t layer, const model::TransformerModel::LayerFn& forward, const at::Tensor& x) {
  if (full_) return forward(x);  // validation, generation: the whole model is gathered
  TORCH_CHECK(in_step_, "ZeRO-3: the model's parameters are sharded; a forward outside a training step needs "
              "ParameterShards::gather_all first");
  TORCH_CHECK(at::GradMode::is_enabled() && x.requires_grad(),
              "ZeRO-3: a training step's layers run with grad, on an input that requires grad (full training)");
  const size_t u = size_t(layer) + 1;
  // Backward reaches this node right after the checkpoint below has back-propagated through the layer.
  auto hooked = ShardsBackwardHook::apply(x, this, int64_t(u));
  pre_forward(u);
  auto out = model::checkpoint(
      [this, u, forward](const at::Tensor& y) {
        if (at::GradMode::is_enabled()) pre_backward(u);  // the recomputation in backward (forward runs no-grad)
        return forward(y);
      },
      hooked);
  release(u);  // nothing of the forward references the weights: the checkpoint kept only the input
  return out;
}

void ParameterShards::begin_step() {
  if (full_) release_all();
  in_step_ = true;
  launch_gather(0);
  if (units_.size() > 1) launch_gather(1);  // the first layer's prefetch
  ensure_gathered(0);
  arm_grads(0);  // the root's gradients accumulate into one flat buffer over the step's micro-batches
}

void ParameterShards::idle_micro_batch() {
  // The calls a forward and backward make, in their order, with no gradients (zeros reduce-scattered).
  const size_t n = units_.size();
  for (size_t u = 1; u < n; ++u) {
    pre_forward(u);
    release(u);
  }
  for (size_t u = n; u-- > 1;) {
    pre_backward(u);
    post_backward(u);
  }
}

void ParameterShards::finish_step(const std::string& what) {
  while (!scatters_.empty()) complete_scatter();
  dist_->set_phase(what);
  auto in = flat_grad(0);  // the root's gradients, accumulated in full over the step's micro-batches
  auto out = at::empty({shards_[0].numel()}, in.options());
  dist_->reduce_scatter_async(out, in, "the ZeRO-3 gradient reduce-scatter of the root unit")();
  {
    at::NoGradGuard no_grad;
    if (shards_[0].grad().defined()) shards_[0].mutable_grad().add_(out);
    else shards_[0].mutable_grad() = out;
  }
  for (size_t u = 0; u < units_.size(); ++u) {
    if (units_[u].gathering) ensure_gathered(u);  // none in flight after a backward; kept safe regardless
    release(u);
  }
  in_step_ = false;
}

std::vector<at::Tensor> ParameterShards::grad_pieces() const {
  std::vector<at::Tensor> out;
  for (size_t u = 0; u < units_.size(); ++u) {
    const auto& g = shards_[u].grad();
    if (!g.defined()) continue;
    const int64_t lo = dist_->rank() * g.numel(), hi = lo + g.numel();
    for (size_t j = 0; j < units_[u].params.size(); ++j) {
      const int64_t a = std::max(lo, units_[u].offsets[j]),
                    b = std::min(hi, units_[u].offsets[j] + sizes_numel(units_[u].params[j]));
      if (a < b) out.push_back(g.narrow(0, a - lo, b - a));
    }
  }
  return out;
}

void ParameterShards::zero_grads() {
  for (auto& s : shards_) s.mutable_grad() = at::Tensor();
  for (auto& p : params_) p.mutable_grad() = at::Tensor();
  for (auto& unit : units_) unit.grads = at::Tensor();
}

}  // namespace anvil::train
