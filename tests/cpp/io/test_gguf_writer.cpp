// Tests of the GGUF writer and quantizers (anvil/io/gguf.h "writing") and the export's name and
// permutation helpers (anvil/model/gguf_export.h), read back through anvil's own strict reader:
// every metadata type (scalars and arrays) survives a round trip with its type, the data section is
// aligned (default 32 and a custom general.alignment), quantized tensors dequantize within the block
// formats' error bounds (Q8_0: d/2 per element, Q4_0: d/2, d = the block's scale), F16/BF16 agree with
// ATen's conversions, bad input is an error naming the rule, and a failing source leaves no file and no
// temporary file. tests/python/test_gguf_export.py compares the bytes with gguf-py's quantizers.
#include "anvil/io/fs.h"
#include "anvil/io/gguf.h"
#include "anvil/model/gguf_export.h"
#include "anvil/model/gguf_model.h"
#include "test_util.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

using anvil::test::expect_error;
namespace gt = anvil::io::ggml_type;
using anvil::io::GgufType;

std::string temp_dir() {
  char tmpl[] = "/tmp/anvil_gguf_writer_XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  EXPECT_NE(d, nullptr);
  return d;
}

at::Tensor from_bytes(const std::vector<uint8_t>& b) {
  return at::from_blob(const_cast<uint8_t*>(b.data()), {static_cast<int64_t>(b.size())}, at::kByte).clone();
}

TEST(GgufWriter, MetadataOfEveryTypeRoundTrips) {
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "m.gguf");
  std::vector<std::pair<std::string, anvil::io::GgufValue>> meta = {
      {"u8", anvil::io::gguf_int_value(GgufType::kUint8, 255)},
      {"i8", anvil::io::gguf_int_value(GgufType::kInt8, -128)},
      {"u16", anvil::io::gguf_int_value(GgufType::kUint16, 65535)},
      {"i16", anvil::io::gguf_int_value(GgufType::kInt16, -32768)},
      {"u32", anvil::io::gguf_int_value(GgufType::kUint32, 4294967295LL)},
      {"i32", anvil::io::gguf_int_value(GgufType::kInt32, -2147483647LL - 1)},
      {"u64", anvil::io::gguf_int_value(GgufType::kUint64, (int64_t(1) << 62) + 7)},
      {"i64", anvil::io::gguf_int_value(GgufType::kInt64, -(int64_t(1) << 62))},
      {"f32", anvil::io::gguf_float_value(GgufType::kFloat32, 0.1)},
      {"f64", anvil::io::gguf_float_value(GgufType::kFloat64, 0.1)},
      {"b", anvil::io::gguf_int_value(GgufType::kBool, 1)},
      {"s", anvil::io::gguf_string_value(std::string("caf\xC3\xA9\0x", 7))},
      {"as", anvil::io::gguf_string_array({"a", "", "\xE2\x96\x81hello"})},
      {"ai32", anvil::io::gguf_int_array(GgufType::kInt32, {1, -2, 3})},
      {"af32", anvil::io::gguf_float_array(GgufType::kFloat32, {-10000.0, 0.5})},
      {"ab", anvil::io::gguf_int_array(GgufType::kBool, {0, 1})},
      {"empty", anvil::io::gguf_int_array(GgufType::kUint8, {})},
  };
  const at::Tensor w = at::randn({3, 5});  // (3, 5): 15 floats, a row that no alignment divides
  const auto bytes = anvil::io::write_gguf(path, meta, {{"w", {3, 5}, gt::kF32}, {"v", {7}, gt::kF32}}, [&](size_t i) {
    return anvil::io::quantize_ggml(i == 0 ? w : at::arange(7, at::kFloat), gt::kF32);
  });
  const anvil::io::GgufFile f(path);
  EXPECT_EQ(f.version(), 3u);
  ASSERT_EQ(f.metadata().size(), meta.size());
  for (size_t i = 0; i < meta.size(); ++i) {
    const auto& [key, want] = meta[i];
    const auto& got = f.metadata()[i].second;
    EXPECT_EQ(f.metadata()[i].first, key);
    EXPECT_EQ(got.type, want.type) << key;
    EXPECT_EQ(got.element_type, want.element_type) << key;
    EXPECT_EQ(got.ints, want.ints) << key;
    EXPECT_EQ(got.strings, want.strings) << key;
    ASSERT_EQ(got.floats.size(), want.floats.size()) << key;
    for (size_t k = 0; k < got.floats.size(); ++k)
      EXPECT_EQ(got.floats[k], want.element_type == GgufType::kFloat32 ? double(float(want.floats[k])) : want.floats[k]);
  }
  EXPECT_EQ(f.data_offset() % 32, 0u);
  EXPECT_EQ(f.info("w").offset, 0u);
  EXPECT_EQ(f.info("v").offset, 64u);  // 60 bytes padded to 32
  EXPECT_EQ(f.info("w").dims, (std::vector<int64_t>{5, 3}));
  EXPECT_TRUE(at::equal(f.tensor("w"), w));
  EXPECT_TRUE(at::equal(f.tensor("v"), at::arange(7, at::kFloat)));
  EXPECT_EQ(bytes, f.data_offset() + 64 + 32);  // the last tensor padded too, as gguf-py writes it
  anvil::io::remove_tree(dir);
}

TEST(GgufWriter, CustomAlignment) {
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "a.gguf");
  anvil::io::write_gguf(path, {{"general.alignment", anvil::io::gguf_int_value(GgufType::kUint32, 256)}},
                        {{"a", {3}, gt::kF32}, {"b", {2}, gt::kF16}},
                        [&](size_t i) { return anvil::io::quantize_ggml(at::ones({i == 0 ? 3 : 2}), i == 0 ? gt::kF32 : gt::kF16); });
  const anvil::io::GgufFile f(path);
  EXPECT_EQ(f.alignment(), 256u);
  EXPECT_EQ(f.data_offset() % 256, 0u);
  EXPECT_EQ(f.info("b").offset, 256u);
  EXPECT_TRUE(at::equal(f.tensor("b"), at::ones({2})));
  expect_error([&] { anvil::io::write_gguf(path, {{"general.alignment", anvil::io::gguf_int_value(GgufType::kUint32, 48)}}, {}, {}); },
               {"general.alignment", "power of two"});
  anvil::io::remove_tree(dir);
}

TEST(GgufWriter, QuantizedTensorsDequantizeWithinTheirBounds) {
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "q.gguf");
  const at::Tensor x = anvil::test::wide_random({6, 96}, at::kFloat);  // (6, 96): 3 blocks a row
  const std::vector<uint32_t> types = {gt::kF32, gt::kF16, gt::kBF16, gt::kQ8_0, gt::kQ4_0};
  std::vector<anvil::io::GgufTensorSpec> specs;
  for (uint32_t t : types) specs.push_back({anvil::io::ggml_type_name(t), {6, 96}, t});
  anvil::io::write_gguf(path, {}, specs, [&](size_t i) { return anvil::io::quantize_ggml(x, types[i]); });
  const anvil::io::GgufFile f(path);
  EXPECT_TRUE(at::equal(f.tensor("F32"), x));
  EXPECT_TRUE(at::equal(f.tensor("F16"), x.to(at::kHalf).to(at::kFloat)));
  EXPECT_TRUE(at::equal(f.tensor("BF16"), x.to(at::kBFloat16).to(at::kFloat)));
  const at::Tensor blocks = x.reshape({-1, 32});
  const at::Tensor amax = blocks.abs().amax(1, true);
  // Q8_0: d = amax / 127 (fp16-rounded when stored): error <= d/2 from rounding + 127 * |d - fp16(d)|
  // (relative 2^-11, or half of fp16's subnormal step 6e-8 when d is that small).
  const at::Tensor q8 = f.tensor("Q8_0").reshape({-1, 32});
  EXPECT_TRUE(((q8 - blocks).abs() <= amax / 127 * 0.51 + amax * 2e-3 + 127 * 3e-8).all().item<bool>());
  // Q4_0: d = max / -8; levels -8..7 cover [-8d, 7d]; error <= |d|/2 except the clipped top level (|d|).
  const at::Tensor q4 = f.tensor("Q4_0").reshape({-1, 32});
  EXPECT_TRUE(((q4 - blocks).abs() <= amax / 8 * 1.01 + amax * 2e-3 + 8 * 3e-8).all().item<bool>());
  EXPECT_GT((q4 - blocks).abs().max().item<float>(), 0.0f);  // it did quantize
  anvil::io::remove_tree(dir);
}

TEST(GgufWriter, Q4_0KeepsTheSignedMaximumExactly) {
  // The element of largest magnitude maps to level 0 (-8 d = max), exactly representable.
  at::Tensor x = at::randn({32}) * 0.1;
  x[5] = -3.0f;
  const auto b = anvil::io::quantize_ggml(x, gt::kQ4_0);
  EXPECT_EQ(b.size(), 18u);
  EXPECT_EQ((b[2 + 5] & 0x0F), 0);  // element 5 is the low nibble of byte 5
  anvil::io::GgufTensorInfo info{"t", {32}, gt::kQ4_0, 0, 18};
  const at::Tensor y = anvil::io::dequantize_ggml_tensor(info, b.data());
  EXPECT_EQ(y[5].item<float>(), -3.0f);
  // All zeros: d = 0, every nibble 8.
  const auto z = anvil::io::quantize_ggml(at::zeros({32}), gt::kQ4_0);
  for (size_t j = 2; j < z.size(); ++j) EXPECT_EQ(z[j], 0x88);
}

TEST(GgufWriter, BadInputIsAnError) {
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "bad.gguf");
  expect_error([&] { anvil::io::quantize_ggml(at::ones({4, 48}), gt::kQ8_0, "w"); }, {"'w'", "row length 48", "block of 32"});
  expect_error([&] { anvil::io::quantize_ggml(at::ones({256}), gt::kQ2_K); }, {"does not quantize to Q2_K"});
  expect_error([&] { anvil::io::write_gguf(path, {{"k", anvil::io::gguf_string_value("a")}, {"k", anvil::io::gguf_string_value("b")}}, {}, {}); },
               {"'k'", "twice"});
  expect_error([&] { anvil::io::write_gguf(path, {}, {{std::string(64, 'n'), {1}, gt::kF32}}, [](size_t) { return std::vector<uint8_t>(4); }); },
               {"1 to 63 bytes"});
  expect_error([&] { anvil::io::write_gguf(path, {{"x", anvil::io::gguf_int_value(GgufType::kUint8, 256)}}, {}, {}); },
               {"'x'", "256", "UINT8"});
  expect_error([&] { anvil::io::write_gguf(path, {}, {{"t", {2}, gt::kF32}}, [](size_t) { return std::vector<uint8_t>(4); }); },
               {"'t'", "4 bytes", "needs 8"});
  EXPECT_FALSE(anvil::io::path_exists(path));
  EXPECT_TRUE(anvil::io::list_directory(dir).empty());  // no temporary file left behind
  anvil::io::remove_tree(dir);
}

TEST(GgufWriter, AFailingSourceLeavesNoFile) {
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "x.gguf");
  anvil::io::write_text_atomically(path, "old");
  expect_error([&] {
    anvil::io::write_gguf(path, {}, {{"a", {32}, gt::kF32}, {"b", {32}, gt::kF32}}, [](size_t i) -> std::vector<uint8_t> {
      TORCH_CHECK(i == 0, "source failed at tensor ", i);
      return std::vector<uint8_t>(128);
    });
  }, {"source failed at tensor 1"});
  EXPECT_EQ(anvil::io::read_text_file(path), "old");  // untouched
  EXPECT_EQ(anvil::io::list_directory(dir).size(), 1u);
  anvil::io::remove_tree(dir);
}

TEST(GgufExport, NamesAndPermutationInvertTheReader) {
  for (const std::string hf : {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                               "model.layers.0.input_layernorm.weight", "model.layers.11.self_attn.k_proj.weight",
                               "model.layers.3.mlp.down_proj.weight", "model.layers.2.post_attention_layernorm.weight"})
    EXPECT_EQ(anvil::model::gguf_to_hf_name(anvil::model::hf_to_gguf_name(hf)), hf);
  EXPECT_EQ(anvil::model::hf_to_gguf_name("model.layers.3.mlp.up_proj.weight"), "blk.3.ffn_up.weight");
  EXPECT_EQ(anvil::model::hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), "");
  EXPECT_EQ(anvil::model::hf_to_gguf_name("model.layers.0.self_attn.q_proj.bias"), "");
  const at::Tensor w = at::randn({3 * 8, 5});
  const at::Tensor p = anvil::model::gguf_permute_qk(w, 3);
  EXPECT_TRUE(at::equal(anvil::model::gguf_unpermute_qk(p, 3), w));
  EXPECT_TRUE(at::equal(p[1], w[4]));  // head 0: rows (0, 4, 1, 5, 2, 6, 3, 7) of its 8
  EXPECT_TRUE(at::equal(p[8 + 2], w[8 + 1]));
  expect_error([&] { anvil::model::gguf_permute_qk(at::randn({10, 4}), 3); }, {"3 heads"});
  expect_error([&] { anvil::model::gguf_export_file_type("q5_k"); }, {"'q5_k'", "f32, f16, bf16, q8_0, q4_0"});
  EXPECT_EQ(anvil::model::gguf_export_file_type("q4_0"), 2);
  EXPECT_EQ(anvil::model::gguf_export_file_type("bf16"), 32);
}

TEST(GgufWriter, KQuantsDequantizeWithinTheirBounds) {
  // Q4_K / Q5_K / Q6_K (and the Q5_0 / Q5_1 fallbacks) written and read back by anvil: the sizes of ggml's blocks,
  // zero blocks exactly zero, and a per-value error below one step of the super-block's widest sub-block grid
  // (the scale searches may clip an outlier by up to a step). Bytes against ggml: tests/python/test_gguf_kquants.py.
  const std::string dir = temp_dir(), path = anvil::io::join_path(dir, "k.gguf");
  at::Tensor x = at::randn({4, 512}, at::TensorOptions().dtype(at::kFloat)) * 0.1;  // (4, 512): 2 super-blocks a row
  x[0].slice(0, 0, 256).zero_();
  const std::vector<uint32_t> types = {gt::kQ4_K, gt::kQ5_K, gt::kQ6_K, gt::kQ5_0, gt::kQ5_1};
  const std::vector<uint64_t> block_bytes = {144, 176, 210, 22, 24};
  const std::vector<int> levels = {15, 31, 63, 31, 31};
  std::vector<anvil::io::GgufTensorSpec> specs;
  for (uint32_t t : types) specs.push_back({anvil::io::ggml_type_name(t), {4, 512}, t});
  for (size_t i = 0; i < types.size(); ++i)
    EXPECT_EQ(anvil::io::quantize_ggml(x, types[i]).size(), 4 * 512 / anvil::io::ggml_block_layout(types[i]).first * block_bytes[i]);
  anvil::io::write_gguf(path, {}, specs, [&](size_t i) { return anvil::io::quantize_ggml(x, types[i]); });
  const anvil::io::GgufFile f(path);
  const at::Tensor sb = x.reshape({-1, 256});
  const at::Tensor range = sb.amax(1, true) - sb.amin(1, true);  // (8, 1)
  for (size_t i = 0; i < types.size(); ++i) {
    const at::Tensor y = f.tensor(anvil::io::ggml_type_name(types[i])).reshape({-1, 256});
    EXPECT_TRUE(at::equal(y[0], at::zeros({256}))) << i;
    EXPECT_TRUE(((y - sb).abs() <= range / levels[i] * 1.05 + 1e-6).all().item<bool>()) << anvil::io::ggml_type_name(types[i]);
    EXPECT_GT((y - sb).abs().max().item<float>(), 0.0f);
  }
  expect_error([&] { anvil::io::quantize_ggml(at::zeros({2, 128}), gt::kQ4_K); }, {"Q4_K"});
  anvil::io::remove_tree(dir);
}

TEST(GgufExport, LlamaQuantizeTensorTypes) {
  using anvil::model::gguf_tensor_type;
  // use_more_bits for 8 layers: 0, 3, 6, 7 get Q6_K attn_v / ffn_down in the _m mixes.
  for (int64_t layer = 0; layer < 8; ++layer) {
    const bool more = layer == 0 || layer == 3 || layer == 6 || layer == 7;
    const std::string b = "blk." + std::to_string(layer) + ".";
    EXPECT_EQ(gguf_tensor_type("q4_k_m", b + "attn_v.weight", {256, 512}, 8, true), more ? gt::kQ6_K : gt::kQ4_K) << layer;
    EXPECT_EQ(gguf_tensor_type("q5_k_m", b + "ffn_down.weight", {256, 512}, 8, true), more ? gt::kQ6_K : gt::kQ5_K) << layer;
    EXPECT_EQ(gguf_tensor_type("q4_k_m", b + "attn_q.weight", {256, 512}, 8, true), gt::kQ4_K);
    EXPECT_EQ(gguf_tensor_type("q6_k", b + "attn_v.weight", {256, 512}, 8, true), gt::kQ6_K);
  }
  // 70B: the attn_v that are not promoted to Q6_K take Q5_K (layer 20 of 80: not in use_more_bits).
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.20.attn_v.weight", {256, 512}, 80, true, true), gt::kQ5_K);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.20.attn_v.weight", {256, 512}, 80, true, false), gt::kQ4_K);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.1.attn_v.weight", {256, 512}, 80, true, true), gt::kQ6_K);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "output.weight", {1000, 512}, 8, true), gt::kQ6_K);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "token_embd.weight", {1000, 512}, 8, true), gt::kQ4_K);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "token_embd.weight", {1000, 512}, 8, false), gt::kQ6_K);  // tied: the output
  EXPECT_EQ(gguf_tensor_type("q4_0", "output.weight", {1000, 512}, 8, true), gt::kQ6_K);
  EXPECT_EQ(gguf_tensor_type("q4_0", "output.weight", {1000, 192}, 8, true), gt::kQ8_0);
  EXPECT_EQ(gguf_tensor_type("q8_0", "output.weight", {1000, 512}, 8, true), gt::kQ8_0);
  // Rows not a multiple of 256: Q5_0 / Q5_1 / Q8_0, F16 when not of 32 either; norms and 1-D F32.
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.1.attn_q.weight", {192, 192}, 8, true), gt::kQ5_0);
  EXPECT_EQ(gguf_tensor_type("q5_k_m", "blk.1.attn_q.weight", {192, 192}, 8, true), gt::kQ5_1);
  EXPECT_EQ(gguf_tensor_type("q6_k", "blk.1.attn_q.weight", {192, 192}, 8, true), gt::kQ8_0);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.0.ffn_down.weight", {192, 80}, 8, true), gt::kF16);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "output.weight", {1000, 80}, 8, true), gt::kF16);
  EXPECT_EQ(gguf_tensor_type("q4_k_m", "blk.0.attn_norm.weight", {256}, 8, true), gt::kF32);
  EXPECT_EQ(gguf_tensor_type("f16", "blk.0.ffn_down.weight", {192, 80}, 8, true), gt::kF16);
  EXPECT_EQ(anvil::model::gguf_export_file_type("q4_k_m"), 15);
  EXPECT_EQ(anvil::model::gguf_export_file_type("q5_k_m"), 17);
  EXPECT_EQ(anvil::model::gguf_export_file_type("q6_k"), 18);
  expect_error([&] { gguf_tensor_type("q3_k_m", "output.weight", {4, 256}, 8, true); }, {"'q3_k_m'", "q4_k_m"});
}

}  // namespace
