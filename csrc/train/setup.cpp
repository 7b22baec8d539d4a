// The steps training recipes share (include/anvil/train/setup.h).
#include "anvil/train/setup.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/attention.h"
#include "anvil/model/generate.h"
#include "anvil/ops.h"
#include "anvil/train/loss.h"

#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

namespace anvil::train {

using model::CausalLM;

// ---- setup ---------------------------------------------------------------------------------------------

namespace {

void random_init(CausalLM& model, double std, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& p : model.named_parameters(/*recurse=*/true)) {
    const std::string& name = p.key();
    auto t = p.value();
    const bool norm = name.size() >= 11 && name.compare(name.size() - 11, 11, "norm.weight") == 0;
    if (norm) {
      t.fill_(1.0);
    } else if (t.dim() == 1) {
      t.zero_();
    } else {
      auto cpu = at::empty(t.sizes(), at::kFloat);
      cpu.normal_(0.0, std, gen);
      t.copy_(cpu);
    }
  }
}

double initializer_range_of(const std::string& config_json) {
  const auto j = nlohmann::json::parse(config_json, nullptr, false);
  if (j.is_object() && j.contains("initializer_range") && j["initializer_range"].is_number())
    return j["initializer_range"].get<double>();
  return 0.02;  // transformers' PretrainedConfig default
}

std::string one_line(std::string s) {
  for (auto& ch : s)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return s;
}

}  // namespace

ModelPaths resolve_model_paths(const ModelSection& m) {
  ModelPaths p;
  if (m.init == "pretrained") p.model = io::resolve_model_path(m.path);
  if (!m.tokenizer.empty()) p.tokenizer = io::resolve_model_path(m.tokenizer);
  else if (m.init == "random") p.tokenizer = io::is_directory(m.config) ? m.config : io::parent_dir(m.config);
  else p.tokenizer = p.model;
  return p;
}

std::shared_ptr<CausalLM> build_model(const ModelSection& m, const ModelPaths& paths, at::ScalarType dtype,
                                      at::Device device, uint64_t seed, const std::string& base_weights,
                                      bool shapes_only) {
  std::shared_ptr<CausalLM> lm;
  if (m.init == "pretrained") {
    lm = model::load_causal_lm(paths.model, dtype, device, base_weights);
  } else if (shapes_only) {
    lm = std::make_shared<CausalLM>(model::load_model_config(m.config), at::TensorOptions().dtype(dtype).device(at::kMeta));
  } else {
    lm = std::make_shared<CausalLM>(model::load_model_config(m.config), at::TensorOptions().dtype(dtype).device(device));
    random_init(*lm, initializer_range_of(lm->config().json), seed);
  }
  // Training mode (loading leaves a model in eval mode): dropout is on from the first step, whether or not
  // a validation pass (which restores the mode it found) comes first.
  lm->train();
  return lm;
}

std::unique_ptr<data::Tokenizer> load_tokenizer_if_present(const std::string& dir, const EvalSection& e) {
  const bool has = io::path_exists(io::join_path(dir, "tokenizer.json")) || io::path_exists(io::join_path(dir, "tokenizer.model"));
  if (!has && !e.prompts.empty())
    throw std::invalid_argument("config key eval.prompts: generating needs a tokenizer, and " + dir +
                                " has none (set model.tokenizer)");
  if (!has) return nullptr;
  return data::load_tokenizer(dir);
}

TrainingData read_training_data(const DataSection& d, const data::Tokenizer* tok, uint64_t seed, int64_t vocab_size) {
  data::ReadOptions options;
  options.vocab_size = vocab_size;
  options.loss_on = d.loss_on == "all" ? data::LossOn::kAll : data::LossOn::kCompletion;
  options.add_eos = d.add_eos;
  TrainingData out;
  out.train = data::read_examples(d.train, tok, options, "config key data.train");
  if (!d.validation.empty()) out.validation = data::read_examples(d.validation, tok, options, "config key data.validation");
  else if (d.validation_fraction > 0) data::split_validation(out.train, out.validation, d.validation_fraction, seed);
  out.pad_id = tok ? (tok->pad_id() >= 0 ? tok->pad_id() : std::max(0, tok->eos_id())) : 0;
  out.validation_rows = data::pack_examples(out.validation, d.seq_len, out.pad_id);
  return out;
}

int64_t count_steps(const TrainSection& t, const data::BatchStream& stream) {
  if (t.steps > 0) return t.steps;
  int64_t micro = 0;
  for (int64_t e = 0; e < t.epochs; ++e) micro += stream.batches_in_epoch(e);
  return std::max<int64_t>(1, micro / t.grad_accum);
}

// ---- a causal LM on packed batches ---------------------------------------------------------------------

at::Tensor batch_to_device(const data::Batch& b, at::Device device) {
  auto host = at::empty({4, b.rows, b.length}, at::kLong);  // (4, B, S): ids, positions, doc ids, labels
  const std::vector<int32_t>* parts[4] = {&b.ids, &b.positions, &b.doc_ids, &b.labels};
  auto* out = host.data_ptr<int64_t>();
  for (const auto* part : parts)
    for (const int32_t v : *part) *out++ = v;
  if (!device.is_cuda()) return host;
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

at::Tensor causal_lm_batch_loss(CausalLM& model, const data::Batch& b, double normalizer, int64_t chunk,
                                at::Device device) {
  const auto all = batch_to_device(b, device);  // (4, B, S) int64
  const auto ids = all[0], positions = all[1], docs = all[2], labels = all[3];
  // Document ids only where a row packs several documents: one document per row (padding after it) is
  // plain causal attention, which runs SDPA's flash kernel; a document mask takes the slower masked path.
  auto h = model.hidden_states(ids, nullptr, positions, b.packed ? c10::optional<at::Tensor>(docs) : c10::nullopt);  // (B, S, H)
  if (model.lm_head && model.lm_head->adapter) {
    auto logits = model.lm_head->forward(h).to(at::kFloat);  // (B, S, V)
    auto sum = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}), labels.view({-1}), {}, at::Reduction::Sum,
                                      kIgnoreIndex);
    return normalizer > 0 ? sum / normalizer : sum * 0.0;
  }
  const auto head = model.lm_head ? model.lm_head->weight : model.model->embed_tokens->weight;  // (V, H)
  return causal_lm_loss(h, head, labels, normalizer, chunk);
}

EvalResult evaluate_causal_lm(CausalLM& model, const data::PackedRows& rows, int64_t batch_size, int64_t max_batches,
                              int64_t chunk, at::Device device, const EvalShard& shard) {
  const bool was_training = model.is_training();
  model.eval();
  at::NoGradGuard no_grad;
  auto sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  int64_t targets = 0;
  for (int64_t i = 0, begin = 0; begin < rows.rows; ++i, begin += batch_size) {
    if (max_batches > 0 && i >= max_batches) break;
    if (!shard.mine(i)) continue;
    const auto b = data::slice_rows(rows, begin, std::min(rows.rows, begin + batch_size));
    sum += causal_lm_batch_loss(model, b, 1.0, chunk, device).to(at::kDouble);
    targets += b.targets;
  }
  if (was_training) model.train();
  EvalResult r;
  r.targets = targets;
  r.loss = targets ? sum.item<double>() / double(targets) : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

LossFn causal_lm_loss_fn(CausalLM& model, int64_t chunk, at::Device device) {
  return [&model, chunk, device](const data::Batch& b, double normalizer) {
    return Loss{causal_lm_batch_loss(model, b, normalizer, chunk, device), {}};
  };
}

EvalFn causal_lm_eval_fn(CausalLM& model, const TrainingData& data, const TrainSection& t, const EvalSection& e,
                         at::Device device) {
  if (data.validation_rows.rows == 0) return nullptr;
  return [&model, &data, batch = t.batch_size, max = e.max_batches, chunk = t.loss_chunk, device](const EvalShard& shard) {
    return evaluate_causal_lm(model, data.validation_rows, batch, max, chunk, device, shard);
  };
}

std::vector<std::string> generate_texts(CausalLM& model, const data::Tokenizer& tok,
                                        const std::vector<std::string>& prompts, int64_t max_new_tokens) {
  std::vector<std::string> out;
  const bool was_training = model.is_training();
  model.eval();
  at::NoGradGuard no_grad;
  model::GenerateOptions o;
  o.max_new_tokens = max_new_tokens;
  for (const auto id : tok.eos_ids()) o.stop_tokens.push_back(id);
  // One left-padded batch for all prompts (model::generate_rows): rows of their own lengths.
  std::vector<std::vector<int64_t>> rows;
  for (const auto& p : prompts) {
    const auto ids = tok.encode(p, true);
    rows.emplace_back(ids.begin(), ids.end());
  }
  for (const auto& fresh64 : model::generate_rows(model, rows, o)) {
    std::vector<int32_t> fresh;
    for (const auto id : fresh64) {
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), id) != o.stop_tokens.end()) break;
      fresh.push_back(int32_t(id));
    }
    out.push_back(tok.decode(fresh, true));
  }
  if (was_training) model.train();
  return out;
}

std::vector<std::string> generate_for_prompts(CausalLM& model, const data::Tokenizer* tok, const EvalSection& e) {
  if (e.prompts.empty() || !tok) return {};  // load_tokenizer_if_present refused prompts without a tokenizer
  return generate_texts(model, *tok, e.prompts, e.max_new_tokens);
}

void print_generations_after(CausalLM& model, const data::Tokenizer* tok, const EvalSection& e,
                             const std::vector<std::string>& before) {
  if (e.prompts.empty() || !tok) return;
  print_generations(e.prompts, before, generate_texts(model, *tok, e.prompts, e.max_new_tokens), e.max_new_tokens);
}

void print_generations(const std::vector<std::string>& prompts, const std::vector<std::string>& before,
                       const std::vector<std::string>& after, int64_t max_new_tokens) {
  print_generations(prompts, {{"before", before}, {"after", after}}, max_new_tokens);
}

void print_generations(const std::vector<std::string>& prompts,
                       const std::vector<std::pair<std::string, std::vector<std::string>>>& columns,
                       int64_t max_new_tokens) {
  size_t width = 0;
  for (const auto& [label, texts] : columns) width = std::max(width, label.size());
  std::cout << "\ngenerations (greedy, " << max_new_tokens << " new tokens at most):\n";
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::cout << "prompt: " << one_line(prompts[i]) << "\n";
    for (const auto& [label, texts] : columns)
      std::cout << "  " << label << ":" << std::string(width - label.size() + 1, ' ')
                << (i < texts.size() ? one_line(texts[i]) : "") << "\n";
  }
}

// ---- the memory plan -----------------------------------------------------------------------------------

// Checked against the measured peak by bench/lora (H100, 2026-11-23): the previous model, which still
// counted fp32 copies of every adapted input, estimated 1.91x / 1.20x / 1.07x the measured 853M /
// 853M-checkpointed / 7B peaks; this one is within a few percent of each.
namespace {

MemoryEstimate estimate_one_rank(const CausalLM& model, const MemoryInputs& in, at::Device device) {
  MemoryEstimate m;
  const auto& cfg = model.config();
  int64_t weights = 0;
  for (const auto& [name, t] : model.state_tensors()) weights += t.numel() * int64_t(t.element_size());
  m.weights = double(weights);
  m.trainable = in.trainable_are_weights ? 0.0 : double(in.trainable_numel) * in.trainable_elsize;
  const double world = double(std::max<int64_t>(1, in.world_size));
  const double grads = double(in.trainable_numel) * in.trainable_elsize;
  // ZeRO-2: the gradients a rank owns, and at most two buckets in flight (never more than the whole); stage 0 and
  // 1 hold every gradient once (they are views into the all-reduce's buckets).
  m.gradients = in.world_size > 1 && in.zero_stage >= 2 ? grads / world + std::min(grads, 2.0 * in.bucket_bytes)
                                                         : grads;
  m.optimizer = 2.0 * grads / (in.world_size > 1 && in.zero_stage >= 1 ? world : 1.0);
  const double e = in.bf16_autocast ? 2.0 : double(c10::elementSize(model.dtype()));
  const double h = double(cfg.hidden_size), inter = double(cfg.intermediate_size);
  const double kv = double(cfg.num_key_value_heads * cfg.head_dim), q = double(cfg.num_attention_heads * cfg.head_dim);
  double per_token = e * (4 * h + q + 2 * kv + q + 3 * inter);  // norms, residual, q/k/v, attn out, MLP
  per_token += e * in.extra_activations_per_token;
  const double rows = std::ceil(double(in.batch_size) / world);  // data::shard_rows: this rank's rows
  const double tokens = rows * double(in.seq_len);
  // (B, 1, S, S) bool when rows pack several documents and the mask path runs (model/attention.h).
  const bool varlen = device.is_cuda() && in.seq_len >= model::kVarlenMinSeqLen;  // `device`: a plan's model is on meta
  const double mask = varlen ? 0.0 : rows * double(in.seq_len) * double(in.seq_len);
  const double layers = double(cfg.num_hidden_layers);
  m.activations = per_token * tokens * layers + mask + tokens * e * h;
  m.activations_ckpt = tokens * e * h * layers + per_token * tokens + mask + tokens * e * h;
  const double chunk_rows = std::min<double>(double(in.loss_chunk), tokens);
  // The fused cross-entropy (CUDA) keeps only the chunk's logits in the model dtype; the ATen path an fp32
  // copy and an fp32 temporary besides.
  const bool fused_loss =
      device.is_cuda() && ops::use_fused_ops(at::empty({0}, at::TensorOptions().dtype(model.dtype()).device(device)));
  m.loss_chunk = chunk_rows * double(cfg.vocab_size) * (fused_loss ? e : 4.0 * 2 + e) + tokens * 4.0;
  // A second loss's chunk (KD) runs after the first one's buffers are freed: the larger of the two counts.
  if (in.kd_chunk_rows > 0)
    m.loss_chunk = std::max(m.loss_chunk, std::min(in.kd_chunk_rows, tokens) * in.kd_bytes_per_row +
                                              tokens * in.kd_bytes_per_token);
  m.frozen_weights = in.frozen_weights, m.frozen_activations = tokens * in.frozen_activations_per_token;
  m.total = m.weights + m.trainable + m.gradients + m.optimizer + m.loss_chunk + m.frozen_weights + m.frozen_activations;
  m.total_ckpt = m.total + m.activations_ckpt;
  m.total += m.activations;
  return m;
}

}  // namespace

MemoryEstimate estimate_memory(const CausalLM& model, const MemoryInputs& in, at::Device device) {
  MemoryEstimate m = estimate_one_rank(model, in, device);
  for (int64_t stage = 0; stage <= 2; ++stage) {
    m.by_stage_and_world.emplace_back();
    for (const int64_t world : kPlanWorldSizes) {
      MemoryInputs other = in;
      other.world_size = world, other.zero_stage = stage;
      const auto r = estimate_one_rank(model, other, device);
      m.by_stage_and_world.back().push_back(in.grad_checkpointing ? r.total_ckpt : r.total);
    }
  }
  return m;
}

void add_frozen_model(MemoryInputs& in, const CausalLM& frozen, const CausalLM& trained, const std::string& what,
                      int64_t chunk_rows) {
  in.frozen_what = what;
  int64_t weights = 0;
  for (const auto& [name, t] : frozen.state_tensors()) weights += t.numel() * int64_t(t.element_size());
  in.frozen_weights = double(weights);
  const auto& f = frozen.config();
  const double e = double(c10::elementSize(frozen.dtype()));
  const double h = double(f.hidden_size), inter = double(f.intermediate_size);
  const double q = double(f.num_attention_heads * f.head_dim), kv = double(f.num_key_value_heads * f.head_dim);
  // The output hidden states, the layer input and one layer's temporaries; the target rows' copy.
  in.frozen_activations_per_token = e * (3 * h + q + 2 * kv + 3 * inter) + e * h;
  const double v = double(trained.config().vocab_size);
  // Per row: both models' logits in their dtypes, then ~6 fp32 (rows, V) buffers (log-probs, probabilities,
  // the mixture's log, the gradient).
  in.kd_chunk_rows = double(chunk_rows);
  in.kd_bytes_per_row = v * (e + double(c10::elementSize(trained.dtype())) + 6 * 4.0);
  in.kd_bytes_per_token = 8.0;
}

std::string format_estimate(const MemoryEstimate& m, const MemoryInputs& in) {
  std::ostringstream o;
  char buf[160];
  auto row = [&](const char* what, double bytes) {  // GiB, or MiB below one GiB
    const bool big = bytes >= double(1ull << 30);
    std::snprintf(buf, sizeof buf, "  %-38s %10.3f %s\n", what, bytes / double(big ? 1ull << 30 : 1ull << 20),
                  big ? "GiB" : "MiB");
    o << buf;
  };
  o << "memory estimate (batch_size " << in.batch_size << " x seq_len " << in.seq_len << ", " << in.what << ", "
    << in.trainable_numel << " trainable parameters";
  if (in.world_size > 1) o << "; one rank of " << in.world_size << ", train.zero_stage " << in.zero_stage;
  o << "):\n";
  row("weights", m.weights);
  if (!in.trainable_are_weights) row("adapters (fp32)", m.trainable);
  row("gradients", m.gradients);
  row("AdamW state (exp_avg, exp_avg_sq)", m.optimizer);
  row("activations", m.activations);
  row("activations with grad_checkpointing", m.activations_ckpt);
  row(in.kd_chunk_rows > 0 ? "loss chunk (larger of CE and KD)" : "loss chunk (train.loss_chunk rows)",
      m.loss_chunk);
  if (!in.frozen_what.empty()) {
    row((in.frozen_what + " weights (frozen)").c_str(), m.frozen_weights);
    row((in.frozen_what + " forward (no grad)").c_str(), m.frozen_activations);
  }
  row(in.grad_checkpointing ? "total (grad_checkpointing off)" : "total", m.total);
  row(in.grad_checkpointing ? "total" : "total with grad_checkpointing", m.total_ckpt);
  if (!m.by_stage_and_world.empty()) {
    // The same run launched on more ranks (torchrun --nproc-per-node N): one rank's total, in GiB (MiB when the
    // whole is below one GiB).
    const bool big = m.by_stage_and_world[0][0] >= double(1ull << 30);
    const double unit = double(big ? 1ull << 30 : 1ull << 20);
    o << "per rank under torchrun (" << (big ? "GiB" : "MiB") << ", train.grad_checkpointing " << (in.grad_checkpointing ? "true" : "false")
      << ", batch_size rows split over the ranks):\n";
    std::snprintf(buf, sizeof buf, "  %-38s", "train.zero_stage \\ ranks");
    o << buf;
    for (const int64_t w : kPlanWorldSizes) {
      std::snprintf(buf, sizeof buf, " %8lld", static_cast<long long>(w));
      o << buf;
    }
    o << "\n";
    static const char* const kStage[] = {"0 (replicated)", "1 (AdamW state sharded)", "2 (and gradients)"};
    for (size_t s = 0; s < m.by_stage_and_world.size(); ++s) {
      std::snprintf(buf, sizeof buf, "  %-38s", kStage[s]);
      o << buf;
      for (const double b : m.by_stage_and_world[s]) {
        std::snprintf(buf, sizeof buf, " %8.2f", b / unit);
        o << buf;
      }
      o << "\n";
    }
  }
  return o.str();
}

MemoryInputs memory_inputs(const std::string& what, const TrainSection& t, const DataSection& d,
                           const NamedTensors& trainable, int64_t world_size) {
  MemoryInputs in;
  in.world_size = std::max<int64_t>(1, world_size), in.zero_stage = t.zero_stage;
  in.bucket_bytes = t.dist_bucket_mb * double(1 << 20);
  in.what = what;
  in.batch_size = t.batch_size, in.seq_len = d.seq_len, in.loss_chunk = t.loss_chunk;
  in.bf16_autocast = t.mixed_precision == "bf16";
  in.grad_checkpointing = t.grad_checkpointing;
  for (const auto& [name, p] : trainable) in.trainable_numel += p.numel();
  in.trainable_elsize = trainable.empty() ? 4 : int64_t(trainable[0].second.element_size());
  return in;
}

std::string memory_advice(const MemoryEstimate& m, const MemoryInputs& in, const std::string& more) {
  return format_estimate(m, in) + "to lower it: train.batch_size (now " + std::to_string(in.batch_size) +
         ", raise train.grad_accum to keep the step size), data.seq_len (now " + std::to_string(in.seq_len) +
         "), train.grad_checkpointing (now " + (in.grad_checkpointing ? "true" : "false") + ")" + more;
}

void print_run_summary(const std::string& recipe, const CausalLM& model, at::Device device,
                       const NamedTensors& trainable, const TrainingData& data, int64_t total_steps) {
  int64_t numel = 0;
  for (const auto& [name, t] : trainable) numel += t.numel();
  std::cerr << "anvil " << recipe << ": " << model.config().architecture << " (" << model::dtype_name(model.dtype())
            << ", " << device.str() << "), " << trainable.size() << " trainable tensors (" << numel
            << " parameters), " << data.train.size() << " training examples, " << data.validation.size()
            << " validation examples, " << total_steps << " steps\n";
}

}  // namespace anvil::train
