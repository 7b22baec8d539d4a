// The safetensors header: the dtype table and the parser that validates a whole file held in memory.
//
// Everything that decides whether bytes from a stranger may be used as tensors lives here, in one
// function with no file or mapping behind it, so the fuzz target (tests/fuzz/fuzz_safetensors.cpp)
// exercises exactly the code the reader runs. The rules are those of the format (docs/FORMATS.md,
// "safetensors"): each one is a separate check with its own message, so an error says which rule a
// file broke. The JSON parser is nlohmann's; a parse callback adds what it does not check itself:
// duplicate keys (it would keep the last one silently) and nesting deeper than the format's three
// levels (so a hostile header cannot make anything recurse deeply).
#include "anvil/io/json.h"
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <set>

namespace anvil::io {
namespace {

struct DtypeInfo {
  const char* name;
  int64_t size;          // bytes per element
  at::ScalarType dtype;
  int rank;              // the reference writer's order: files sort by rank descending, then name
};

// Every byte-sized dtype the format defines, in the reference implementation's enum order (its writer
// sorts tensors by this order descending, which puts the widest dtypes first and keeps every tensor
// aligned when the data section starts 8-aligned).
constexpr std::array<DtypeInfo, 19> kDtypes = {{
    {"BOOL", 1, at::kBool, 0},
    {"U8", 1, at::kByte, 1},
    {"I8", 1, at::kChar, 2},
    {"F8_E5M2", 1, at::kFloat8_e5m2, 3},
    {"F8_E4M3", 1, at::kFloat8_e4m3fn, 4},
    {"F8_E8M0", 1, at::kFloat8_e8m0fnu, 5},
    {"F8_E4M3FNUZ", 1, at::kFloat8_e4m3fnuz, 6},
    {"F8_E5M2FNUZ", 1, at::kFloat8_e5m2fnuz, 7},
    {"I16", 2, at::kShort, 8},
    {"U16", 2, at::kUInt16, 9},
    {"F16", 2, at::kHalf, 10},
    {"BF16", 2, at::kBFloat16, 11},
    {"I32", 4, at::kInt, 12},
    {"U32", 4, at::kUInt32, 13},
    {"F32", 4, at::kFloat, 14},
    {"C64", 8, at::kComplexFloat, 15},
    {"F64", 8, at::kDouble, 16},
    {"I64", 8, at::kLong, 17},
    {"U64", 8, at::kUInt64, 18},
}};

// Dtypes the format defines with fewer than 8 bits per element: known, but not readable as ATen
// tensors of the stated shape, so they get their own message rather than "unknown dtype".
constexpr std::array<const char*, 3> kSubByteDtypes = {"F4", "F6_E2M3", "F6_E3M2"};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

using Json = nlohmann::json;

// Rejects duplicate keys and nesting deeper than `max_depth` levels (3 for a safetensors header: root
// object -> tensor object -> shape array).
class HeaderShapeGuard {
 public:
  HeaderShapeGuard(const std::string& what, size_t max_depth) : what_(what), max_depth_(max_depth) {}
  bool operator()(int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
      case Json::parse_event_t::array_start:
        TORCH_CHECK(open_.size() < max_depth_, what_, ": JSON nests deeper than the format's ", max_depth_,
                    " levels");
        open_.push_back(event == Json::parse_event_t::object_start);
        keys_.emplace_back();
        break;
      case Json::parse_event_t::object_end:
      case Json::parse_event_t::array_end:
        open_.pop_back();
        keys_.pop_back();
        break;
      case Json::parse_event_t::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        TORCH_CHECK(keys_.back().insert(key).second, what_, ": duplicate key '", key, "'",
                    open_.size() > 1 ? " (in a nested object)" : "");
        break;
      }
      case Json::parse_event_t::value:
        break;
    }
    return true;
  }

 private:
  const std::string& what_;
  size_t max_depth_;
  std::vector<bool> open_;                 // one per open object/array: true for an object
  std::vector<std::set<std::string>> keys_;  // the keys seen in each open object
};

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

uint64_t as_offset(const Json& v, const std::string& what, const std::string& name, const char* field) {
  TORCH_CHECK(v.is_number_unsigned(), "safetensors: ", what, ": tensor '", name, "': ", field,
              " entries must be non-negative integers, got ", v.dump());
  return v.get<uint64_t>();
}

std::vector<int64_t> parse_shape(const Json& v, const std::string& what, const std::string& name) {
  TORCH_CHECK(v.is_array(), "safetensors: ", what, ": tensor '", name, "': shape must be an array, got ",
              v.type_name());
  std::vector<int64_t> shape;
  for (const auto& d : v) {
    const uint64_t n = as_offset(d, what, name, "shape");
    TORCH_CHECK(n <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "safetensors: ", what,
                ": tensor '", name, "': shape entry ", n, " overflows int64");
    shape.push_back(static_cast<int64_t>(n));
  }
  return shape;
}

// numel x element size, with overflow reported as the rule it is.
uint64_t shape_bytes(const std::vector<int64_t>& shape, int64_t elem, const std::string& what,
                     const std::string& name) {
  uint64_t n = 1;
  for (int64_t d : shape)
    TORCH_CHECK(!__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n), "safetensors: ", what, ": tensor '",
                name, "': element count of shape ", c10::IntArrayRef(shape), " overflows 64 bits");
  TORCH_CHECK(n <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), "safetensors: ", what,
              ": tensor '", name, "': element count ", n, " overflows int64");
  uint64_t bytes = 0;
  TORCH_CHECK(!__builtin_mul_overflow(n, static_cast<uint64_t>(elem), &bytes), "safetensors: ", what,
              ": tensor '", name, "': byte size of shape ", c10::IntArrayRef(shape), " overflows 64 bits");
  return bytes;
}

TensorEntry parse_entry(const std::string& name, const Json& v, const std::string& what) {
  TORCH_CHECK(v.is_object(), "safetensors: ", what, ": tensor '", name, "' must be an object, got ", v.type_name());
  for (const auto& [key, _] : v.items())
    TORCH_CHECK(key == "dtype" || key == "shape" || key == "data_offsets", "safetensors: ", what, ": tensor '",
                name, "' has unknown field '", key, "' (allowed: dtype, shape, data_offsets)");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    TORCH_CHECK(v.contains(field), "safetensors: ", what, ": tensor '", name, "' lacks the field '", field, "'");

  TensorEntry e;
  e.name = name;
  const auto& dt = v.at("dtype");
  TORCH_CHECK(dt.is_string(), "safetensors: ", what, ": tensor '", name, "': dtype must be a string, got ", dt.dump());
  e.dtype_name = dt.get<std::string>();
  const DtypeInfo* info = find_dtype(e.dtype_name);
  if (!info) {
    const bool sub_byte = std::find_if(kSubByteDtypes.begin(), kSubByteDtypes.end(), [&](const char* s) {
                            return e.dtype_name == s;
                          }) != kSubByteDtypes.end();
    TORCH_CHECK(!sub_byte, "safetensors: ", what, ": tensor '", name, "': dtype ", e.dtype_name,
                " is a sub-byte type anvil does not read");
    TORCH_CHECK(false, "safetensors: ", what, ": tensor '", name, "': unknown dtype '", e.dtype_name, "'");
  }
  e.dtype = info->dtype;
  e.shape = parse_shape(v.at("shape"), what, name);

  const auto& off = v.at("data_offsets");
  TORCH_CHECK(off.is_array() && off.size() == 2, "safetensors: ", what, ": tensor '", name,
              "': data_offsets must be an array [begin, end], got ", off.dump());
  e.begin = as_offset(off[0], what, name, "data_offsets");
  e.end = as_offset(off[1], what, name, "data_offsets");
  TORCH_CHECK(e.end >= e.begin, "safetensors: ", what, ": tensor '", name, "': data_offsets end ", e.end,
              " is before begin ", e.begin);
  const uint64_t want = shape_bytes(e.shape, info->size, what, name);
  TORCH_CHECK(e.end - e.begin == want, "safetensors: ", what, ": tensor '", name, "': shape ",
              c10::IntArrayRef(e.shape), " x ", e.dtype_name, " is ", want, " bytes but data_offsets [", e.begin,
              ", ", e.end, "] span ", e.end - e.begin);
  return e;
}

std::map<std::string, std::string> parse_metadata(const Json& v, const std::string& what) {
  TORCH_CHECK(v.is_object(), "safetensors: ", what, ": __metadata__ must be an object of strings, got ",
              v.type_name());
  std::map<std::string, std::string> out;
  for (const auto& [key, value] : v.items()) {
    TORCH_CHECK(value.is_string(), "safetensors: ", what, ": __metadata__ value of '", key,
                "' must be a string, got ", value.dump());
    out[key] = value.get<std::string>();
  }
  return out;
}

}  // namespace

int64_t safetensors_dtype_size(const std::string& dtype_name) {
  const DtypeInfo* d = find_dtype(dtype_name);
  return d ? d->size : 0;
}

std::string safetensors_dtype_name(at::ScalarType dtype) {
  for (const auto& d : kDtypes)
    if (d.dtype == dtype) return d.name;
  TORCH_CHECK(false, "safetensors: dtype ", dtype, " has no safetensors equivalent");
}

namespace detail {

int safetensors_dtype_rank(const std::string& dtype_name) {
  const DtypeInfo* d = find_dtype(dtype_name);
  return d ? d->rank : -1;
}

}  // namespace detail

nlohmann::json parse_json_strict(const std::string& text, const std::string& what, bool allow_comments) {
  try {
    HeaderShapeGuard guard(what, 64);
    return Json::parse(text, std::ref(guard), /*allow_exceptions=*/true, allow_comments);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, what, ": not valid JSON: ", e.what());
  }
}

SafetensorsHeader parse_safetensors_header(const uint8_t* data, uint64_t size, const std::string& what) {
  TORCH_CHECK(size >= 8, "safetensors: ", what, ": file is ", size,
              " bytes, shorter than the 8-byte header length");
  SafetensorsHeader h;
  h.header_bytes = read_u64_le(data);
  TORCH_CHECK(h.header_bytes <= kMaxHeaderBytes, "safetensors: ", what, ": header length ", h.header_bytes,
              " exceeds the bound of ", kMaxHeaderBytes, " bytes");
  TORCH_CHECK(h.header_bytes <= size - 8, "safetensors: ", what, ": header length ", h.header_bytes,
              " runs past the end of the file (", size, " bytes)");
  TORCH_CHECK(h.header_bytes >= 2 && data[8] == '{', "safetensors: ", what,
              ": header must be a JSON object starting with '{'");

  const char* json_begin = reinterpret_cast<const char*>(data + 8);
  // nlohmann's parser takes a NUL as the end of its input and would accept "{}\0garbage"; JSON text
  // never holds a raw NUL, so any NUL is an error (padding must be spaces).
  TORCH_CHECK(std::memchr(json_begin, 0, h.header_bytes) == nullptr, "safetensors: ", what,
              ": header contains a NUL byte (JSON text never does; padding must be spaces)");
  Json root;
  try {
    const std::string where = "safetensors: " + what + ": header";
    HeaderShapeGuard guard(where, 3);
    root = Json::parse(json_begin, json_begin + h.header_bytes, std::ref(guard));
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "safetensors: ", what, ": header is not valid UTF-8 JSON: ", e.what());
  }
  TORCH_CHECK(root.is_object(), "safetensors: ", what, ": header must be a JSON object");

  for (const auto& [key, value] : root.items()) {
    if (key == "__metadata__")
      h.metadata = parse_metadata(value, what);
    else
      h.entries.push_back(parse_entry(key, value, what));
  }
  // Offsets order the data; the header's key order means nothing (the reference writer sorts by dtype).
  std::sort(h.entries.begin(), h.entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  uint64_t expected = 0;
  for (const auto& e : h.entries) {
    TORCH_CHECK(e.begin == expected, "safetensors: ", what, ": data offsets are not contiguous: tensor '", e.name,
                "' begins at ", e.begin, " but the previous tensor ends at ", expected,
                e.begin < expected ? " (overlap)" : " (gap)");
    expected = e.end;
  }
  h.data_bytes = expected;
  const uint64_t available = size - 8 - h.header_bytes;
  TORCH_CHECK(h.data_bytes == available, "safetensors: ", what, ": tensors cover ", h.data_bytes,
              " bytes of data but the file holds ", available,
              h.data_bytes > available ? " (offsets out of range: file truncated?)" : " (trailing bytes)");
  return h;
}

}  // namespace anvil::io
