// safetensors files and Hugging Face checkpoint directories: the reader, the writer and the resolver
// of model arguments (a directory, a file, or a hub id already in the local Hugging Face cache).
//
// Reading maps the file read-only-for-the-file (MAP_PRIVATE: a write to a tensor view copies the
// page, never reaches the file) and validates the whole header before anything is handed out, because
// checkpoints come from strangers: every rule the format states (docs/FORMATS.md, "safetensors") is
// checked and a broken rule is a c10::Error naming the file, the key and the rule, never a crash.
// CPU tensors are zero-copy views of the mapping when the data is aligned for its dtype (the tensor
// holds the mapping alive); loading to a GPU streams from the mapping through a small pinned staging
// ring, so host memory stays at a few chunks however large the checkpoint is.
//
// Writing follows the format exactly as the reference implementation writes it (compact JSON header,
// padded to 8 bytes with spaces, tensors sorted by dtype alignment then name, contiguous offsets), to a
// temporary file that is renamed over the target only once it is complete.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace anvil::io {

/// One tensor of a safetensors header.
struct TensorEntry {
  std::string name;
  at::ScalarType dtype;     ///< the ATen dtype the bytes are read as
  std::string dtype_name;   ///< as written in the file: "BF16", "F8_E4M3", ...
  std::vector<int64_t> shape;  ///< [] for a scalar
  uint64_t begin, end;      ///< byte range in the data section (after the 8-byte length and the header)
  uint64_t nbytes() const { return end - begin; }
};

/// A validated header: what parse_safetensors_header returns.
struct SafetensorsHeader {
  uint64_t header_bytes = 0;        ///< N, the JSON length (the data section starts at 8 + N)
  uint64_t data_bytes = 0;          ///< length of the data section (= the last tensor's end)
  std::vector<TensorEntry> entries;  ///< in data-offset order
  std::map<std::string, std::string> metadata;  ///< the "__metadata__" object (str -> str)
};

/// The largest header anvil accepts (the reference implementation's bound): 100,000,000 bytes.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

/// Parses and validates the header of a complete safetensors file held in memory (`size` bytes from
/// `data`): header length bound and fit, UTF-8 JSON object, known fields and dtypes, no duplicate
/// keys, shapes x dtype sizes equal to each tensor's byte range, offsets contiguous from 0 and ending
/// exactly at the end of the file. `what` names the file in error messages. Throws c10::Error naming
/// the rule broken; never reads outside [data, data + size). The fuzz target calls this directly.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, const std::string& what = "<memory>");

/// Element size in bytes of a safetensors dtype name, or 0 when anvil does not know the name.
int64_t safetensors_dtype_size(const std::string& dtype_name);
/// The safetensors dtype name of an ATen dtype ("BF16" for at::kBFloat16); throws for a dtype the format
/// cannot hold (complex128, quantized types, ...).
std::string safetensors_dtype_name(at::ScalarType dtype);

struct Mapping;  // a read-only file mapping shared by the file and every zero-copy tensor view of it

/// One safetensors file, memory-mapped and validated on open.
class SafetensorsFile {
 public:
  /// Opens, maps and validates `path`; throws c10::Error naming the file and the rule broken.
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  /// Every tensor, in data-offset order.
  const std::vector<TensorEntry>& entries() const { return header_.entries; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// The entry of `name`; the error names the key and the file when it is missing.
  const TensorEntry& entry(const std::string& name) const;
  /// CPU tensor of `name`: a zero-copy view of the mapping when its bytes are aligned for the dtype
  /// (the tensor keeps the mapping alive; writing to it copies the page, the file never changes), else
  /// a copy.
  at::Tensor tensor(const std::string& name) const;
  /// Whether tensor(name) is a zero-copy view (its data is aligned for its dtype).
  bool is_zero_copy(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  /// The raw bytes of a tensor inside the mapping (valid while this file is alive).
  const uint8_t* data(const TensorEntry& e) const;
  /// Header length N and data-section length.
  uint64_t header_bytes() const { return header_.header_bytes; }
  uint64_t data_bytes() const { return header_.data_bytes; }
  uint64_t file_bytes() const { return 8 + header_.header_bytes + header_.data_bytes; }

 private:
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  SafetensorsHeader header_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in header_.entries
};

/// A checkpoint: a .safetensors file, or a directory holding model.safetensors, or
/// model.safetensors.index.json with its shards (the single file wins when both exist, as in
/// transformers). Every shard is mapped and validated on open; the index must name only shards inside
/// the directory and only keys that its shard holds.
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& path);
  const std::string& path() const { return path_; }
  /// Every tensor name, sorted.
  std::vector<std::string> keys() const;
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  /// CPU tensor of `name`, as stored (zero-copy where aligned); the error names the key when missing.
  at::Tensor tensor(const std::string& name) const;
  /// The entry of `name` and the file that holds it.
  const TensorEntry& entry(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  /// The files, in shard order.
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  /// The index's "metadata" object (sharded) or the single file's "__metadata__", as strings.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Every tensor on `device`. CPU: zero-copy views of the mappings. CUDA: each shard is streamed
  /// from its mapping through a ring of pinned staging buffers (memcpy on the host overlapped with
  /// the host-to-device copies of the previous chunks on a side stream), so host memory stays at
  /// the ring's size; returns once every copy has completed.
  std::unordered_map<std::string, at::Tensor> load_all(at::Device device = at::kCPU) const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::unordered_map<std::string, size_t> where_;  // name -> index into files_
  std::map<std::string, std::string> metadata_;
};

/// Writes `tensors` (any device, any strides: each is copied to CPU contiguous) as one safetensors
/// file, atomically: a temporary file in the same directory, flushed and renamed over `path`. Names
/// must be unique and not "__metadata__". On any error the target is untouched and the temporary
/// file removed.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// Writes a checkpoint directory as transformers does: model.safetensors when everything fits in
/// `max_shard_bytes`, else model-00001-of-0000N.safetensors ... plus model.safetensors.index.json
/// ({"metadata": {"total_size": bytes}, "weight_map": {name: shard}}). Tensors go into shards in the
/// given order; a new shard starts when the next tensor would overflow the current one (a tensor
/// larger than the bound gets a shard of its own). Each file is written atomically, the index last;
/// stale model*.safetensors files and index of an earlier save in `dir` are then removed.
void save_checkpoint(const std::string& dir, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                     int64_t max_shard_bytes = 5'000'000'000,
                     const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

/// Resolves a model argument: an existing file or directory is returned as is; "org/name" (optionally
/// "org/name@revision") is looked up in the local Hugging Face cache ($HF_HUB_CACHE, else
/// $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub) as
/// models--org--name/snapshots/<commit of refs/main (or the revision)>. Nothing is downloaded; the
/// error lists every place it looked.
std::string resolve_model_path(const std::string& arg);

}  // namespace anvil::io
