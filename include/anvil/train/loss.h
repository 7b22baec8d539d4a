// The training loss: a causal-LM cross-entropy over the LM head that never materializes fp32 logits
// for all tokens.
//
// Logits of a fine-tuning batch are big (8 x 1024 tokens x 128k vocabulary = 4 GiB in fp32, as much
// again for their gradient). causal_lm_loss walks the tokens in chunks: each chunk's logits h W^T are
// computed in the model dtype, reduced in fp32 to a log-sum-exp and the target logit, and dropped;
// only h, W, the labels and one fp32 log-sum-exp per token are kept for backward, which recomputes the
// chunk's logits and writes dh (and dW when the head is trainable).
//
// The inner chunk runs on one of two kernels. On CUDA, anvil::ops::cross_entropy_chunk reads the
// chunk's logits in the model dtype once (an online log-sum-exp per row, no fp32 copy), and its backward
// overwrites those logits with their gradient in place: the chunk's extra memory drops from three
// (rows, V) fp32 buffers to none beyond the model-dtype logits. On the CPU the ATen ops stay (vectorized,
// and their tree-shaped fp32 sums are the ones the PEFT oracle tests compare against); the fused CPU
// kernel is a scalar reference loop. ANVIL_FUSED_OPS=0 forces the ATen path everywhere.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace anvil::train {

/// The label that marks a position without a target (transformers' ignore_index).
constexpr int64_t kIgnoreIndex = -100;

/// The implementation of each chunk's cross-entropy.
enum class LossKernel {
  kAuto,   ///< kFused on CUDA (fp32/bf16/fp16) unless ANVIL_FUSED_OPS=0, else kAten
  kAten,   ///< logits cast to fp32, at::logsumexp and gather; the backward's softmax in fp32, then cast
  kFused,  ///< anvil::ops::cross_entropy_chunk / cross_entropy_chunk_backward, on any device (tests)
};

/// sum over targets of -log softmax(h W^T)[label] / normalizer, an fp32 scalar with autograd to
/// hidden and (when it requires grad) weight.
/// hidden (..., H) in the model dtype; weight (V, H) the LM head; labels (...) int64, already aligned
/// (labels[i] is the token to predict at position i, kIgnoreIndex for none; anvil::data::pack_examples'
/// labels are). normalizer: the number of targets the mean is over, counted across every micro-batch
/// of the optimizer step so that micro-batches are weighted by their targets (<= 0: the loss is 0).
/// chunk: token rows per chunk. kernel: see LossKernel (both compute the same fp32 quantities).
at::Tensor causal_lm_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                          double normalizer, int64_t chunk = 4096, LossKernel kernel = LossKernel::kAuto);

/// acc += a @ b for the chunked losses' head gradient (acc (V, H), fp32 or the operands' dtype; a (V, rows),
/// b (rows, H)): on CUDA the GEMM adds into acc in its epilogue, on the CPU the product is formed in the
/// operands' dtype, widened and added.
void accumulate_product(at::Tensor acc, const at::Tensor& a, const at::Tensor& b);

}  // namespace anvil::train
