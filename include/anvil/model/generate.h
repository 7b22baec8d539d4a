// Text generation with a KV cache, and the loss / perplexity of token sequences: the core that the
// `anvil generate` and `anvil eval` commands (and the distillation and LoRA pipelines) build on.
// Token ids in, token ids out; tokenizers live in anvil::data.
//
// Sampling follows transformers' logits processors in their order: temperature, then top-k, then
// top-p (nucleus, at least one token kept), then a draw from the softmax. Greedy picks the first
// maximum, as torch.argmax does, so greedy output equals transformers' generate(do_sample=False).
// Draws use a CPU generator seeded from the options, so a seed gives the same tokens on any device.
#pragma once

#include "anvil/model/transformer.h"

#include <cstdint>
#include <vector>

namespace anvil::model {

struct GenerateOptions {
  int64_t max_new_tokens = 32;          ///< tokens to generate at most
  double temperature = 0.0;             ///< <= 0: greedy; otherwise logits / temperature, then sample
  int64_t top_k = 0;                    ///< keep the k most likely tokens (0: all)
  double top_p = 1.0;                   ///< keep the smallest set of tokens whose probability reaches top_p (1: all)
  std::vector<int64_t> stop_tokens;     ///< a row stops after emitting one of these (e.g. eos ids)
  int64_t pad_token_id = -1;            ///< fills stopped rows; -1: the first stop token (or 0)
  uint64_t seed = 0;                    ///< seed of the sampling generator
  bool use_cache = true;                ///< false: recompute the whole sequence each step (for tests)
};

/// prompt (B, S) int64 (rows of equal length, no padding) -> (B, S + n) int64 on the model's device,
/// n <= max_new_tokens: fewer when every row has stopped. Rows that stop early are padded.
at::Tensor generate(CausalLM& model, const at::Tensor& prompt, const GenerateOptions& options);

/// Picks the next token of each row from logits (B, V) per options (greedy or sampled) -> (B) int64.
at::Tensor sample_next_token(const at::Tensor& logits, const GenerateOptions& options, at::Generator& generator);

/// Mean next-token cross entropy in nats, fp32: logits[:, :-1] against labels[:, 1:], positions
/// whose label is -100 ignored (transformers' ForCausalLMLoss). labels default to input_ids.
at::Tensor causal_lm_loss(CausalLM& model, const at::Tensor& input_ids,
                          const c10::optional<at::Tensor>& labels = c10::nullopt);

struct PerplexityResult {
  double nll_sum = 0;  ///< summed negative log-likelihood, nats
  int64_t tokens = 0;  ///< tokens predicted
  double mean_nll() const { return tokens ? nll_sum / double(tokens) : 0.0; }
  double perplexity() const;  ///< exp(mean_nll)
};

/// Perplexity over token sequences (each 1-D int64). Each sequence is cut into windows of at most
/// max_length tokens (0: no limit), each window scored on its own (its first token is context only).
PerplexityResult perplexity(CausalLM& model, const std::vector<at::Tensor>& sequences, int64_t max_length = 0);

}  // namespace anvil::model
