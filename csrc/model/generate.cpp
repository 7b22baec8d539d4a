// Generation with a KV cache and sequence loss / perplexity (include/anvil/model/generate.h).
// The prompt is run once to fill the cache; each later step feeds only the newest token. Token
// choice mirrors transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper.
#include "anvil/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace anvil::model {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// TopKLogitsWarper: drop every logit below the k-th largest.
at::Tensor keep_top_k(const at::Tensor& logits, int64_t k) {  // (B, V) fp32
  k = std::min<int64_t>(k, logits.size(-1));
  auto kth = std::get<0>(at::topk(logits, k, -1)).narrow(-1, k - 1, 1);  // (B, 1)
  return logits.masked_fill(logits < kth, kNegInf);
}

// TopPLogitsWarper: sort ascending, drop the tokens whose cumulative probability stays <= 1 - p,
// always keeping the most likely one.
at::Tensor keep_top_p(const at::Tensor& logits, double p) {  // (B, V) fp32
  auto [sorted, order] = at::sort(logits, -1, /*descending=*/false);
  auto cumulative = sorted.softmax(-1).cumsum(-1);
  auto remove = cumulative <= (1 - p);
  remove.narrow(-1, remove.size(-1) - 1, 1).fill_(false);
  auto remove_original = remove.scatter(-1, order, remove);
  return logits.masked_fill(remove_original, kNegInf);
}

}  // namespace

at::Tensor sample_next_token(const at::Tensor& logits_in, const GenerateOptions& o, at::Generator& generator) {
  auto logits = logits_in.to(at::kFloat);  // (B, V)
  if (o.temperature <= 0) return logits.argmax(-1);
  logits = logits / o.temperature;
  if (o.top_k > 0) logits = keep_top_k(logits, o.top_k);
  if (o.top_p < 1.0) logits = keep_top_p(logits, o.top_p);
  // Drawn on the CPU generator so that a seed means the same tokens on every device.
  auto probs = logits.softmax(-1).to(at::kCPU);
  return at::multinomial(probs, 1, /*replacement=*/false, generator).squeeze(-1).to(logits_in.device());
}

at::Tensor generate(CausalLM& model, const at::Tensor& prompt, const GenerateOptions& o, const at::Tensor& attention_mask) {
  TORCH_CHECK(prompt.dim() == 2 && prompt.size(1) > 0, "generate: prompt must be (B, S) with S >= 1, got ", prompt.sizes());
  TORCH_CHECK(o.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0, got ", o.max_new_tokens);
  TORCH_CHECK(o.top_p > 0 && o.top_p <= 1, "generate: top_p must be in (0, 1], got ", o.top_p);
  TORCH_CHECK(o.top_k >= 0, "generate: top_k must be >= 0, got ", o.top_k);
  at::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  auto ids = prompt.to(model.device(), at::kLong);
  const int64_t b = ids.size(0);
  const int64_t pad = o.pad_token_id >= 0 ? o.pad_token_id : (o.stop_tokens.empty() ? 0 : o.stop_tokens[0]);
  auto stop = at::tensor(o.stop_tokens.empty() ? std::vector<int64_t>{-1} : o.stop_tokens, ids.options());
  auto finished = at::zeros({b}, ids.options().dtype(at::kBool));

  // Padding: the mask of every key so far (B, L) and each row's positions, from its first real token.
  const bool padded = attention_mask.defined();
  at::Tensor keys, positions;  // (B, L) bool, (B, S) int64
  if (padded) {
    TORCH_CHECK(attention_mask.sizes() == prompt.sizes(), "generate: attention_mask ", attention_mask.sizes(),
                " must be shaped like the prompt ", prompt.sizes());
    keys = attention_mask.to(model.device()).ne(0);
    const int64_t s = keys.size(1);
    TORCH_CHECK(keys.select(1, s - 1).all().item<bool>(),
                "generate: attention_mask must be left padding: every row's last token must be real (1)");
    if (s > 1)
      TORCH_CHECK(keys.narrow(1, 1, s - 1).ge(keys.narrow(1, 0, s - 1)).all().item<bool>(),
                  "generate: attention_mask must be left padding: no 0 after a row's first 1");
    // transformers 5.17 _prepare_position_ids_for_generation: cumsum - 1, 0 at the pads (which no real token sees).
    positions = (keys.to(at::kLong).cumsum(-1) - 1).masked_fill(keys.logical_not(), 0);
  }
  // The rows still generating (int64 indices into the batch) once one has been dropped; undefined: all of them.
  at::Tensor active;
  int64_t running = b;
  const auto rows_of = [&](const at::Tensor& t) { return active.defined() ? t.index_select(0, active) : t; };
  // x, pos: the running rows'; keys: the whole batch's, of which the running rows' are taken.
  auto forward = [&](const at::Tensor& x, KvCache* cache, const at::Tensor& pos) {
    if (!padded) return cache ? model.forward(x, cache) : model.forward(x);
    return model.forward(x, cache, pos, c10::nullopt, rows_of(keys));
  };

  KvCache cache = model.make_cache();
  std::vector<at::Tensor> pieces{ids}, position_pieces{positions};  // whole-batch (B, *) pieces
  at::Tensor logits;  // (running, S', V)
  if (o.max_new_tokens > 0) logits = forward(ids, o.use_cache ? &cache : nullptr, positions);
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    auto last = logits.select(1, logits.size(1) - 1);  // (running, V)
    // Retired rows draw from zeros: the sampler sees the whole batch's shape, so its noise is that of a run
    // without the drop (torch's multinomial draws one exponential per entry).
    if (active.defined()) last = at::zeros({b, last.size(1)}, last.options()).index_copy_(0, active, last);
    auto next = sample_next_token(last, o, generator);  // (B)
    next = at::where(finished, at::full_like(next, pad), next);
    pieces.push_back(next.unsqueeze(1));
    finished = finished | at::isin(next, stop);
    const int64_t done = finished.sum().item<int64_t>();
    if (done == b || step + 1 == o.max_new_tokens) break;
    at::Tensor next_pos;
    if (padded) {  // generated tokens (and the pads of finished rows) count as real, as in transformers
      keys = at::cat({keys, at::ones({b, 1}, keys.options())}, 1);
      next_pos = position_pieces.back().select(1, position_pieces.back().size(1) - 1).unsqueeze(1) + 1;  // (B, 1)
      position_pieces.push_back(next_pos);
    }
    if (o.drop_finished && b - done < running) {  // rows stopped this step: they leave the batch and the cache
      const auto still = finished.logical_not().nonzero().squeeze(1);           // (running') into the batch
      const auto kept = rows_of(finished).logical_not().nonzero().squeeze(1);   // (running') into the running rows
      if (o.use_cache) cache.keep_rows(kept);
      active = still, running = still.size(0);
    }
    if (o.use_cache) logits = forward(rows_of(next.unsqueeze(1)), &cache, padded ? rows_of(next_pos) : next_pos);
    else logits = forward(rows_of(at::cat(pieces, 1)), nullptr, padded ? rows_of(at::cat(position_pieces, 1)) : at::Tensor());
  }
  return at::cat(pieces, 1);
}

std::pair<at::Tensor, at::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows, int64_t pad) {
  TORCH_CHECK(!rows.empty(), "left_pad: no rows");
  size_t width = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    TORCH_CHECK(!rows[i].empty(), "left_pad: row ", i, " is empty: every prompt needs at least one token");
    width = std::max(width, rows[i].size());
  }
  auto ids = at::full({int64_t(rows.size()), int64_t(width)}, pad, at::kLong);  // (B, S)
  auto mask = at::zeros({int64_t(rows.size()), int64_t(width)}, at::kLong);    // (B, S)
  for (size_t i = 0; i < rows.size(); ++i) {
    const int64_t n = int64_t(rows[i].size()), start = int64_t(width) - n;
    ids[int64_t(i)].narrow(0, start, n).copy_(at::tensor(rows[i], at::kLong));
    mask[int64_t(i)].narrow(0, start, n).fill_(1);
  }
  return {ids, mask};
}

std::vector<std::vector<int64_t>> generate_rows(CausalLM& model, const std::vector<std::vector<int64_t>>& prompts,
                                                const GenerateOptions& o) {
  if (prompts.empty()) return {};
  const int64_t pad = o.pad_token_id >= 0 ? o.pad_token_id : (o.stop_tokens.empty() ? 0 : o.stop_tokens[0]);
  auto [ids, mask] = left_pad(prompts, pad);
  const int64_t s = ids.size(1);
  auto out = generate(model, ids, o, mask).to(at::kCPU);  // (B, S + n)
  const int64_t n = out.size(1) - s;
  std::vector<std::vector<int64_t>> rows(prompts.size());
  auto fresh = out.narrow(1, s, n).contiguous();
  const int64_t* p = fresh.data_ptr<int64_t>();
  for (size_t i = 0; i < prompts.size(); ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t id = p[int64_t(i) * n + j];
      rows[i].push_back(id);
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), id) != o.stop_tokens.end()) break;
    }
  return rows;
}

at::Tensor causal_lm_loss(CausalLM& model, const at::Tensor& input_ids, const c10::optional<at::Tensor>& labels_in) {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) >= 2, "causal_lm_loss: input_ids must be (B, S) with S >= 2, got ",
              input_ids.sizes());
  auto labels = (labels_in ? *labels_in : input_ids).to(model.device(), at::kLong);
  TORCH_CHECK(labels.sizes() == input_ids.sizes(), "causal_lm_loss: labels ", labels.sizes(), " must match input_ids ",
              input_ids.sizes());
  auto logits = model.forward(input_ids).to(at::kFloat);  // (B, S, V)
  const int64_t s = logits.size(1), v = logits.size(2);
  auto shifted_logits = logits.narrow(1, 0, s - 1).reshape({-1, v});
  auto shifted_labels = labels.narrow(1, 1, s - 1).reshape({-1});
  return at::cross_entropy_loss(shifted_logits, shifted_labels, {}, at::Reduction::Mean, /*ignore_index=*/-100);
}

double PerplexityResult::perplexity() const { return std::exp(mean_nll()); }

PerplexityResult perplexity(CausalLM& model, const std::vector<at::Tensor>& sequences, int64_t max_length) {
  TORCH_CHECK(max_length == 0 || max_length >= 2, "perplexity: max_length must be 0 or >= 2, got ", max_length);
  at::NoGradGuard no_grad;
  PerplexityResult result;
  for (size_t i = 0; i < sequences.size(); ++i) {
    const auto& seq = sequences[i];
    TORCH_CHECK(seq.dim() == 1, "perplexity: sequence ", i, " must be 1-D, got ", seq.sizes());
    const int64_t n = seq.size(0);
    const int64_t window = max_length > 0 ? max_length : n;
    for (int64_t start = 0; start + 1 < n; start += window) {
      const int64_t len = std::min(window, n - start);
      if (len < 2) break;
      auto ids = seq.narrow(0, start, len).unsqueeze(0);
      const double mean = causal_lm_loss(model, ids).item<double>();
      result.nll_sum += mean * double(len - 1);
      result.tokens += len - 1;
    }
  }
  return result;
}

}  // namespace anvil::model
