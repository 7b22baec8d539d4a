// GGUF writer and ggml's reference quantizers (include/anvil/io/gguf.h, "writing").
//
// Why built this way:
// - Streamed. A GGUF header holds every tensor's offset, and every size follows from (type, shape), so
//   the header is complete before any tensor is made; tensors are then asked for one at a time and
//   written as they come. A model is never held whole in memory, only the tensor being written.
// - Atomic. The file goes through io/fs.h's write_file_atomically (temporary name, fsync, rename): an
//   export that fails or is killed leaves no partial .gguf behind.
// - Layout exactly as gguf-py's GGUFWriter writes it (and ggml's gguf.cpp reads it): u32 magic "GGUF",
//   u32 version 3, u64 tensor count, u64 kv count, the kvs (u64-length strings, u32 value types, arrays
//   as u32 element type + u64 count + elements), the tensor infos (name, u32 n_dims, u64 dims in ggml
//   order, u32 type, u64 offset in the data section), zero padding to the alignment, then each tensor's
//   bytes followed by zero padding to the alignment (the last one too, as gguf-py does).
// - Quantizers follow gguf-py 0.19.0's gguf/quants.py operation by operation in fp32 (that code is
//   written to be bit-exact with ggml-quants.c's quantize_row_*_ref), so the bytes equal both:
//     Q8_0: d = amax / 127, id = d ? 1/d : 0, q = round-half-away(x * id), d stored as fp16 (RNE);
//     Q4_0: m = the element of largest |x| (first one on ties, sign kept), d = m / -8, id = d ? 1/d : 0,
//           q = min(15, trunc(x * id + 8.5)); nibbles: byte j = q[j] | q[j + 16] << 4; d as fp16;
//     BF16: NaN forced quiet ((bits & 0xffff0000) | 0x400000), then round to nearest even;
//     F16:  IEEE round to nearest even (c10::Half, as numpy's astype(float16)).
//   This file is compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add in x * id + 8.5
//   would round once instead of twice and change a nibble now and then.
//   Q4_K, Q5_K, Q6_K and the Q5_0 / Q5_1 fallbacks are ggml-quants.c's _ref quantizers (gguf-py does not
//   quantize them): csrc/io/gguf_kquants.cpp.
#include "io_internal.h"

#include "anvil/io/fs.h"
#include "anvil/io/gguf.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <unordered_set>

namespace anvil::io {

// ---- values ---------------------------------------------------------------------------------------------

namespace {

bool is_integer_type(GgufType t) {
  switch (t) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kUint16: case GgufType::kInt16:
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kUint64: case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

// The value range of an integer type (kBool: 0..1); UINT64 is held as int64, so its top half is refused.
std::pair<int64_t, int64_t> int_range(GgufType t) {
  switch (t) {
    case GgufType::kUint8: return {0, 255};
    case GgufType::kInt8: return {-128, 127};
    case GgufType::kUint16: return {0, 65535};
    case GgufType::kInt16: return {-32768, 32767};
    case GgufType::kUint32: return {0, 4294967295LL};
    case GgufType::kInt32: return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
    case GgufType::kUint64: return {0, std::numeric_limits<int64_t>::max()};
    case GgufType::kBool: return {0, 1};
    default: return {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max()};
  }
}

}  // namespace

GgufValue gguf_int_value(GgufType type, int64_t v) {
  TORCH_CHECK(is_integer_type(type) || type == GgufType::kBool, "gguf_int_value: ", gguf_type_name(type),
              " is not an integer or bool type");
  GgufValue out;
  out.type = out.element_type = type;
  out.ints = {v};
  return out;
}

GgufValue gguf_float_value(GgufType type, double v) {
  TORCH_CHECK(type == GgufType::kFloat32 || type == GgufType::kFloat64, "gguf_float_value: ", gguf_type_name(type),
              " is not FLOAT32 or FLOAT64");
  GgufValue out;
  out.type = out.element_type = type;
  out.floats = {v};
  return out;
}

GgufValue gguf_string_value(const std::string& v) {
  GgufValue out;
  out.type = out.element_type = GgufType::kString;
  out.strings = {v};
  return out;
}

GgufValue gguf_int_array(GgufType element_type, std::vector<int64_t> v) {
  GgufValue out = gguf_int_value(element_type, 0);
  out.type = GgufType::kArray;
  out.ints = std::move(v);
  return out;
}

GgufValue gguf_float_array(GgufType element_type, std::vector<double> v) {
  GgufValue out = gguf_float_value(element_type, 0);
  out.type = GgufType::kArray;
  out.floats = std::move(v);
  return out;
}

GgufValue gguf_string_array(std::vector<std::string> v) {
  GgufValue out;
  out.type = GgufType::kArray;
  out.element_type = GgufType::kString;
  out.strings = std::move(v);
  return out;
}

// ---- serialization ----------------------------------------------------------------------------------------

namespace {

struct Bytes {
  std::string buf;
  template <typename T>
  void put(T v) {
    char raw[sizeof(T)];
    std::memcpy(raw, &v, sizeof(T));  // little-endian hosts only (x86-64, aarch64), as the reader
    buf.append(raw, sizeof(T));
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    buf.append(s);
  }
};

void put_scalar(Bytes& b, GgufType t, const GgufValue& v, size_t i, const std::string& key) {
  if (t == GgufType::kString) return b.str(v.strings[i]);
  if (t == GgufType::kFloat32) return b.put<float>(static_cast<float>(v.floats[i]));
  if (t == GgufType::kFloat64) return b.put<double>(v.floats[i]);
  const int64_t x = v.ints[i];
  const auto range = int_range(t);
  TORCH_CHECK(x >= range.first && x <= range.second, "gguf: metadata '", key, "': ", x, " does not fit ",
              gguf_type_name(t));
  switch (t) {
    case GgufType::kUint8: case GgufType::kBool: return b.put<uint8_t>(static_cast<uint8_t>(x));
    case GgufType::kInt8: return b.put<int8_t>(static_cast<int8_t>(x));
    case GgufType::kUint16: return b.put<uint16_t>(static_cast<uint16_t>(x));
    case GgufType::kInt16: return b.put<int16_t>(static_cast<int16_t>(x));
    case GgufType::kUint32: return b.put<uint32_t>(static_cast<uint32_t>(x));
    case GgufType::kInt32: return b.put<int32_t>(static_cast<int32_t>(x));
    case GgufType::kUint64: return b.put<uint64_t>(static_cast<uint64_t>(x));
    case GgufType::kInt64: return b.put<int64_t>(x);
    default: TORCH_CHECK(false, "gguf: metadata '", key, "': cannot write a value of ", gguf_type_name(t));
  }
}

void put_value(Bytes& b, const std::string& key, const GgufValue& v) {
  const GgufType t = v.element_type;
  TORCH_CHECK(t != GgufType::kArray, "gguf: metadata '", key, "': arrays of arrays are not written");
  const size_t n = v.size();
  TORCH_CHECK(v.is_array() || n == 1, "gguf: metadata '", key, "': a scalar holds ", n, " values");
  b.put<uint32_t>(static_cast<uint32_t>(v.type));
  if (v.is_array()) {
    b.put<uint32_t>(static_cast<uint32_t>(t));
    b.put<uint64_t>(n);
  }
  for (size_t i = 0; i < n; ++i) put_scalar(b, t, v, i, key);
}

uint64_t pad_to(uint64_t n, uint64_t alignment) { return (n + alignment - 1) / alignment * alignment; }

}  // namespace

uint64_t ggml_tensor_nbytes(uint32_t type, const std::vector<int64_t>& shape, const std::string& what) {
  const auto layout = ggml_block_layout(type);
  TORCH_CHECK(layout.first > 0, "gguf: '", what, "': ggml type ", ggml_type_name(type), " has no known block size");
  TORCH_CHECK(!shape.empty() && static_cast<int64_t>(shape.size()) <= kGgufMaxDims, "gguf: '", what,
              "': rank ", shape.size(), " (GGUF tensors have 1 to 4 dims)");
  uint64_t numel = 1;
  for (int64_t d : shape) {
    TORCH_CHECK(d > 0, "gguf: '", what, "': shape ", at::IntArrayRef(shape), " has a dim < 1");
    numel *= static_cast<uint64_t>(d);
  }
  TORCH_CHECK(shape.back() % layout.first == 0, "gguf: '", what, "': row length ", shape.back(),
              " is not a multiple of ", ggml_type_name(type), "'s block of ", layout.first);
  return numel / layout.first * layout.second;
}

uint64_t write_gguf(const std::string& path, const std::vector<std::pair<std::string, GgufValue>>& metadata,
                    const std::vector<GgufTensorSpec>& tensors,
                    const std::function<std::vector<uint8_t>(size_t index)>& source) {
  uint64_t alignment = 32;
  Bytes head;
  head.put<uint32_t>(0x46554747u);  // "GGUF"
  head.put<uint32_t>(3);
  head.put<uint64_t>(tensors.size());
  head.put<uint64_t>(metadata.size());
  std::unordered_set<std::string> keys;
  for (const auto& [key, value] : metadata) {
    TORCH_CHECK(!key.empty(), "gguf: '", path, "': an empty metadata key");
    TORCH_CHECK(keys.insert(key).second, "gguf: '", path, "': metadata key '", key, "' appears twice");
    if (key == "general.alignment") {
      TORCH_CHECK(!value.is_array() && value.element_type == GgufType::kUint32 && value.ints.size() == 1 &&
                      value.ints[0] > 0 && (value.ints[0] & (value.ints[0] - 1)) == 0,
                  "gguf: '", path, "': general.alignment must be a UINT32 power of two");
      alignment = static_cast<uint64_t>(value.ints[0]);
    }
    head.str(key);
    put_value(head, key, value);
  }
  std::vector<uint64_t> sizes;
  std::unordered_set<std::string> names;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(!t.name.empty() && t.name.size() < 64, "gguf: '", path, "': tensor name '", t.name,
                "' must be 1 to 63 bytes (ggml's GGML_MAX_NAME)");
    TORCH_CHECK(names.insert(t.name).second, "gguf: '", path, "': tensor '", t.name, "' appears twice");
    sizes.push_back(ggml_tensor_nbytes(t.type, t.shape, t.name));
    head.str(t.name);
    head.put<uint32_t>(static_cast<uint32_t>(t.shape.size()));
    for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) head.put<uint64_t>(static_cast<uint64_t>(*d));
    head.put<uint32_t>(t.type);
    head.put<uint64_t>(offset);
    offset = pad_to(offset + sizes.back(), alignment);
  }
  head.buf.resize(pad_to(head.buf.size(), alignment), '\0');
  const uint64_t total = head.buf.size() + offset;

  write_file_atomically(path, [&](int fd) {
    write_all(fd, head.buf.data(), head.buf.size(), path);
    const std::vector<uint8_t> zeros(alignment, 0);
    for (size_t i = 0; i < tensors.size(); ++i) {
      const std::vector<uint8_t> bytes = source(i);
      TORCH_CHECK(bytes.size() == sizes[i], "gguf: '", path, "': tensor '", tensors[i].name, "' came as ",
                  bytes.size(), " bytes, its ", ggml_type_name(tensors[i].type), " shape needs ", sizes[i]);
      write_all(fd, bytes.data(), bytes.size(), path);
      const uint64_t pad = pad_to(sizes[i], alignment) - sizes[i];
      if (pad) write_all(fd, zeros.data(), pad, path);
    }
  });
  return total;
}

// ---- quantizers ---------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kQk = 32;  // QK8_0 == QK4_0

uint16_t fp16_bits(float v) { return c10::Half(v).x; }

// gguf-py's np_roundf: round half away from zero, as floor(|n|) + floor(2 (|n| - floor(|n|))), signed.
float round_away(float n) {
  const float a = std::fabs(n);
  const float floored = std::floor(a);
  const float b = floored + std::floor(2.0f * (a - floored));
  return n > 0 ? b : (n < 0 ? -b : 0.0f);
}

// block_q8_0 { ggml_half d; int8_t qs[32]; }
void quantize_block_q8_0(const float* x, uint8_t* out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < kQk; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = fp16_bits(d);
  std::memcpy(out, &dh, 2);
  for (int64_t j = 0; j < kQk; ++j) {
    const float prod = x[j] * id;
    out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(round_away(prod)));
  }
}

// block_q4_0 { ggml_half d; uint8_t qs[16]; }
void quantize_block_q4_0(const float* x, uint8_t* out) {
  float amax = -1.0f, max = 0.0f;  // -1: the first element is always taken (an all-zero block keeps x[0]'s sign)
  for (int64_t j = 0; j < kQk; ++j) {
    if (std::fabs(x[j]) > amax) {  // strictly greater: the first of equal magnitudes wins (numpy argmax)
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const uint16_t dh = fp16_bits(d);
  std::memcpy(out, &dh, 2);
  uint8_t q[kQk];
  for (int64_t j = 0; j < kQk; ++j) {
    const float prod = x[j] * id;
    const float t = std::trunc(prod + 8.5f);
    q[j] = static_cast<uint8_t>(std::min(15.0f, std::max(0.0f, t)));
  }
  for (int64_t j = 0; j < kQk / 2; ++j) out[2 + j] = static_cast<uint8_t>(q[j] | (q[j + kQk / 2] << 4));
}

// gguf-py BF16.quantize_blocks == ggml_compute_fp32_to_bf16.
uint16_t bf16_bits(float v) {
  uint32_t n;
  std::memcpy(&n, &v, 4);
  if ((n & 0x7fffffffu) > 0x7f800000u) n = (n & 0xffff0000u) | (64u << 16);
  return static_cast<uint16_t>((static_cast<uint64_t>(n) + (0x7fffu + ((n >> 16) & 1u))) >> 16);
}

}  // namespace

bool ggml_type_quantizable(uint32_t type) {
  return type == ggml_type::kF32 || type == ggml_type::kF16 || type == ggml_type::kBF16 ||
         type == ggml_type::kQ8_0 || type == ggml_type::kQ4_0 || detail::ggml_block_quantizer(type) != nullptr;
}

std::vector<uint8_t> quantize_ggml(const at::Tensor& x_in, uint32_t type, const std::string& what) {
  TORCH_CHECK(ggml_type_quantizable(type), "gguf: '", what, "': anvil does not quantize to ",
              ggml_type_name(type), " (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)");
  TORCH_CHECK(x_in.device().is_cpu() && at::isFloatingType(x_in.scalar_type()), "gguf: '", what,
              "': quantize_ggml takes a CPU floating tensor, got ", x_in.toString());
  const std::vector<int64_t> shape = x_in.dim() == 0 ? std::vector<int64_t>{1} : x_in.sizes().vec();
  const uint64_t nbytes = ggml_tensor_nbytes(type, shape, what);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();  // (..., row) fp32
  const float* src = x.data_ptr<float>();
  const int64_t n = x.numel();
  std::vector<uint8_t> out(nbytes);
  uint8_t* dst = out.data();
  if (type == ggml_type::kF32) {
    std::memcpy(dst, src, nbytes);
  } else if (type == ggml_type::kF16 || type == ggml_type::kBF16) {
    const bool half = type == ggml_type::kF16;
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const uint16_t v = half ? fp16_bits(src[i]) : bf16_bits(src[i]);
        std::memcpy(dst + 2 * i, &v, 2);
      }
    });
  } else if (const auto quantize_block = detail::ggml_block_quantizer(type)) {
    const auto layout = ggml_block_layout(type);  // (elements, bytes) per block
    const int64_t block_elems = layout.first, block_bytes = layout.second;
    at::parallel_for(0, n / block_elems, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) quantize_block(src + i * block_elems, dst + i * block_bytes);
    });
  } else {
    const bool q8 = type == ggml_type::kQ8_0;
    const int64_t block_bytes = ggml_block_layout(type).second;
    at::parallel_for(0, n / kQk, 512, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (q8) quantize_block_q8_0(src + i * kQk, dst + i * block_bytes);
        else quantize_block_q4_0(src + i * kQk, dst + i * block_bytes);
      }
    });
  }
  return out;
}

}  // namespace anvil::io
