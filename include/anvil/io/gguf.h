// GGUF files (llama.cpp / ggml's single-file model format): a strict reader and the dequantization of
// the ggml block types that small published models use, so a GGUF model can be loaded into anvil's
// Hugging Face-layout CausalLM (anvil::model::load_causal_lm on a .gguf path; include/anvil/model/gguf_model.h).
//
// The reader maps the file read-only and validates everything before handing anything out, because
// model files come from strangers: the magic and version (2 or 3; both little-endian with 64-bit
// counts), every count and length against the bytes that remain (so a forged count cannot allocate
// gigabytes), every metadata value type, `general.alignment` (a power of two, default 32), tensor
// ranks (1..4), dims, ggml types, sizes (elements x block size), offsets (aligned, inside the data
// section, not overlapping). A broken rule is a c10::Error naming the file, the key or tensor and the
// rule; never a crash or a read outside the file. docs/FORMATS.md ("GGUF") describes what is read.
//
// Dequantization follows ggml's block layouts (ggml-common.h) and its arithmetic order (ggml-quants.c's
// dequantize_row_*), so fp32 results equal ggml's and gguf-py's bit for bit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace anvil::io {

/// GGUF metadata value types (the numbers as stored in the file).
enum class GgufType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6, kBool = 7,
  kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};

/// "UINT32", "STRING", ... for a value type.
std::string gguf_type_name(GgufType type);

/// One metadata value: a scalar, or an array of scalars of one type (GGUF arrays of arrays are refused).
/// Integers and bools are held in `ints` (a UINT64 above INT64_MAX is refused), floats in `floats`,
/// strings in `strings`; a scalar is an array of one element with is_array false.
struct GgufValue {
  GgufType type = GgufType::kUint8;          ///< the scalar type, or kArray
  GgufType element_type = GgufType::kUint8;  ///< the scalar type, or an array's element type
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;

  bool is_array() const { return type == GgufType::kArray; }
  bool is_integer() const;  ///< element_type is one of the integer types (not bool)
  bool is_float() const { return element_type == GgufType::kFloat32 || element_type == GgufType::kFloat64; }
  bool is_string() const { return element_type == GgufType::kString; }
  bool is_bool() const { return element_type == GgufType::kBool; }
  /// Number of elements (1 for a scalar).
  size_t size() const;
};

/// ggml tensor types that anvil knows by name (the numbers as stored in the file; ggml.h's ggml_type).
namespace ggml_type {
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
                   kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15, kI8 = 24, kI16 = 25,
                   kI32 = 26, kI64 = 27, kF64 = 28, kBF16 = 30;
}  // namespace ggml_type

/// "Q4_K", "BF16", ... for a ggml type number ("type 99" for one anvil does not know).
std::string ggml_type_name(uint32_t type);
/// Elements per block and bytes per block of a ggml type anvil can size; {0, 0} for an unknown type.
std::pair<int64_t, int64_t> ggml_block_layout(uint32_t type);
/// Whether anvil dequantizes this type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K).
bool ggml_type_dequantizable(uint32_t type);

/// One tensor of a GGUF file.
struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  ///< ggml order: dims[0] is the innermost (contiguous) dimension
  uint32_t type = 0;          ///< ggml type number
  uint64_t offset = 0;        ///< byte offset inside the data section
  uint64_t nbytes = 0;        ///< elements / block elements x block bytes
  /// The PyTorch shape: dims reversed (a weight stored as [in, out] is (out, in)).
  std::vector<int64_t> shape() const { return std::vector<int64_t>(dims.rbegin(), dims.rend()); }
  int64_t numel() const;
};

/// A validated GGUF header: what parse_gguf returns.
struct GgufHeader {
  uint32_t version = 0;
  uint64_t alignment = 32;    ///< `general.alignment`, or 32
  uint64_t data_offset = 0;   ///< where the data section starts in the file
  std::vector<std::pair<std::string, GgufValue>> metadata;  ///< in file order
  std::vector<GgufTensorInfo> tensors;                      ///< in file order
};

/// The most tensors / metadata keys / array elements / dims per tensor anvil accepts. Counts are also
/// bounded by the bytes that remain, so these only cap what a well-formed but absurd file can ask for.
constexpr uint64_t kGgufMaxTensors = 1u << 20;
constexpr uint64_t kGgufMaxKeys = 1u << 20;
constexpr int64_t kGgufMaxDims = 4;

/// Parses and validates the header of a complete GGUF file held in memory (`size` bytes from `data`):
/// see the file comment for the rules. `what` names the file in error messages. Throws c10::Error;
/// never reads outside [data, data + size).
GgufHeader parse_gguf(const uint8_t* data, uint64_t size, const std::string& what = "<memory>");

/// Dequantizes `info`'s bytes (`data` points at them, info.nbytes long) to a contiguous CPU fp32 tensor
/// of info.shape(). Throws naming the tensor and its type when the type is not dequantizable.
at::Tensor dequantize_ggml_tensor(const GgufTensorInfo& info, const uint8_t* data, const std::string& what = "<memory>");

struct GgufMapping;  // the read-only file mapping

/// One GGUF file, memory-mapped and validated on open.
class GgufFile {
 public:
  /// Opens, maps and validates `path`; throws c10::Error naming the file and the rule broken.
  explicit GgufFile(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return header_.version; }
  uint64_t alignment() const { return header_.alignment; }
  uint64_t data_offset() const { return header_.data_offset; }

  /// Every metadata key/value, in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return header_.metadata; }
  bool has(const std::string& key) const { return keys_.count(key) != 0; }
  /// The value of `key`; the error names the key and the file when it is missing.
  const GgufValue& value(const std::string& key) const;
  /// Typed scalar getters: the error names the key, the file and the type found.
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;  ///< a float or an integer value
  const std::string& get_string(const std::string& key) const;
  bool get_bool(const std::string& key) const;

  /// Every tensor, in file order.
  const std::vector<GgufTensorInfo>& tensors() const { return header_.tensors; }
  bool contains(const std::string& name) const { return tensor_index_.count(name) != 0; }
  const GgufTensorInfo& info(const std::string& name) const;
  /// The raw bytes of a tensor inside the mapping (valid while this file is alive).
  const uint8_t* data(const GgufTensorInfo& info) const;
  /// `name` dequantized to a CPU tensor of `dtype` (fp32, bf16 or fp16), PyTorch shape (dims reversed).
  at::Tensor tensor(const std::string& name, at::ScalarType dtype = at::kFloat) const;

 private:
  std::string path_;
  std::unique_ptr<GgufMapping> mapping_;
  GgufHeader header_;
  std::unordered_map<std::string, size_t> keys_;          // key -> position in header_.metadata
  std::unordered_map<std::string, size_t> tensor_index_;  // name -> position in header_.tensors
};

/// Whether `path` names a GGUF file: a regular file whose first four bytes are "GGUF".
bool is_gguf_file(const std::string& path);

// ---- writing (csrc/io/gguf_writer.cpp) ------------------------------------------------------------------
// The other direction: metadata values, tensor infos and tensor bytes written as a GGUF v3 file, and
// ggml's reference quantizers (bit-exact with gguf-py 0.19.0's gguf/quants.py and ggml-quants.c's
// quantize_row_*_ref) to make those bytes. docs/FORMATS.md "GGUF export".

/// Metadata values to write. Integers are range-checked against their type when written.
GgufValue gguf_int_value(GgufType type, int64_t v);      ///< any integer type, or kBool (0 / 1)
GgufValue gguf_float_value(GgufType type, double v);     ///< kFloat32 or kFloat64
GgufValue gguf_string_value(const std::string& v);
GgufValue gguf_int_array(GgufType element_type, std::vector<int64_t> v);
GgufValue gguf_float_array(GgufType element_type, std::vector<double> v);
GgufValue gguf_string_array(std::vector<std::string> v);

/// One tensor to write: its name (at most 63 bytes, ggml's GGML_MAX_NAME), PyTorch shape (rank 1..4;
/// written reversed, as ggml orders dims) and ggml type.
struct GgufTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  uint32_t type = ggml_type::kF32;
};

/// Bytes of a tensor of `type` and PyTorch `shape`; throws naming `what` when the type is unknown or the
/// row (last dim) is not a whole number of the type's blocks.
uint64_t ggml_tensor_nbytes(uint32_t type, const std::vector<int64_t>& shape, const std::string& what = "tensor");

/// Whether quantize_ggml makes this type: F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.
bool ggml_type_quantizable(uint32_t type);

/// `x` (a CPU tensor of any floating dtype; converted to fp32 first, as gguf-py does) in ggml's bytes of
/// `type`, blocks running along the contiguous last dimension (its length must be a multiple of the
/// block size): F32 as is, F16 round-to-nearest-even, BF16 ggml_compute_fp32_to_bf16 (quiet NaN, RNE),
/// Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K as ggml-quants.c's quantize_row_*_ref (what llama-quantize runs
/// without an importance matrix). Throws naming `what`.
std::vector<uint8_t> quantize_ggml(const at::Tensor& x, uint32_t type, const std::string& what = "tensor");

/// Writes a GGUF v3 file at `path`: `metadata` in order (keys unique and non-empty; `general.alignment`,
/// when present, a UINT32 power of two that sets the alignment, else 32), the tensor infos, then each
/// tensor's bytes as `source(i)` returns them (exactly ggml_tensor_nbytes long; asked for one at a
/// time, in order, so only one tensor's bytes are held), each padded to the alignment. The file is
/// written to a temporary name, fsync'ed and renamed (io/fs.h write_file_atomically): an error, or a
/// kill, leaves `path` as it was. Returns the file's size in bytes.
uint64_t write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                    const std::vector<GgufTensorSpec>& tensors,
                    const std::function<std::vector<uint8_t>(size_t index)>& source);

}  // namespace anvil::io
