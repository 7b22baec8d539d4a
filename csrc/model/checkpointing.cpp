// Gradient checkpointing (include/anvil/model/checkpointing.h): a reentrant autograd Function.
//
// Forward saves the input (detached), the CPU generator's state, the CUDA generator's state for CUDA
// inputs, and the autocast state, then runs the block under no-grad. Backward restores those states
// around a recomputation with grad (putting the current RNG states back afterwards, so the rest of
// the backward and the next step see the RNG untouched) and back-propagates through it.
// A dummy input that requires grad makes the output require grad even when x does not (the first
// layer's input in LoRA training comes from a frozen embedding), so backward still runs and the
// block's parameters get their gradients.
#include "anvil/model/checkpointing.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>

#include <mutex>

namespace anvil::model {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RngState {
  at::Tensor cpu, device;
};

RngState capture_rng(const at::Device& device) {
  RngState s;
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    s.cpu = cpu.get_state();
  }
  if (device.is_cuda()) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.device = gen.get_state();
  }
  return s;
}

void restore_rng(const RngState& s, const at::Device& device) {
  auto cpu = at::detail::getDefaultCPUGenerator();
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    cpu.set_state(s.cpu);
  }
  if (device.is_cuda() && s.device.defined()) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.device);
  }
}

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  // The block, held in saved_data (an IValue) so that it lives exactly as long as the graph node.
  struct FnHolder : torch::CustomClassHolder {
    explicit FnHolder(std::function<at::Tensor(const at::Tensor&)> f) : fn(std::move(f)) {}
    std::function<at::Tensor(const at::Tensor&)> fn;
  };

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& /*dummy*/,
                            std::function<at::Tensor(const at::Tensor&)> fn) {
    const auto device = x.device();
    auto rng = capture_rng(device);
    ctx->saved_data["rng_cpu"] = rng.cpu;
    if (rng.device.defined()) ctx->saved_data["rng_device"] = rng.device;
    const auto type = device.type();
    ctx->saved_data["autocast"] = at::autocast::is_autocast_enabled(type);
    ctx->saved_data["autocast_dtype"] = at::autocast::get_autocast_dtype(type);
    auto holder = c10::make_intrusive<FnHolder>(std::move(fn));
    ctx->saved_data["fn"] = c10::IValue::make_capsule(holder);
    ctx->save_for_backward({x});
    at::NoGradGuard no_grad;
    return holder->fn(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    const auto device = x.device();
    const auto type = device.type();
    RngState saved{ctx->saved_data["rng_cpu"].toTensor(),
                   ctx->saved_data.count("rng_device") ? ctx->saved_data["rng_device"].toTensor() : at::Tensor()};
    auto fn = c10::static_intrusive_pointer_cast<FnHolder>(ctx->saved_data["fn"].toCapsule());
    const auto now = capture_rng(device);
    restore_rng(saved, device);
    at::Tensor out;
    {
      at::AutoGradMode grad(true);
      const bool was = at::autocast::is_autocast_enabled(type);
      const auto was_dtype = at::autocast::get_autocast_dtype(type);
      at::autocast::set_autocast_enabled(type, ctx->saved_data["autocast"].toBool());
      at::autocast::set_autocast_dtype(type, ctx->saved_data["autocast_dtype"].toScalarType());
      out = fn->fn(x);
      at::autocast::set_autocast_enabled(type, was);
      at::autocast::set_autocast_dtype(type, was_dtype);
    }
    restore_rng(now, device);
    if (out.requires_grad()) torch::autograd::backward({out}, {grad_outputs[0]});
    return {x.grad(), at::Tensor(), at::Tensor()};
  }

};

}  // namespace

at::Tensor checkpoint(std::function<at::Tensor(const at::Tensor&)> fn, const at::Tensor& x) {
  if (!at::GradMode::is_enabled()) return fn(x);
  static thread_local at::Tensor dummy = at::empty({}, at::kFloat).requires_grad_(true);
  return CheckpointFunction::apply(x, dummy, std::move(fn));
}

}  // namespace anvil::model
