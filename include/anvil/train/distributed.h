// Multi-process data parallel training on PyTorch's c10d: the process group a torchrun (or Slurm) launch
// asks for, and the gradient all-reduce the trainer runs on it.
//
// Rendezvous is env://, as torch.distributed's: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
// MASTER_PORT; without RANK and WORLD_SIZE the process trains alone and nothing here runs. The store is a
// c10d::TCPStore at MASTER_ADDR:MASTER_PORT (torchrun's agent hosts it when TORCHELASTIC_USE_AGENT_STORE is
// "True", else rank 0 does), the group a c10d::ProcessGroupGloo on CPU or ProcessGroupNCCL on CUDA
// (train.dist_backend "auto"), every collective bounded by train.dist_timeout_s.
//
// Faults: a collective that fails (a peer died: gloo sees the connection close; or hung: the timeout) is
// rethrown naming the ranks that did not answer. Each surviving rank writes a key to the store when its
// collective fails and waits a few seconds for the others' keys; a rank whose key never comes is the one that
// exited, was killed or hangs. If the store itself is gone, rank 0 (or the launcher) that hosted it is named.
//
// Gradients (GradientSync): the trainable tensors are cut into buckets of ~bucket_bytes in reverse order (the
// order backward produces them), each bucket all-reduced (summed) as soon as the last of its tensors has its
// gradient accumulated (a post-accumulate-grad hook, so the sum of a step's micro-batches is what is sent),
// while backward goes on with the layers below. Buckets are launched strictly in order, so every rank issues
// the same collectives in the same order (what c10d requires). Our own bucketing rather than c10d::Reducer:
// the Reducer divides by the world size, expects every parameter used in every backward (or a graph walk each
// step with find_unused_parameters), and owns the gradient tensors; here a tensor without a gradient is a zero
// in its bucket, and the reduction is a plain sum, which is what the trainer's loss normalization needs (the
// loss of each rank is divided by the global step's target count, so the sum over ranks is the one-process
// gradient).
#pragma once

#include "anvil/train/config.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace anvil::train {

/// torchrun's environment. `launched` is false when RANK and WORLD_SIZE are both absent.
struct DistEnv {
  bool launched = false;
  int64_t rank = 0, world_size = 1, local_rank = 0;
  std::string master_addr;
  int64_t master_port = 0;
  bool agent_store = false;   ///< TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent hosts the TCPStore
  int64_t restart_count = 0;  ///< TORCHELASTIC_RESTART_COUNT: the store keys of each attempt are apart
};

/// Reads the variables through `get` (std::getenv by default); errors name the variable and the rule
/// ("WORLD_SIZE: must be an integer >= 1, got ...", "RANK: must be < WORLD_SIZE (2), got 2").
DistEnv read_dist_env(const std::function<const char*(const char*)>& get = nullptr);

/// The backend train.dist_backend names for a device: "auto" is gloo on CPU and nccl on CUDA; nccl on a CPU
/// device or in a build without CUDA is an error naming the key.
std::string resolve_dist_backend(const std::string& backend, at::Device device);

/// A process group of a launched run. Every method is collective (every rank calls it, in the same order)
/// unless it says otherwise.
class Distributed {
 public:
  /// Connects to the store and builds the group (train.dist_backend, train.dist_timeout_s). On CUDA the
  /// device must be cuda:LOCAL_RANK (the recipe picks it: `device_for_rank`).
  static std::shared_ptr<Distributed> connect(const DistEnv& env, const std::string& backend, double timeout_s,
                                              at::Device device);
  ~Distributed();

  int64_t rank() const { return env_.rank; }
  int64_t world_size() const { return env_.world_size; }
  bool is_main() const { return env_.rank == 0; }
  const std::string& backend() const { return backend_; }
  double timeout_s() const { return timeout_s_; }

  /// In place: every rank ends with rank `root`'s values (same shapes and dtypes on every rank). `what` names
  /// the collective in a failure.
  void broadcast(std::vector<at::Tensor>& tensors, int64_t root, const std::string& what);
  /// In place sum over ranks, blocking. `what` names the collective in a failure ("the loss of step 3").
  void all_reduce_sum(at::Tensor& t, const std::string& what);
  void barrier(const std::string& what);

  /// A collective in flight (the *_async methods): calling it waits for the collective (a failure rethrown as
  /// fail() words it); it holds the collective's tensors until then. Call it exactly once.
  using Waiter = std::function<void()>;
  /// Every rank's `in` (n,) into `out` (world_size * n,), in rank order (c10d's _allgather_base: one flat
  /// collective, gloo and NCCL); both contiguous, same dtype and device. Issued now, completed by the waiter.
  Waiter all_gather_async(at::Tensor out, at::Tensor in, const std::string& what);
  /// The sum over ranks of slice `rank` of `in` (world_size * n,) into `out` (n,) (c10d's _reduce_scatter_base).
  Waiter reduce_scatter_async(at::Tensor out, at::Tensor in, const std::string& what);

  /// Sets what failures name as the rank's place ("step 3"); not collective.
  void set_phase(std::string phase) { phase_ = std::move(phase); }

  /// A failed collective as the error the user sees (names the ranks that did not answer); not collective.
  [[noreturn]] void fail(const std::string& what, const std::string& reason);

 private:
  friend class GradientSync;
  struct Impl;
  Impl& impl() { return *impl_; }
  Distributed() = default;
  DistEnv env_;
  std::string backend_, phase_ = "setup";
  double timeout_s_ = 0;
  std::unique_ptr<Impl> impl_;
};

/// The device a rank trains on: model.device "cuda" (or "auto" with CUDA) becomes cuda:LOCAL_RANK; a CPU
/// device stays; an explicit cuda:N under a launch with more than one local rank is an error naming model.device.
at::Device device_for_rank(at::Device device, const DistEnv& env, const std::string& key);

/// The process group of a torchrun launch (read_dist_env), or null when the process was not launched so.
/// `device` is the rank's (device_for_rank).
std::shared_ptr<Distributed> connect_if_launched(const TrainSection& train, at::Device device);

/// The bucketed gradient all-reduce of the trainable tensors (see the header comment).
///
/// Sharded (ZeRO-2): each bucket has one owner rank (buckets dealt greedily by size, largest first, to the least
/// loaded rank) and is reduced to it alone. A bucket's buffer is made when it is launched, the tensors' own
/// gradients are released as they are copied in, and at most two buckets are in flight (launching a third waits
/// for the oldest): so while the armed backward runs, a rank holds the gradients of the buckets not yet launched,
/// two buckets' buffers and the sums it owns; after finish() only the gradients of the tensors it owns (the rest
/// undefined). Replicated (stages 0 and 1): persistent buffers, every gradient summed on every rank; each
/// tensor's gradient is a view into its bucket (DDP's gradient_as_bucket_view), which backward accumulates into
/// in place, so the gradients are held once, not once more as the reduce's buffers.
class GradientSync {
 public:
  GradientSync(std::shared_ptr<Distributed> dist, std::vector<at::Tensor> params, int64_t bucket_bytes = 25 << 20,
               bool sharded = false);
  ~GradientSync();
  /// The next backward passes reduce (the last micro-batch of a step); earlier ones only accumulate.
  void arm();
  /// After that backward (or instead of it, on a rank with no rows): launches the buckets not yet launched,
  /// waits for all, and writes the sums into the tensors' gradients (sharded: the owned tensors' only).
  void finish(const std::string& what);
  /// Before a step's first backward (in place of setting the gradients undefined): replicated, zeroes the buckets
  /// and points every gradient at its slot; sharded, sets them undefined.
  void zero_grads();
  /// Sharded: the owner rank of each tensor (its bucket's); empty when replicated.
  const std::vector<int64_t>& owners() const { return owner_of_; }
  /// The most bytes of gradients and bucket buffers this rank held at once, measured where they peak (as a
  /// bucket is launched, and after finish()), over every step so far.
  int64_t peak_bytes() const { return peak_bytes_; }

  struct Bucket;

 private:
  void ready(size_t param);
  void launch(size_t bucket);
  void complete(size_t bucket, const std::string& what);  // waits for its reduce, writes the sums
  void note_live_bytes();
  at::Tensor slot(size_t param);        // the param's view into its bucket
  bool in_bucket(size_t param) const;   // its gradient is that view (or any part of its bucket)

  std::shared_ptr<Distributed> dist_;
  std::vector<at::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  ///< param index -> bucket
  size_t next_ = 0;                ///< the next bucket to launch (in order)
  size_t done_ = 0;                ///< buckets below this are complete (sharded: waited for and freed)
  bool armed_ = false;
  bool sharded_ = false;
  std::vector<int64_t> owner_of_;  ///< sharded: param index -> owner rank
  std::vector<int64_t> bucket_owner_;
  int64_t peak_bytes_ = 0;
};

}  // namespace anvil::train
