// compressed-tensors format (anvil/model/compressed_tensors.h): config parsing and its errors, target
// matching, required keys, packing bit layout, dequantization arithmetic. The package itself is the
// oracle in tests/python/test_compressed_tensors.py; these tests pin the rules written out by hand.
#include "anvil/model/compressed_tensors.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <random>

namespace ct = anvil::model::ct;
using json = nlohmann::json;

namespace {

json w4a16_config() {
  return json::parse(R"({
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "ignore": ["lm_head", "re:.*mlp\\.gate$"],
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
      "num_bits": 4, "type": "int", "symmetric": true, "group_size": 128, "strategy": "group",
      "dynamic": false, "actorder": null, "observer": "minmax", "observer_kwargs": {}}}},
    "sparsity_config": {}, "version": "0.19.0"})");
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

}  // namespace

TEST(CompressedTensors, ParsesSchemeAndInfersStrategy) {
  const auto c = ct::parse_quantization_config(w4a16_config());
  EXPECT_EQ(c.format, "pack-quantized");
  ASSERT_EQ(c.config_groups.size(), 1u);
  const auto& w = *c.config_groups[0].second.weights;
  EXPECT_EQ(w.num_bits, 4);
  EXPECT_EQ(w.strategy, ct::Strategy::kGroup);
  EXPECT_EQ(*w.group_size, 128);
  EXPECT_TRUE(c.extra.contains("sparsity_config"));

  // No strategy: group_size -1 means channel, none means tensor.
  auto a = ct::parse_quant_args(json{{"num_bits", 8}, {"group_size", -1}});
  EXPECT_EQ(a.strategy, ct::Strategy::kChannel);
  EXPECT_EQ(ct::parse_quant_args(json{{"num_bits", 8}}).strategy, ct::Strategy::kTensor);
  EXPECT_EQ(ct::parse_quant_args(json{{"type", "FLOAT"}, {"block_structure", "128x64"}, {"strategy", "block"}}).block_structure,
            (std::vector<int64_t>{128, 64}));
}

TEST(CompressedTensors, PresetGroupsExpand) {
  auto j = json::parse(R"({"format": "int-quantized", "config_groups": {"W8A8": ["Linear"]}})");
  const auto c = ct::parse_quantization_config(j);
  const auto& s = c.config_groups[0].second;
  ASSERT_TRUE(s.weights && s.input_activations);
  EXPECT_EQ(s.weights->strategy, ct::Strategy::kChannel);
  EXPECT_EQ(s.input_activations->strategy, ct::Strategy::kToken);
  EXPECT_TRUE(s.input_activations->dynamic);
  const auto asym = ct::preset_scheme("w4a16_asym", {"Linear"});
  EXPECT_FALSE(asym.weights->symmetric);
  EXPECT_EQ(ct::to_json(*asym.weights)["zp_dtype"], "torch.int8");
  EXPECT_NE(error_of([] { ct::preset_scheme("NVFP4", {"Linear"}); }).find("'NVFP4'"), std::string::npos);
}

TEST(CompressedTensors, ErrorsNameTheKey) {
  auto bad = [](const std::function<void(json&)>& edit) {
    json j = w4a16_config();
    edit(j);
    return error_of([&] { ct::parse_quantization_config(j); });
  };
  const std::string w = "quantization_config.config_groups.group_0.weights";
  EXPECT_NE(bad([](json& j) { j["config_groups"]["group_0"]["weights"]["num_bits"] = "4"; }).find(w + ".num_bits"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["config_groups"]["group_0"]["weights"]["strategy"] = "row"; }).find(w + ".strategy"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["config_groups"]["group_0"]["weights"]["bits"] = 4; }).find(w + ".bits: unknown key"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["config_groups"]["group_0"]["weights"].erase("group_size"); }).find(w + ".group_size"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["config_groups"]["group_0"].erase("targets"); }).find("group_0.targets: missing"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["quant_method"] = "gptq"; }).find("quantization_config.quant_method"), std::string::npos);
  EXPECT_NE(bad([](json& j) { j.erase("config_groups"); }).find("quantization_config.config_groups: missing"),
            std::string::npos);
  EXPECT_NE(bad([](json& j) { j["quantization_status"] = "done"; }).find("quantization_config.quantization_status"),
            std::string::npos);
  // token activations must be dynamic
  EXPECT_NE(bad([](json& j) {
              j["config_groups"]["group_0"]["input_activations"] = {{"num_bits", 8}, {"strategy", "token"}};
            }).find("input_activations.strategy: token quantization must be dynamic"),
            std::string::npos);
}

TEST(CompressedTensors, ToJsonRoundTripsAndWritesEveryField) {
  const auto c = ct::parse_quantization_config(w4a16_config());
  const json out = ct::to_json(c);
  EXPECT_EQ(out["quant_method"], "compressed-tensors");
  EXPECT_EQ(out["version"], "0.19.0");
  const json& w = out["config_groups"]["group_0"]["weights"];
  for (const char* k : {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic", "actorder",
                        "scale_dtype", "zp_dtype", "observer", "observer_kwargs"})
    EXPECT_TRUE(w.contains(k)) << k;
  EXPECT_TRUE(w["zp_dtype"].is_null());  // symmetric
  EXPECT_TRUE(out["kv_cache_scheme"].is_null());
  const auto again = ct::parse_quantization_config(out);
  EXPECT_EQ(ct::to_json(again), out);
}

TEST(CompressedTensors, TargetsMatchAsCompressedTensors) {
  const auto c = ct::parse_quantization_config(w4a16_config());
  const std::vector<std::string> linear = {"Linear"};
  EXPECT_TRUE(ct::scheme_for(c, "model.layers.0.self_attn.q_proj", linear));
  EXPECT_FALSE(ct::scheme_for(c, "lm_head", linear));                      // ignored by name
  EXPECT_FALSE(ct::scheme_for(c, "model.layers.1.mlp.gate", linear));     // ignored by regex
  EXPECT_TRUE(ct::scheme_for(c, "model.layers.1.mlp.gate_proj", linear));  // the regex ends in $
  EXPECT_FALSE(ct::scheme_for(c, "model.embed_tokens", {"Embedding"}));   // not a Linear
  // re: anchors at the start (re.match), not at the end.
  EXPECT_TRUE(ct::matches("model.layers.0.mlp.down_proj", {}, "re:model\\.layers\\.0\\."));
  EXPECT_FALSE(ct::matches("model.layers.0.mlp.down_proj", {}, "re:layers\\.0"));
  EXPECT_TRUE(ct::matches("model.layers.0.mlp.down_proj", {}, "re:.*layers\\.0"));
  // The most specific group wins: exact name over regex over class.
  json j = w4a16_config();
  j["config_groups"]["group_1"] = {{"targets", {"re:.*down_proj"}}, {"weights", {{"num_bits", 8}, {"strategy", "channel"}}}};
  j["config_groups"]["group_2"] = {{"targets", {"model.layers.0.mlp.down_proj"}},
                                   {"weights", {{"num_bits", 8}, {"strategy", "tensor"}}}};
  const auto c2 = ct::parse_quantization_config(j);
  EXPECT_EQ(ct::scheme_for(c2, "model.layers.0.mlp.down_proj", linear)->first, "group_2");
  EXPECT_EQ(ct::scheme_for(c2, "model.layers.1.mlp.down_proj", linear)->first, "group_1");
  EXPECT_EQ(ct::scheme_for(c2, "model.layers.1.mlp.up_proj", linear)->first, "group_0");
  EXPECT_NE(error_of([] { ct::matches("x", {}, "re:(unclosed"); }).find("re:(unclosed"), std::string::npos);
}

TEST(CompressedTensors, RequiredKeysPerFormat) {
  using V = std::vector<std::string>;
  const auto w4 = ct::preset_scheme("W4A16", {"Linear"});
  EXPECT_EQ(ct::required_keys("", w4, "pack-quantized"), (V{"weight_packed", "weight_scale", "weight_shape"}));
  const auto asym = ct::preset_scheme("W4A16_ASYM", {"Linear"});
  EXPECT_EQ(ct::required_keys("m", asym, "pack-quantized"), (V{"m.weight_packed", "m.weight_scale", "m.weight_shape",
                                                               "m.weight_zero_point"}));
  EXPECT_EQ(ct::required_keys("", ct::preset_scheme("FP8", {"Linear"}), "float-quantized"),
            (V{"weight", "weight_scale", "input_scale"}));
  EXPECT_EQ(ct::required_keys("", ct::preset_scheme("FP8_DYNAMIC", {"Linear"}), "float-quantized"), (V{"weight", "weight_scale"}));
  auto static_asym = ct::preset_scheme("W8A8", {"Linear"});
  static_asym.input_activations->dynamic = false;
  static_asym.input_activations->strategy = ct::Strategy::kTensor;
  static_asym.input_activations->symmetric = false;
  EXPECT_EQ(ct::required_keys("", static_asym, "int-quantized"), (V{"weight", "weight_scale", "input_scale", "input_zero_point"}));
  EXPECT_EQ(ct::required_keys("", w4, "dense"), (V{"weight"}));

  const auto c = ct::parse_quantization_config(w4a16_config());
  const std::vector<ct::ModuleRef> mods = {{"a.q_proj", {"Linear"}}, {"lm_head", {"Linear"}}};
  EXPECT_EQ(ct::check_complete({"a.q_proj.weight_packed", "a.q_proj.weight_shape", "lm_head.weight"}, c, mods),
            (V{"a.q_proj.weight_scale"}));
  EXPECT_TRUE(ct::check_complete({"a.q_proj.weight_packed", "a.q_proj.weight_shape", "a.q_proj.weight_scale"}, c, mods).empty());
}

TEST(CompressedTensors, PackingBitLayout) {
  // Element i of a row sits at bits [i*b, (i+1)*b) of the row's bit string, offset by 2^(b-1).
  std::mt19937 rng(1234);
  for (int64_t bits : {1, 2, 3, 4, 5, 6, 7, 8}) {
    for (int64_t cols : {1, 7, 31, 32, 33, 100}) {
      const int64_t rows = 3, off = int64_t{1} << (bits - 1);
      at::Tensor v = at::empty({rows, cols}, at::kChar);
      std::uniform_int_distribution<int> d(static_cast<int>(-off), static_cast<int>(off - 1));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) v[r][c] = d(rng);
      const at::Tensor p = ct::pack_int32(v, bits);
      ASSERT_EQ(p.size(1), (cols * bits + 31) / 32) << bits << " " << cols;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          uint64_t got = 0;
          for (int64_t k = 0; k < bits; ++k) {
            const int64_t bit = c * bits + k;
            const auto word = static_cast<uint32_t>(p[r][bit / 32].item<int32_t>());
            got |= static_cast<uint64_t>((word >> (bit % 32)) & 1u) << k;
          }
          ASSERT_EQ(static_cast<int64_t>(got), v[r][c].item<int64_t>() + off) << bits << " " << cols << " " << c;
        }
      }
      EXPECT_TRUE(at::equal(ct::unpack_int32(p, bits, {rows, cols}), v));
      // Along dim 0 = the transpose packed along dim 1.
      const at::Tensor p0 = ct::pack_int32(v, bits, 0);
      EXPECT_TRUE(at::equal(p0, ct::pack_int32(v.t().contiguous(), bits).t()));
      EXPECT_TRUE(at::equal(ct::unpack_int32(p0, bits, {rows, cols}, 0), v));
    }
  }
}

TEST(CompressedTensors, PackingRefusesBadInput) {
  EXPECT_NE(error_of([] { ct::pack_int32(at::full({2, 4}, 8, at::kChar), 4); }).find("[-8, 7]"), std::string::npos);
  EXPECT_NE(error_of([] { ct::pack_int32(at::zeros({2, 4}, at::kInt), 4); }).find("int8"), std::string::npos);
  EXPECT_NE(error_of([] { ct::unpack_int32(at::zeros({2, 3}, at::kInt), 4, {2, 32}); }).find("got [2, 3]"),
            std::string::npos);
}

TEST(CompressedTensors, DequantizesByTheFormula) {
  at::manual_seed(7);
  const int64_t out = 5, in = 256;
  // int4 asymmetric groups of 128, packed; zero points packed along dim 0.
  auto s = ct::preset_scheme("W4A16_ASYM", {"Linear"});
  at::Tensor q = at::randint(-8, 8, {out, in}, at::kChar);
  at::Tensor zp = at::randint(-8, 8, {out, 2}, at::kChar);
  at::Tensor scale = at::rand({out, 2}, at::kBFloat16) + 0.01;
  ct::ModuleTensors t = {{"weight_packed", ct::pack_int32(q, 4)},
                         {"weight_shape", at::tensor(std::vector<int64_t>{out, in})},
                         {"weight_scale", scale},
                         {"weight_zero_point", ct::pack_int32(zp, 4, 0)}};
  // In the scale's dtype (bf16: the product rounded to bf16, as the package) and in fp32 (exact).
  const at::Tensor wb = ct::dequantize_module(t, s, "pack-quantized", std::nullopt, "m");
  const at::Tensor w = ct::dequantize_module(t, s, "pack-quantized", at::kFloat, "m");
  EXPECT_EQ(wb.scalar_type(), at::kBFloat16);
  EXPECT_EQ(w.scalar_type(), at::kFloat);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c : {0, 1, 127, 128, 255}) {
      const float exact =
          static_cast<float>(q[r][c].item<int>() - zp[r][c / 128].item<int>()) * scale[r][c / 128].item<float>();
      ASSERT_EQ(w[r][c].item<float>(), exact) << r << " " << c;
      ASSERT_EQ(wb[r][c].item<float>(), static_cast<float>(c10::BFloat16(exact))) << r << " " << c;
    }
  // fp8 blocks: each 128x128 block (partial at the edges) times its scale.
  auto fb = ct::preset_scheme("FP8_BLOCK", {"Linear"});
  at::Tensor wq = (at::randn({130, 200}) * 50).to(at::kFloat8_e4m3fn);
  at::Tensor bs = at::rand({2, 2}) + 0.5;
  const at::Tensor wd = ct::dequantize_module({{"weight", wq}, {"weight_scale", bs}}, fb, "float-quantized", std::nullopt);
  EXPECT_EQ(wd.scalar_type(), at::kFloat);  // the scale's dtype
  EXPECT_EQ(wd[129][199].item<float>(), wq[129][199].to(at::kFloat).item<float>() * bs[1][1].item<float>());
  EXPECT_EQ(wd[3][130].item<float>(), wq[3][130].to(at::kFloat).item<float>() * bs[0][1].item<float>());
  // legacy act-order: column c uses group g_idx[c].
  auto w4 = ct::preset_scheme("W4A16", {"Linear"});
  w4.weights->actorder = "group";
  at::Tensor g = at::randint(0, 2, {in}, at::kInt);
  at::Tensor sc = at::rand({out, 2}) + 0.1;
  const at::Tensor wg = ct::dequantize_module(
      {{"weight_packed", ct::pack_int32(q, 4)}, {"weight_shape", at::tensor(std::vector<int64_t>{out, in})},
       {"weight_scale", sc}, {"weight_g_idx", g}},
      w4, "pack-quantized", std::nullopt);
  for (int64_t c : {0, 5, 200}) EXPECT_EQ(wg[2][c].item<float>(), q[2][c].item<float>() * sc[2][g[c].item<int64_t>()].item<float>());
}

TEST(CompressedTensors, DamagedModulesNameTheTensor) {
  const auto s = ct::preset_scheme("W8A8", {"Linear"});
  at::Tensor q = at::randint(-128, 128, {4, 8}, at::kChar);
  auto err = [&](ct::ModuleTensors t) { return error_of([&] { ct::dequantize_module(t, s, "int-quantized", at::kFloat, "l.q_proj"); }); };
  EXPECT_NE(err({{"weight", q}}).find("'l.q_proj.weight_scale' is missing"), std::string::npos);
  EXPECT_NE(err({{"weight", q}, {"weight_scale", at::ones({4, 2})}}).find("'l.q_proj.weight_scale' must have shape [4, 1]"),
            std::string::npos);
  EXPECT_NE(err({{"weight", q.to(at::kFloat)}, {"weight_scale", at::ones({4, 1})}}).find("'l.q_proj.weight' must be Char"),
            std::string::npos);
  const auto w4 = ct::preset_scheme("W4A16", {"Linear"});
  const std::string e = error_of([&] {
    ct::dequantize_module({{"weight_packed", at::zeros({4, 3}, at::kInt)},
                           {"weight_shape", at::tensor(std::vector<int64_t>{4, 128})},
                           {"weight_scale", at::ones({4, 1})}},
                          w4, "pack-quantized", at::kFloat, "l.up");
  });
  EXPECT_NE(e.find("'l.up.weight_packed'"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { ct::dequantize_module({{"weight", q}}, s, "sparse-bitmask", at::kFloat, "l"); }).find("sparse-bitmask"),
            std::string::npos);
}

TEST(CompressedTensors, CompressInvertsDequantize) {
  at::manual_seed(11);
  for (const char* preset : {"W4A16", "W4A16_ASYM", "W8A16", "W8A8", "FP8_DYNAMIC", "FP8", "FP8_BLOCK"}) {
    const auto s = ct::preset_scheme(preset, {"Linear"});
    const auto& a = *s.weights;
    const std::string format = a.type == ct::QuantType::kFloat ? "float-quantized"
                               : a.num_bits < 8 || a.strategy == ct::Strategy::kGroup ? "pack-quantized"
                                                                                      : "int-quantized";
    const at::Tensor w = at::randn({192, 256});
    const auto shape = ct::weight_scale_shape(a, 192, 256);
    const at::Tensor scale = at::rand(shape) * 0.02 + 0.01;
    at::Tensor zp;
    if (!a.symmetric) zp = at::randint(-8, 8, shape, at::kChar);
    const auto t = ct::compress_module(w, scale, zp, s, format, "m");
    const at::Tensor back = ct::dequantize_module(t, s, format, at::kFloat, "m");
    // Dequantizing what was compressed, then compressing that again, changes nothing.
    const auto t2 = ct::compress_module(back, scale, zp, s, format, "m");
    for (const auto& [k, v] : t) EXPECT_TRUE(at::equal(v.to(at::kFloat), t2.at(k).to(at::kFloat))) << preset << " " << k;
  }
}

// Found while writing fuzz_quantized_checkpoint (a checkpoint's weight_shape and a config's block_structure are
// outside bytes): the packed width cols * num_bits was formed in int64, so weight_shape [1, 2^61 + 1] at 8 bits
// wrapped it to 8 bits = one word, which a (1, 1) weight_packed matched, and the reader went on to allocate 2^61
// bytes (and would have read past the word); ceil(out / r) was (out + r - 1) / r, which overflows for r near 2^63;
// a block_structure of 2^40 rows expanded a (1, 1) scale to 2^40 rows before narrowing it.
TEST(CompressedTensors, HostileShapesAreRefusedOrTakenWithoutTheirSize) {
  const int64_t huge = (int64_t{1} << 61) + 1;
  const std::string e = error_of([&] { ct::unpack_int32(at::zeros({1, 1}, at::kInt), 8, {1, huge}); });
  EXPECT_NE(e.find("packed at 8 bits along dim 1 is [1, " + std::to_string(huge / 32 * 8 + 1) + "] int32, got [1, 1]"),
            std::string::npos)
      << e;
  const std::string d = error_of([&] {
    ct::dequantize_module({{"weight_packed", at::zeros({1, 1}, at::kInt)},
                           {"weight_shape", at::tensor(std::vector<int64_t>{1, huge})},
                           {"weight_scale", at::ones({1, 1})}},
                          ct::preset_scheme("W8A16", {"Linear"}), "pack-quantized", at::kFloat, "l.down");
  });
  EXPECT_NE(d.find("'l.down.weight_packed'"), std::string::npos) << d;
  EXPECT_NE(d.find("got [1, 1]"), std::string::npos) << d;
  EXPECT_NE(error_of([] { ct::unpack_int32(at::zeros({1, 1}, at::kInt), 8, {-1, 4}); }).find("must not be negative"),
            std::string::npos);
  // Blocks far larger than the weight: one block covers it, (2, 3) * the one scale.
  at::Tensor q = (at::randn({2, 3}) * 20).to(at::kFloat8_e4m3fn);
  at::Tensor scale = at::full({1, 1}, 0.25);
  for (const int64_t r : {int64_t{1} << 40, std::numeric_limits<int64_t>::max()}) {
    const auto s = ct::parse_scheme(json{{"targets", {"Linear"}},
                                         {"weights", {{"num_bits", 8}, {"type", "float"}, {"strategy", "block"},
                                                      {"block_structure", {r, r}}, {"symmetric", true}}}});
    EXPECT_EQ(ct::weight_scale_shape(*s.weights, 2, 3), (std::vector<int64_t>{1, 1}));
    const at::Tensor w = ct::dequantize_module({{"weight", q}, {"weight_scale", scale}}, s, "float-quantized", at::kFloat, "l");
    EXPECT_TRUE(at::equal(w, q.to(at::kFloat) * 0.25)) << r;
  }
}
