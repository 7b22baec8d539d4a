// The process group and the bucketed gradient all-reduce (include/anvil/train/distributed.h).
//
// ProcessGroupGloo.hpp includes gloo's headers, which the torch wheel does not ship (the compiled
// ProcessGroupGloo is in libtorch_cpu.so). They come from Debian's libgloo-dev (scripts/setup.sh), used as
// declarations only: every gloo type in the c10d header is held through a shared_ptr or unique_ptr, so the
// layout of ProcessGroupGloo and its Options does not depend on gloo's version, and nothing of gloo is
// compiled here or linked (libgloo is never named to the linker; docs/ARCHITECTURE.md "Dependencies").
// This file must not construct c10d::ProcessGroupGloo::GlooStore (whose inline vtable would depend on the
// headers' version): the group builds its own from our c10d store.
#ifndef USE_C10D_GLOO  // torch's CMake config defines it (and USE_C10D_NCCL) for its users; plain builds may not
#define USE_C10D_GLOO 1
#endif
#include "anvil/train/distributed.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#if defined(ANVIL_WITH_CUDA)
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace anvil::train {

namespace {

[[noreturn]] void env_error(const std::string& var, const std::string& rule, const char* got) {
  throw std::runtime_error("environment variable " + var + ": " + rule + ", got \"" + (got ? got : "") +
                           "\" (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; "
                           "unset all of them to train in one process)");
}

int64_t env_int(const std::function<const char*(const char*)>& get, const char* var, int64_t lo, int64_t hi,
                const std::string& rule) {
  const char* s = get(var);
  if (!s || !*s) env_error(var, "is required when RANK or WORLD_SIZE is set", s);
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s, &end, 10);
  if (errno || *end || v < lo || v > hi) env_error(var, rule, s);
  return v;
}

// "8 s", "0.5 s".
std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g s", s);
  return buf;
}

// c10d's errors carry a C++ backtrace; the first line is what a user can act on.
std::string first_line(const std::exception& e) {
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  std::string s = c10 ? c10->what_without_backtrace() : e.what();
  const auto nl = s.find('\n');
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// The time a surviving rank waits for the others to report a failed collective of their own.
std::chrono::milliseconds grace(double timeout_s) {
  return std::chrono::milliseconds(int64_t(std::min(5.0, std::max(1.0, timeout_s / 2)) * 1000));
}

}  // namespace

DistEnv read_dist_env(const std::function<const char*(const char*)>& get_or_null) {
  const std::function<const char*(const char*)> get =
      get_or_null ? get_or_null : [](const char* v) -> const char* { return std::getenv(v); };
  DistEnv e;
  const char* rank = get("RANK");
  const char* world = get("WORLD_SIZE");
  if ((!rank || !*rank) && (!world || !*world)) return e;
  e.launched = true;
  e.world_size = env_int(get, "WORLD_SIZE", 1, 1 << 20, "must be an integer >= 1");
  e.rank = env_int(get, "RANK", 0, e.world_size - 1,
                   "must be an integer in [0, WORLD_SIZE) = [0, " + std::to_string(e.world_size) + ")");
  const char* local = get("LOCAL_RANK");
  e.local_rank = local && *local ? env_int(get, "LOCAL_RANK", 0, e.world_size - 1, "must be an integer in [0, WORLD_SIZE)")
                                 : e.rank;
  const char* addr = get("MASTER_ADDR");
  if (!addr || !*addr) env_error("MASTER_ADDR", "is required when RANK or WORLD_SIZE is set (the host of the TCPStore)", addr);
  e.master_addr = addr;
  e.master_port = env_int(get, "MASTER_PORT", 1, 65535, "must be a TCP port in [1, 65535]");
  const char* agent = get("TORCHELASTIC_USE_AGENT_STORE");
  e.agent_store = agent && std::string(agent) == "True";
  const char* restarts = get("TORCHELASTIC_RESTART_COUNT");
  if (restarts && *restarts) e.restart_count = env_int(get, "TORCHELASTIC_RESTART_COUNT", 0, 1 << 30, "must be an integer >= 0");
  return e;
}

std::string resolve_dist_backend(const std::string& backend, at::Device device) {
  const std::string b = backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : backend;
  if (b != "gloo" && b != "nccl")
    throw std::runtime_error("config key train.dist_backend: must be \"auto\", \"gloo\" or \"nccl\", got \"" + backend + "\"");
  if (b == "nccl" && !device.is_cuda())
    throw std::runtime_error("config key train.dist_backend: \"nccl\" needs a CUDA device (model.device is " +
                             device.str() + "); use \"gloo\" or \"auto\"");
#if !defined(ANVIL_WITH_CUDA)
  if (b == "nccl") throw std::runtime_error("config key train.dist_backend: \"nccl\": this build of anvil has no CUDA");
#endif
  return b;
}

at::Device device_for_rank(at::Device device, const DistEnv& env, const std::string& key) {
  if (!env.launched || !device.is_cuda()) return device;
  if (device.has_index() && device.index() != env.local_rank)
    throw std::runtime_error("config key " + key + ": " + device.str() + " under a multi-process launch; each rank " +
                             "trains on cuda:LOCAL_RANK (here cuda:" + std::to_string(env.local_rank) +
                             "): set it to \"cuda\" or \"auto\"");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(env.local_rank));
}

std::shared_ptr<Distributed> connect_if_launched(const TrainSection& train, at::Device device) {
  const DistEnv env = read_dist_env();
  if (!env.launched) return nullptr;
  return Distributed::connect(env, train.dist_backend, train.dist_timeout_s, device);
}

// ---- Distributed ---------------------------------------------------------------------------------------

struct Distributed::Impl {
  c10::intrusive_ptr<c10d::Store> store;    // our keys (fault reports), under "anvil/"
  c10::intrusive_ptr<c10d::Backend> group;  // ProcessGroupGloo or ProcessGroupNCCL
  std::string store_where;                  // "MASTER_ADDR:MASTER_PORT (hosted by ...)"
};

std::shared_ptr<Distributed> Distributed::connect(const DistEnv& env, const std::string& backend, double timeout_s,
                                                  at::Device device) {
  std::shared_ptr<Distributed> d(new Distributed());
  d->env_ = env;
  d->backend_ = resolve_dist_backend(backend, device);
  d->timeout_s_ = timeout_s;
  d->impl_ = std::make_unique<Impl>();
  const auto timeout = std::chrono::milliseconds(int64_t(timeout_s * 1000));
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  // torch.distributed's env:// rule: torchrun's agent already serves the store; else rank 0 does.
  so.isServer = env.rank == 0 && !env.agent_store;
  so.numWorkers = env.agent_store ? std::nullopt : std::optional<size_t>(size_t(env.world_size));
  so.waitWorkers = false;
  so.timeout = timeout;
  d->impl_->store_where = env.master_addr + ":" + std::to_string(env.master_port) +
                          (env.agent_store ? " (hosted by torchrun's agent)" : " (hosted by rank 0)");
  c10::intrusive_ptr<c10d::Store> tcp;
  try {
    tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
  } catch (const std::exception& e) {
    throw std::runtime_error("distributed: rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) +
                             " could not reach the TCPStore at " + d->impl_->store_where + " within train.dist_timeout_s = " +
                             seconds_text(timeout_s) + " (MASTER_ADDR, MASTER_PORT): " + first_line(e));
  }
  // Each launch attempt (torchrun --max-restarts) in a namespace of its own.
  const std::string prefix = "anvil/attempt_" + std::to_string(env.restart_count);
  d->impl_->store = c10::make_intrusive<c10d::PrefixStore>(prefix + "/anvil", tcp);
  auto group_store = c10::make_intrusive<c10d::PrefixStore>(prefix + "/" + d->backend_, tcp);
  try {
    if (d->backend_ == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      // GLOO_SOCKET_IFNAME as torch.distributed reads it (comma-separated interfaces), else the host's address.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      if (ifname && *ifname) {
        std::stringstream ss(ifname);
        for (std::string name; std::getline(ss, name, ',');)
          if (!name.empty()) opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      d->impl_->group = c10::make_intrusive<c10d::ProcessGroupGloo>(group_store, int(env.rank), int(env.world_size), opts);
    } else {
#if defined(ANVIL_WITH_CUDA)
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;  // the watchdog's bound on every collective (TORCH_NCCL_ASYNC_ERROR_HANDLING)
      d->impl_->group = c10::make_intrusive<c10d::ProcessGroupNCCL>(group_store, int(env.rank), int(env.world_size), opts);
#endif
    }
  } catch (const std::exception& e) {
    d->fail("building the " + d->backend_ + " process group", e.what());
  }
  return d;
}

Distributed::~Distributed() = default;

void Distributed::fail(const std::string& what, const std::string& reason) {
  const std::string me = "rank " + std::to_string(env_.rank) + " of " + std::to_string(env_.world_size);
  std::string who;
  try {
    impl_->store->set("fault/" + std::to_string(env_.rank), std::vector<uint8_t>(phase_.begin(), phase_.end()));
    std::vector<int64_t> missing;
    for (int64_t k = 0; k < env_.world_size; ++k)
      if (k != env_.rank) missing.push_back(k);
    const auto until = std::chrono::steady_clock::now() + grace(timeout_s_);
    while (!missing.empty() && std::chrono::steady_clock::now() < until) {
      std::vector<int64_t> still;
      for (int64_t k : missing)
        if (!impl_->store->check({"fault/" + std::to_string(k)})) still.push_back(k);
      missing.swap(still);
      if (!missing.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    if (missing.empty()) {
      who = "every other rank reports the same failure";
    } else {
      std::string list;
      for (int64_t k : missing) list += (list.empty() ? "" : ", ") + std::to_string(k);
      who = std::string(missing.size() == 1 ? "rank " : "ranks ") + list +
            " did not answer (exited, was killed or hangs; train.dist_timeout_s = " + seconds_text(timeout_s_) + ")";
    }
  } catch (const std::exception&) {
    who = "the TCPStore at " + impl_->store_where + " is gone: " +
          (env_.agent_store ? std::string("torchrun's agent stopped") : std::string("rank 0 stopped"));
  }
  throw std::runtime_error("distributed: " + what + " failed on " + me + " during " + phase_ + ": " + who + "\n  (" +
                           reason + ")");
}

namespace {

void wait_or_fail(Distributed& d, const c10::intrusive_ptr<c10d::Work>& work, const std::string& what) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    d.fail(what, first_line(e));
  }
}

}  // namespace

void Distributed::broadcast(std::vector<at::Tensor>& tensors, int64_t root, const std::string& what) {
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  for (auto& t : tensors) {
    std::vector<at::Tensor> one = {t};
    c10::intrusive_ptr<c10d::Work> work;
    try {
      work = impl_->group->broadcast(one, opts);
    } catch (const std::exception& e) {
      fail(what + " (a broadcast from rank " + std::to_string(root) + ")", first_line(e));
    }
    wait_or_fail(*this, work, what + " (a broadcast from rank " + std::to_string(root) + ")");
  }
}

void Distributed::all_reduce_sum(at::Tensor& t, const std::string& what) {
  std::vector<at::Tensor> one = {t};
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->group->allreduce(one);
  } catch (const std::exception& e) {
    fail(what, first_line(e));
  }
  wait_or_fail(*this, work, what);
}

void Distributed::barrier(const std::string& what) {
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->group->barrier();
  } catch (const std::exception& e) {
    fail(what, first_line(e));
  }
  wait_or_fail(*this, work, what);
}

namespace {

// Issues a collective now; the waiter completes it (a failure either way worded by fail). It holds `keep`, the
// collective's tensors, until then.
Distributed::Waiter issue_async(Distributed& d, const std::function<c10::intrusive_ptr<c10d::Work>()>& issue,
                                std::vector<at::Tensor> keep, const std::string& what) {
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = issue();
  } catch (const std::exception& e) {
    d.fail(what, first_line(e));
  }
  return [&d, work, keep = std::move(keep), what] { wait_or_fail(d, work, what); };
}

}  // namespace

Distributed::Waiter Distributed::all_gather_async(at::Tensor out, at::Tensor in, const std::string& what) {
  TORCH_CHECK(out.is_contiguous() && in.is_contiguous() && out.numel() == in.numel() * world_size(),
              "all_gather_async: out must be (world_size * in.numel(),) contiguous");
  return issue_async(*this, [&] { return impl_->group->_allgather_base(out, in); }, {out, in}, what);
}

Distributed::Waiter Distributed::reduce_scatter_async(at::Tensor out, at::Tensor in, const std::string& what) {
  TORCH_CHECK(out.is_contiguous() && in.is_contiguous() && in.numel() == out.numel() * world_size(),
              "reduce_scatter_async: in must be (world_size * out.numel(),) contiguous");
  return issue_async(*this, [&] { return impl_->group->_reduce_scatter_base(out, in); }, {out, in}, what);
}

// ---- GradientSync ------------------------------------------------------------------------------------

struct GradientSync::Bucket {
  std::vector<size_t> params;   // indices into params_, in launch order
  std::vector<int64_t> offsets; // element offset of each in `flat`
  at::Tensor flat;              // (numel,) the bucket's gradients, the params' dtype and device
  int64_t numel = 0;            // the bucket's elements
  size_t pending = 0;           // params whose gradient has not been accumulated in this backward
  c10::intrusive_ptr<c10d::Work> work;
};

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  std::function<void()> fn;
  explicit ReadyHook(std::function<void()> f) : fn(std::move(f)) {}
  void operator()(const torch::autograd::Variable&) override { fn(); }
};

std::mutex g_sync_mutex;  // hooks run on the autograd engine's device threads

}  // namespace

GradientSync::GradientSync(std::shared_ptr<Distributed> dist, std::vector<at::Tensor> params, int64_t bucket_bytes,
                           bool sharded)
    : dist_(std::move(dist)), params_(std::move(params)), bucket_of_(params_.size()), sharded_(sharded) {
  // Reverse order: the last tensors (the top layers) get their gradients first in backward.
  int64_t bytes = 0;
  for (size_t k = params_.size(); k-- > 0;) {
    const auto& p = params_[k];
    const bool fresh = buckets_.empty() || bytes >= bucket_bytes ||
                       buckets_.back().flat.scalar_type() != p.scalar_type();
    if (fresh) {
      buckets_.emplace_back();
      buckets_.back().flat = at::empty({0}, p.options());  // dtype placeholder until sized below
      bytes = 0;
    }
    auto& b = buckets_.back();
    b.offsets.push_back(b.params.empty() ? 0 : b.offsets.back() + params_[b.params.back()].numel());
    b.params.push_back(k);
    bucket_of_[k] = buckets_.size() - 1;
    bytes += p.numel() * int64_t(p.element_size());
  }
  for (auto& b : buckets_) {
    b.numel = b.offsets.back() + params_[b.params.back()].numel();
    // Replicated: one persistent buffer per bucket. Sharded: made at launch, freed once reduced.
    b.flat = sharded_ ? at::empty({0}, b.flat.options()) : at::zeros({b.numel}, b.flat.options());
    b.pending = b.params.size();
  }
  zero_grads();  // replicated: every gradient a view into its bucket, which backward accumulates into in place
  if (sharded_) {
    // Owners by bucket, greedily by size (largest first, to the least loaded rank; ties to the lower rank).
    const int64_t world = dist_->world_size();
    std::vector<size_t> order(buckets_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return buckets_[a].numel > buckets_[b].numel; });
    std::vector<int64_t> load(size_t(world), 0);
    bucket_owner_.assign(buckets_.size(), 0);
    for (size_t i : order) {
      const auto r = std::min_element(load.begin(), load.end()) - load.begin();
      bucket_owner_[i] = r, load[size_t(r)] += buckets_[i].numel;
    }
    owner_of_.assign(params_.size(), 0);
    for (size_t k = 0; k < params_.size(); ++k) owner_of_[k] = bucket_owner_[bucket_of_[k]];
  }
  for (size_t k = 0; k < params_.size(); ++k)
    torch::autograd::impl::set_post_acc_grad_hooks(params_[k], std::make_unique<ReadyHook>([this, k] { ready(k); }));
}

GradientSync::~GradientSync() {
  for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientSync::arm() {
  armed_ = true;
  note_live_bytes();  // the earlier micro-batches' gradients, accumulated locally
}

at::Tensor GradientSync::slot(size_t k) {
  const auto& b = buckets_[bucket_of_[k]];
  const size_t j = size_t(std::find(b.params.begin(), b.params.end(), k) - b.params.begin());
  return b.flat.narrow(0, b.offsets[j], params_[k].numel()).view(params_[k].sizes());
}

bool GradientSync::in_bucket(size_t k) const {
  const auto& g = params_[k].grad();
  const auto& flat = buckets_[bucket_of_[k]].flat;
  if (!g.defined() || flat.numel() == 0) return false;
  const auto* lo = static_cast<const char*>(flat.data_ptr());
  const auto* at = static_cast<const char*>(g.data_ptr());
  return at >= lo && at < lo + flat.numel() * int64_t(flat.element_size());
}

void GradientSync::zero_grads() {
  for (size_t k = 0; k < params_.size(); ++k) {
    if (sharded_) {
      params_[k].mutable_grad() = at::Tensor();  // backward makes them; launch releases them into the buckets
    } else if (!in_bucket(k)) {
      params_[k].mutable_grad() = slot(k);
    }
  }
  if (!sharded_)
    for (auto& b : buckets_) b.flat.zero_();
}

void GradientSync::note_live_bytes() {
  int64_t bytes = 0;
  for (size_t k = 0; k < params_.size(); ++k) {
    const auto& g = params_[k].grad();
    if (g.defined() && !in_bucket(k)) bytes += g.numel() * int64_t(g.element_size());  // a view is its bucket's
  }
  for (const auto& b : buckets_) bytes += b.flat.numel() * int64_t(b.flat.element_size());
  peak_bytes_ = std::max(peak_bytes_, bytes);
}

void GradientSync::ready(size_t k) {
  std::lock_guard<std::mutex> lock(g_sync_mutex);
  if (!armed_) return;
  auto& b = buckets_[bucket_of_[k]];
  if (b.pending > 0) --b.pending;
  // In order only: every rank issues the same collectives in the same sequence.
  while (next_ < buckets_.size() && buckets_[next_].pending == 0) launch(next_++);
}

void GradientSync::launch(size_t i) {
  auto& b = buckets_[i];
  bool stolen = false;  // the buffer is the bucket's one gradient
  if (sharded_) {
    // At most two buckets in flight: the oldest completes (and frees its buffer) before a third is made.
    while (done_ + 2 <= i) complete(done_++, "the ZeRO-2 gradient reduce");
    const auto& g = params_[b.params[0]].grad();
    if (b.params.size() == 1 && g.defined() && g.is_contiguous() && g.scalar_type() == b.flat.scalar_type()) {
      // A bucket of one tensor (a large embedding, say) reduces in that gradient's own memory: no second copy.
      b.flat = g.reshape(-1);
      params_[b.params[0]].mutable_grad() = at::Tensor();
      stolen = true;
    } else {
      b.flat = at::empty({b.numel}, b.flat.options());
    }
  }
  note_live_bytes();  // the bucket's gradients and its buffer: the moment this rank holds the most
  for (size_t j = 0; j < b.params.size() && !stolen; ++j) {
    const size_t k = b.params[j];
    auto& p = params_[k];
    if (in_bucket(k)) continue;  // replicated: backward accumulated into the bucket itself
    auto slot = b.flat.narrow(0, b.offsets[j], p.numel());
    if (p.grad().defined()) slot.copy_(p.grad().reshape(-1));
    else slot.zero_();  // a tensor this rank's backward did not reach adds nothing
    if (sharded_) p.mutable_grad() = at::Tensor();  // the buffer holds it now; the owner gets the sum back
  }
  std::vector<at::Tensor> one = {b.flat};
  try {
    if (sharded_) {
      c10d::ReduceOptions o;
      o.rootRank = bucket_owner_[i];
      b.work = dist_->impl().group->reduce(one, o);
    } else {
      b.work = dist_->impl().group->allreduce(one);
    }
  } catch (const std::exception& e) {
    dist_->fail(std::string(sharded_ ? "the ZeRO-2 gradient reduce" : "the gradient all-reduce") + " (bucket " +
                    std::to_string(i) + ")",
                first_line(e));
  }
}

void GradientSync::complete(size_t i, const std::string& what) {
  auto& b = buckets_[i];
  wait_or_fail(*dist_, b.work, what + " (gradient bucket " + std::to_string(i) + " of " + std::to_string(buckets_.size()) + ")");
  b.work.reset();
  const bool mine = !sharded_ || bucket_owner_[i] == dist_->rank();
  if (mine)
    for (size_t j = 0; j < b.params.size(); ++j) {
      const size_t k = b.params[j];
      auto& p = params_[k];
      if (in_bucket(k)) continue;  // replicated: the gradient is a view of the sum already
      auto sum = b.flat.narrow(0, b.offsets[j], p.numel()).view(p.sizes());
      // A view into the buffer: sharded, the owner's bucket is exactly its gradients, kept alive by these views
      // (no clone, no moment holding both); replicated, the view the next step's backward accumulates into.
      p.mutable_grad() = sum;
    }
  if (sharded_) b.flat = at::empty({0}, b.flat.options());  // freed, unless the owner's gradients view it
  b.pending = b.params.size();
}

void GradientSync::finish(const std::string& what) {
  {
    std::lock_guard<std::mutex> lock(g_sync_mutex);
    while (next_ < buckets_.size()) launch(next_++);
    while (done_ < buckets_.size()) complete(done_++, what);
  }
  note_live_bytes();
  next_ = 0, done_ = 0;
  armed_ = false;
}

}  // namespace anvil::train
