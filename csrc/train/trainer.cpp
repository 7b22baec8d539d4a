// The training loop (include/anvil/train/trainer.h).
#include "anvil/train/trainer.h"

#include "anvil/io/fs.h"
#include "anvil/train/progress.h"

#include <ATen/autocast_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <sstream>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <set>
#include <thread>

namespace anvil::train {

namespace {

using nlohmann::json;

// ---- Ctrl-C ------------------------------------------------------------------------------------------

std::atomic<bool> g_interrupted{false};

// The first Ctrl-C asks the loop to stop after the current step; a second one kills as usual. Under a launch
// SIGTERM does the same: torchrun forwards the launcher's Ctrl-C (and Slurm its scancel) to the workers as
// SIGTERM.
extern "C" void on_interrupt(int sig) {
  g_interrupted = true;
  std::signal(sig, SIG_DFL);
}

// Installs on_interrupt for its lifetime (SIGINT, and SIGTERM when `term`).
struct InterruptScope {
  void (*previous)(int);
  void (*previous_term)(int) = nullptr;
  bool term;
  explicit InterruptScope(bool term) : term(term) {
    g_interrupted = false;
    previous = std::signal(SIGINT, on_interrupt);
    if (term) previous_term = std::signal(SIGTERM, on_interrupt);
  }
  ~InterruptScope() {
    std::signal(SIGINT, previous);
    if (term) std::signal(SIGTERM, previous_term);
  }
};

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

// train.skip_nonfinite_steps gives up after this many skipped steps in a row: the run is diverging, not
// meeting a bad batch.
constexpr int64_t kMaxSkippedInARow = 8;

// A test hook (tests/python/test_train.py): ANVIL_TEST_NONFINITE_STEPS="3,4" makes those steps' loss NaN,
// so that the non-finite stop and train.skip_nonfinite_steps can be shown on a run that is otherwise sane.
std::set<int64_t> poisoned_steps() {
  std::set<int64_t> out;
  const char* spec = std::getenv("ANVIL_TEST_NONFINITE_STEPS");
  for (const char* p = spec; p && *p;) {
    char* end = nullptr;
    const long long v = std::strtoll(p, &end, 10);
    if (end == p) break;
    out.insert(v);
    p = *end == ',' ? end + 1 : end;
  }
  return out;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// A test hook (tests/python/test_distributed.py): ANVIL_TEST_DIST_STOP="RANK:STEP:exit" makes that rank exit
// with status 3 as it starts STEP, "RANK:STEP:hang" makes it sleep there, so that the other ranks' fault
// report can be shown.
void maybe_stop_rank(int64_t rank, int64_t step) {
  const char* spec = std::getenv("ANVIL_TEST_DIST_STOP");
  if (!spec) return;
  long long r = -1, s = -1;
  char how[16] = {0};
  if (std::sscanf(spec, "%lld:%lld:%15s", &r, &s, how) != 3 || r != rank || s != step) return;
  std::cerr << "\nANVIL_TEST_DIST_STOP: rank " << rank << " " << how << " at step " << step << std::endl;
  if (std::string(how) == "hang")
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(60));
  std::_Exit(3);
}

// Data parallel dropout: each rank's generators reseeded at every step from (seed, step, rank), so the ranks
// draw different masks and a resumed run draws the same ones without per-rank generator states in the
// checkpoint. (A single process keeps its one stream, saved in the checkpoint.)
void seed_rank_generators(uint64_t seed, int64_t step, int64_t rank, at::Device device) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ULL ^ (uint64_t(step) + 1) * 0xBF58476D1CE4E5B9ULL ^ (uint64_t(rank) + 1) * 0x94D049BB133111EBULL;
  x ^= x >> 31;
  at::Generator cpu = at::detail::getDefaultCPUGenerator();  // a handle on the default generator
  cpu.set_current_seed(x);
  if (device.is_cuda()) {
    at::Generator cuda = at::globalContext().defaultGenerator(device);
    cuda.set_current_seed(x);
  }
}

}  // namespace

// ---- pieces ------------------------------------------------------------------------------------------

StepCallback progress_line(const std::string& label, int64_t total_steps, int64_t start_step) {
  auto progress = std::make_shared<Progress>(label, total_steps, "steps");
  progress->resume_from(start_step);
  return [progress](const StepReport& r) {
    std::vector<std::pair<std::string, std::string>> fields = {{"loss", fixed(r.loss, 4)}};
    for (const auto& [name, v] : r.terms) fields.emplace_back(name, fixed(v, 4));
    fields.emplace_back("lr", sci(r.lr));
    const auto mem = cuda_memory_text();
    if (r.peak_mem_gib >= 0 && !mem.empty()) fields.emplace_back("mem", mem);
    progress->update(r.step, fields, r.tokens_this_run);
    if (r.step >= r.total_steps) progress->finish();
  };
}

LoopSettings loop_settings(const std::string& recipe, const TrainSection& train, const EvalSection& eval,
                           const OutputSection& output, int64_t total_steps, const json& config,
                           std::vector<std::string> same_run_sections) {
  LoopSettings s;
  s.recipe = recipe, s.out_dir = output.dir, s.train = train, s.total_steps = total_steps;
  s.eval_every = eval.every, s.save_every = output.save_every, s.log_every = output.log_every;
  s.plot = output.plot, s.config = config, s.same_run_sections = std::move(same_run_sections);
  return s;
}

AutocastGuard::AutocastGuard(bool on, at::DeviceType type) : on_(on), type_(type) {
  if (!on_) return;
  was_ = at::autocast::is_autocast_enabled(type_);
  was_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, at::kBFloat16);
}

AutocastGuard::~AutocastGuard() {
  if (!on_) return;
  at::autocast::set_autocast_enabled(type_, was_);
  at::autocast::set_autocast_dtype(type_, was_dtype_);
  at::autocast::clear_cache();
}

// ---- Trainer -----------------------------------------------------------------------------------------

Trainer::Trainer(LoopSettings settings, NamedTensors trainable, at::Device device)
    : s_(std::move(settings)), trainable_(std::move(trainable)), device_(device) {
  AdamWOptions adamw;
  adamw.beta1 = s_.train.beta1, adamw.beta2 = s_.train.beta2, adamw.eps = s_.train.eps;
  adamw.weight_decay = s_.train.weight_decay;
  for (const auto& [name, t] : trainable_) params_.push_back(t);
  adamw_ = adamw;
  if (s_.dist) {
    const int64_t world = s_.dist->world_size();
    if (s_.train.batch_size % world != 0)
      throw std::runtime_error("config key train.batch_size: must be a multiple of WORLD_SIZE (" + std::to_string(world) +
                               ") under a multi-process launch (it is the global micro-batch, split by rows), got " +
                               std::to_string(s_.train.batch_size));
    if (s_.train.zero_stage == 3) {
      // ZeRO-3: the parameters themselves sharded by decoder layer; no GradientSync (each layer's gradients are
      // reduce-scattered as its backward ends) and AdamW over this rank's flat shards.
      if (!s_.shard_model)
        throw std::runtime_error("config key train.zero_stage: 3 (parameter sharding) is for anvil train (full "
                                 "fine-tuning); anvil " + s_.recipe + " supports 0, 1 or 2");
      zero3_ = std::make_unique<ParameterShards>(s_.dist, *s_.shard_model, trainable_);
    } else {
      sync_ = std::make_unique<GradientSync>(s_.dist, params_, int64_t(s_.train.dist_bucket_mb * double(1 << 20)),
                                             /*sharded=*/s_.train.zero_stage == 2);
    }
  }
  if (zero3_) {
    optimizer_ = std::make_unique<AdamW>(zero3_->shards(), adamw);  // fp32 state for this rank's shards only
    return;
  }
  if (s_.dist && s_.train.zero_stage == 2) {
    // ZeRO-2: a tensor's AdamW state lives where its gradient is reduced to, its bucket's owner.
    owner_ = sync_->owners();
  } else if (s_.dist && s_.train.zero_stage == 1) {
    // ZeRO-1: each tensor's AdamW state lives on one rank, the owners chosen greedily by size (largest first,
    // to the least loaded rank; ties to the lower rank), as torch's ZeroRedundancyOptimizer partitions.
    const int64_t world = s_.dist->world_size();
    std::vector<size_t> order(params_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return params_[a].numel() > params_[b].numel(); });
    std::vector<int64_t> load(size_t(world), 0);
    owner_.assign(params_.size(), 0);
    for (size_t i : order) {
      const auto r = std::min_element(load.begin(), load.end()) - load.begin();
      owner_[i] = r, load[size_t(r)] += params_[i].numel();
    }
  }
  if (!owner_.empty()) {
    std::vector<at::Tensor> mine;
    local_index_.assign(params_.size(), -1);
    for (size_t i = 0; i < params_.size(); ++i)
      if (owner_[i] == s_.dist->rank()) local_index_[i] = int64_t(mine.size()), mine.push_back(params_[i]);
    optimizer_ = std::make_unique<AdamW>(mine, adamw);
  } else {
    optimizer_ = std::make_unique<AdamW>(params_, adamw);
  }
}

void Trainer::zero_grads() {
  if (zero3_) return zero3_->zero_grads();
  if (sync_) return sync_->zero_grads();  // data parallel: the gradients live in (or go to) the reduce's buckets
  for (auto& p : params_) p.mutable_grad() = at::Tensor();  // every tensor's, owned by this rank's AdamW or not
}

void Trainer::add_checkpoint_file(CheckpointFile file) { extra_files_.push_back(std::move(file)); }

std::string Trainer::path(const std::string& name) const { return io::join_path(s_.out_dir, name); }

void Trainer::open(bool resume, data::BatchStream& stream) {
  if (is_main()) io::make_directories(s_.out_dir);
  // Every rank reads the checkpoint (the same folder: one file system), only rank 0 writes output.dir.
  if (s_.dist) s_.dist->barrier("opening output.dir");
  if (resume) {
    const auto dir = find_checkpoint(s_.out_dir);
    check_same_run(s_.config, checkpoint_config(dir), s_.same_run_sections);
    if (owner_.empty() && !zero3_) {
      state_ = load_training_checkpoint(dir, trainable_, *optimizer_, device_);
    } else if (zero3_) {
      // ZeRO-3: the parameters are still whole here (sharded below, once every rank has rank 0's); each rank
      // keeps its shards' part of the consolidated state.
      AdamW full(params_, adamw_);
      state_ = load_training_checkpoint(dir, trainable_, full, device_);
      zero3_->state_from_full(full, *optimizer_);
    } else {
      // ZeRO-1: the checkpoint holds every tensor's state (consolidated on save, so any rank count resumes it);
      // each rank reads it whole and keeps its own tensors' part.
      AdamW full(params_, adamw_);
      state_ = load_training_checkpoint(dir, trainable_, full, device_);
      const auto all = full.state_tensors(), mine = optimizer_->state_tensors();
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params_.size(); ++i)
        if (local_index_[i] >= 0)
          for (size_t k = 0; k < 3; ++k) {
            auto t = mine[3 * size_t(local_index_[i]) + k].second;
            t.copy_(all[3 * i + k].second);
          }
    }
    stream.seek(state_.epoch, state_.index);
    if (is_main()) {
      truncate_metrics(path("metrics.jsonl"), state_.step);
      std::cerr << "resuming from " << dir << " at step " << state_.step << "\n";
    }
  } else {
    if (io::path_exists(path("checkpoint")))
      throw std::runtime_error("output.dir " + s_.out_dir + " already holds a run (checkpoint/); pass --resume to "
                               "continue it, or choose another output.dir");
    if (is_main()) io::write_text_atomically(path("metrics.jsonl"), "");
  }
  resumed_ = resume;
  elapsed_before_ = state_.elapsed;
  if (is_main()) io::write_text_atomically(path("config.json"), s_.config.dump(2) + "\n");
  if (s_.dist) {
    // Every rank starts from rank 0's trainable tensors (a seeded init is the same everywhere already; this
    // makes it so whatever a recipe did), and no rank reads output.dir after rank 0 may have written it.
    s_.dist->set_phase("the start of the run");
    s_.dist->broadcast(params_, 0, "the initial trainable tensors");
    // ZeRO-3: each rank's shards cut from them; the whole parameters stay until the first step (the recipe's
    // generations before training use them), which releases them.
    if (zero3_) zero3_->shards_from_full();
    s_.dist->barrier("the start of the run");
  }
}

std::unique_ptr<AdamW> Trainer::consolidated_optimizer() {
  // Collective: each state tensor broadcast from its owner; rank 0 keeps them all, the others a scratch copy
  // of one tensor at a time.
  std::unique_ptr<AdamW> full;
  if (is_main()) full = std::make_unique<AdamW>(params_, adamw_);
  const auto all = full ? full->state_tensors() : std::vector<std::pair<std::string, at::Tensor>>();
  const auto mine = optimizer_->state_tensors();  // 3 per owned tensor: exp_avg, exp_avg_sq, step
  s_.dist->set_phase("saving the ZeRO-1 optimizer state");
  for (size_t i = 0; i < params_.size(); ++i)
    for (size_t k = 0; k < 3; ++k) {
      const auto like = [&] {
        return k < 2 ? at::empty_like(params_[i]) : at::empty({}, params_[i].options().dtype(at::kFloat));
      };
      std::vector<at::Tensor> buf = {local_index_[i] >= 0 ? mine[3 * size_t(local_index_[i]) + k].second
                                     : full            ? all[3 * i + k].second
                                                       : like()};
      s_.dist->broadcast(buf, owner_[i], "gathering the ZeRO-1 optimizer state");
      if (full && local_index_[i] >= 0) {
        auto t = all[3 * i + k].second;
        t.copy_(buf[0]);
      }
    }
  return full;
}

double Trainer::run_eval(const EvalFn& evaluate, std::optional<MetricsLog>& metrics) {
  if (!evaluate) return 0;
  // ZeRO-3: the whole model on every rank (the ranks' shares of the batches differ in number).
  if (zero3_) zero3_->gather_all("gathering the parameters for validation at step " + std::to_string(state_.step));
  // Under a launch each rank evaluates its share of the batches (EvalShard) and the sums are added over the
  // ranks: loss * targets, targets and term * targets (every term is a mean per target), in fp64.
  EvalResult r = s_.dist ? evaluate(EvalShard{s_.dist->rank(), s_.dist->world_size()}) : evaluate(EvalShard{});
  if (s_.dist) {
    const double n = double(r.targets);
    std::vector<double> sums = {r.loss * n, n};
    for (const auto& [name, v] : r.terms) sums.push_back(v * n);
    auto packed = at::tensor(sums, at::TensorOptions().dtype(at::kDouble)).to(device_);  // (2 + terms,)
    s_.dist->set_phase("validation at step " + std::to_string(state_.step));
    s_.dist->all_reduce_sum(packed, "the validation sums at step " + std::to_string(state_.step));
    const auto host = packed.cpu();
    const double total = host[1].item<double>();
    const double inv = total > 0 ? 1.0 / total : 0.0;
    r.targets = int64_t(std::llround(total));
    r.loss = host[0].item<double>() * inv;
    r.ppl = std::exp(r.loss);
    for (size_t i = 0; i < r.terms.size(); ++i) r.terms[i].second = host[2 + int64_t(i)].item<double>() * inv;
  }
  if (!metrics) return r.loss;
  json line = {{"step", state_.step}, {"val_loss", r.loss}, {"val_ppl", r.ppl}};
  std::string more;
  for (const auto& [name, v] : r.terms) {
    line["val_" + name] = v;
    more += ", " + name + " " + fixed(v, 4);
  }
  metrics->write(line);
  std::cerr << "\nstep " << state_.step << ": validation loss " << fixed(r.loss, 4) << ", perplexity "
            << fixed(r.ppl, 3) << more << " (" << r.targets << " tokens)\n";
  return r.loss;
}

int Trainer::fit(data::BatchStream& stream, const LossFn& loss_fn, const EvalFn& evaluate, const RunOptions& options,
                 const std::function<std::string()>& oom_advice) {
  const std::string who = "anvil " + s_.recipe;
  const bool mixed = s_.train.mixed_precision == "bf16";
  ScheduleOptions schedule;
  schedule.kind = s_.train.schedule, schedule.lr = s_.train.lr, schedule.warmup_steps = s_.train.warmup_steps;
  schedule.total_steps = s_.total_steps, schedule.min_lr_ratio = s_.train.min_lr_ratio;
  std::optional<MetricsLog> metrics;  // rank 0's
  if (is_main()) metrics.emplace(path("metrics.jsonl"));
  const StepCallback report = !is_main() ? StepCallback([](const StepReport&) {})
                              : options.on_step ? options.on_step
                                         : progress_line(s_.recipe, s_.total_steps, state_.step);
  const int64_t rank = s_.dist ? s_.dist->rank() : 0, world = s_.dist ? s_.dist->world_size() : 1;
  const auto start = std::chrono::steady_clock::now();
  const int64_t tokens_before = state_.tokens;
  int64_t last_good_step = state_.step;  // the step of the newest checkpoint on disk
  bool has_checkpoint = resumed_;
  InterruptScope interrupt_scope(bool(s_.dist));
  const auto zero = [&] { return at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device_)); };

  // Non-finite guard. Every step adds its loss and gradient norm to `unchecked` on the device (a sum of
  // non-negative norms and losses is non-finite iff one of them is); the host reads it on logged steps
  // and before every save. A checkpoint is only written once the weights it holds have given a finite
  // loss: a save due after step k is held back (state, generator states) and written during step k+1,
  // after that step's loss and gradient norm are known finite and before its update, when weights and
  // optimizer state are still step k's. So the checkpoint a failure names resumes to a finite loss.
  auto unchecked = zero();
  const auto all_finite = [&] {
    const bool ok = std::isfinite(unchecked.item<double>());
    unchecked.zero_();
    return ok;
  };
  struct Pending {
    TrainState state;
    NamedTensors generators;
  };
  std::optional<Pending> pending;
  const auto write_checkpoint = [&](const TrainState& st, const NamedTensors& generators) {
    // The state is replicated (ZeRO-1: gathered to rank 0 first); rank 0 writes it for all.
    if (zero3_) {
      // ZeRO-3: parameters and AdamW state gathered into the 1-process format (any rank count resumes it).
      const bool was_full = zero3_->full();
      zero3_->gather_all("gathering the parameters for a checkpoint at step " + std::to_string(st.step));
      const auto full = zero3_->consolidated(*optimizer_, adamw_);
      if (full) save_training_checkpoint(s_.out_dir, trainable_, *full, st, s_.config, generators, extra_files_);
      if (!was_full) zero3_->release_all();  // mid-step (the held-back save): the update comes next
    } else if (!owner_.empty()) {
      const auto full = consolidated_optimizer();
      if (full) save_training_checkpoint(s_.out_dir, trainable_, *full, st, s_.config, generators, extra_files_);
    } else if (is_main()) {
      save_training_checkpoint(s_.out_dir, trainable_, *optimizer_, st, s_.config, generators, extra_files_);
    }
    last_good_step = st.step;
    has_checkpoint = true;
  };
  const auto snapshot = [&] {
    TrainState st = state_;
    st.elapsed = elapsed_before_ + seconds_since(start);
    return Pending{st, generator_states(device_)};
  };
  // An early stop: rank 0 says why on stderr and to the front end's callback.
  const auto stop = [&](int status, const std::string& message) {
    if (!is_main()) return status;
    std::cerr << "\n" << message << "\n";
    if (options.on_stop) options.on_stop(status, message);
    return status;
  };
  const auto stop_nonfinite = [&](const std::string& what) {
    // every rank stops (the loss is the same on all); rank 0 says why
    std::ostringstream m;
    m << who << ": " << what << "; stopping. ";
    if (has_checkpoint)
      m << "The last good checkpoint is " << path("checkpoint") << " (step " << last_good_step
        << ", its weights gave a finite loss): lower train.lr (now " << s_.train.lr
        << ") and resume with --resume, or set train.skip_nonfinite_steps.";
    else
      m << "No checkpoint was saved yet: lower train.lr (now " << s_.train.lr
        << ") or set train.max_grad_norm, and start again.";
    return stop(kExitFailed, m.str());
  };

  const std::set<int64_t> poisoned = poisoned_steps();

  // Where validation starts, so that the first periodic evaluation has something to fall from.
  if (state_.step == 0 && s_.eval_every > 0) run_eval(evaluate, metrics);
  auto loss_acc = zero();
  auto step_loss = zero();              // this step's loss, over its micro-batches (reused: no allocation per step)
  std::vector<at::Tensor> step_terms;   // likewise for the loss callback's terms
  std::vector<at::Tensor> term_acc;
  std::vector<std::string> term_names;
  int64_t steps_since_log = 0, skipped_in_a_row = 0, skipped = 0;
  try {
    while (state_.step < s_.total_steps) {
      // One optimizer step: its micro-batches first, so that the loss is the mean over all their targets.
      const double lr = lr_at(schedule, state_.step);
      // Every rank reads the whole global micro-batches (packing is on the host), so the normalizer is the
      // step's global target count and each rank's loss is its rows' target-loss sum over it: the sum of the
      // ranks' gradients is the one-process gradient of the step's mean loss.
      std::vector<data::Batch> micro;
      int64_t targets = 0;
      for (int64_t i = 0; i < s_.train.grad_accum; ++i) {
        micro.push_back(stream.next());
        targets += micro.back().targets;
        state_.tokens += micro.back().tokens;
      }
      if (s_.dist) {
        s_.dist->set_phase("step " + std::to_string(state_.step + 1));
        maybe_stop_rank(rank, state_.step + 1);
        seed_rank_generators(s_.train.seed, state_.step, rank, device_);
      }
      step_loss.zero_();
      for (auto& t : step_terms) t.zero_();
      if (zero3_) zero3_->begin_step();  // the root unit gathered, kept through the micro-batches
      for (size_t m = 0; m < micro.size(); ++m) {
        const bool last_micro = m + 1 == micro.size();
        if (sync_ && last_micro) sync_->arm();  // earlier micro-batches only accumulate locally
        const data::Batch b = s_.dist ? data::shard_rows(micro[m], rank, world) : std::move(micro[m]);
        if (b.rows == 0) {  // a short last micro-batch of an epoch: this rank still joins the reduce
          if (zero3_) zero3_->idle_micro_batch();  // and, ZeRO-3, every layer's gather and reduce-scatter
          continue;
        }
        Loss loss;
        {
          AutocastGuard autocast(mixed, device_.type());
          loss = loss_fn(b, double(targets));
        }
        loss.value.backward();
        step_loss.add_(loss.value.detach());
        for (size_t i = 0; i < loss.terms.size(); ++i) {
          if (i == step_terms.size()) step_terms.push_back(zero());
          if (i == term_names.size()) term_names.push_back(loss.terms[i].first);
          step_terms[i].add_(loss.terms[i].second.detach().to(at::kFloat));
        }
      }
      bool interrupted_anywhere = false;
      if (s_.dist) {
        const std::string what = "step " + std::to_string(state_.step + 1);
        if (zero3_) zero3_->finish_step("the ZeRO-3 gradient reduce-scatters of " + what);
        else sync_->finish("the gradient all-reduce of " + what);
        // The step's loss and terms are sums over the ranks' rows; a Ctrl-C seen by any rank stops all at once.
        std::vector<at::Tensor> parts = {step_loss.reshape({1}),
                                         at::full({1}, g_interrupted ? 1.0f : 0.0f, step_loss.options())};
        for (auto& t : step_terms) parts.push_back(t.reshape({1}));
        auto packed = at::cat(parts);  // (2 + terms,) fp32
        s_.dist->all_reduce_sum(packed, "the loss of " + what);
        step_loss.copy_(packed[0]);
        interrupted_anywhere = packed[1].item<float>() > 0;
        for (size_t i = 0; i < step_terms.size(); ++i) step_terms[i].copy_(packed[2 + i]);
      }
      if (poisoned.count(state_.step + 1)) step_loss.fill_(std::nan(""));
      // ZeRO-2 and 3: each rank holds its own tensors' (3: shards') gradients, so the norm's squares are summed
      // over the ranks.
      const auto sum_squares = [&](at::Tensor& sq) {
        auto one = sq.view({1});  // in place on the () square
        s_.dist->all_reduce_sum(one, "the gradient norm of step " + std::to_string(state_.step + 1));
      };
      const auto grad_norm =
          zero3_ ? clip_gradients(zero3_->grad_pieces(), s_.train.max_grad_norm, sum_squares, params_[0].options())
          : s_.train.zero_stage == 2 && s_.dist ? clip_grad_norm(params_, s_.train.max_grad_norm, sum_squares)
                                                : clip_grad_norm(params_, s_.train.max_grad_norm);
      unchecked.add_(step_loss + grad_norm.to(at::kFloat));

      // train.skip_nonfinite_steps: a host sync every step, to decide before the update.
      const bool skip = s_.train.skip_nonfinite_steps && !all_finite();
      // The held-back save of an earlier step, once its weights have given a finite loss (a skipped step
      // vouches for nothing: the save waits for the next finite one).
      if (pending && !skip) {
        if (!s_.train.skip_nonfinite_steps && !all_finite())
          return stop_nonfinite("the loss is " + std::to_string(step_loss.item<double>()) + " (gradient norm " +
                                std::to_string(grad_norm.item<double>()) + ") at step " + std::to_string(state_.step + 1));
        write_checkpoint(pending->state, pending->generators);
        pending.reset();
      }
      if (skip) {
        ++skipped, ++skipped_in_a_row;
        std::cerr << "\n" << who << ": step " << state_.step + 1 << ": loss " << step_loss.item<double>()
                  << ", gradient norm " << grad_norm.item<double>() << ": not finite, skipped (train.skip_nonfinite_steps; "
                  << skipped_in_a_row << " in a row)\n";
        if (skipped_in_a_row >= kMaxSkippedInARow)
          return stop_nonfinite(std::to_string(skipped_in_a_row) + " steps in a row were not finite (at step " +
                                std::to_string(state_.step + 1) + ")");
        zero_grads();
      } else {
        skipped_in_a_row = 0;
        optimizer_->step(lr);
        if (zero3_) zero3_->release_all();  // any gathered value is stale now; the next forward gathers
        if (!owner_.empty()) {
          // ZeRO-1: each tensor's owner updated it; every rank takes the result.
          s_.dist->set_phase("step " + std::to_string(state_.step + 1) + " (the ZeRO-1 update)");
          for (size_t i = 0; i < params_.size(); ++i) {
            std::vector<at::Tensor> one = {params_[i]};
            s_.dist->broadcast(one, owner_[i], "the ZeRO-1 update of " + trainable_[i].first);
          }
        }
        zero_grads();
        loss_acc.add_(step_loss);
        for (size_t i = 0; i < step_terms.size(); ++i) {
          if (i == term_acc.size()) term_acc.push_back(zero());
          term_acc[i].add_(step_terms[i]);
        }
        ++steps_since_log;
      }
      ++state_.step;
      state_.epoch = stream.epoch(), state_.index = stream.index();

      const bool last = state_.step == s_.total_steps;
      // Read once: the flag may change under us. Under a launch, what the ranks agreed on this step.
      const bool interrupted = s_.dist ? interrupted_anywhere : bool(g_interrupted);
      const bool save_due = s_.save_every > 0 && state_.step % s_.save_every == 0 && !last;
      // Saves fall on logged steps, so that a resumed run logs the same means as an uninterrupted one.
      if ((state_.step % s_.log_every == 0 || last || save_due || interrupted) && steps_since_log > 0) {
        const double loss = loss_acc.item<double>() / double(steps_since_log);  // the one host sync
        loss_acc.zero_();
        StepReport r;
        for (size_t i = 0; i < term_acc.size(); ++i) {
          r.terms.emplace_back(term_names[i], term_acc[i].item<double>() / double(steps_since_log));
          term_acc[i].zero_();
        }
        steps_since_log = 0;
        if (!std::isfinite(loss) || !all_finite())
          return stop_nonfinite("the loss is " + std::to_string(loss) + " at step " + std::to_string(state_.step) +
                                " (or a gradient norm since the last logged step is not finite)");
        const double run_seconds = seconds_since(start);
        r.step = state_.step, r.total_steps = s_.total_steps;
        r.loss = loss, r.lr = lr, r.grad_norm = skip ? 0.0 : grad_norm.item<double>();
        r.tokens = state_.tokens, r.tokens_this_run = state_.tokens - tokens_before;
        r.tokens_per_s = double(r.tokens_this_run) / std::max(run_seconds, 1e-9);
        r.elapsed_s = elapsed_before_ + run_seconds;
        r.peak_mem_gib = peak_memory_gib(device_);
        json line = {{"step", r.step},         {"loss", r.loss},     {"lr", r.lr},
                     {"grad_norm", r.grad_norm}, {"tokens", r.tokens}, {"tokens_per_s", r.tokens_per_s},
                     {"elapsed_s", r.elapsed_s}};
        for (const auto& [name, v] : r.terms) line[name] = v;
        if (r.peak_mem_gib >= 0) line["peak_mem_gib"] = r.peak_mem_gib;
        if (skipped > 0) line["skipped_steps"] = skipped;
        if (metrics) metrics->write(line);
        report(r);
      }
      if (s_.eval_every > 0 && state_.step % s_.eval_every == 0 && !last) run_eval(evaluate, metrics);
      if (interrupted && !last) {
        // Ctrl-C saves at once (the user is waiting), after the same check.
        if (!all_finite())
          return stop_nonfinite("the loss or gradient norm is not finite in the steps before step " +
                                std::to_string(state_.step));
        const auto now = snapshot();
        write_checkpoint(now.state, now.generators);
        return stop(kExitInterrupted, "interrupted: saved a checkpoint at step " + std::to_string(state_.step) +
                                          " in " + path("checkpoint") + "\nresume with: " + who + " --config " +
                                          s_.out_dir + "/config.json --resume");
      }
      if (save_due) pending = snapshot();
    }
    const double final_val = run_eval(evaluate, metrics);
    if (!std::isfinite(final_val)) return stop_nonfinite("the final validation loss is " + std::to_string(final_val));
  } catch (const c10::OutOfMemoryError& e) {
    return stop(kExitFailed, "CUDA out of memory at step " + std::to_string(state_.step + 1) + ": " +
                                 e.what_without_backtrace() + "\n" + (oom_advice ? oom_advice() : std::string()));
  } catch (const c10::Error& e) {
    // The host allocator's failure is a plain c10::Error; give it the same advice as the device's.
    const std::string what = e.what_without_backtrace();
    if (what.find("DefaultCPUAllocator: can't allocate memory") == std::string::npos &&
        what.find("DefaultCPUAllocator: not enough memory") == std::string::npos)
      throw;
    return stop(kExitFailed, "host out of memory at step " + std::to_string(state_.step + 1) + ": " + what + "\n" +
                                 (oom_advice ? oom_advice() : std::string()));
  }
  // The final weights have no next step to vouch for them: they must be finite (a huge but finite
  // update shows as a non-finite validation loss above, when there is validation data).
  if (!all_finite()) return stop_nonfinite("the loss or gradient norm of the last steps is not finite");
  // ZeRO-3: the whole model on every rank for the final checkpoint and the recipe's export and generations.
  if (zero3_) zero3_->gather_all("gathering the parameters at the end of the run");
  for (const auto& [name, t] : trainable_)
    if (!at::isfinite(t).all().item<bool>())
      return stop_nonfinite("the trained tensor " + name + " holds non-finite values after the last step");
  const auto now = snapshot();
  write_checkpoint(now.state, now.generators);
  state_.elapsed = now.state.elapsed;
  if (s_.dist && is_main()) {
    const auto mib = [](int64_t bytes) { return fixed(double(bytes) / (1 << 20), 2); };
    const std::string how = " MiB (train.zero_stage " + std::to_string(s_.train.zero_stage) + ", " +
                            std::to_string(s_.dist->world_size()) + " ranks";
    std::cerr << "gradient memory: rank 0's gradients and reduce buffers peaked at "
              << mib(sync_ ? sync_->peak_bytes() : zero3_->peak_grad_bytes()) << how << ")\n";
    // Parameters: replicated (stages 0-2) every rank holds all; ZeRO-3 its shards and the gathered units.
    int64_t all = 0;
    for (const auto& p : params_) all += p.numel() * int64_t(p.element_size());
    std::cerr << "parameter memory: rank 0's parameters peaked at " << mib(zero3_ ? zero3_->peak_bytes() : all)
              << " MiB in the training steps" << how.substr(4)
              << (zero3_ ? "; its shards and the gathered units, against " + mib(all) +
                               " MiB whole: validation and checkpoints gather the whole model)"
                         : "; every parameter)")
              << "\n";
  }
  if (s_.plot && is_main()) plot_metrics(path("metrics.jsonl"), path("loss.svg"), "anvil " + s_.recipe + ": " + io::file_name(s_.out_dir));
  return kExitOk;
}

}  // namespace anvil::train
