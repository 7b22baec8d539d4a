// The safetensors writer and the checkpoint-directory writer, plus the atomic-write and small-file
// helpers the io sources share.
//
// The header is built the way the reference implementation (Rust `safetensors`, which the Python
// package calls) builds it, so that our files are byte-for-byte what `safetensors.torch.save_file`
// writes for the same tensors (tests/python/test_safetensors_io.py checks it): compact JSON with
// "__metadata__" first (omitted when empty), tensors sorted by dtype (widest first, in the reference's
// enum order) then name, each as {"dtype","shape","data_offsets"}, offsets contiguous from 0, the
// header padded with spaces to a multiple of 8 so every tensor is aligned for its dtype.
// Tensors are converted to CPU contiguous one at a time while writing, so saving GPU weights needs host
// memory for one tensor, not the model. Every file goes to a temporary name first and is renamed
// over the target only when complete and flushed: a crash or error never leaves a partial checkpoint.
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <numeric>
#include <regex>
#include <set>
#include <sstream>

namespace anvil::io {

namespace detail {

// POSIX calls rather than std::filesystem: libtorch.so exports its own copies of std::filesystem's
// functions (status, file_size, remove_all, create_directories, ...), and in a process that loads it
// those win symbol resolution and crash (remove_all jumps to address 0; see docs/ARCHITECTURE.md).

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  return dir.back() == '/' ? dir + name : dir + "/" + name;
}

std::string parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

std::string file_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

void make_directories(const std::string& dir) {
  if (dir.empty() || is_directory(dir)) return;
  const std::string parent = parent_dir(dir);
  if (parent != dir) make_directories(parent);
  if (::mkdir(dir.c_str(), 0777) != 0 && errno != EEXIST)
    TORCH_CHECK(false, "cannot create the directory '", dir, "': ", std::strerror(errno));
}

std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  return names;
}

std::string read_text_file(const std::string& path, uint64_t max_bytes) {
  struct stat st {};
  TORCH_CHECK(::stat(path.c_str(), &st) == 0, "cannot read '", path, "': ", std::strerror(errno));
  TORCH_CHECK(static_cast<uint64_t>(st.st_size) <= max_bytes, "'", path, "' is ", st.st_size,
              " bytes, more than the ", max_bytes, " allowed");
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "cannot open '", path, "'");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_all(int fd, const void* data, uint64_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<uint64_t>(n, 1u << 30));
    if (w < 0 && errno == EINTR) continue;
    TORCH_CHECK(w > 0, "cannot write '", path, "': ", w < 0 ? std::strerror(errno) : "wrote nothing");
    p += w;
    n -= static_cast<uint64_t>(w);
  }
}

void write_file_atomically(const std::string& path, const std::function<void(int fd)>& write) {
  static std::atomic<uint64_t> counter{0};
  const std::string dir = parent_dir(path);
  // Hidden, unique per process and call, in the target's directory (rename must not cross filesystems).
  const std::string tmp = join_path(dir, "." + file_name(path) + ".tmp." + std::to_string(::getpid()) + "." +
                                             std::to_string(counter++));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  TORCH_CHECK(fd >= 0, "cannot write '", path, "': cannot create the temporary file '", tmp, "': ",
              std::strerror(errno));
  try {
    write(fd);
    TORCH_CHECK(::fsync(fd) == 0, "cannot write '", path, "': fsync failed: ", std::strerror(errno));
    const int rc = ::close(fd);
    TORCH_CHECK(rc == 0, "cannot write '", path, "': close failed: ", std::strerror(errno));
    TORCH_CHECK(::rename(tmp.c_str(), path.c_str()) == 0, "cannot write '", path, "': rename from '", tmp,
                "' failed: ", std::strerror(errno));
  } catch (...) {
    ::close(fd);  // harmless when already closed (EBADF)
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; failure here loses nothing already written, so it is not an error.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace detail

namespace {

struct PlannedTensor {
  const std::string* name;
  const at::Tensor* tensor;
  std::string dtype_name;
  uint64_t nbytes;
};

std::string build_header(const std::vector<PlannedTensor>& plan, const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  uint64_t offset = 0;
  for (const auto& p : plan) {
    nlohmann::ordered_json info = nlohmann::ordered_json::object();
    info["dtype"] = p.dtype_name;
    info["shape"] = p.tensor->sizes().vec();
    info["data_offsets"] = {offset, offset + p.nbytes};
    header[*p.name] = info;
    offset += p.nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK(false, "tensor names and metadata must be valid UTF-8: ", e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');
  return text;
}

std::vector<PlannedTensor> plan_tensors(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                        const std::string& path) {
  std::vector<PlannedTensor> plan;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    TORCH_CHECK(name != "__metadata__", "save_safetensors '", path, "': '__metadata__' is reserved, not a tensor name");
    TORCH_CHECK(seen.insert(name).second, "save_safetensors '", path, "': duplicate tensor name '", name, "'");
    TORCH_CHECK(t.defined(), "save_safetensors '", path, "': tensor '", name, "' is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "save_safetensors '", path, "': tensor '", name,
                "' must be dense (strided), got layout ", t.layout());
    plan.push_back({&name, &t, safetensors_dtype_name(t.scalar_type()),
                    static_cast<uint64_t>(t.numel()) * static_cast<uint64_t>(t.element_size())});
  }
  std::stable_sort(plan.begin(), plan.end(), [](const PlannedTensor& a, const PlannedTensor& b) {
    const int ra = detail::safetensors_dtype_rank(a.dtype_name), rb = detail::safetensors_dtype_rank(b.dtype_name);
    return ra != rb ? ra > rb : *a.name < *b.name;
  });
  return plan;
}

}  // namespace

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  const auto plan = plan_tensors(tensors, path);
  std::string header;
  try {
    header = build_header(plan, metadata);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "save_safetensors '", path, "': ", e.what_without_backtrace());
  }
  detail::write_file_atomically(path, [&](int fd) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
    detail::write_all(fd, len, 8, path);
    detail::write_all(fd, header.data(), header.size(), path);
    for (const auto& p : plan) {
      if (p.nbytes == 0) continue;
      // One tensor at a time on the host: (shape) dtype, contiguous
      const at::Tensor host = p.tensor->detach().to(at::kCPU).contiguous();
      detail::write_all(fd, host.const_data_ptr(), p.nbytes, path);
    }
  });
}

namespace {

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

// huggingface_hub's split_state_dict_into_shards_factory, which transformers' save_pretrained uses:
// tensors in the given order; a tensor larger than the bound gets a shard of its own at once; a
// tensor that would tip the current shard over the bound starts a new one.
std::vector<std::vector<size_t>> split_into_shards(const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                                   int64_t max_shard_bytes) {
  std::vector<std::vector<size_t>> shards;
  std::vector<size_t> current;
  int64_t current_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i].second;
    const int64_t bytes = t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0;
    if (bytes > max_shard_bytes) {
      shards.push_back({i});
      continue;
    }
    if (current_bytes + bytes > max_shard_bytes) {
      shards.push_back(std::move(current));
      current = {};
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += bytes;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));
  return shards;
}

// Files of an earlier save that the new one does not overwrite (e.g. 4 shards before, 3 now).
void remove_stale_files(const std::string& dir, const std::set<std::string>& written) {
  static const std::regex kShard(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (const auto& name : detail::list_directory(dir)) {
    const bool ours = name == kSingleFile || name == kIndexFile || std::regex_match(name, kShard);
    if (ours && !written.count(name)) ::unlink(detail::join_path(dir, name).c_str());
  }
}

}  // namespace

void save_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     int64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(max_shard_bytes > 0, "save_checkpoint '", dir, "': max_shard_bytes must be positive, got ",
              max_shard_bytes);
  detail::make_directories(dir);
  plan_tensors(tensors, dir);  // every name and dtype checked before anything is written

  const auto shards = split_into_shards(tensors, max_shard_bytes);
  std::set<std::string> written;
  if (shards.size() == 1) {
    save_safetensors(detail::join_path(dir, kSingleFile), tensors, metadata);
    written.insert(kSingleFile);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total = 0;
    for (size_t s = 0; s < shards.size(); ++s) {
      const std::string name = shard_name(s, shards.size());
      std::vector<std::pair<std::string, at::Tensor>> part;
      for (size_t i : shards[s]) {
        part.push_back(tensors[i]);
        weight_map[tensors[i].first] = name;
        total += static_cast<uint64_t>(tensors[i].second.numel()) * tensors[i].second.element_size();
      }
      save_safetensors(detail::join_path(dir, name), part, metadata);
      written.insert(name);
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";  // transformers: indent 2, sorted keys, newline
    const std::string path = detail::join_path(dir, kIndexFile);
    detail::write_file_atomically(path, [&](int fd) { detail::write_all(fd, text.data(), text.size(), path); });
    written.insert(kIndexFile);
  }
  remove_stale_files(dir, written);
}

}  // namespace anvil::io
