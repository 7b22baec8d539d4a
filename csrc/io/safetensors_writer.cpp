// The safetensors writer and the checkpoint-directory writer (atomic writes: anvil/io/fs.h).
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
#include "anvil/io/fs.h"
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
    TORCH_CHECK(!t.is_meta(), "save_safetensors '", path, "': tensor '", name, "' is on the meta device (it has no data)");
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
  write_file_atomically(path, [&](int fd) {
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(header.size()) >> (8 * i));
    write_all(fd, len, 8, path);
    write_all(fd, header.data(), header.size(), path);
    for (const auto& p : plan) {
      if (p.nbytes == 0) continue;
      // One tensor at a time on the host: (shape) dtype, contiguous
      at::Tensor host;
      try {
        host = p.tensor->detach().to(at::kCPU).contiguous();
      } catch (const c10::Error& e) {
        TORCH_CHECK(false, "save_safetensors '", path, "': cannot copy tensor '", *p.name, "' to the host: ",
                    e.what_without_backtrace());
      }
      write_all(fd, host.const_data_ptr(), p.nbytes, path);
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
  for (const auto& name : list_directory(dir)) {
    const bool ours = name == kSingleFile || name == kIndexFile || std::regex_match(name, kShard);
    if (ours && !written.count(name)) ::unlink(join_path(dir, name).c_str());
  }
}

}  // namespace

void save_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     int64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  TORCH_CHECK(max_shard_bytes > 0, "save_checkpoint '", dir, "': max_shard_bytes must be positive, got ",
              max_shard_bytes);
  make_directories(dir);
  plan_tensors(tensors, dir);  // every name and dtype checked before anything is written

  const auto shards = split_into_shards(tensors, max_shard_bytes);
  std::set<std::string> written;
  if (shards.size() == 1) {
    save_safetensors(join_path(dir, kSingleFile), tensors, metadata);
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
      save_safetensors(join_path(dir, name), part, metadata);
      written.insert(name);
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    const std::string text = index.dump(2) + "\n";  // transformers: indent 2, sorted keys, newline
    const std::string path = join_path(dir, kIndexFile);
    write_file_atomically(path, [&](int fd) { write_all(fd, text.data(), text.size(), path); });
    written.insert(kIndexFile);
  }
  remove_stale_files(dir, written);
}

}  // namespace anvil::io
