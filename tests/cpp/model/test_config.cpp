// config.json -> ModelConfig: published configs as transformers 4.x wrote them (tests/data/configs/,
// copied from the Hugging Face repositories), configs written by transformers 5.17's
// save_pretrained (tiny_*_v5.json), the two spellings agreeing, and every kind of bad input failing
// with a message that names the key and the rule.
#include "anvil/model/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace anvil::model {
namespace {

std::string fixture(const std::string& name) { return std::string(ANVIL_MODEL_TEST_CONFIGS) + "/" + name; }

ModelConfig load(const std::string& name) { return load_model_config(fixture(name)); }

std::string read(const std::string& name) {
  std::ifstream in(fixture(name));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Replaces the first occurrence of `from` in `text` (which must contain it).
std::string edit(std::string text, const std::string& from, const std::string& to) {
  const auto pos = text.find(from);
  EXPECT_NE(pos, std::string::npos) << "fixture lacks '" << from << "'";
  if (pos != std::string::npos) text.replace(pos, from.size(), to);
  return text;
}

void expect_error(const std::string& json, const std::vector<std::string>& words) {
  try {
    parse_model_config(json, "test/config.json");
    ADD_FAILURE() << "expected an error mentioning '" << words.front() << "'";
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "message lacks '" << w << "': " << msg;
  }
}

double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

TEST(ModelConfig, Llama31PublishedV4) {
  auto c = load("llama3_1_8b.json");
  EXPECT_EQ(c.family, ModelFamily::kLlama);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.rope.dim, 128);
  EXPECT_FALSE(c.rope.interleave);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{128001});
  EXPECT_DOUBLE_EQ(c.attention_scale, 1.0 / std::sqrt(128.0));
  EXPECT_EQ(c.num_experts, 0);
}

TEST(ModelConfig, Qwen25HasQkvBiasAndNoWindowWhenUnused) {
  auto c = load("qwen2_5_7b_instruct.json");
  EXPECT_EQ(c.family, ModelFamily::kQwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.sliding_window, 0);  // use_sliding_window false
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.head_dim, 128);
  // With use_sliding_window, layers from max_window_layers on use the window.
  auto w = parse_model_config(edit(read("qwen2_5_7b_instruct.json"), "\"use_sliding_window\": false", "\"use_sliding_window\": true"));
  EXPECT_EQ(w.sliding_window, 131072);
  EXPECT_FALSE(w.layer_sliding[27]);
}

TEST(ModelConfig, Qwen3HasQkNormAndExplicitHeadDim) {
  auto c = load("qwen3_8b.json");
  EXPECT_EQ(c.family, ModelFamily::kQwen3);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope.type, "default");  // rope_scaling null
  EXPECT_EQ(c.sliding_window, 0);
}

TEST(ModelConfig, MistralSlidingWindowOnEveryLayer) {
  auto c = load("mistral_7b_v0_1.json");
  EXPECT_EQ(c.family, ModelFamily::kMistral);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.layer_sliding, std::vector<bool>(32, true));
}

TEST(ModelConfig, MixtralPublishedV4) {
  auto c = load("mixtral_8x7b_v0_1.json");
  EXPECT_EQ(c.family, ModelFamily::kMixtral);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 14336);
  EXPECT_EQ(c.router_score, "softmax");
  EXPECT_TRUE(c.renormalize);
  EXPECT_FALSE(c.router_fp32);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_TRUE(c.is_moe_layer(0));
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
}

TEST(ModelConfig, Qwen2MoeWrittenByTransformers5) {
  auto c = load("tiny_qwen2_moe_v5.json");
  EXPECT_EQ(c.family, ModelFamily::kQwen2Moe);
  EXPECT_EQ(c.architecture, "Qwen2MoeForCausalLM");
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.moe_intermediate_size, 16);
  EXPECT_EQ(c.intermediate_size, 48);  // the dense layers' width, not the experts'
  EXPECT_EQ(c.shared_expert_intermediate_size, 24);
  EXPECT_EQ(c.n_shared_experts, 0);
  EXPECT_EQ(c.router_score, "softmax");
  EXPECT_TRUE(c.renormalize);  // norm_topk_prob true
  EXPECT_FALSE(c.router_fp32);
  EXPECT_EQ(c.n_group, 1);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.head_dim, 8);
  // decoder_sparse_step 2: layers 1 and 3 would be MoE; mlp_only_layers [3] makes 3 dense.
  EXPECT_EQ(c.decoder_sparse_step, 2);
  EXPECT_EQ(c.mlp_only_layers, std::vector<int64_t>{3});
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.is_moe_layer(2));
  EXPECT_FALSE(c.is_moe_layer(3));
  EXPECT_EQ(c.sliding_window, 16);
  EXPECT_EQ(c.layer_sliding, (std::vector<bool>{true, false, true, false}));  // layer_types as written
  // Without layer_types (4.x configs): Qwen2MoeConfig's rule, the even layers below max_window_layers (3).
  auto no_types = parse_model_config(edit(read("tiny_qwen2_moe_v5.json"), "\"layer_types\"", "\"unused_layer_types\""));
  EXPECT_EQ(no_types.layer_sliding, (std::vector<bool>{true, false, true, false}));
  auto fewer = parse_model_config(edit(edit(read("tiny_qwen2_moe_v5.json"), "\"layer_types\"", "\"unused_layer_types\""),
                                       "\"max_window_layers\": 3", "\"max_window_layers\": 1"));
  EXPECT_EQ(fewer.layer_sliding, (std::vector<bool>{true, false, false, false}));
  auto no_window = parse_model_config(edit(read("tiny_qwen2_moe_v5.json"), "\"use_sliding_window\": true", "\"use_sliding_window\": false"));
  EXPECT_EQ(no_window.sliding_window, 0);
  // qkv_bias false; defaults of Qwen2MoeConfig for absent keys (num_experts 60, top-4, no renormalisation).
  auto defaults = parse_model_config(R"({"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 64, "hidden_size": 64,
      "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 16, "qkv_bias": false})");
  EXPECT_FALSE(defaults.qkv_bias);
  EXPECT_EQ(defaults.num_experts, 60);
  EXPECT_EQ(defaults.num_experts_per_tok, 4);
  EXPECT_EQ(defaults.moe_intermediate_size, 1408);
  EXPECT_EQ(defaults.shared_expert_intermediate_size, 5632);
  EXPECT_FALSE(defaults.renormalize);
  EXPECT_EQ(defaults.num_key_value_heads, 16);
  EXPECT_TRUE(defaults.is_moe_layer(0) && defaults.is_moe_layer(1));
}

TEST(ModelConfig, Qwen3MoeWrittenByTransformers5) {
  auto c = load("tiny_qwen3_moe_v5.json");
  EXPECT_EQ(c.family, ModelFamily::kQwen3Moe);
  EXPECT_TRUE(c.qk_norm);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.o_bias);
  EXPECT_EQ(c.num_experts, 4);  // written as num_local_experts
  EXPECT_EQ(c.head_dim, 12);    // explicit, unlike hidden / heads = 8
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_FALSE(c.renormalize);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_TRUE(c.is_moe_layer(0) && c.is_moe_layer(1));
  // Published configs say num_experts; without head_dim it is hidden / heads (Qwen3MoeConfig has none).
  auto published = parse_model_config(edit(edit(read("tiny_qwen3_moe_v5.json"), "\"num_local_experts\"", "\"num_experts\""),
                                           "\"head_dim\": 12,", ""));
  EXPECT_EQ(published.num_experts, 4);
  EXPECT_EQ(published.head_dim, 8);
  // attention_bias: every projection, o_proj included; the window on every layer.
  auto biased = parse_model_config(edit(edit(read("tiny_qwen3_moe_v5.json"), "\"attention_bias\": false", "\"attention_bias\": true"),
                                        "\"use_sliding_window\": false", "\"use_sliding_window\": true"));
  EXPECT_TRUE(biased.qkv_bias && biased.o_bias);
  EXPECT_EQ(biased.sliding_window, 4096);  // sliding_window null: the class default
  EXPECT_EQ(biased.layer_sliding, (std::vector<bool>{true, true}));
}

TEST(ModelConfig, QwenMoeErrorsNameTheKey) {
  const std::string q2 = read("tiny_qwen2_moe_v5.json");
  expect_error(edit(q2, "\"decoder_sparse_step\": 2", "\"decoder_sparse_step\": 0"), {"'decoder_sparse_step'", ">= 1", "got 0"});
  expect_error(edit(q2, "\"decoder_sparse_step\": 2", "\"decoder_sparse_step\": 1.5"), {"'decoder_sparse_step'", "integer"});
  expect_error(edit(q2, "\"mlp_only_layers\": [\n    3\n  ]", "\"mlp_only_layers\": [4]"),
               {"'mlp_only_layers'", "layer 4", "num_hidden_layers = 4"});
  expect_error(edit(q2, "\"mlp_only_layers\": [\n    3\n  ]", "\"mlp_only_layers\": 3"), {"'mlp_only_layers'", "list"});
  expect_error(edit(q2, "\"mlp_only_layers\": [\n    3\n  ]", "\"mlp_only_layers\": [\"3\"]"),
               {"'mlp_only_layers'", "must be an integer"});
  expect_error(edit(q2, "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 9"), {"num_experts_per_tok 9", "8 experts"});
  expect_error(edit(q2, "\"num_experts\": 8", "\"num_experts\": -1"), {"'num_experts'", ">= 0"});
  expect_error(edit(q2, "\"shared_expert_intermediate_size\": 24", "\"shared_expert_intermediate_size\": 0"),
               {"'shared_expert_intermediate_size'", "positive"});
  expect_error(edit(q2, "\"moe_intermediate_size\": 16", "\"moe_intermediate_size\": 0"), {"'moe_intermediate_size'", "positive"});
  expect_error(edit(q2, "\"norm_topk_prob\": true", "\"norm_topk_prob\": 1"), {"'norm_topk_prob'", "true or false"});
  expect_error(edit(q2, "\"qkv_bias\": true", "\"qkv_bias\": \"yes\""), {"'qkv_bias'", "true or false"});
  const std::string q3 = read("tiny_qwen3_moe_v5.json");
  expect_error(edit(q3, "\"num_local_experts\": 4", "\"num_local_experts\": 4, \"num_experts\": 8"),
               {"'num_experts' 8", "'num_local_experts' 4", "disagree"});
  expect_error(edit(q3, "\"num_local_experts\": 4", "\"num_local_experts\": \"4\""), {"'num_local_experts'", "integer"});
  // num_experts 0: a dense model, as transformers builds it.
  auto dense = parse_model_config(edit(q3, "\"num_local_experts\": 4", "\"num_local_experts\": 0"));
  EXPECT_FALSE(dense.is_moe_layer(0));
}

TEST(ModelConfig, DeepseekV2LiteMla) {
  auto c = load("deepseek_v2_lite.json");
  EXPECT_EQ(c.family, ModelFamily::kDeepseekV2);
  EXPECT_TRUE(c.mla);
  EXPECT_EQ(c.q_lora_rank, 0);  // null
  EXPECT_EQ(c.kv_lora_rank, 512);
  EXPECT_EQ(c.rope.dim, 64);
  EXPECT_TRUE(c.rope.interleave);
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_DOUBLE_EQ(c.rope.attention_factor, 1.0);  // mscale == mscale_all_dim
  const double m = yarn_mscale(40, 0.707);
  EXPECT_DOUBLE_EQ(c.attention_scale, 1.0 / std::sqrt(192.0) * m * m);
  EXPECT_EQ(c.n_group, 1);  // greedy
  EXPECT_FALSE(c.renormalize);
  EXPECT_EQ(c.router_score, "softmax");
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_FALSE(c.fp8_checkpoint);
}

TEST(ModelConfig, DeepseekV3PublishedFp8) {
  auto c = load("deepseek_v3.json");
  EXPECT_EQ(c.family, ModelFamily::kDeepseekV3);
  EXPECT_TRUE(c.fp8_checkpoint);
  EXPECT_EQ(c.router_score, "sigmoid");
  EXPECT_TRUE(c.router_bias);
  EXPECT_TRUE(c.renormalize);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_EQ(c.first_k_dense_replace, 3);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_TRUE(c.rope.interleave);  // 4.x configs have no rope_interleave: the default
  const double m = yarn_mscale(40, 1.0);
  EXPECT_DOUBLE_EQ(c.attention_scale, 1.0 / std::sqrt(192.0) * m * m);
  EXPECT_EQ(c.bos_token_id, 0);
}

TEST(ModelConfig, WrittenByTransformers5) {
  auto l = load("tiny_llama3_v5.json");
  EXPECT_EQ(l.rope.type, "llama3");
  EXPECT_EQ(l.rope.original_max_position_embeddings, 64);
  EXPECT_EQ(l.head_dim, 8);
  auto d = load("tiny_deepseek_v3_v5.json");
  EXPECT_TRUE(d.rope.interleave);
  EXPECT_EQ(d.rope.type, "default");
  EXPECT_EQ(d.n_group, 2);
  EXPECT_EQ(d.head_dim, 4);  // qk_rope_head_dim, whatever head_dim says
  auto x = load("tiny_mixtral_v5.json");
  EXPECT_DOUBLE_EQ(x.rope.theta, 1e6);
  EXPECT_EQ(x.head_dim, 8);  // "head_dim": null -> hidden / heads
  EXPECT_EQ(x.pad_token_id, -1);
}

TEST(ModelConfig, V4AndV5SpellingsAgree) {
  const std::string v4 = edit(read("llama3_1_8b.json"), "\"rope_theta\": 500000.0,", "");
  // 5.x: everything in rope_parameters, rope_theta included.
  const std::string v5 = edit(edit(v4, "\"rope_scaling\"", "\"rope_parameters\""), "\"rope_type\": \"llama3\"",
                              "\"rope_type\": \"llama3\", \"rope_theta\": 500000.0");
  auto a = load("llama3_1_8b.json");
  auto b = parse_model_config(v5);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_DOUBLE_EQ(a.rope.theta, b.rope.theta);
  EXPECT_DOUBLE_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  // 4.x's "type" works as "rope_type"; rope_interleave false turns DeepSeek-V3's pairs off.
  auto d = parse_model_config(edit(read("deepseek_v3.json"), "\"v_head_dim\"", "\"rope_interleave\": false, \"v_head_dim\""));
  EXPECT_FALSE(d.rope.interleave);
  EXPECT_EQ(d.rope.type, "yarn");
}

TEST(ModelConfig, ErrorsNameTheKeyAndTheRule) {
  const std::string llama = read("llama3_1_8b.json");
  expect_error(edit(llama, "LlamaForCausalLM", "GPT2LMHeadModel"),
               {"unknown architecture 'GPT2LMHeadModel'", "LlamaForCausalLM", "DeepseekV3ForCausalLM"});
  expect_error(edit(llama, "\"hidden_size\": 4096,", ""), {"missing required key 'hidden_size'"});
  expect_error(edit(llama, "\"num_hidden_layers\": 32", "\"num_hidden_layers\": \"32\""),
               {"'num_hidden_layers'", "must be an integer"});
  expect_error(edit(llama, "\"rope_type\": \"llama3\"", "\"rope_type\": \"dynamic\""), {"rope type 'dynamic'", "not supported"});
  expect_error(edit(llama, "\"low_freq_factor\": 1.0,", ""), {"llama3", "rope_scaling.low_freq_factor"});
  expect_error(edit(llama, "\"hidden_act\": \"silu\"", "\"hidden_act\": \"gelu\""), {"hidden_act 'gelu'"});
  expect_error(edit(llama, "\"num_key_value_heads\": 8", "\"num_key_value_heads\": 5"), {"not a multiple", "num_key_value_heads 5"});
  // Without `architectures`, model_type decides; an unknown one is named.
  const std::string no_arch = edit(llama, "\"architectures\": [\"LlamaForCausalLM\"],", "");
  EXPECT_EQ(parse_model_config(no_arch).family, ModelFamily::kLlama);
  expect_error(edit(no_arch, "\"model_type\": \"llama\"", "\"model_type\": \"gpt2\""), {"unknown model_type 'gpt2'"});
  expect_error("{\"hidden_size\": 4096", {"not valid JSON"});
  expect_error("[1, 2]", {"must hold a JSON object"});
  const std::string v3 = read("deepseek_v3.json");
  expect_error(edit(v3, "\"n_group\": 8", "\"n_group\": 7"), {"n_group 7", "256 experts"});
  expect_error(edit(v3, "\"topk_group\": 4", "\"topk_group\": 9"), {"topk_group 9"});
  expect_error(edit(v3, "\"kv_lora_rank\": 512,", ""), {"missing required key 'kv_lora_rank'"});
  expect_error(edit(v3, "\"quant_method\": \"fp8\"", "\"quant_method\": \"gptq\""), {"quant_method 'gptq'"});
  expect_error(edit(v3, "\"weight_block_size\": [128, 128]", "\"weight_block_size\": [64, 64]"), {"weight_block_size [64,64]"});
  expect_error(edit(v3, "\"scoring_func\": \"sigmoid\"", "\"scoring_func\": \"softmax\""), {"scoring_func 'softmax'"});
  expect_error(edit(edit(read("deepseek_v2_lite.json"), "\"n_group\": 1,", ""), "\"topk_method\": \"greedy\"",
                    "\"topk_method\": \"group_limited_greedy\""),
               {"missing required key 'n_group'"});
  try {
    load_model_config(fixture("no_such_dir"));
    ADD_FAILURE() << "expected an error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no_such_dir"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace anvil::model
