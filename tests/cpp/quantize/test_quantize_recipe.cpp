// anvil quantize's machinery: the config's errors, the scheme table, the compressed-tensors
// configs parsed back by model::ct and their key checks, RTN's refusal of NaN, ignore patterns, and the core's
// one-layer API (model::load_decoder_layer + decoder_layer_inputs) against the whole model's forward, dense and
// MoE. The exports against transformers and compressed-tensors: tests/python/test_quantize_recipe.py.
#include "anvil/model/transformer.h"
#include "quantize/calibrate.h"
#include "quantize/export.h"
#include "quantize/recipe.h"
#include "quantize/schemes.h"
#include "anvil/model/compressed_tensors.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <stdexcept>
#include <string>

namespace anvil::quantize {
namespace {

using nlohmann::json;

std::string error_of(const json& user) {
  try {
    resolve_config(user);
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

json base_config() { return {{"model", {{"path", "m"}}}, {"output", {{"dir", "o"}}}}; }

TEST(QuantizeConfig, ErrorsNameTheKey) {
  EXPECT_EQ(error_of(base_config()), "");
  auto c = base_config();
  c["quantize"]["scheme"] = "int3";
  EXPECT_NE(error_of(c).find("config key quantize.scheme: must be one of \"fp8-block\""), std::string::npos);
  c = base_config();
  c["quantize"]["scheme"] = "gptq-int4";
  EXPECT_NE(error_of(c).find("config key data.calib: is required for gptq-int4"), std::string::npos);
  c = base_config();
  c["quantize"]["group_size"] = 12;
  EXPECT_NE(error_of(c).find("quantize.group_size"), std::string::npos);
  c = base_config();
  c["output"]["format"] = "fp8";
  EXPECT_NE(error_of(c).find("output.format"), std::string::npos);
  c = base_config();
  c["quantize"]["ignore"] = {"re:("};
  EXPECT_NE(error_of(c).find("quantize.ignore"), std::string::npos);
  c = base_config();
  c["model"].erase("path");
  EXPECT_NE(error_of(c).find("model.path"), std::string::npos);
  c = base_config();
  c["train"] = {{"lr", 1}};
  EXPECT_NE(error_of(c).find("train"), std::string::npos);
}

TEST(QuantizeSchemes, MisfitsAreNamed) {
  EXPECT_EQ(shape_misfit(find_scheme("fp8-block"), 200, 256, 128), "");  // partial row blocks are fine
  EXPECT_NE(shape_misfit(find_scheme("fp8-block"), 256, 192, 128).find("not a multiple of 128"), std::string::npos);
  EXPECT_NE(shape_misfit(find_scheme("int4-weight"), 8, 192, 128).find("quantize.group_size"), std::string::npos);
  EXPECT_EQ(shape_misfit(find_scheme("fp8-channel"), 7, 13, 128), "");
}

TEST(QuantizeExport, ConfigsParseAsCompressedTensorsAndNameTheirKeys) {
  // Every compressed-tensors scheme's quantization_config parses with model::ct (compressed-tensors' rules) back to
  // the scheme it was made of; FineGrainedFP8 has its keys.
  for (const auto& s : schemes()) {
    if (s.format == "gguf") continue;  // GGUF files have no quantization_config (quantize/gguf.h)
    const std::string format = export_format("compressed-tensors", s);
    const auto j = quantization_config(format, s, {"lm_head", "re:.*gate$"}, 64, s.algorithm == "gptq");
    const auto c = model::ct::parse_quantization_config(j);
    ASSERT_EQ(c.config_groups.size(), 1u) << s.name;
    const auto& g = c.config_groups[0].second;
    EXPECT_EQ(model::ct::effective_format(c, g), ct_format(s)) << s.name;
    EXPECT_EQ(g.weights->num_bits, weight_bits(s)) << s.name;
    EXPECT_EQ(g.input_activations.has_value(), !s.activations.empty()) << s.name;
    EXPECT_EQ(c.ignore, (std::vector<std::string>{"lm_head", "re:.*gate$"}));
    const auto keys = required_keys(format, s, "model.layers.0.mlp.up_proj", 64);
    EXPECT_EQ(keys.front().rfind("model.layers.0.mlp.up_proj.weight", 0), 0u) << s.name;
    try {
      check_module_keys(format, s, "m", 64, {{"m.weight", at::ones({2, 2})}});
      ADD_FAILURE() << s.name << ": an incomplete module passed";
    } catch (const std::runtime_error& e) {
      EXPECT_NE(std::string(e.what()).find("m.weight_scale"), std::string::npos) << e.what();
    }
  }
  const auto fp8 = quantization_config("fp8", find_scheme("fp8-block"), {"lm_head"}, 128, false);
  EXPECT_EQ(fp8.at("quant_method"), "fp8");
  EXPECT_EQ(fp8.at("weight_block_size"), json({128, 128}));
  EXPECT_EQ(required_keys("fp8", find_scheme("fp8-block"), "x", 128),
            (std::vector<std::string>{"x.weight", "x.weight_scale_inv"}));
}

TEST(QuantizeSchemes, RtnNaNIsRefused) {
  auto w = at::randn({6, 64});
  auto q = quantize_rtn(find_scheme("fp8-channel"), w);
  EXPECT_EQ(q.scale.sizes(), (at::IntArrayRef{6, 1}));
  EXPECT_LE((q.dequantize(at::kFloat) - w).abs().max().item<double>(), w.abs().max().item<double>() / 16);
  auto bad = w.clone();
  bad[2][5] = NAN;
  EXPECT_THROW(quantize_rtn(find_scheme("int8-weight"), bad), std::runtime_error);
}

TEST(QuantizeCalibrate, IgnorePatterns) {
  const std::vector<std::string> p = {"lm_head", "mlp.down_proj", "re:.*layers\\.1\\..*q_proj"};
  EXPECT_TRUE(is_ignored("lm_head", p));
  EXPECT_TRUE(is_ignored("model.layers.3.mlp.down_proj", p));
  EXPECT_FALSE(is_ignored("model.layers.3.mlp.xdown_proj", p));
  EXPECT_TRUE(is_ignored("model.layers.1.self_attn.q_proj", p));
  EXPECT_FALSE(is_ignored("model.layers.11.self_attn.q_proj", p));
}

// The whole model's logits equal embed -> each layer built alone -> norm -> lm_head.
void expect_layers_rebuild_the_model(const std::string& config_file) {
  const auto config = model::load_model_config(std::string(ANVIL_MODEL_TEST_CONFIGS) + "/" + config_file);
  auto lm = std::make_shared<model::CausalLM>(config, at::TensorOptions().dtype(at::kFloat));
  at::NoGradGuard no_grad;
  for (auto& p : lm->parameters(true)) p.normal_(0, 0.1);
  lm->eval();
  std::unordered_map<std::string, at::Tensor> state;
  for (auto& [name, t] : lm->state_tensors()) state[name] = t;
  const auto ids = at::randint(0, config.vocab_size, {2, 9}, at::kLong);
  const auto want = lm->forward(ids);
  auto h = at::embedding(state.at("model.embed_tokens.weight"), ids);
  const auto positions = at::arange(9, at::kLong).unsqueeze(0).expand({2, 9});
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    auto layer = model::load_decoder_layer(lm->config(), i, state, at::TensorOptions().dtype(at::kFloat));
    const auto in = model::decoder_layer_inputs(lm->config(), i, positions, at::kFloat);
    h = layer->forward(h, in.cos, in.sin, in.mask, nullptr);
  }
  auto norm = state.at("model.norm.weight");
  auto hf = h.to(at::kFloat);
  hf = hf * at::rsqrt(hf.pow(2).mean(-1, true) + config.rms_norm_eps) * norm;
  const auto head = config.tie_word_embeddings ? state.at("model.embed_tokens.weight") : state.at("lm_head.weight");
  const auto got = at::linear(hf, head);
  EXPECT_LE((got - want).abs().max().item<double>(), 1e-4 * want.abs().max().item<double>()) << config_file;
  state.erase("model.layers.0.self_attn.q_proj.weight");
  try {
    model::load_decoder_layer(lm->config(), 0, state, at::TensorOptions().dtype(at::kFloat));
    ADD_FAILURE() << "a missing tensor loaded";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj.weight"), std::string::npos);
  }
}

TEST(QuantizeCalibrate, OneLayerAtATimeIsTheModel) {
  expect_layers_rebuild_the_model("tiny_llama3_v5.json");
  expect_layers_rebuild_the_model("tiny_mixtral_v5.json");
  expect_layers_rebuild_the_model("tiny_qwen2_moe_v5.json");  // shared expert + gate, dense and sliding layers
  expect_layers_rebuild_the_model("tiny_qwen3_moe_v5.json");
}

}  // namespace
}  // namespace anvil::quantize
