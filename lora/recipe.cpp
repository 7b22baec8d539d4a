// The `anvil lora` / `anvil train` recipe (lora/recipe.h).
//
// run_recipe at the bottom reads top to bottom: set up the model (loaded, or randomly initialised for
// full training), attach adapters, load the tokenizer, read and split the data; print the memory
// estimate; resume from a checkpoint when asked; generate from eval.prompts; then the loop: for each
// optimizer step, grad_accum micro-batches forward + backward through the chunked loss, clip, AdamW,
// log, evaluate, checkpoint; finally the adapter (or model), the plot and the generations again.
//
// Exactness of resume (bit-exact on the CPU in fp32) rests on three things, each saved in the
// checkpoint: the trainable tensors and AdamW state (safetensors, exact), the torch CPU (and CUDA)
// generator states (LoRA dropout draws from them), and the data position (epoch, micro-batch index):
// an epoch's order is a pure function of (seed, epoch), so packing is recomputed, not stored. With
// PiSSA the frozen base itself depends on the run (W - scaling B0 A0): the initial factors travel in
// every checkpoint and a resumed run rebuilds the residual from them instead of from a new SVD.
//
// PiSSA's outputs: adapter/ is the adapter converted to a plain LoRA of the original base (PEFT's
// path_initial_model_for_weight_conversion), so that it loads where every other adapter does.
//
// Host syncs: micro-batches are packed on the host, so the target count of a step (the loss
// normalizer) is known without touching the device; the loss is accumulated on the device and read
// back only on logged steps (output.log_every), where the non-finite check happens too.
#include "lora/recipe.h"

#include "anvil/data/dataset.h"
#include "anvil/data/tokenizer.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/generate.h"
#include "anvil/model/transformer.h"
#include "anvil/train/loss.h"
#include "anvil/train/optim.h"
#include "anvil/train/plot.h"
#include "anvil/train/progress.h"
#include "io/io_internal.h"  // the core's POSIX path helpers

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>
#include <torch/autograd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include <sys/stat.h>
#include <unistd.h>

#if defined(ANVIL_WITH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace anvil::lora {

namespace {

using nlohmann::json;
using anvil::data::Example;
using anvil::model::CausalLM;

// ---- Ctrl-C ----------------------------------------------------------------------------------------

std::atomic<bool> g_interrupted{false};

// The first Ctrl-C asks the loop to stop after the current step; a second one kills as usual.
extern "C" void on_interrupt(int) {
  g_interrupted = true;
  std::signal(SIGINT, SIG_DFL);
}

// ---- small file helpers ----------------------------------------------------------------------------
// Paths through POSIX and the core's helpers, never std::filesystem (libtorch.so exports broken copies
// of its functions: docs/ARCHITECTURE.md).

std::string join(const std::string& dir, const std::string& name) { return io::detail::join_path(dir, name); }

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    throw std::runtime_error("cannot rename " + from + " to " + to + ": " + std::strerror(errno));
}

// rm -r: a directory's entries, then the directory; nothing when absent.
void remove_tree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& name : io::detail::list_directory(path)) remove_tree(join(path, name));
    if (::rmdir(path.c_str()) != 0) throw std::runtime_error("cannot remove " + path + ": " + std::strerror(errno));
  } else if (::unlink(path.c_str()) != 0) {
    throw std::runtime_error("cannot remove " + path + ": " + std::strerror(errno));
  }
}

void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  if (!in || !out) throw std::runtime_error("cannot copy " + from + " to " + to);
  out << in.rdbuf();
  if (!out) throw std::runtime_error("copy of " + from + " to " + to + " failed");
}

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp);
    out << text;
    if (!out) throw std::runtime_error("write to " + tmp + " failed");
  }
  rename_path(tmp, path);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// ---- setup: device, model, tokenizer ---------------------------------------------------------------

at::Device resolve_device(const std::string& name) {
  if (name == "auto") return at::hasCUDA() ? at::Device("cuda") : at::Device(at::kCPU);
  if (name.rfind("cuda", 0) == 0 && !at::hasCUDA())
    throw std::invalid_argument("config key model.device: \"" + name + "\" but no CUDA device is available (use \"cpu\")");
  return at::Device(name);
}

// transformers' _init_weights for the decoder-only models: Linear and Embedding weights
// normal(0, initializer_range), biases zero, RMSNorm weights one. Drawn on the CPU from a generator
// seeded with train.seed, so a seed gives the same model on any device.
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
  const auto j = json::parse(config_json, nullptr, false);
  if (j.is_object() && j.contains("initializer_range") && j["initializer_range"].is_number())
    return j["initializer_range"].get<double>();
  return 0.02;  // transformers' PretrainedConfig default
}

std::shared_ptr<CausalLM> build_model(const RecipeConfig& c, at::Device device, at::ScalarType dtype) {
  if (c.model.init == "pretrained") {
    // anvil train updates every weight, so FP8 checkpoints are dequantized for it.
    const std::string base = c.mode == RecipeMode::kFull ? std::string("dense") : c.model.base_weights;
    return anvil::model::load_causal_lm(io::resolve_model_path(c.model.path), dtype, device, base);
  }
  auto config = anvil::model::load_model_config(c.model.config);
  auto model = std::make_shared<CausalLM>(config, at::TensorOptions().dtype(dtype).device(device));
  random_init(*model, initializer_range_of(model->config().json), c.train.seed);
  return model;
}

std::string tokenizer_dir(const RecipeConfig& c) {
  if (!c.model.tokenizer.empty()) return io::resolve_model_path(c.model.tokenizer);
  if (c.model.init == "random") {
    const std::string& p = c.model.config;
    return io::detail::is_directory(p) ? p : io::detail::parent_dir(p);
  }
  return io::resolve_model_path(c.model.path);
}

// The tokenizer, or null when the folder has none (pre-tokenized data needs none).
std::unique_ptr<anvil::data::Tokenizer> load_tokenizer_if_present(const std::string& dir) {
  const bool has = path_exists(join(dir, "tokenizer.json")) || path_exists(join(dir, "tokenizer.model"));
  if (!has) return nullptr;
  return anvil::data::load_tokenizer(dir);
}

// ---- data ------------------------------------------------------------------------------------------

// One JSONL line: pre-tokenized {"input_ids": [...], "labels": [...]?} (labels as transformers takes
// them: the token itself or -100; every token is a target without labels), else text for the tokenizer.
Example read_line(const std::string& line, const anvil::data::Tokenizer* tok, const anvil::data::ReadOptions& options,
                  const std::string& where) {
  const auto j = json::parse(line, nullptr, false);
  if (j.is_object() && j.contains("input_ids")) {
    Example e;
    const auto& ids = j["input_ids"];
    if (!ids.is_array() || ids.empty()) throw std::runtime_error(where + ": \"input_ids\" must be a non-empty list of ids");
    for (const auto& id : ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0)
        throw std::runtime_error(where + ": \"input_ids\" must hold non-negative integers, got " + id.dump());
      e.ids.push_back(id.get<int32_t>());
    }
    e.target.assign(e.ids.size(), 1);
    if (j.contains("labels")) {
      const auto& labels = j["labels"];
      if (!labels.is_array() || labels.size() != ids.size())
        throw std::runtime_error(where + ": \"labels\" must be a list as long as \"input_ids\"");
      for (size_t i = 0; i < labels.size(); ++i) {
        if (!labels[i].is_number_integer())
          throw std::runtime_error(where + ": \"labels\" must hold integers (-100 = no target)");
        e.target[i] = labels[i].get<int64_t>() != anvil::train::kIgnoreIndex;
      }
    }
    return e;
  }
  if (!tok)
    throw std::runtime_error(where + ": a text example needs a tokenizer, and none was found (set model.tokenizer to a "
                             "folder with tokenizer.json or tokenizer.model, or give pre-tokenized {\"input_ids\": [...]} lines)");
  return anvil::data::tokenize_example(line, *tok, options, where);
}

std::vector<Example> read_examples(const std::string& path, const anvil::data::Tokenizer* tok,
                                   const anvil::data::ReadOptions& options, const std::string& key) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("config key " + key + ": cannot open \"" + path + "\"");
  std::vector<Example> out;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    out.push_back(read_line(line, tok, options, path + ":" + std::to_string(n)));
  }
  if (out.empty()) throw std::runtime_error("config key " + key + ": \"" + path + "\" holds no examples");
  return out;
}

// A deterministic validation split: a seeded permutation's first round(f * n) examples (at least
// one, and at least one left to train on), kept in file order on both sides.
void split_validation(std::vector<Example>& train, std::vector<Example>& validation, double fraction, uint64_t seed) {
  const int64_t n = int64_t(train.size());
  int64_t k = std::llround(fraction * double(n));
  k = std::max<int64_t>(1, std::min<int64_t>(k, n - 1));
  if (n < 2) throw std::runtime_error("config key data.validation_fraction: needs at least 2 training examples");
  const auto order = anvil::data::shuffled_order(n, seed ^ 0x5eed5a1177ULL);
  std::vector<uint8_t> is_val(n, 0);
  for (int64_t i = 0; i < k; ++i) is_val[order[i]] = 1;
  std::vector<Example> rest;
  for (int64_t i = 0; i < n; ++i) (is_val[i] ? validation : rest).push_back(std::move(train[i]));
  train = std::move(rest);
}

// One micro-batch, on the host.
struct Batch {
  int64_t rows = 0, length = 0;
  std::vector<int32_t> ids, labels, positions, doc_ids;
  int64_t targets = 0, tokens = 0;  // labels != -100; non-padding tokens
  bool packed = false;              // some row holds a second document (doc id > 0)
};

// Micro-batches of packed rows, epoch after epoch: epoch e packs the examples in the order
// shuffled_order(n, seed, e); the position (epoch, index) says where the next batch starts.
class BatchStream {
 public:
  BatchStream(const std::vector<Example>& examples, int64_t seq_len, int32_t pad_id, int64_t batch_size, uint64_t seed)
      : examples_(examples), seq_len_(seq_len), pad_id_(pad_id), batch_size_(batch_size), seed_(seed) {}

  static uint64_t epoch_seed(uint64_t seed, int64_t epoch) { return seed * 1000003ULL + uint64_t(epoch) + 1; }

  anvil::data::PackedRows pack_epoch(int64_t epoch) const {
    const auto order = anvil::data::shuffled_order(int64_t(examples_.size()), epoch_seed(seed_, epoch));
    std::vector<Example> ordered;
    ordered.reserve(order.size());
    for (const auto i : order) ordered.push_back(examples_[i]);
    return anvil::data::pack_examples(ordered, seq_len_, pad_id_);
  }
  int64_t batches_in_epoch(int64_t epoch) const { return (pack_epoch(epoch).rows + batch_size_ - 1) / batch_size_; }

  void seek(int64_t epoch, int64_t index) {
    epoch_ = epoch, index_ = index;
    rows_ = pack_epoch(epoch_);
  }
  int64_t epoch() const { return epoch_; }
  int64_t index() const { return index_; }

  Batch next() {
    if (rows_.rows == 0) rows_ = pack_epoch(epoch_);
    if (index_ * batch_size_ >= rows_.rows) {
      ++epoch_, index_ = 0;
      rows_ = pack_epoch(epoch_);
    }
    Batch b = slice(rows_, index_ * batch_size_, std::min(rows_.rows, (index_ + 1) * batch_size_));
    ++index_;
    return b;
  }

  static Batch slice(const anvil::data::PackedRows& r, int64_t begin, int64_t end) {
    Batch b;
    b.rows = end - begin, b.length = r.row_length;
    const auto from = begin * r.row_length, to = end * r.row_length;
    b.ids.assign(r.ids.begin() + from, r.ids.begin() + to);
    b.labels.assign(r.labels.begin() + from, r.labels.begin() + to);
    b.positions.assign(r.positions.begin() + from, r.positions.begin() + to);
    b.doc_ids.assign(r.doc_ids.begin() + from, r.doc_ids.begin() + to);
    for (size_t i = 0; i < b.labels.size(); ++i) {
      b.targets += b.labels[i] != anvil::train::kIgnoreIndex;
      b.tokens += b.doc_ids[i] >= 0;
      b.packed = b.packed || b.doc_ids[i] > 0;
    }
    return b;
  }

 private:
  const std::vector<Example>& examples_;
  int64_t seq_len_;
  int32_t pad_id_;
  int64_t batch_size_;
  uint64_t seed_;
  int64_t epoch_ = 0, index_ = 0;
  anvil::data::PackedRows rows_;
};

// The batch's ids, positions, doc ids and labels as one (4, B, S) int64 tensor on `device`: one copy.
// For CUDA the host tensor is pinned and the copy non-blocking, so the host does not wait for the
// device's queue (a copy from pageable memory synchronizes the stream first).
at::Tensor to_device(const Batch& b, at::Device device) {
  auto host = at::empty({4, b.rows, b.length}, at::kLong);
  const std::vector<int32_t>* parts[4] = {&b.ids, &b.positions, &b.doc_ids, &b.labels};
  auto* out = host.data_ptr<int64_t>();
  for (const auto* part : parts)
    for (const int32_t v : *part) *out++ = v;
  if (!device.is_cuda()) return host;
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

// ---- the loss of one micro-batch -----------------------------------------------------------------

at::Tensor head_weight(CausalLM& model) { return model.lm_head ? model.lm_head->weight : model.model->embed_tokens->weight; }

// sum of target losses / normalizer. The chunked loss over the head, unless lm_head carries an
// adapter (targeted explicitly): then the head's full forward and at::cross_entropy.
at::Tensor batch_loss(CausalLM& model, const Batch& b, double normalizer, int64_t chunk, at::Device device) {
  const auto all = to_device(b, device);  // (4, B, S) int64
  const auto ids = all[0], positions = all[1], docs = all[2], labels = all[3];
  // Document ids only where a row packs several documents: one document per row (padding after it) is
  // plain causal attention, which runs SDPA's flash kernel; a document mask takes the slower masked path.
  auto h = model.hidden_states(ids, nullptr, positions, b.packed ? c10::optional<at::Tensor>(docs) : c10::nullopt);  // (B, S, H)
  if (model.lm_head && model.lm_head->adapter) {
    auto logits = model.lm_head->forward(h).to(at::kFloat);  // (B, S, V)
    auto sum = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}), labels.view({-1}), {}, at::Reduction::Sum,
                                      anvil::train::kIgnoreIndex);
    return normalizer > 0 ? sum / normalizer : sum * 0.0;
  }
  return anvil::train::causal_lm_loss(h, head_weight(model), labels, normalizer, chunk);
}

// ---- evaluation ------------------------------------------------------------------------------------

struct EvalResult {
  double loss = 0, ppl = 0;
  int64_t targets = 0;
};

EvalResult evaluate(CausalLM& model, const anvil::data::PackedRows& rows, int64_t batch_size, int64_t max_batches,
                    int64_t chunk, at::Device device) {
  model.eval();
  at::NoGradGuard no_grad;
  auto sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  int64_t targets = 0;
  for (int64_t i = 0, begin = 0; begin < rows.rows; ++i, begin += batch_size) {
    if (max_batches > 0 && i >= max_batches) break;
    const auto b = BatchStream::slice(rows, begin, std::min(rows.rows, begin + batch_size));
    sum += batch_loss(model, b, 1.0, chunk, device).to(at::kDouble);
    targets += b.targets;
  }
  model.train();
  EvalResult r;
  r.targets = targets;
  r.loss = targets ? sum.item<double>() / double(targets) : 0.0;
  r.ppl = std::exp(r.loss);
  return r;
}

// ---- generations before and after ------------------------------------------------------------------

std::vector<std::string> generate_all(CausalLM& model, const anvil::data::Tokenizer& tok,
                                      const std::vector<std::string>& prompts, int64_t max_new_tokens) {
  std::vector<std::string> out;
  const bool was_training = model.is_training();
  model.eval();
  at::NoGradGuard no_grad;
  anvil::model::GenerateOptions o;
  o.max_new_tokens = max_new_tokens;
  for (const auto id : tok.eos_ids()) o.stop_tokens.push_back(id);
  for (const auto& p : prompts) {
    const auto ids = tok.encode(p, true);
    std::vector<int64_t> ids64(ids.begin(), ids.end());
    auto prompt = at::tensor(ids64, at::kLong).unsqueeze(0);
    auto full = anvil::model::generate(model, prompt, o).to(at::kCPU);
    std::vector<int32_t> fresh;
    for (int64_t i = prompt.size(1); i < full.size(1); ++i) {
      const auto id = int32_t(full[0][i].item<int64_t>());
      if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), id) != o.stop_tokens.end()) break;
      fresh.push_back(id);
    }
    out.push_back(tok.decode(fresh, true));
  }
  if (was_training) model.train();
  return out;
}

std::string one_line(std::string s) {
  for (auto& ch : s)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return s;
}

// ---- memory estimate -------------------------------------------------------------------------------

struct MemoryEstimate {
  double weights = 0, trainable = 0, gradients = 0, optimizer = 0, activations = 0, activations_ckpt = 0,
         loss_chunk = 0, total = 0, total_ckpt = 0;
};

double gib(double bytes) { return bytes / double(1ull << 30); }

// A model of what training holds, in bytes; activations per token per layer counted from the tensors
// autograd keeps for a Llama-style layer (norm inputs, q/k/v, attention output, the MLP's gate, up and
// product), LoRA's dropped-out inputs when lora.dropout > 0 (its branch otherwise saves the layer's own
// input, already counted) and its rank-r intermediates, and the per-document mask where packing uses one.
// Checked against the measured peak by bench/lora (H100, 2026-11-23): the previous model, which still
// counted fp32 copies of every adapted input, estimated 1.91x / 1.20x / 1.07x the measured 853M /
// 853M-checkpointed / 7B peaks; this one is within a few percent of each.
MemoryEstimate estimate_memory(const CausalLM& model, const RecipeConfig& c, int64_t trainable_numel,
                               int64_t trainable_elsize, at::Device device) {
  MemoryEstimate m;
  const auto& cfg = model.config();
  int64_t weights = 0;
  for (const auto& [name, t] : model.state_tensors()) weights += t.numel() * int64_t(t.element_size());
  m.weights = double(weights);
  m.trainable = c.mode == RecipeMode::kLora ? double(trainable_numel) * trainable_elsize : 0.0;
  m.gradients = double(trainable_numel) * trainable_elsize;
  m.optimizer = 2.0 * double(trainable_numel) * trainable_elsize;
  const double e = c.train.mixed_precision == "bf16" ? 2.0 : double(c10::elementSize(model.dtype()));
  const double h = double(cfg.hidden_size), inter = double(cfg.intermediate_size);
  const double kv = double(cfg.num_key_value_heads * cfg.head_dim), q = double(cfg.num_attention_heads * cfg.head_dim);
  double per_token = e * (4 * h + q + 2 * kv + q + 3 * inter);  // norms, residual, q/k/v, attn out, MLP
  if (c.mode == RecipeMode::kLora) {
    per_token += e * 7.0 * double(c.lora.r);                                  // x A of each of the 7 linears
    if (c.lora.lora_dropout > 0) per_token += e * (h + q + h + inter);       // dropout(x) per distinct input
  }
  const double tokens = double(c.train.batch_size) * double(c.data.seq_len);
  // (B, 1, S, S) bool when rows pack several documents and the mask path runs (model/attention.h).
  const bool varlen = model.device().is_cuda() && c.data.seq_len >= anvil::model::kVarlenMinSeqLen;
  const double mask = varlen ? 0.0 : double(c.train.batch_size) * double(c.data.seq_len) * double(c.data.seq_len);
  const double layers = double(cfg.num_hidden_layers);
  m.activations = per_token * tokens * layers + mask + tokens * e * h;
  m.activations_ckpt = tokens * e * h * layers + per_token * tokens + mask + tokens * e * h;
  const double rows = std::min<double>(double(c.train.loss_chunk), tokens);
  // The fused cross-entropy (CUDA) keeps only the chunk's logits in the model dtype; the ATen path an fp32
  // copy and an fp32 temporary besides.
  const bool fused_loss =
      device.is_cuda() && anvil::model::use_fused_ops(at::empty({0}, at::TensorOptions().dtype(model.dtype()).device(device)));
  m.loss_chunk = rows * double(cfg.vocab_size) * (fused_loss ? e : 4.0 * 2 + e) + tokens * 4.0;
  m.total = m.weights + (c.mode == RecipeMode::kFull ? 0 : m.trainable) + m.gradients + m.optimizer + m.loss_chunk;
  m.total_ckpt = m.total + m.activations_ckpt;
  m.total += m.activations;
  return m;
}

std::string format_estimate(const MemoryEstimate& m, const RecipeConfig& c, int64_t trainable_numel) {
  std::ostringstream o;
  char buf[160];
  auto row = [&](const char* what, double bytes) {  // GiB, or MiB below one GiB
    const bool big = bytes >= double(1ull << 30);
    std::snprintf(buf, sizeof buf, "  %-38s %10.3f %s\n", what, big ? gib(bytes) : bytes / double(1ull << 20),
                  big ? "GiB" : "MiB");
    o << buf;
  };
  o << "memory estimate (batch_size " << c.train.batch_size << " x seq_len " << c.data.seq_len
    << (c.mode == RecipeMode::kLora ? ", lora r " + std::to_string(c.lora.r) : std::string(", full training"))
    << ", " << trainable_numel << " trainable parameters):\n";
  row("weights", m.weights);
  if (c.mode == RecipeMode::kLora) row("adapters (fp32)", m.trainable);
  row("gradients", m.gradients);
  row("AdamW state (exp_avg, exp_avg_sq)", m.optimizer);
  row("activations", m.activations);
  row("activations with grad_checkpointing", m.activations_ckpt);
  row("loss chunk (train.loss_chunk rows)", m.loss_chunk);
  row(c.train.grad_checkpointing ? "total (grad_checkpointing off)" : "total", m.total);
  row(c.train.grad_checkpointing ? "total" : "total with grad_checkpointing", m.total_ckpt);
  return o.str();
}

// ---- checkpoints -----------------------------------------------------------------------------------

// checkpoint/'s file of PiSSA's initial factors (the residual base is W - scaling B0 A0).
const char kPissaInitFile[] = "pissa_init.safetensors";

struct TrainState {
  int64_t step = 0, epoch = 0, index = 0, tokens = 0;
  double elapsed = 0;
};

// checkpoint/ = trainable.safetensors, optimizer.safetensors, rng.safetensors, state.json (and, for
// PiSSA, pissa_init.safetensors: the initial factors that define the residual base). Written
// into checkpoint.tmp/, then the old checkpoint/ is moved to checkpoint.old/, the new one renamed
// into place and the old one removed: some complete checkpoint exists at every moment.
void save_training_checkpoint(const std::string& out_dir, const std::vector<std::pair<std::string, at::Tensor>>& trainable,
                              const std::vector<std::pair<std::string, at::Tensor>>& pissa_init,
                              const anvil::train::AdamW& optimizer, const TrainState& st, const json& config,
                              at::Device device) {
  const std::string dir = join(out_dir, "checkpoint"), tmp = join(out_dir, "checkpoint.tmp"), old = join(out_dir, "checkpoint.old");
  remove_tree(tmp);
  io::detail::make_directories(tmp);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (const auto& [name, t] : trainable) weights.emplace_back(name, t.detach());
  io::save_safetensors(join(tmp, "trainable.safetensors"), weights);
  io::save_safetensors(join(tmp, "optimizer.safetensors"), optimizer.state_tensors());
  if (!pissa_init.empty()) io::save_safetensors(join(tmp, kPissaInitFile), pissa_init);
  std::vector<std::pair<std::string, at::Tensor>> rng = {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}};
  if (device.is_cuda()) rng.emplace_back("cuda", at::globalContext().defaultGenerator(device).get_state());
  io::save_safetensors(join(tmp, "rng.safetensors"), rng);
  json state = {{"step", st.step},   {"epoch", st.epoch},     {"batch_index", st.index},
                {"tokens", st.tokens}, {"elapsed_s", st.elapsed}, {"config", config}};
  write_text_atomic(join(tmp, "state.json"), state.dump(2) + "\n");
  remove_tree(old);
  if (path_exists(dir)) rename_path(dir, old);
  rename_path(tmp, dir);
  remove_tree(old);
}

// PiSSA's unrounded initial factors from a checkpoint (pissa_init.safetensors), by PEFT file name.
std::vector<std::pair<std::string, at::Tensor>> load_pissa_factors(const std::string& dir) {
  const std::string path = join(dir, kPissaInitFile);
  if (!path_exists(path))
    throw std::runtime_error("--resume: " + path + " is missing; the checkpoint was not made by a PiSSA run "
                             "(lora.init must match the run's)");
  io::SafetensorsFile f(path);
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& e : f.entries()) out.emplace_back(e.name, f.tensor(e.name));
  return out;
}

std::string find_checkpoint(const std::string& out_dir) {
  if (path_exists(join(out_dir, "checkpoint/state.json"))) return join(out_dir, "checkpoint");
  if (path_exists(join(out_dir, "checkpoint.old/state.json"))) return join(out_dir, "checkpoint.old");  // crash mid-rename
  throw std::runtime_error("--resume: no checkpoint in " + join(out_dir, "checkpoint") +
                           " (start without --resume, or set output.dir to the run to continue)");
}

// The keys a resumed run must share with the checkpoint's run: everything that decides the data, the
// model, the trainable tensors and their shapes.
void check_same_run(const json& now, const json& then) {
  for (const char* section : {"model", "data", "lora"})
    for (auto it = now[section].begin(); it != now[section].end(); ++it)
      if (!then.contains(section) || then[section].value(it.key(), json()) != it.value())
        throw std::runtime_error(std::string("--resume: config key ") + section + "." + it.key() + " is " +
                                 it.value().dump() + " but the checkpoint was made with " +
                                 (then.contains(section) ? then[section].value(it.key(), json()).dump() : "null"));
  for (const char* key : {"batch_size", "grad_accum", "seed"})
    if (then["train"].value(key, json()) != now["train"][key])
      throw std::runtime_error(std::string("--resume: config key train.") + key + " is " + now["train"][key].dump() +
                               " but the checkpoint was made with " + then["train"].value(key, json()).dump());
}

TrainState load_training_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& trainable,
                                    anvil::train::AdamW& optimizer, const json& config, at::Device device) {
  const auto state = json::parse(read_text(join(dir, "state.json")));
  check_same_run(config, state.at("config"));
  {
    io::SafetensorsFile f(join(dir, "trainable.safetensors"));
    at::NoGradGuard no_grad;
    for (const auto& [name, t] : trainable) {
      if (!f.contains(name)) throw std::runtime_error("--resume: " + f.path() + " lacks tensor '" + name + "'");
      auto src = f.tensor(name);
      if (src.sizes() != t.sizes())
        throw std::runtime_error("--resume: tensor '" + name + "' in " + f.path() + " has shape " + c10::str(src.sizes()) +
                                 ", the model needs " + c10::str(t.sizes()));
      auto dst = t;
      dst.copy_(src);
    }
  }
  {
    io::SafetensorsFile f(join(dir, "optimizer.safetensors"));
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& e : f.entries()) tensors.emplace_back(e.name, f.tensor(e.name));
    optimizer.load_state(tensors);
  }
  {
    io::SafetensorsFile f(join(dir, "rng.safetensors"));
    auto cpu = at::detail::getDefaultCPUGenerator();
    cpu.set_state(f.tensor("cpu").clone());
    if (device.is_cuda() && f.contains("cuda")) {
      auto gen = at::globalContext().defaultGenerator(device);
      gen.set_state(f.tensor("cuda").clone());
    }
  }
  TrainState st;
  st.step = state.at("step").get<int64_t>();
  st.epoch = state.at("epoch").get<int64_t>();
  st.index = state.at("batch_index").get<int64_t>();
  st.tokens = state.at("tokens").get<int64_t>();
  st.elapsed = state.at("elapsed_s").get<double>();
  return st;
}

// ---- metrics.jsonl ---------------------------------------------------------------------------------

// Keeps the lines of steps <= step (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::string& path, int64_t step) {
  if (!path_exists(path)) return;
  std::ifstream in(path);
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto j = json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= step)
      kept += line + "\n";
  }
  write_text_atomic(path, kept);
}

class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path) : out_(path, std::ios::app) {
    if (!out_) throw std::runtime_error("cannot append to " + path);
  }
  void write(const json& j) {
    out_ << j.dump() << "\n";
    out_.flush();
  }

 private:
  std::ofstream out_;
};

void plot_metrics(const std::string& metrics, const std::string& svg, const std::string& title) {
  anvil::train::LossSeries train{"train", {}, false, "#1f77b4"}, val{"validation", {}, true, "#d62728"};
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    const auto j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("step")) continue;
    if (j.contains("loss")) train.xy.emplace_back(j["step"].get<double>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val.xy.emplace_back(j["step"].get<double>(), j["val_loss"].get<double>());
  }
  anvil::train::write_loss_plot(svg, {train, val}, title);
}

// ---- outputs ---------------------------------------------------------------------------------------

void copy_tokenizer_files(const std::string& from, const std::string& to) {
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"}) {
    const std::string src = join(from, name);
    if (path_exists(src)) copy_file(src, join(to, name));
  }
}

std::string fixed(double v, int digits) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string sci(double v) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

double peak_memory_gib(at::Device device) {
#if defined(ANVIL_WITH_CUDA)
  if (device.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    return gib(double(stats.allocated_bytes[0].peak));
  }
#endif
  (void)device;
  return -1;
}

// Autocast for full training with train.mixed_precision = "bf16", on for the guard's lifetime.
class AutocastGuard {
 public:
  AutocastGuard(bool on, at::DeviceType type) : on_(on), type_(type) {
    if (!on_) return;
    was_ = at::autocast::is_autocast_enabled(type_);
    was_dtype_ = at::autocast::get_autocast_dtype(type_);
    at::autocast::set_autocast_enabled(type_, true);
    at::autocast::set_autocast_dtype(type_, at::kBFloat16);
  }
  ~AutocastGuard() {
    if (!on_) return;
    at::autocast::set_autocast_enabled(type_, was_);
    at::autocast::set_autocast_dtype(type_, was_dtype_);
    at::autocast::clear_cache();
  }

 private:
  bool on_, was_ = false;
  at::DeviceType type_;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace

// ==== the recipe =====================================================================================

int run_recipe(const RecipeConfig& c, const RecipeOptions& options) {
  const bool lora_mode = c.mode == RecipeMode::kLora;
  const std::string out_dir(c.output.dir);
  const at::Device device = resolve_device(c.model.device);
  const bool mixed = c.train.mixed_precision == "bf16";
  // Mixed precision keeps fp32 master weights and computes in bf16 under autocast.
  const at::ScalarType dtype = mixed ? at::kFloat : anvil::model::dtype_from_name(c.model.dtype);

  // ---- model, adapters, tokenizer ----
  at::manual_seed(c.train.seed);  // dropout draws from the default generators
  auto model = build_model(c, device, dtype);
  std::vector<std::pair<std::string, at::Tensor>> trainable;
  std::vector<std::pair<std::string, at::Tensor>> pissa_init;  // PiSSA's initial factors (kept in every checkpoint)
  LoraConfig lora_config = c.lora;
  if (lora_mode) {
    lora_config.base_model_name_or_path = c.model.path;
    if (is_pissa(lora_config) && options.resume) {
      // The residual base is rebuilt from the checkpoint's initial factors, not from a new SVD: bit for bit
      // the run's own, on any machine and for the randomized variant too.
      // The config check first, so that a changed lora.r is named as such, not as a shape mismatch.
      const auto dir = find_checkpoint(out_dir);
      check_same_run(c.resolved, json::parse(read_text(join(dir, "state.json"))).at("config"));
      const auto factors = load_pissa_factors(dir);
      trainable = apply_lora(*model, lora_config, c.train.seed, &factors);
    } else {
      trainable = apply_lora(*model, lora_config, c.train.seed);
    }
    pissa_init = pissa_initial_factors(*model);
  } else {
    for (auto& p : model->named_parameters(/*recurse=*/true)) {
      p.value().set_requires_grad(true);
      trainable.emplace_back(p.key(), p.value());
    }
  }
  model->model->set_gradient_checkpointing(c.train.grad_checkpointing);
  const std::string tok_dir = tokenizer_dir(c);
  auto tok = load_tokenizer_if_present(tok_dir);
  if (!tok && !c.eval.prompts.empty())
    throw std::invalid_argument("config key eval.prompts: generating needs a tokenizer, and " + tok_dir +
                                " has none (set model.tokenizer)");
  int64_t trainable_numel = 0;
  for (const auto& [n, t] : trainable) trainable_numel += t.numel();
  const int64_t trainable_elsize = trainable.empty() ? 4 : int64_t(trainable[0].second.element_size());

  // ---- data ----
  anvil::data::ReadOptions read_options;
  read_options.loss_on = c.data.loss_on == "all" ? anvil::data::LossOn::kAll : anvil::data::LossOn::kCompletion;
  read_options.add_eos = c.data.add_eos;
  auto train_examples = read_examples(c.data.train, tok.get(), read_options, "data.train");
  std::vector<Example> val_examples;
  if (!c.data.validation.empty()) val_examples = read_examples(c.data.validation, tok.get(), read_options, "data.validation");
  else if (c.data.validation_fraction > 0) split_validation(train_examples, val_examples, c.data.validation_fraction, c.train.seed);
  const int32_t pad_id = tok ? (tok->pad_id() >= 0 ? tok->pad_id() : std::max(0, tok->eos_id())) : 0;
  BatchStream stream(train_examples, c.data.seq_len, pad_id, c.train.batch_size, c.train.seed);
  const auto val_rows = anvil::data::pack_examples(val_examples, c.data.seq_len, pad_id);
  int64_t total_steps = c.train.steps;
  if (total_steps == 0) {
    int64_t micro = 0;
    for (int64_t e = 0; e < c.train.epochs; ++e) micro += stream.batches_in_epoch(e);
    total_steps = std::max<int64_t>(1, micro / c.train.grad_accum);
  }

  // ---- memory estimate, dry run ----
  const auto estimate = estimate_memory(*model, c, trainable_numel, trainable_elsize, device);
  std::cerr << (lora_mode ? "anvil lora: " : "anvil train: ") << model->config().architecture << " ("
            << anvil::model::dtype_name(model->dtype()) << ", " << device.str() << "), " << trainable.size()
            << " trainable tensors (" << trainable_numel << " parameters), " << train_examples.size()
            << " training examples, " << val_examples.size() << " validation examples, " << total_steps
            << " steps\n";
  if (options.dry_run) {
    std::cout << format_estimate(estimate, c, trainable_numel);
    return kExitOk;
  }

  // ---- output directory, resume ----
  io::detail::make_directories(out_dir);
  anvil::train::AdamWOptions adamw;
  adamw.beta1 = c.train.beta1, adamw.beta2 = c.train.beta2, adamw.eps = c.train.eps, adamw.weight_decay = c.train.weight_decay;
  std::vector<at::Tensor> params;
  for (const auto& [n, t] : trainable) params.push_back(t);
  anvil::train::AdamW optimizer(params, adamw);
  TrainState st;
  if (options.resume) {
    const auto dir = find_checkpoint(out_dir);
    st = load_training_checkpoint(dir, trainable, optimizer, c.resolved, device);
    stream.seek(st.epoch, st.index);
    truncate_metrics(join(out_dir, "metrics.jsonl"), st.step);
    std::cerr << "resuming from " << dir << " at step " << st.step << "\n";
  } else {
    if (path_exists(join(out_dir, "checkpoint")))
      throw std::runtime_error("output.dir " + out_dir + " already holds a run (checkpoint/); pass --resume to "
                               "continue it, or choose another output.dir");
    write_text_atomic(join(out_dir, "metrics.jsonl"), "");
  }
  write_text_atomic(join(out_dir, "config.json"), c.resolved.dump(2) + "\n");
  if (lora_mode && c.output.save_initial_adapter && !options.resume) {
    if (pissa_init.empty()) save_adapter(*model, lora_config, join(out_dir, "initial_adapter"));
    else save_pissa_initial_adapter(*model, lora_config, join(out_dir, "initial_adapter"));
  }

  std::vector<std::string> before;
  if (!c.eval.prompts.empty() && tok) before = generate_all(*model, *tok, c.eval.prompts, c.eval.max_new_tokens);

  // ---- the loop ----
  anvil::train::ScheduleOptions schedule;
  schedule.kind = c.train.schedule, schedule.lr = c.train.lr, schedule.warmup_steps = c.train.warmup_steps;
  schedule.total_steps = total_steps, schedule.min_lr_ratio = c.train.min_lr_ratio;
  MetricsLog metrics(join(out_dir, "metrics.jsonl"));
  anvil::train::Progress progress(lora_mode ? "lora" : "train", total_steps, "steps");
  progress.resume_from(st.step);
  const double elapsed_before = st.elapsed;
  const int64_t tokens_before = st.tokens;
  int64_t last_good_step = st.step;  // the step of the newest checkpoint on disk
  bool has_checkpoint = options.resume;
  g_interrupted = false;
  auto previous_handler = std::signal(SIGINT, on_interrupt);
  struct RestoreHandler {
    void (*h)(int);
    ~RestoreHandler() { std::signal(SIGINT, h); }
  } restore{previous_handler};

  auto save = [&]() {
    st.elapsed = elapsed_before + progress.elapsed();
    save_training_checkpoint(out_dir, trainable, pissa_init, optimizer, st, c.resolved, device);
    last_good_step = st.step;
    has_checkpoint = true;
  };
  auto run_eval = [&]() {
    if (val_rows.rows == 0) return;
    const auto r = evaluate(*model, val_rows, c.train.batch_size, c.eval.max_batches, c.train.loss_chunk, device);
    metrics.write({{"step", st.step}, {"val_loss", r.loss}, {"val_ppl", r.ppl}});
    std::cerr << "\nstep " << st.step << ": validation loss " << fixed(r.loss, 4) << ", perplexity " << fixed(r.ppl, 3)
              << " (" << r.targets << " tokens)\n";
  };

  // Where validation starts, so that the first periodic evaluation has something to fall from.
  if (st.step == 0 && c.eval.every > 0) run_eval();
  model->train();
  auto loss_acc = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  int64_t steps_since_log = 0;
  try {
    while (st.step < total_steps) {
      // One optimizer step: its micro-batches first, so that the loss is the mean over all their targets.
      const double lr = anvil::train::lr_at(schedule, st.step);
      std::vector<Batch> micro;
      int64_t targets = 0;
      for (int64_t i = 0; i < c.train.grad_accum; ++i) {
        micro.push_back(stream.next());
        targets += micro.back().targets;
      }
      for (const auto& b : micro) {
        at::Tensor loss;
        {
          AutocastGuard autocast(mixed, device.type());
          loss = batch_loss(*model, b, double(targets), c.train.loss_chunk, device);
        }
        loss.backward();
        loss_acc.add_(loss.detach());
        st.tokens += b.tokens;
      }
      const auto grad_norm = anvil::train::clip_grad_norm(params, c.train.max_grad_norm);
      optimizer.step(lr);
      optimizer.zero_grad();
      ++st.step, ++steps_since_log;
      st.epoch = stream.epoch(), st.index = stream.index();

      const bool last = st.step == total_steps;
      const bool interrupted = g_interrupted;  // read once: the flag may change under us
      const bool save_due = (c.output.save_every > 0 && st.step % c.output.save_every == 0) || interrupted;
      // A checkpoint is only written after a logged (checked finite) loss.
      if (st.step % c.output.log_every == 0 || last || save_due) {
        const double loss = loss_acc.item<double>() / double(steps_since_log);  // the one host sync
        loss_acc.zero_();
        steps_since_log = 0;
        if (!std::isfinite(loss)) {
          std::cerr << "\n" << (lora_mode ? "anvil lora" : "anvil train") << ": the loss is " << loss << " at step "
                    << st.step << "; stopping. ";
          if (has_checkpoint)
            std::cerr << "The last good checkpoint is " << join(out_dir, "checkpoint") << " (step "
                      << last_good_step << "): lower train.lr (now " << c.train.lr << ") and resume with --resume.\n";
          else
            std::cerr << "No checkpoint was saved yet: lower train.lr (now " << c.train.lr
                      << ") or set train.max_grad_norm, and start again.\n";
          return kExitFailed;
        }
        const double elapsed = elapsed_before + progress.elapsed();
        const double rate = double(st.tokens - tokens_before) / std::max(progress.elapsed(), 1e-9);
        json line = {{"step", st.step},         {"loss", loss},     {"lr", lr},
                     {"grad_norm", grad_norm.item<double>()}, {"tokens", st.tokens}, {"tokens_per_s", rate},
                     {"elapsed_s", elapsed}};
        const double peak = peak_memory_gib(device);
        if (peak >= 0) line["peak_mem_gib"] = peak;
        metrics.write(line);
        std::vector<std::pair<std::string, std::string>> fields = {{"loss", fixed(loss, 4)}, {"lr", sci(lr)}};
        const auto mem = anvil::train::cuda_memory_text();
        if (device.is_cuda() && !mem.empty()) fields.emplace_back("mem", mem);
        progress.update(st.step, fields, st.tokens - tokens_before);
      }
      if (c.eval.every > 0 && st.step % c.eval.every == 0 && !last) run_eval();
      if (save_due && !interrupted && !last) save();
      if (interrupted && !last) {
        save();
        std::cerr << "\ninterrupted: saved a checkpoint at step " << st.step << " in " << join(out_dir, "checkpoint")
                  << "\nresume with: anvil " << (lora_mode ? "lora" : "train") << " --config " << out_dir
                  << "/config.json --resume\n";
        return kExitInterrupted;
      }
    }
    progress.finish();
    run_eval();
  } catch (const c10::OutOfMemoryError& e) {
    std::cerr << "\nCUDA out of memory at step " << st.step + 1 << ": " << e.what_without_backtrace() << "\n"
              << format_estimate(estimate, c, trainable_numel)
              << "to lower it: train.batch_size (now " << c.train.batch_size << ", raise train.grad_accum to keep the "
              << "step size), data.seq_len (now " << c.data.seq_len << "), train.grad_checkpointing (now "
              << (c.train.grad_checkpointing ? "true" : "false") << ")"
              << (lora_mode ? ", lora.r (now " + std::to_string(c.lora.r) + ")" : std::string()) << "\n";
    return kExitFailed;
  }

  // ---- outputs ----
  save();
  if (lora_mode && !pissa_init.empty()) {
    // PiSSA trained a residual base: adapter/ is the LoRA delta of the original base (PEFT's conversion).
    save_pissa_as_lora(*model, lora_config, join(out_dir, "adapter"));
    if (c.output.save_pissa_adapter) save_adapter(*model, lora_config, join(out_dir, "adapter_pissa"));
  } else if (lora_mode) {
    save_adapter(*model, lora_config, join(out_dir, "adapter"));
  } else {
    if (mixed) model->to(anvil::model::dtype_from_name(c.model.dtype));
    const std::string model_dir = join(out_dir, "model");
    anvil::model::save_causal_lm(*model, model_dir);
    copy_tokenizer_files(tok_dir, model_dir);
  }
  if (c.output.plot)
    plot_metrics(join(out_dir, "metrics.jsonl"), join(out_dir, "loss.svg"),
                 std::string(lora_mode ? "anvil lora" : "anvil train") + ": " + io::detail::file_name(out_dir));
  if (!c.eval.prompts.empty() && tok) {
    const auto after = generate_all(*model, *tok, c.eval.prompts, c.eval.max_new_tokens);
    std::cout << "\ngenerations (greedy, " << c.eval.max_new_tokens << " new tokens at most):\n";
    for (size_t i = 0; i < c.eval.prompts.size(); ++i)
      std::cout << "prompt: " << one_line(c.eval.prompts[i]) << "\n  before: " << one_line(before[i])
                << "\n  after:  " << one_line(after[i]) << "\n";
  }
  std::cout << "wrote " << join(out_dir, lora_mode ? "adapter" : "model") << ", "
            << join(out_dir, "metrics.jsonl") << (c.output.plot ? ", " + join(out_dir, "loss.svg") : "")
            << ", " << join(out_dir, "checkpoint") << "\n";
  return kExitOk;
}

}  // namespace anvil::lora
