// Tests of the GGUF reader (anvil/io/gguf.h) on files built byte by byte here: every metadata value
// type, alignment and data offsets, hand-computed dequantizations of each block type (values worked out
// from ggml's block layouts, independent of the code under test), the model-name mapping and q/k
// un-permutation, and a deterministic mutation loop over a valid file (truncations, random bytes, forged
// u64 counts) that must give c10::Errors only, never a crash or a read outside the buffer (run under
// ASan to check the last part strictly). tests/python/test_gguf.py checks the same reader against
// gguf-py, ggml's own writer and reader.
#include "anvil/io/gguf.h"
#include "anvil/model/gguf_model.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

using anvil::test::expect_error;
namespace gt = anvil::io::ggml_type;

// A little-endian byte builder for GGUF files.
struct Bytes {
  std::string b;
  template <typename T>
  Bytes& put(T v) {
    b.append(reinterpret_cast<const char*>(&v), sizeof(T));
    return *this;
  }
  Bytes& str(const std::string& s) {
    put<uint64_t>(s.size());
    b += s;
    return *this;
  }
  Bytes& half(float f) { return put<uint16_t>(c10::detail::fp16_ieee_from_fp32_value(f)); }
};

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> dims;
  uint32_t type;
  std::string data;
};

// header + kv (already encoded, `n_kv` of them) + tensor infos + padding + data, tensors packed in order.
std::string gguf_file(const std::string& kv, uint64_t n_kv, const std::vector<TensorSpec>& tensors,
                      uint64_t alignment = 32) {
  Bytes f;
  f.put<uint32_t>(0x46554747).put<uint32_t>(3).put<uint64_t>(tensors.size()).put<uint64_t>(n_kv);
  f.b += kv;
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const auto& t : tensors) {
    f.str(t.name).put<uint32_t>(t.dims.size());
    for (auto d : t.dims) f.put<uint64_t>(d);
    f.put<uint32_t>(t.type).put<uint64_t>(offset);
    offsets.push_back(offset);
    offset = (offset + t.data.size() + alignment - 1) / alignment * alignment;
  }
  while (f.b.size() % alignment) f.b.push_back('\0');
  const size_t data_start = f.b.size();
  for (size_t i = 0; i < tensors.size(); ++i) {
    f.b.resize(data_start + offsets[i], '\0');
    f.b += tensors[i].data;
  }
  return f.b;
}

anvil::io::GgufHeader parse(const std::string& file) {
  return anvil::io::parse_gguf(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "test.gguf");
}

at::Tensor dequant(const std::string& file, size_t index = 0) {
  const auto h = parse(file);
  const auto& t = h.tensors.at(index);
  return anvil::io::dequantize_ggml_tensor(t, reinterpret_cast<const uint8_t*>(file.data()) + h.data_offset + t.offset);
}

// Every value type once, and an array of each scalar type.
std::string all_types_kv(uint64_t& n) {
  Bytes kv;
  n = 0;
  auto key = [&](const std::string& k, uint32_t type) -> Bytes& {
    ++n;
    return kv.str(k).put<uint32_t>(type);
  };
  key("u8", 0).put<uint8_t>(250);
  key("i8", 1).put<int8_t>(-5);
  key("u16", 2).put<uint16_t>(65000);
  key("i16", 3).put<int16_t>(-300);
  key("u32", 4).put<uint32_t>(4000000000u);
  key("i32", 5).put<int32_t>(-7);
  key("f32", 6).put<float>(0.25f);
  key("bool", 7).put<uint8_t>(1);
  key("str", 8).str("héllo");
  key("arr", 9).put<uint32_t>(8).put<uint64_t>(2).str("a").str("");
  key("u64", 10).put<uint64_t>(uint64_t{1} << 40);
  key("i64", 11).put<int64_t>(-(int64_t{1} << 40));
  key("f64", 12).put<double>(-1.5);
  key("arr_i16", 9).put<uint32_t>(3).put<uint64_t>(3).put<int16_t>(1).put<int16_t>(-2).put<int16_t>(3);
  key("general.alignment", 4).put<uint32_t>(64);
  return kv.b;
}

TEST(Gguf, ReadsEveryValueTypeAndTheLayout) {
  uint64_t n_kv = 0;
  const std::string kv = all_types_kv(n_kv);
  std::string f32(4 * 6, '\0');
  for (int i = 0; i < 6; ++i) {
    const float v = i * 1.5f;
    std::memcpy(&f32[4 * i], &v, 4);
  }
  const std::string file = gguf_file(kv, n_kv, {{"a", {3, 2}, gt::kF32, f32}, {"b", {2}, gt::kF32, f32.substr(0, 8)}}, 64);
  const auto h = parse(file);
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.alignment, 64u);
  EXPECT_EQ(h.data_offset % 64, 0u);
  ASSERT_EQ(h.metadata.size(), n_kv);
  auto value = [&](const std::string& k) -> const anvil::io::GgufValue& {
    for (const auto& [key, v] : h.metadata)
      if (key == k) return v;
    throw std::runtime_error("no key " + k);
  };
  EXPECT_EQ(value("u8").ints[0], 250);
  EXPECT_EQ(value("i8").ints[0], -5);
  EXPECT_EQ(value("u16").ints[0], 65000);
  EXPECT_EQ(value("i16").ints[0], -300);
  EXPECT_EQ(value("u32").ints[0], 4000000000LL);
  EXPECT_EQ(value("i32").ints[0], -7);
  EXPECT_EQ(value("f32").floats[0], 0.25);
  EXPECT_TRUE(value("bool").is_bool());
  EXPECT_EQ(value("bool").ints[0], 1);
  EXPECT_EQ(value("str").strings[0], "héllo");
  EXPECT_TRUE(value("arr").is_array());
  EXPECT_EQ(value("arr").strings, (std::vector<std::string>{"a", ""}));
  EXPECT_EQ(value("u64").ints[0], int64_t{1} << 40);
  EXPECT_EQ(value("i64").ints[0], -(int64_t{1} << 40));
  EXPECT_EQ(value("f64").floats[0], -1.5);
  EXPECT_EQ(value("arr_i16").ints, (std::vector<int64_t>{1, -2, 3}));
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.tensors[0].shape(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(h.tensors[1].offset, 64u);  // 24 bytes, padded to the alignment
  const at::Tensor a = dequant(file);
  EXPECT_TRUE(at::equal(a, at::arange(6, at::kFloat).mul(1.5f).reshape({2, 3})));
}

// ---- dequantization, values worked out by hand from the block layouts ------------------------------

TEST(Gguf, DequantizesQ8_0Q4_0Q4_1) {
  Bytes q8, q40, q41;
  q8.half(0.5f);
  for (int j = 0; j < 32; ++j) q8.put<int8_t>(static_cast<int8_t>(j - 16));
  q40.half(2.0f);
  q41.half(0.25f).half(-1.0f);
  for (int j = 0; j < 16; ++j) {
    q40.put<uint8_t>(static_cast<uint8_t>(j | ((15 - j) << 4)));
    q41.put<uint8_t>(static_cast<uint8_t>(j | ((15 - j) << 4)));
  }
  const at::Tensor y8 = dequant(gguf_file("", 0, {{"x", {32}, gt::kQ8_0, q8.b}}));
  const at::Tensor y40 = dequant(gguf_file("", 0, {{"x", {32}, gt::kQ4_0, q40.b}}));
  const at::Tensor y41 = dequant(gguf_file("", 0, {{"x", {32}, gt::kQ4_1, q41.b}}));
  for (int j = 0; j < 32; ++j) {
    EXPECT_EQ(y8[j].item<float>(), 0.5f * (j - 16)) << j;
    const int nibble = j < 16 ? j : 15 - (j - 16);  // low nibbles first, then the high ones
    EXPECT_EQ(y40[j].item<float>(), 2.0f * (nibble - 8)) << j;
    EXPECT_EQ(y41[j].item<float>(), 0.25f * nibble - 1.0f) << j;
  }
}

TEST(Gguf, DequantizesQ4_K) {
  // d = 1, dmin = 0.5; sub-block s has scale s + 1 and min 2s (6-bit packing of get_scale_min_k4);
  // qs: value l of sub-block s is (l + s) % 16.
  const int scale[8] = {1, 2, 3, 4, 5, 6, 7, 8}, min[8] = {0, 2, 4, 6, 8, 10, 12, 14};
  uint8_t packed[12] = {};
  for (int s = 0; s < 4; ++s) {
    packed[s] = static_cast<uint8_t>(scale[s]);
    packed[s + 4] = static_cast<uint8_t>(min[s]);
  }
  for (int s = 4; s < 8; ++s) {  // low 4 bits in bytes 8..11; the high 2 bits (zero here) in bytes 0..7
    packed[s + 4] = static_cast<uint8_t>((scale[s] & 0x0F) | ((min[s] & 0x0F) << 4));
  }
  Bytes b;
  b.half(1.0f).half(0.5f);
  b.b.append(reinterpret_cast<const char*>(packed), 12);
  for (int pair = 0; pair < 4; ++pair)
    for (int l = 0; l < 32; ++l)
      b.put<uint8_t>(static_cast<uint8_t>(((l + 2 * pair) % 16) | (((l + 2 * pair + 1) % 16) << 4)));
  const at::Tensor y = dequant(gguf_file("", 0, {{"x", {256}, gt::kQ4_K, b.b}}));
  for (int s = 0; s < 8; ++s)
    for (int l = 0; l < 32; ++l)
      EXPECT_EQ(y[32 * s + l].item<float>(), 1.0f * scale[s] * ((l + s) % 16) - 0.5f * min[s]) << s << " " << l;
}

TEST(Gguf, DequantizesQ6_K) {
  // Value i (0..255) = 6-bit q(i) - 32 with q(i) = i % 64; scale of 16-group g = g - 8; d = 0.5.
  uint8_t ql[128] = {}, qh[64] = {};
  for (int i = 0; i < 256; ++i) {
    const int half = i / 128, r = i % 128, k = r / 32, l = r % 32, q = i % 64;
    uint8_t& low = ql[64 * half + l + 32 * (k % 2)];
    low |= static_cast<uint8_t>((q & 0x0F) << (4 * (k / 2)));
    qh[32 * half + l] |= static_cast<uint8_t>((q >> 4) << (2 * k));
  }
  Bytes b;
  b.b.append(reinterpret_cast<const char*>(ql), 128);
  b.b.append(reinterpret_cast<const char*>(qh), 64);
  for (int g = 0; g < 16; ++g) b.put<int8_t>(static_cast<int8_t>(g - 8));
  b.half(0.5f);
  const at::Tensor y = dequant(gguf_file("", 0, {{"x", {256}, gt::kQ6_K, b.b}}));
  for (int i = 0; i < 256; ++i) EXPECT_EQ(y[i].item<float>(), 0.5f * (i / 16 - 8) * (i % 64 - 32)) << i;
}

TEST(Gguf, RefusesWhatItCannotDequantize) {
  // block_q2_K: 256 values in 84 bytes (2 + 2 + 16 + 64); anvil sizes it but does not dequantize it.
  const std::string file = gguf_file("", 0, {{"blk.0.x", {256}, gt::kQ2_K, std::string(84, '\0')}});
  EXPECT_EQ(parse(file).tensors[0].nbytes, 84u);
  expect_error([&] { dequant(file); }, {"blk.0.x", "Q2_K", "does not dequantize"});
}

// ---- the model mapping -----------------------------------------------------------------------------

TEST(Gguf, HuggingFaceNamesAndQkUnpermutation) {
  EXPECT_EQ(anvil::model::gguf_to_hf_name("token_embd.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(anvil::model::gguf_to_hf_name("blk.12.ffn_up.weight"), "model.layers.12.mlp.up_proj.weight");
  EXPECT_EQ(anvil::model::gguf_to_hf_name("blk.0.attn_output.weight"), "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(anvil::model::gguf_to_hf_name("blk.x.ffn_up.weight"), "");
  EXPECT_EQ(anvil::model::gguf_to_hf_name("rope_freqs.weight"), "");
  // 2 heads of head_dim 4: HF rows (h, 2, 2) -> llama.cpp rows (h, 2, 2) transposed in the last two.
  const at::Tensor hf = at::arange(8, at::kFloat).reshape({8, 1});
  const at::Tensor llama_cpp = hf.reshape({2, 2, 2, 1}).transpose(1, 2).reshape({8, 1});
  EXPECT_EQ(llama_cpp.flatten()[1].item<float>(), 2.0f);  // head 0: rows 0, 2, 1, 3
  EXPECT_TRUE(at::equal(anvil::model::gguf_unpermute_qk(llama_cpp, 2), hf));
}

// ---- malformed files --------------------------------------------------------------------------------

TEST(Gguf, MalformedHeadersNameTheRule) {
  std::string f32(8, '\0');
  const std::string good = gguf_file("", 0, {{"w", {2}, gt::kF32, f32}});
  auto with = [&](size_t at, uint64_t v, size_t width) {
    std::string b = good;
    std::memcpy(&b[at], &v, width);
    return b;
  };
  expect_error([&] { parse(with(0, 0x46554746, 4)); }, {"test.gguf", "not a GGUF file"});
  expect_error([&] { parse(with(4, 1, 4)); }, {"version 1"});
  expect_error([&] { parse(with(8, uint64_t{1} << 60, 8)); }, {"tensor count"});
  expect_error([&] { parse(with(16, 1000, 8)); }, {"metadata count"});
  const size_t info = 24, rank = info + 9, dim = rank + 4, type = dim + 8, offset = type + 4;
  expect_error([&] { parse(with(info, uint64_t{1} << 62, 8)); }, {"length"});
  expect_error([&] { parse(with(rank, 5, 4)); }, {"'w'", "5 dimensions"});
  expect_error([&] { parse(with(type, 77, 4)); }, {"'w'", "ggml type 77"});
  expect_error([&] { parse(with(type, gt::kQ8_0, 4)); }, {"'w'", "not a multiple of its block size 32"});
  expect_error([&] { parse(with(offset, 4, 8)); }, {"'w'", "alignment"});
  expect_error([&] { parse(with(offset, 64, 8)); }, {"'w'", "past the end"});
  expect_error([&] { parse(with(dim, 3, 8)); }, {"'w'", "past the end"});
  expect_error([&] { parse(good.substr(0, good.size() - 1)); }, {"'w'", "past the end"});
  Bytes kv;
  kv.str("k").put<uint32_t>(9).put<uint32_t>(9).put<uint64_t>(0);
  expect_error([&] { parse(gguf_file(kv.b, 1, {})); }, {"'k'", "array of arrays"});
  Bytes kv2;
  kv2.str("k").put<uint32_t>(7).put<uint8_t>(2);
  expect_error([&] { parse(gguf_file(kv2.b, 1, {})); }, {"'k'", "BOOL"});
  Bytes kv3;
  kv3.str("k").put<uint32_t>(4).put<uint32_t>(1).str("k").put<uint32_t>(4).put<uint32_t>(2);
  expect_error([&] { parse(gguf_file(kv3.b, 2, {})); }, {"duplicate metadata key 'k'"});
  Bytes kv4;
  kv4.str("general.alignment").put<uint32_t>(4).put<uint32_t>(24);
  expect_error([&] { parse(gguf_file(kv4.b, 1, {})); }, {"general.alignment 24"});
}

// Only c10::Errors: never a crash, a hang or another exception, whatever the bytes.
TEST(Gguf, MutationsGiveCleanErrorsOnly) {
  uint64_t n_kv = 0;
  const std::string kv = all_types_kv(n_kv);
  Bytes q4k;
  q4k.half(0.1f).half(0.2f);
  q4k.b.append(12 + 128, '\x5a');
  const std::string good = gguf_file(kv, n_kv,
                                     {{"a", {32, 2}, gt::kQ8_0, std::string(68, '\x11')},
                                      {"b", {256}, gt::kQ4_K, q4k.b},
                                      {"c", {4}, gt::kF16, std::string(8, '\x3c')}},
                                     64);
  std::mt19937_64 rng(12345);
  int accepted = 0, refused = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::string b = good;
    switch (iter % 4) {
      case 0: b.resize(rng() % b.size()); break;                 // truncation
      case 1: b[rng() % b.size()] = static_cast<char>(rng()); break;  // one random byte
      case 2: {                                                  // a forged u64 (a count, length or offset)
        const size_t at = rng() % (b.size() - 8);
        const uint64_t v = (rng() % 3 == 0) ? ~uint64_t{0} - (rng() % 64) : rng() % (1u << 20);
        std::memcpy(&b[at], &v, 8);
        break;
      }
      default:
        for (int k = 0; k < 8; ++k) b[rng() % b.size()] = static_cast<char>(rng());
    }
    try {
      const auto h = anvil::io::parse_gguf(reinterpret_cast<const uint8_t*>(b.data()), b.size(), "m.gguf");
      for (const auto& t : h.tensors)
        if (anvil::io::ggml_type_dequantizable(t.type))
          anvil::io::dequantize_ggml_tensor(t, reinterpret_cast<const uint8_t*>(b.data()) + h.data_offset + t.offset);
      ++accepted;
    } catch (const c10::Error&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 1000);
  EXPECT_GT(accepted, 10);
  std::cout << "mutations: " << accepted << " accepted, " << refused << " refused\n";
}

}  // namespace
