// GGUF reader and ggml dequantization (include/anvil/io/gguf.h).
//
// The header is parsed by a Cursor that knows how many bytes remain and refuses every read past them,
// so no forged length or count can make the parser read outside the file or allocate more than the
// file could describe: a count of N items is accepted only when N x (the smallest item's size) fits in
// what remains. The layout (ggml's gguf.cpp and docs/gguf.md):
//   u32 magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
//   kv_count x { string key, u32 value type, value },            string = u64 length + bytes
//   tensor_count x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset },
//   padding to `general.alignment`, then the data section (tensor offsets are relative to its start).
// Everything is little-endian (GGUF's big-endian variant is refused: its version reads as a huge number).
//
// Dequantization: one function per block type, written from ggml's block structs (ggml-common.h) and
// dequantize_row_* (ggml-quants.c), with the same fp32 operation order so the results are bit-exact.
// Blocks are independent, so tensors are dequantized in parallel over blocks (at::parallel_for).
#include "anvil/io/gguf.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <unordered_set>

namespace anvil::io {

// ---- names and sizes -------------------------------------------------------------------------------

std::string gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::kUint8: return "UINT8";
    case GgufType::kInt8: return "INT8";
    case GgufType::kUint16: return "UINT16";
    case GgufType::kInt16: return "INT16";
    case GgufType::kUint32: return "UINT32";
    case GgufType::kInt32: return "INT32";
    case GgufType::kFloat32: return "FLOAT32";
    case GgufType::kBool: return "BOOL";
    case GgufType::kString: return "STRING";
    case GgufType::kArray: return "ARRAY";
    case GgufType::kUint64: return "UINT64";
    case GgufType::kInt64: return "INT64";
    case GgufType::kFloat64: return "FLOAT64";
  }
  return "type " + std::to_string(static_cast<uint32_t>(type));
}

bool GgufValue::is_integer() const {
  switch (element_type) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kUint16: case GgufType::kInt16:
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kUint64: case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

size_t GgufValue::size() const {
  if (is_string()) return strings.size();
  if (is_float()) return floats.size();
  return ints.size();
}

namespace {

struct TypeInfo {
  uint32_t type;
  const char* name;
  int64_t block_elems, block_bytes;
  bool dequantizable;
};

// ggml's type traits (ggml.c type_traits, gguf-py GGML_QUANT_SIZES) for the types anvil can at least size.
constexpr int64_t kQK = 32;    // QK4_0 = QK4_1 = QK8_0
constexpr int64_t kQKK = 256;  // QK_K, the super-block of the K-quants
const TypeInfo kTypes[] = {
    {ggml_type::kF32, "F32", 1, 4, true},
    {ggml_type::kF16, "F16", 1, 2, true},
    {ggml_type::kQ4_0, "Q4_0", kQK, 2 + kQK / 2, true},
    {ggml_type::kQ4_1, "Q4_1", kQK, 2 + 2 + kQK / 2, true},
    {ggml_type::kQ5_0, "Q5_0", kQK, 2 + 4 + kQK / 2, true},
    {ggml_type::kQ5_1, "Q5_1", kQK, 2 + 2 + 4 + kQK / 2, true},
    {ggml_type::kQ8_0, "Q8_0", kQK, 2 + kQK, true},
    {ggml_type::kQ8_1, "Q8_1", kQK, 4 + kQK, false},
    {ggml_type::kQ2_K, "Q2_K", kQKK, 2 + 2 + kQKK / 16 + kQKK / 4, false},
    {ggml_type::kQ3_K, "Q3_K", kQKK, 2 + kQKK / 4 + kQKK / 8 + 12, false},
    {ggml_type::kQ4_K, "Q4_K", kQKK, 2 + 2 + 12 + kQKK / 2, true},
    {ggml_type::kQ5_K, "Q5_K", kQKK, 2 + 2 + 12 + kQKK / 8 + kQKK / 2, true},
    {ggml_type::kQ6_K, "Q6_K", kQKK, 2 + kQKK / 2 + kQKK / 4 + kQKK / 16, true},
    {ggml_type::kQ8_K, "Q8_K", kQKK, 4 + kQKK + kQKK / 16 * 2, false},
    {ggml_type::kI8, "I8", 1, 1, false},
    {ggml_type::kI16, "I16", 1, 2, false},
    {ggml_type::kI32, "I32", 1, 4, false},
    {ggml_type::kI64, "I64", 1, 8, false},
    {ggml_type::kF64, "F64", 1, 8, false},
    {ggml_type::kBF16, "BF16", 1, 2, true},
};

const TypeInfo* find_type(uint32_t type) {
  for (const auto& t : kTypes)
    if (t.type == type) return &t;
  return nullptr;
}

}  // namespace

std::string ggml_type_name(uint32_t type) {
  const TypeInfo* t = find_type(type);
  return t ? t->name : "type " + std::to_string(type);
}

std::pair<int64_t, int64_t> ggml_block_layout(uint32_t type) {
  const TypeInfo* t = find_type(type);
  return t ? std::make_pair(t->block_elems, t->block_bytes) : std::make_pair(int64_t{0}, int64_t{0});
}

bool ggml_type_dequantizable(uint32_t type) {
  const TypeInfo* t = find_type(type);
  return t && t->dequantizable;
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

// ---- the header parser -----------------------------------------------------------------------------

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32

// Reads little-endian values from [data, data + size); every read checks the bytes remaining.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& what) : data_(data), size_(size), what_(what) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  template <typename T>
  T read(const char* field) {
    need(sizeof(T), field);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const std::string& field) {
    const uint64_t n = read<uint64_t>(field.c_str());
    TORCH_CHECK(n <= remaining(), "gguf: '", what_, "': ", field, " has length ", n, " but only ", remaining(),
                " bytes remain in the file (truncated or corrupt)");
    std::string s(reinterpret_cast<const char*>(data_ + pos_), n);
    pos_ += n;
    return s;
  }

  // A count of items each at least `min_item_bytes` long must fit in what remains.
  void check_count(uint64_t count, uint64_t min_item_bytes, const std::string& field) const {
    TORCH_CHECK(min_item_bytes == 0 || count <= remaining() / min_item_bytes, "gguf: '", what_, "': ", field,
                " is ", count, ", more than the ", remaining(), " remaining bytes can hold (truncated or corrupt)");
  }

 private:
  void need(uint64_t n, const char* field) const {
    TORCH_CHECK(n <= remaining(), "gguf: '", what_, "': the file ends inside ", field, " (at byte ", pos_, " of ",
                size_, "; truncated)");
  }
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  const std::string& what_;
};

bool valid_scalar_type(uint32_t t) {
  return t <= static_cast<uint32_t>(GgufType::kFloat64) && t != static_cast<uint32_t>(GgufType::kArray);
}

uint64_t scalar_min_bytes(GgufType t) {
  switch (t) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kBool: return 1;
    case GgufType::kUint16: case GgufType::kInt16: return 2;
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kFloat32: return 4;
    default: return 8;  // 64-bit scalars; a string is at least its u64 length
  }
}

// Appends one scalar of type `t` to `v`.
void read_scalar(Cursor& c, GgufType t, GgufValue& v, const std::string& key, const std::string& what) {
  const std::string field = "the value of '" + key + "'";
  switch (t) {
    case GgufType::kUint8: v.ints.push_back(c.read<uint8_t>(field.c_str())); break;
    case GgufType::kInt8: v.ints.push_back(c.read<int8_t>(field.c_str())); break;
    case GgufType::kUint16: v.ints.push_back(c.read<uint16_t>(field.c_str())); break;
    case GgufType::kInt16: v.ints.push_back(c.read<int16_t>(field.c_str())); break;
    case GgufType::kUint32: v.ints.push_back(c.read<uint32_t>(field.c_str())); break;
    case GgufType::kInt32: v.ints.push_back(c.read<int32_t>(field.c_str())); break;
    case GgufType::kInt64: v.ints.push_back(c.read<int64_t>(field.c_str())); break;
    case GgufType::kUint64: {
      const uint64_t u = c.read<uint64_t>(field.c_str());
      TORCH_CHECK(u <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "gguf: '", what, "': key '", key,
                  "' holds the UINT64 ", u, ", above the largest value anvil reads (2^63 - 1)");
      v.ints.push_back(static_cast<int64_t>(u));
      break;
    }
    case GgufType::kBool: {
      const uint8_t b = c.read<uint8_t>(field.c_str());
      TORCH_CHECK(b <= 1, "gguf: '", what, "': key '", key, "' holds the BOOL byte ", int(b), " (must be 0 or 1)");
      v.ints.push_back(b);
      break;
    }
    case GgufType::kFloat32: v.floats.push_back(c.read<float>(field.c_str())); break;
    case GgufType::kFloat64: v.floats.push_back(c.read<double>(field.c_str())); break;
    case GgufType::kString: v.strings.push_back(c.read_string(field)); break;
    case GgufType::kArray: TORCH_CHECK(false, "gguf: internal: read_scalar of an array");
  }
}

GgufValue read_value(Cursor& c, const std::string& key, const std::string& what) {
  const uint32_t raw = c.read<uint32_t>(("the value type of '" + key + "'").c_str());
  TORCH_CHECK(raw <= static_cast<uint32_t>(GgufType::kFloat64), "gguf: '", what, "': key '", key,
              "' has value type ", raw, ", not a GGUF type (0..12)");
  GgufValue v;
  v.type = static_cast<GgufType>(raw);
  if (v.type != GgufType::kArray) {
    v.element_type = v.type;
    read_scalar(c, v.type, v, key, what);
    return v;
  }
  const uint32_t elem = c.read<uint32_t>(("the array type of '" + key + "'").c_str());
  TORCH_CHECK(elem != static_cast<uint32_t>(GgufType::kArray), "gguf: '", what, "': key '", key,
              "' is an array of arrays, which anvil does not read");
  TORCH_CHECK(valid_scalar_type(elem), "gguf: '", what, "': key '", key, "' is an array of value type ", elem,
              ", not a GGUF type (0..12)");
  v.element_type = static_cast<GgufType>(elem);
  const uint64_t n = c.read<uint64_t>(("the array length of '" + key + "'").c_str());
  c.check_count(n, scalar_min_bytes(v.element_type), "the array length of '" + key + "'");
  if (v.is_string()) v.strings.reserve(n);
  else if (v.is_float()) v.floats.reserve(n);
  else v.ints.reserve(n);
  for (uint64_t i = 0; i < n; ++i) read_scalar(c, v.element_type, v, key, what);
  return v;
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

GgufTensorInfo read_tensor_info(Cursor& c, uint64_t index, const std::string& what) {
  GgufTensorInfo t;
  t.name = c.read_string("the name of tensor " + std::to_string(index));
  const std::string tn = "tensor '" + t.name + "'";
  const uint32_t n_dims = c.read<uint32_t>(("the rank of " + tn).c_str());
  TORCH_CHECK(n_dims >= 1 && n_dims <= kGgufMaxDims, "gguf: '", what, "': ", tn, " has ", n_dims,
              " dimensions (ggml allows 1..", kGgufMaxDims, ")");
  for (uint32_t d = 0; d < n_dims; ++d) {
    const uint64_t dim = c.read<uint64_t>(("the dims of " + tn).c_str());
    TORCH_CHECK(dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "gguf: '", what, "': ", tn,
                " has dimension ", d, " = ", dim, " (above 2^63 - 1)");
    t.dims.push_back(static_cast<int64_t>(dim));
  }
  t.type = c.read<uint32_t>(("the type of " + tn).c_str());
  t.offset = c.read<uint64_t>(("the offset of " + tn).c_str());

  const TypeInfo* type = find_type(t.type);
  TORCH_CHECK(type, "gguf: '", what, "': ", tn, " has ggml type ", t.type, ", which anvil does not know");
  // Element count without overflow: every dim is bounded so that the product stays below 2^62.
  uint64_t numel = 1;
  for (int64_t d : t.dims) {
    TORCH_CHECK(d == 0 || numel <= (uint64_t{1} << 62) / static_cast<uint64_t>(d), "gguf: '", what, "': ", tn,
                " has too many elements (dims overflow)");
    numel *= static_cast<uint64_t>(d);
  }
  TORCH_CHECK(t.dims[0] % type->block_elems == 0, "gguf: '", what, "': ", tn, " of type ", type->name,
              " has innermost dimension ", t.dims[0], ", not a multiple of its block size ", type->block_elems);
  const uint64_t n_blocks = numel / type->block_elems;
  TORCH_CHECK(n_blocks <= std::numeric_limits<uint64_t>::max() / type->block_bytes, "gguf: '", what, "': ", tn,
              " has too many bytes (size overflow)");
  t.nbytes = n_blocks * type->block_bytes;
  return t;
}

}  // namespace

GgufHeader parse_gguf(const uint8_t* data, uint64_t size, const std::string& what) {
  Cursor c(data, size, what);
  GgufHeader h;
  const uint32_t magic = c.read<uint32_t>("the magic");
  TORCH_CHECK(magic == kMagic, "gguf: '", what, "' is not a GGUF file (the first four bytes are not \"GGUF\")");
  h.version = c.read<uint32_t>("the version");
  TORCH_CHECK(h.version == 2 || h.version == 3, "gguf: '", what, "' has GGUF version ", h.version,
              " (anvil reads versions 2 and 3; version 1 is obsolete, a huge number means a big-endian file)");
  const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
  const uint64_t n_kv = c.read<uint64_t>("the metadata count");
  TORCH_CHECK(n_tensors <= kGgufMaxTensors, "gguf: '", what, "': tensor count ", n_tensors, " exceeds ",
              kGgufMaxTensors);
  TORCH_CHECK(n_kv <= kGgufMaxKeys, "gguf: '", what, "': metadata count ", n_kv, " exceeds ", kGgufMaxKeys);
  c.check_count(n_kv, 8 + 4 + 1, "the metadata count");           // key length, type, smallest value
  c.check_count(n_tensors, 8 + 4 + 8 + 4 + 8, "the tensor count");  // name length, rank, one dim, type, offset

  std::unordered_set<std::string> keys;
  h.metadata.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = c.read_string("metadata key " + std::to_string(i));
    TORCH_CHECK(!key.empty(), "gguf: '", what, "': metadata key ", i, " is empty");
    TORCH_CHECK(keys.insert(key).second, "gguf: '", what, "': duplicate metadata key '", key, "'");
    GgufValue v = read_value(c, key, what);
    h.metadata.emplace_back(std::move(key), std::move(v));
  }
  for (const auto& [key, v] : h.metadata) {
    if (key != "general.alignment") continue;
    TORCH_CHECK(v.type == GgufType::kUint32, "gguf: '", what, "': general.alignment must be a UINT32, found ",
                gguf_type_name(v.type));
    const uint64_t a = static_cast<uint64_t>(v.ints[0]);
    TORCH_CHECK(a != 0 && (a & (a - 1)) == 0, "gguf: '", what, "': general.alignment ", a,
                " is not a power of two");
    h.alignment = a;
  }

  std::unordered_set<std::string> names;
  h.tensors.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t = read_tensor_info(c, i, what);
    TORCH_CHECK(names.insert(t.name).second, "gguf: '", what, "': duplicate tensor name '", t.name, "'");
    TORCH_CHECK(t.offset % h.alignment == 0, "gguf: '", what, "': tensor '", t.name, "' has offset ", t.offset,
                ", not a multiple of the alignment ", h.alignment);
    h.tensors.push_back(std::move(t));
  }

  h.data_offset = align_up(c.pos(), h.alignment);
  const uint64_t data_bytes = size >= h.data_offset ? size - h.data_offset : 0;
  TORCH_CHECK(h.tensors.empty() || size >= h.data_offset, "gguf: '", what, "': the file ends (", size,
              " bytes) before its data section (at ", h.data_offset, "; truncated)");
  for (const auto& t : h.tensors)
    TORCH_CHECK(t.offset <= data_bytes && t.nbytes <= data_bytes - t.offset, "gguf: '", what, "': tensor '", t.name,
                "' (", ggml_type_name(t.type), ", ", t.nbytes, " bytes at data offset ", t.offset,
                ") ends past the end of the file (data section of ", data_bytes, " bytes; truncated or corrupt)");
  // No two tensors may share bytes.
  std::vector<const GgufTensorInfo*> by_offset;
  for (const auto& t : h.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const auto* prev = by_offset[i - 1];
    const auto* cur = by_offset[i];
    TORCH_CHECK(prev->offset + prev->nbytes <= cur->offset || prev->nbytes == 0 || cur->nbytes == 0, "gguf: '",
                what, "': tensors '", prev->name, "' and '", cur->name, "' overlap in the data section");
  }
  return h;
}

// ---- dequantization --------------------------------------------------------------------------------

namespace {

float fp16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// block_q8_0 { ggml_half d; int8_t qs[32]; }: y = d * q.
void dequant_q8_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// block_q4_0 { ggml_half d; uint8_t qs[16]; }: element j in the low nibble of qs[j], element j + 16 in the
// high nibble; y = (q - 8) * d.
void dequant_q4_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// block_q4_1 { ggml_half d, m; uint8_t qs[16]; }: nibbles as Q4_0; y = q * d + m.
void dequant_q4_1(const uint8_t* b, float* y) {
  const float d = fp16(b), m = fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0F) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }: nibbles as Q4_0, the fifth bit of element j in
// bit j of the little-endian u32 qh; y = (q - 16) * d.
void dequant_q5_0(const uint8_t* b, float* y) {
  const float d = fp16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int x0 = ((qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10)) - 16;
    const int x1 = ((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - 16;
    y[j] = static_cast<float>(x0) * d;
    y[j + 16] = static_cast<float>(x1) * d;
  }
}

// block_q5_1 { ggml_half d, m; uint8_t qh[4]; uint8_t qs[16]; }: bits as Q5_0; y = q * d + m.
void dequant_q5_1(const uint8_t* b, float* y) {
  const float d = fp16(b), m = fp16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int x0 = (qs[j] & 0x0F) | (((qh >> j) << 4) & 0x10);
    const int x1 = (qs[j] >> 4) | ((qh >> (j + 12)) & 0x10);
    y[j] = static_cast<float>(x0) * d + m;
    y[j + 16] = static_cast<float>(x1) * d + m;
  }
}

// Q4_K's 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (ggml's get_scale_min_k4):
// bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; sub-blocks 4-7 take their low 4 bits from bytes
// 8-11 and their high 2 bits from the top bits of bytes 0-7.
void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// block_q4_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; }: 8 sub-blocks of 32. Each 32 bytes
// of qs carry two sub-blocks (low nibbles, then high); y = d * sc * q - dmin * m.
void dequant_q4_k(const uint8_t* b, float* y) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int j = 0; j < 8; j += 2) {
    uint8_t sc, m;
    scale_min_k4(j, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(j + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0x0F) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>(q[l] >> 4) - m2;
    q += 32;
    y += 64;
  }
}

// block_q5_K { ggml_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }: Q4_K's scales and
// nibbles, plus a fifth bit per value: for the c-th pair of sub-blocks, bit 2c (first) and 2c + 1 (second) of
// qh[l]; y = d * sc * q - dmin * m.
void dequant_q5_k(const uint8_t* b, float* y) {
  const float d = fp16(b), dmin = fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* ql = b + 48;
  uint8_t u1 = 1, u2 = 2;
  for (int j = 0; j < 8; j += 2) {
    uint8_t sc, m;
    scale_min_k4(j, scales, sc, m);
    const float d1 = d * sc, m1 = dmin * m;
    scale_min_k4(j + 1, scales, sc, m);
    const float d2 = d * sc, m2 = dmin * m;
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>((ql[l] & 0x0F) + (qh[l] & u1 ? 16 : 0)) - m1;
    for (int l = 0; l < 32; ++l) y[32 + l] = d2 * static_cast<float>((ql[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    ql += 32;
    y += 64;
    u1 <<= 2;
    u2 <<= 2;
  }
}

// block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }: two halves of 128; in a
// half, value l + 32 k (k = 0..3) has low 4 bits from ql (nibble k / 2 of byte l + 32 (k % 2)) and high 2
// bits from qh[l] bits 2k..2k+1, minus 32; each 16 values share an int8 scale: y = d * scale * q.
void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = fp16(b + 208);
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
    }
    y += 128;
    ql += 64;
    qh += 32;
    sc += 8;
  }
}

// Element-wise types: one "block" per element.
void dequant_f32(const uint8_t* b, float* y) { std::memcpy(y, b, 4); }
void dequant_f16(const uint8_t* b, float* y) { *y = fp16(b); }
void dequant_bf16(const uint8_t* b, float* y) {
  uint16_t h;
  std::memcpy(&h, b, 2);
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  std::memcpy(y, &bits, 4);
}

using BlockFn = void (*)(const uint8_t*, float*);

BlockFn block_function(uint32_t type) {
  switch (type) {
    case ggml_type::kF32: return dequant_f32;
    case ggml_type::kF16: return dequant_f16;
    case ggml_type::kBF16: return dequant_bf16;
    case ggml_type::kQ8_0: return dequant_q8_0;
    case ggml_type::kQ4_0: return dequant_q4_0;
    case ggml_type::kQ4_1: return dequant_q4_1;
    case ggml_type::kQ5_0: return dequant_q5_0;
    case ggml_type::kQ5_1: return dequant_q5_1;
    case ggml_type::kQ4_K: return dequant_q4_k;
    case ggml_type::kQ5_K: return dequant_q5_k;
    case ggml_type::kQ6_K: return dequant_q6_k;
    default: return nullptr;
  }
}

}  // namespace

at::Tensor dequantize_ggml_tensor(const GgufTensorInfo& info, const uint8_t* data, const std::string& what) {
  const BlockFn fn = block_function(info.type);
  TORCH_CHECK(fn, "gguf: '", what, "': tensor '", info.name, "' has ggml type ", ggml_type_name(info.type),
              ", which anvil does not dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
  // Plain variables, not a structured binding: the lambda below captures them (C++17 forbids capturing
  // bindings, which clang enforces).
  const auto layout = ggml_block_layout(info.type);
  const int64_t block_elems = layout.first, block_bytes = layout.second;
  const int64_t numel = info.numel();
  TORCH_CHECK(numel % block_elems == 0 && static_cast<uint64_t>(numel / block_elems * block_bytes) == info.nbytes,
              "gguf: '", what, "': tensor '", info.name, "' has ", info.nbytes, " bytes, not ", numel, " elements of ",
              ggml_type_name(info.type));
  at::Tensor out = at::empty(info.shape(), at::kFloat);  // (dims reversed) fp32
  float* y = out.data_ptr<float>();
  const int64_t n_blocks = numel / block_elems;
  at::parallel_for(0, n_blocks, 4096 / block_elems + 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(data + i * block_bytes, y + i * block_elems);
  });
  return out;
}

// ---- the file --------------------------------------------------------------------------------------

struct GgufMapping {
  void* addr = MAP_FAILED;
  uint64_t size = 0;
  ~GgufMapping() {
    if (addr != MAP_FAILED) munmap(addr, size);
  }
  const uint8_t* bytes() const { return static_cast<const uint8_t*>(addr); }
};

namespace {

std::unique_ptr<GgufMapping> map_gguf(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  TORCH_CHECK(fd >= 0, "gguf: cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    TORCH_CHECK(false, "gguf: '", path, "' is not a regular file");
  }
  auto m = std::make_unique<GgufMapping>();
  m->size = static_cast<uint64_t>(st.st_size);
  if (m->size < 24) {  // too short for a header (and mmap of an empty file fails): the parser says why
    uint8_t small[24] = {};
    const ssize_t n = ::pread(fd, small, sizeof(small), 0);
    ::close(fd);
    parse_gguf(small, n > 0 ? static_cast<uint64_t>(n) : 0, path);
    TORCH_CHECK(false, "gguf: '", path, "' is too short (", m->size, " bytes)");
  }
  m->addr = ::mmap(nullptr, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(m->addr != MAP_FAILED, "gguf: cannot map '", path, "' (", m->size, " bytes): ", std::strerror(err));
  return m;
}

}  // namespace

GgufFile::GgufFile(const std::string& path) : path_(path), mapping_(map_gguf(path)) {
  header_ = parse_gguf(mapping_->bytes(), mapping_->size, path_);
  for (size_t i = 0; i < header_.metadata.size(); ++i) keys_.emplace(header_.metadata[i].first, i);
  for (size_t i = 0; i < header_.tensors.size(); ++i) tensor_index_.emplace(header_.tensors[i].name, i);
}

GgufFile::~GgufFile() = default;

const GgufValue& GgufFile::value(const std::string& key) const {
  auto it = keys_.find(key);
  TORCH_CHECK(it != keys_.end(), "gguf: '", path_, "' has no metadata key '", key, "'");
  return header_.metadata[it->second].second;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(!v.is_array() && v.is_integer(), "gguf: '", path_, "': key '", key, "' must be an integer, found ",
              gguf_type_name(v.type));
  return v.ints[0];
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(!v.is_array() && (v.is_float() || v.is_integer()), "gguf: '", path_, "': key '", key,
              "' must be a number, found ", gguf_type_name(v.type));
  return v.is_float() ? v.floats[0] : static_cast<double>(v.ints[0]);
}

const std::string& GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(!v.is_array() && v.is_string(), "gguf: '", path_, "': key '", key, "' must be a STRING, found ",
              gguf_type_name(v.type));
  return v.strings[0];
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = value(key);
  TORCH_CHECK(!v.is_array() && v.is_bool(), "gguf: '", path_, "': key '", key, "' must be a BOOL, found ",
              gguf_type_name(v.type));
  return v.ints[0] != 0;
}

const GgufTensorInfo& GgufFile::info(const std::string& name) const {
  auto it = tensor_index_.find(name);
  TORCH_CHECK(it != tensor_index_.end(), "gguf: '", path_, "' has no tensor '", name, "'");
  return header_.tensors[it->second];
}

const uint8_t* GgufFile::data(const GgufTensorInfo& info) const {
  return mapping_->bytes() + header_.data_offset + info.offset;
}

at::Tensor GgufFile::tensor(const std::string& name, at::ScalarType dtype) const {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "gguf: tensor '", name,
              "': dtype must be float32, bfloat16 or float16, got ", c10::toString(dtype));
  const GgufTensorInfo& t = info(name);
  at::Tensor out = dequantize_ggml_tensor(t, data(t), path_);  // fp32
  return dtype == at::kFloat ? out : out.to(dtype);
}

bool is_gguf_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return false;
  uint8_t magic[4] = {};
  const bool ok = std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
  std::fclose(f);
  struct stat st {};
  return ok && ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace anvil::io
