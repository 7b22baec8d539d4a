// Checkpoint: a safetensors file or a Hugging Face checkpoint directory (single file or sharded with
// model.safetensors.index.json), and load_all, its fast path to a GPU.
//
// The index is as untrusted as the shards: it may name only plain file names inside the directory
// (no "/", no ".."), and every key it maps must exist in the shard it names.
//
// load_all to a GPU never copies a shard into anonymous host memory. Where the CUDA runtime can, each
// shard is mapped read-only and page-locked (detail::RegisteredFile, host_register.cpp) and its tensors
// are copied to the device straight from the page cache; the next shard is registered while the
// previous one's copies run. Elsewhere (no CUDA in the build, a device without read-only registration,
// a registration that fails, or ANVIL_LOAD_PATH=ring) the ring path below runs: each shard's bytes are read with
// pread (page cache -> buffer, spread over ATen's threads) into a ring of four pinned staging buffers (up
// to 64 MiB each); a chunk's host-to-device copies are queued on a side stream and an event recorded after
// them, and the buffer is refilled only after its event has completed. So the reads of chunk i+1 overlap
// the DMA of chunk i, and the host memory used is the ring, whatever the checkpoint's size. pread rather
// than a memcpy out of the mapping: touching the mapping takes one minor page fault per 4 KiB page, and
// threads faulting into one address space serialize on its lock (the first version, which copied from
// the mapping, reached 6.2 GB/s on the H100 machine, below a plain pageable .to("cuda")). The
// destination tensors are allocated on the caller's current stream (so the caching allocator ties
// them to it), the side stream first waits for that stream, and load_all returns after the side stream
// has finished, so the tensors are ready on any stream (both paths). Only ATen/c10's device-generic
// stream and event API is used here, so this file needs no CUDA headers and builds in the CPU-only
// configuration too.
#include "anvil/io/json.h"
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"

#include <ATen/Parallel.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>

namespace anvil::io {
namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr uint64_t kMaxIndexBytes = 100'000'000;

// A shard name from an index: a plain file name, nothing that climbs out of the directory.
void check_shard_name(const std::string& name, const std::string& index_path) {
  TORCH_CHECK(!name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
                  name.find('\0') == std::string::npos,
              "checkpoint index '", index_path, "': shard file name '", name,
              "' must be a plain file name inside the checkpoint directory");
}

std::string metadata_value(const nlohmann::json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

}  // namespace

Checkpoint::Checkpoint(const std::string& path) : path_(path) {
  const bool is_file = is_regular_file(path);
  TORCH_CHECK(is_file || is_directory(path), "checkpoint '", path, "': no such file or directory");
  const std::string single = is_file ? path : join_path(path, kSingleFile);
  const std::string index_path = join_path(path, kIndexFile);
  if (is_file || is_regular_file(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single));
    for (const auto& e : files_[0]->entries()) where_.emplace(e.name, 0);
    metadata_ = files_[0]->metadata();
    return;
  }
  TORCH_CHECK(is_regular_file(index_path), "checkpoint '", path, "': the directory holds neither ",
              kSingleFile, " nor ", kIndexFile);

  const auto index = parse_json_strict(read_text_file(index_path, kMaxIndexBytes),
                                               "checkpoint index '" + index_path + "'");
  TORCH_CHECK(index.is_object(), "checkpoint index '", index_path, "' must be a JSON object");
  TORCH_CHECK(index.contains("weight_map") && index.at("weight_map").is_object(), "checkpoint index '",
              index_path, "' lacks the object 'weight_map'");
  if (index.contains("metadata")) {
    TORCH_CHECK(index.at("metadata").is_object(), "checkpoint index '", index_path, "': 'metadata' must be an object");
    for (const auto& [k, v] : index.at("metadata").items()) metadata_[k] = metadata_value(v);
  }
  // Shards open in file-name order (model-00001-of-... first), each once.
  std::set<std::string> shard_names;
  for (const auto& [key, v] : index.at("weight_map").items()) {
    TORCH_CHECK(v.is_string(), "checkpoint index '", index_path, "': weight_map['", key, "'] must be a file name, got ",
                v.dump());
    check_shard_name(v.get<std::string>(), index_path);
    shard_names.insert(v.get<std::string>());
  }
  std::map<std::string, size_t> shard_pos;
  for (const auto& name : shard_names) {
    const std::string shard_path = join_path(path, name);
    TORCH_CHECK(is_regular_file(shard_path), "checkpoint index '", index_path, "' names the shard '", name,
                "', which does not exist");
    shard_pos[name] = files_.size();
    files_.push_back(std::make_unique<SafetensorsFile>(shard_path));
  }
  for (const auto& [key, v] : index.at("weight_map").items()) {
    const size_t pos = shard_pos.at(v.get<std::string>());
    TORCH_CHECK(files_[pos]->contains(key), "checkpoint index '", index_path, "' maps '", key, "' to '",
                v.get<std::string>(), "', which does not hold it");
    where_.emplace(key, pos);
  }
}

std::vector<std::string> Checkpoint::keys() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [k, _] : where_) out.push_back(k);
  std::sort(out.begin(), out.end());
  return out;
}

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = where_.find(name);
  TORCH_CHECK(it != where_.end(), "checkpoint '", path_, "': no tensor '", name, "' (", where_.size(), " tensors)");
  return *files_[it->second];
}

const TensorEntry& Checkpoint::entry(const std::string& name) const { return file_of(name).entry(name); }

at::Tensor Checkpoint::tensor(const std::string& name) const { return file_of(name).tensor(name); }

namespace {

// Reads n bytes of `fd` from `offset` into dst, spread over ATen's intra-op threads (one reader alone
// does not saturate a host-to-device copy); throws naming `path` on a read error or a short file.
void parallel_pread(int fd, const std::string& path, uint8_t* dst, uint64_t offset, uint64_t n) {
  constexpr int64_t kGrain = 4 << 20;
  at::parallel_for(0, static_cast<int64_t>(n), kGrain, [&](int64_t b, int64_t e) {
    for (int64_t at = b; at < e;) {
      const ssize_t got = ::pread(fd, dst + at, static_cast<size_t>(e - at), static_cast<off_t>(offset + at));
      if (got < 0 && errno == EINTR) continue;
      TORCH_CHECK(got > 0, "safetensors: cannot read '", path, "' at byte ", offset + at, ": ",
                  got == 0 ? "the file is shorter than its header says" : std::strerror(errno));
      at += got;
    }
  });
}

// An open read-only descriptor, closed on scope exit.
struct ReadFd {
  int fd;
  explicit ReadFd(const std::string& path) : fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    TORCH_CHECK(fd >= 0, "safetensors: cannot open '", path, "': ", std::strerror(errno));
  }
  ~ReadFd() { ::close(fd); }
  ReadFd(const ReadFd&) = delete;
  ReadFd& operator=(const ReadFd&) = delete;
};

// The device-side tensors of one shard's entries: flat bytes on `device`, allocated on the caller's
// stream (so the caching allocator ties them to it).
std::vector<at::Tensor> allocate_flat(const std::vector<const TensorEntry*>& entries, at::Device device) {
  std::vector<at::Tensor> flat;  // (nbytes) uint8 each, on device
  for (const auto* e : entries)
    flat.push_back(at::empty({static_cast<int64_t>(e->nbytes())}, at::TensorOptions().dtype(at::kByte).device(device)));
  return flat;
}

void view_flat(const std::vector<const TensorEntry*>& entries, const std::vector<at::Tensor>& flat, at::Device device,
               std::unordered_map<std::string, at::Tensor>& out) {
  for (size_t i = 0; i < entries.size(); ++i) {
    const TensorEntry& e = *entries[i];
    out[e.name] = e.nbytes() == 0 ? at::empty(e.shape, at::TensorOptions().dtype(e.dtype).device(device))
                                  : flat[i].view(e.dtype).view(e.shape);
  }
}

// One shard to a device: its tensors (those the checkpoint maps to it), streamed through the ring.
void stream_file_to_device(const SafetensorsFile& file, const std::vector<const TensorEntry*>& entries,
                           at::Device device, std::unordered_map<std::string, at::Tensor>& out) {
  // ANVIL_LOAD_TRACE=1: where the time goes (allocation, reads, waits for the DMA), per shard, on stderr.
  static const bool trace = std::getenv("ANVIL_LOAD_TRACE") != nullptr;
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  const auto t_start = Clock::now();
  double t_read = 0, t_wait = 0, t_alloc = 0;
  // Destinations first, on the caller's stream: flat bytes, viewed as dtype and shape at the end.
  const auto flat = allocate_flat(entries, device);  // (nbytes) uint8 each, on device
  uint64_t total = 0;
  for (const auto* e : entries) total += e->nbytes();
  const ReadFd in(file.path());
  const uint64_t data_start = 8 + file.header_bytes();  // file offset of the data section
  // Hint (errors ignored): the shard is read front to back.
  ::posix_fadvise(in.fd, 0, 0, POSIX_FADV_SEQUENTIAL);

  c10::impl::VirtualGuardImpl impl(device.type());
  const c10::Stream caller = impl.getStream(device);
  const c10::Stream side = impl.getStreamFromGlobalPool(device);
  c10::Event ready(device.type());
  ready.record(caller);
  ready.block(side);  // the side stream starts after the allocations' stream
  c10::StreamGuard on_side(side);

  // The ring: a few buffers of up to 64 MiB; small shards get small buffers.
  constexpr int kRing = 4;
  const uint64_t chunk = std::clamp<uint64_t>((total + kRing - 1) / kRing, 1 << 20, 64 << 20);
  std::vector<at::Tensor> staging;  // (chunk) uint8, pinned host memory
  std::vector<c10::Event> done;
  for (int i = 0; i < kRing; ++i) {
    staging.push_back(
        at::empty({static_cast<int64_t>(chunk)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
    done.emplace_back(device.type());
  }
  t_alloc = seconds_since(t_start);  // destinations on the device and the pinned ring

  std::vector<uint64_t> sizes;
  for (const auto* e : entries) sizes.push_back(e->nbytes());
  for (const auto& c : detail::plan_ring(sizes, chunk, kRing)) {
    auto t0 = Clock::now();
    if (done[c.slot].was_marked_for_recording()) done[c.slot].synchronize();  // its last copies have finished
    t_wait += seconds_since(t0);
    t0 = Clock::now();
    uint8_t* buf = staging[c.slot].data_ptr<uint8_t>();
    // Host side: pieces adjacent in the file (the usual case: every tensor of the shard) in one read.
    for (size_t i = 0; i < c.pieces.size();) {
      const TensorEntry& first = *entries[c.pieces[i].tensor];
      const uint64_t offset = data_start + first.begin + c.pieces[i].tensor_offset;
      uint64_t n = c.pieces[i].bytes;
      size_t j = i + 1;
      for (; j < c.pieces.size(); ++j) {
        const TensorEntry& next = *entries[c.pieces[j].tensor];
        if (data_start + next.begin + c.pieces[j].tensor_offset != offset + n) break;
        n += c.pieces[j].bytes;
      }
      parallel_pread(in.fd, file.path(), buf + c.pieces[i].staging_offset, offset, n);
      i = j;
    }
    t_read += seconds_since(t0);
    // Device side: one async copy per piece on the side stream, then the event that frees the slot.
    for (const auto& p : c.pieces)
      flat[p.tensor]
          .narrow(0, static_cast<int64_t>(p.tensor_offset), static_cast<int64_t>(p.bytes))
          .copy_(staging[c.slot].narrow(0, static_cast<int64_t>(p.staging_offset), static_cast<int64_t>(p.bytes)),
                 /*non_blocking=*/true);
    done[c.slot].record(side);
  }
  for (auto& ev : done)
    if (ev.was_marked_for_recording()) ev.synchronize();
  const auto t_drain = Clock::now();
  impl.synchronizeStream(side);
  t_wait += seconds_since(t_drain);
  if (trace)
    std::fprintf(stderr, "load_all %s: %.2f GB in %.3f s (alloc+ring %.3f, read %.3f, wait %.3f), %d threads\n",
                 file.path().c_str(), total / 1e9, seconds_since(t_start), t_alloc, t_read, t_wait,
                 at::get_num_threads());

  view_flat(entries, flat, device, out);
}

// The registered path: every shard page-locked in turn, its tensors copied from the page cache by DMA
// on a side stream; shard f+1 is registered (page faults and pinning, the slow part) while shard f's
// copies run, and f is unregistered once its copies have completed. Returns false, having copied
// nothing, when the first shard cannot be registered (the caller then takes the ring path).
bool copy_registered_files(const std::vector<const SafetensorsFile*>& files,
                           const std::vector<std::vector<const TensorEntry*>>& entries, at::Device device,
                           std::unordered_map<std::string, at::Tensor>& out) {
  static const bool trace = std::getenv("ANVIL_LOAD_TRACE") != nullptr;
  using Clock = std::chrono::steady_clock;
  const auto seconds_since = [](Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); };
  std::string why_not;
  auto t0 = Clock::now();
  auto current = detail::RegisteredFile::open(files[0]->path(), &why_not);
  if (!current) {
    if (trace) std::fprintf(stderr, "load_all: registered path not taken (%s): staging ring\n", why_not.c_str());
    return false;
  }
  c10::impl::VirtualGuardImpl impl(device.type());
  const c10::Stream caller = impl.getStream(device);
  const c10::Stream side = impl.getStreamFromGlobalPool(device);
  for (size_t f = 0; f < files.size(); ++f) {
    const double t_register = seconds_since(t0);
    const auto t_copy = Clock::now();
    const auto flat = allocate_flat(entries[f], device);
    c10::Event ready(device.type());
    ready.record(caller);
    ready.block(side);  // the copies start after the allocations' stream
    {
      c10::StreamGuard on_side(side);
      const uint64_t data_start = 8 + files[f]->header_bytes();
      TORCH_CHECK(current->size() >= data_start + files[f]->data_bytes(), "safetensors: '", files[f]->path(),
                  "' changed size while it was being loaded");
      for (size_t i = 0; i < entries[f].size(); ++i) {
        const TensorEntry& e = *entries[f][i];
        if (e.nbytes() == 0) continue;
        // (nbytes) uint8, a view of the page-locked mapping: the copy is an asynchronous DMA.
        auto src = at::from_blob(const_cast<uint8_t*>(current->bytes() + data_start + e.begin),
                                 {static_cast<int64_t>(e.nbytes())}, at::TensorOptions().dtype(at::kByte));
        flat[i].copy_(src, /*non_blocking=*/true);
      }
    }
    c10::Event done(device.type());
    done.record(side);
    // The next shard is registered while this one's copies run; a failure there falls back to the ring
    // for the rest, after this shard's copies have completed.
    t0 = Clock::now();
    std::unique_ptr<detail::RegisteredFile> next;
    if (f + 1 < files.size()) next = detail::RegisteredFile::open(files[f + 1]->path(), &why_not);
    done.synchronize();
    view_flat(entries[f], flat, device, out);
    if (trace)
      std::fprintf(stderr, "load_all %s (registered): register %.3f s, copy %.3f s (with the next registration)\n",
                   files[f]->path().c_str(), t_register, seconds_since(t_copy));
    current = std::move(next);
    if (!current && f + 1 < files.size()) {
      if (trace) std::fprintf(stderr, "load_all: registered path stops (%s): staging ring\n", why_not.c_str());
      for (size_t g = f + 1; g < files.size(); ++g)
        if (!entries[g].empty()) stream_file_to_device(*files[g], entries[g], device, out);
      return true;
    }
  }
  return true;
}

}  // namespace

namespace detail {

std::vector<RingChunk> plan_ring(const std::vector<uint64_t>& sizes, uint64_t chunk, int ring) {
  TORCH_CHECK(chunk > 0 && ring > 0, "plan_ring: chunk and ring must be positive");
  std::vector<RingChunk> plan;
  RingChunk current{0, {}};
  uint64_t used = 0;
  for (size_t t = 0; t < sizes.size(); ++t) {
    for (uint64_t off = 0; off < sizes[t];) {
      if (used == chunk) {  // this buffer is full: the next slot
        plan.push_back(std::move(current));
        current = RingChunk{static_cast<int>(plan.size() % ring), {}};
        used = 0;
      }
      const uint64_t n = std::min(sizes[t] - off, chunk - used);
      current.pieces.push_back({t, off, used, n});
      used += n;
      off += n;
    }
  }
  if (!current.pieces.empty()) plan.push_back(std::move(current));
  return plan;
}

}  // namespace detail

std::unordered_map<std::string, at::Tensor> Checkpoint::load_all(at::Device device) const {
  std::unordered_map<std::string, at::Tensor> out;
  out.reserve(where_.size());
  if (device.is_cpu()) {
    for (const auto& [name, _] : where_) out.emplace(name, tensor(name));
    return out;
  }
  c10::DeviceGuard guard(device);
  if (!device.has_index())
    device = at::Device(device.type(), c10::impl::VirtualGuardImpl(device.type()).getDevice().index());
  std::vector<const SafetensorsFile*> files;               // the shards that hold a tensor of the checkpoint
  std::vector<std::vector<const TensorEntry*>> entries;    // per such shard, in data-offset order
  for (size_t f = 0; f < files_.size(); ++f) {
    std::vector<const TensorEntry*> mine;
    for (const auto& e : files_[f]->entries()) {
      auto it = where_.find(e.name);
      if (it != where_.end() && it->second == f) mine.push_back(&e);
    }
    if (mine.empty()) continue;
    files.push_back(files_[f].get());
    entries.push_back(std::move(mine));
  }
  if (files.empty()) return out;
  // ANVIL_LOAD_PATH=ring forces the staging ring (for comparisons); the default tries registration.
  const char* path_env = std::getenv("ANVIL_LOAD_PATH");
  const std::string load_path = path_env ? path_env : "auto";
  TORCH_CHECK(load_path == "auto" || load_path == "ring" || load_path == "registered",
              "ANVIL_LOAD_PATH must be auto, ring or registered, got '", load_path, "'");
  if (load_path != "ring" && device.is_cuda() && copy_registered_files(files, entries, device, out)) return out;
  TORCH_CHECK(load_path != "registered", "ANVIL_LOAD_PATH=registered: the registered path is not available "
              "here (ANVIL_LOAD_TRACE=1 says why)");
  for (size_t f = 0; f < files.size(); ++f) stream_file_to_device(*files[f], entries[f], device, out);
  return out;
}

}  // namespace anvil::io
