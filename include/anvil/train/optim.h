// The optimizer side of training: AdamW over a list of tensors, learning-rate schedules, gradient
// clipping by global norm. Used by the `anvil lora` / `anvil train` recipe and by anything else that
// trains (distillation).
//
// AdamW runs ATen's fused kernel (at::_fused_adamw_: one launch for every tensor on CUDA, a vectorised
// loop on the CPU), grouped by device and dtype as the kernel requires. Its state (exp_avg, exp_avg_sq
// and the per-tensor step count, an fp32 scalar tensor as torch.optim.AdamW keeps it) is plain tensors
// that a checkpoint saves and restores bit for bit, so a resumed run continues exactly. Weight decay is
// decoupled (p -= lr * wd * p before the Adam update), as torch.optim.AdamW does it.
//
// Clipping returns the global norm as a device tensor, so a training loop does not wait on the device
// for it unless it logs it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <functional>
#include <vector>

namespace anvil::train {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  /// params: the trainable tensors (requires_grad, floating point). State is created lazily zero.
  AdamW(std::vector<at::Tensor> params, AdamWOptions options);

  /// One update of every parameter whose .grad() is defined, at learning rate `lr`.
  void step(double lr);

  /// Drops every parameter's gradient (set to undefined, as zero_grad(set_to_none=True)).
  void zero_grad();

  /// The state by name ("exp_avg.<i>", "exp_avg_sq.<i>", "step.<i>", i = parameter index): what a
  /// checkpoint saves.
  std::vector<std::pair<std::string, at::Tensor>> state_tensors() const;

  /// Restores state saved by state_tensors() (copied in place, exactly). Throws std::runtime_error
  /// naming the tensor when one is missing or has another shape.
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& tensors);

  const std::vector<at::Tensor>& params() const { return params_; }
  /// Elements of optimizer state (two moments per parameter element).
  int64_t state_numel() const;

 private:
  std::vector<at::Tensor> params_, exp_avg_, exp_avg_sq_, steps_;
  AdamWOptions options_;
};

struct ScheduleOptions {
  std::string kind = "cosine";  ///< "cosine" | "linear" | "constant"
  double lr = 2e-4;             ///< peak learning rate
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr_ratio = 0.0;    ///< the schedule decays to lr * min_lr_ratio
};

/// The learning rate of optimizer step `step` (0-based), as transformers' schedulers give it
/// (get_cosine/linear/constant_schedule_with_warmup: lr * step / warmup during warmup, then the
/// decay over the remaining steps), with the decay lifted to end at min_lr_ratio:
/// lr * (min_lr_ratio + (1 - min_lr_ratio) * decay). Throws std::invalid_argument for an unknown kind.
double lr_at(const ScheduleOptions& options, int64_t step);

/// Scales the gradients so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_:
/// coefficient max_norm / (norm + 1e-6) clamped to 1) and returns the norm before clipping, an fp32
/// scalar on the gradients' device. max_norm <= 0: only the norm. Undefined grads are skipped.
/// `sum_over_ranks` (ZeRO-2, where each rank holds some of the gradients): sums the () fp32 square of this
/// rank's norm over the ranks in place, so every rank clips by the global norm.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& params, double max_norm,
                          const std::function<void(at::Tensor&)>& sum_over_ranks = nullptr);
/// clip_grad_norm on the gradients themselves (scaled in place, so views scale what they view); `options` give
/// the () fp32 zero of a rank that holds none. ZeRO-3 passes its flat shards' gradients cut at the parameters'
/// boundaries, so that each norm is over one tensor's elements as in one process: the fp32 norm of one long
/// vector drifts from the per-tensor one (~2e-5 relative over 1.5M elements on the CPU).
at::Tensor clip_gradients(const std::vector<at::Tensor>& grads, double max_norm,
                          const std::function<void(at::Tensor&)>& sum_over_ranks, const at::TensorOptions& options);

}  // namespace anvil::train
