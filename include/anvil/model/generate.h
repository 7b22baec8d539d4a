// Text generation with a KV cache, and the loss / perplexity of token sequences: the core that the
// `anvil generate` and `anvil eval` commands (and the distillation and LoRA pipelines) build on.
// Token ids in, token ids out; tokenizers live in anvil::data.
//
// Sampling follows transformers' logits processors in their order: temperature, then top-k, then
// top-p (nucleus, at least one token kept), then a draw from the softmax. Greedy picks the first
// maximum, as torch.argmax does, so greedy output equals transformers' generate(do_sample=False).
// Draws use a CPU generator seeded from the options, so a seed gives the same tokens on any device.
//
// Rows of different lengths go in left-padded, with transformers' attention_mask (1 real, 0 pad): pad keys
// are masked in every step (the cache keeps them, masked), and position ids start at each row's first real
// token (attention_mask.cumsum(-1) - 1, as transformers' _prepare_position_ids_for_generation), so each
// row's tokens are those it gets alone, and those of transformers' batched generate with left padding.
//
// A row that emits a stop token leaves the batch (GenerateOptions::drop_finished): its rows of the KV cache are
// dropped and the later steps run on the rows still going, as vLLM's scheduler retires finished sequences
// (transformers' generate keeps them, padding). The draws stay those of the whole batch: the sampler gets a
// (B, V) tensor in which a retired row's logits are zeros, and torch's multinomial draws its noise for every
// entry of that shape, so a seed gives the same tokens with and without the drop.
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
  /// Rows that have stopped leave the batch (their KV-cache rows are dropped), so they cost no compute in the
  /// later steps; the tokens are the same either way (false keeps them in, for tests).
  bool drop_finished = true;
};

/// prompt (B, S) int64 -> (B, S + n) int64 on the model's device, n <= max_new_tokens: fewer when every row
/// has stopped. Rows that stop early are padded (pad_token_id). attention_mask (B, S) (undefined: every token
/// real): 1 real, 0 pad, the pads of a row before its first real token (left padding), each row >= 1 real.
at::Tensor generate(CausalLM& model, const at::Tensor& prompt, const GenerateOptions& options,
                    const at::Tensor& attention_mask = at::Tensor());

/// Rows of their own lengths left-padded with `pad`: ids (B, S) int64 and attention_mask (B, S) int64 (1 real),
/// S the longest row. Every row needs >= 1 token.
std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows, int64_t pad);

/// Generates for rows of their own lengths in one batch (left_pad, generate) -> each row's new tokens, up to
/// and including its stop token (the pads after it dropped); empty rows are an error naming the row.
std::vector<std::vector<int64_t>> generate_rows(CausalLM& model, const std::vector<std::vector<int64_t>>& prompts,
                                                const GenerateOptions& options);

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
