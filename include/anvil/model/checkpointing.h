// Gradient (activation) checkpointing: run a block under no-grad in forward, keep only its input, and
// recompute it with grad in backward. Trades one extra forward of each block for not storing its
// activations, the memory that limits batch x sequence length when fine-tuning.
//
// This is PyTorch's reentrant checkpoint (torch.utils.checkpoint with use_reentrant=True) in C++: the
// backward re-runs the block under the RNG states (CPU and, for CUDA inputs, the device's generator)
// and the autocast state the forward saw, so dropout masks and compute dtypes are the same, then calls
// torch::autograd::backward on the recomputed output, which accumulates into the block's parameters
// (LoRA adapters or weights) directly and gives the input's gradient.
#pragma once

#include <ATen/ATen.h>

#include <functional>

namespace anvil::model {

/// fn(x) computed without storing its activations; differentiable in x and in every tensor fn uses
/// that requires grad. fn is called twice (forward and backward), so it must not change state other
/// than through the RNG. Without grad mode it is simply fn(x).
at::Tensor checkpoint(std::function<at::Tensor(const at::Tensor&)> fn, const at::Tensor& x);

}  // namespace anvil::model
