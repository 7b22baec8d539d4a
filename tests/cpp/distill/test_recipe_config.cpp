// The config of `anvil distill` (distill/recipe.h): defaults, the student's init rules, the distill section's
// ranges and loss names, the optional lora section, and keys of other recipes named as such.
#include "distill/recipe.h"

#include "train/recipe_config_test_util.h"

#include <gtest/gtest.h>

#include <string>

namespace anvil::distill {
namespace {

using nlohmann::json;

json minimal() {
  return json{{"teacher", {{"path", "some/teacher"}}},
              {"student", {{"layers", {0, 2}}}},
              {"data", {{"train", "train.jsonl"}}}};
}

std::string error_of(const json& user) { return test::resolve_error(resolve_config, user); }

void expect_error(const json& user, const std::string& words) {
  const auto e = error_of(user);
  EXPECT_NE(e.find(words), std::string::npos) << "wanted '" << words << "', got: " << e;
}

TEST(DistillConfig, Defaults) {
  const auto c = resolve_config(minimal());
  EXPECT_EQ(c.output.dir, "runs/distill");
  EXPECT_EQ(c.student.init, "derived");
  EXPECT_EQ(c.student.layers, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(c.kd.loss, train::KdLoss::kForwardKl);
  EXPECT_EQ(c.kd_ratio, 0.5);
  EXPECT_EQ(c.kd.temperature, 1.0);
  EXPECT_FALSE(c.use_lora);
  EXPECT_FALSE(c.resolved.contains("lora"));
  EXPECT_FALSE(c.resolved.contains("model"));
}

TEST(DistillConfig, TeacherAndStudentRules) {
  auto u = minimal();
  u["teacher"].erase("path");
  expect_error(u, "config key teacher.path: is required");
  u = minimal();
  u["student"]["layers"] = json::array();
  expect_error(u, "config key student.layers: a derived student names the teacher layers");
  u["student"]["every_nth"] = 2;
  EXPECT_EQ(error_of(u), "");
  u["student"]["layers"] = {0};
  expect_error(u, "config key student.every_nth: cannot be combined with student.layers");
  u = minimal();
  u["student"]["layers"] = {2, 1};
  expect_error(u, "config key student.layers: must be a list of teacher layer indices >= 0, strictly increasing");
  u = minimal();
  u["student"] = {{"init", "pretrained"}};
  expect_error(u, "config key student.path: is required when student.init is \"pretrained\"");
  u["student"]["path"] = "some/student";
  EXPECT_EQ(error_of(u), "");
  u["student"]["layers"] = {0};
  expect_error(u, "config key student.layers: is for student.init \"derived\"");
  u = minimal();
  u["student"] = {{"init", "random"}};
  expect_error(u, "config key student.config: must name a config.json");
  u = minimal();
  u["student"]["device"] = "tpu";
  expect_error(u, "config key student.device");
  u = minimal();
  u["teacher"]["dtype"] = "int4";
  expect_error(u, "config key teacher.dtype");
}

TEST(DistillConfig, DistillSection) {
  auto u = minimal();
  u["distill"]["loss"] = "kl";
  expect_error(u, "config key distill.loss: must be one of \"forward_kl\", \"reverse_kl\", \"skew_forward_kl\", "
                  "\"skew_reverse_kl\", \"jsd\", \"tv\", got \"kl\"");
  for (const char* name : {"forward_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "jsd", "tv"}) {
    u["distill"]["loss"] = name;
    EXPECT_EQ(error_of(u), "") << name;
  }
  u = minimal();
  u["distill"]["kd_ratio"] = 1.5;
  expect_error(u, "config key distill.kd_ratio");
  u = minimal();
  u["distill"]["temperature"] = 0;
  expect_error(u, "config key distill.temperature");
  u = minimal();
  u["distill"]["jsd_beta"] = -0.1;
  expect_error(u, "config key distill.jsd_beta");
  u = minimal();
  u["distill"]["chunk"] = 0;
  expect_error(u, "config key distill.chunk");
  u = minimal();
  u["distill"]["alpha"] = 0.5;
  expect_error(u, "distill.alpha");
}

TEST(DistillConfig, LoraStudentAndForeignKeys) {
  auto u = minimal();
  u["lora"] = {{"r", 4}};
  const auto c = resolve_config(u);
  EXPECT_TRUE(c.use_lora);
  EXPECT_EQ(c.lora.r, 4);
  EXPECT_TRUE(c.resolved.contains("lora"));
  u["lora"]["init"] = "pissa";
  expect_error(u, "config key lora.init: PiSSA is for anvil lora");
  u = minimal();
  u["lora"] = {{"r", 4}};
  u["train"]["mixed_precision"] = "bf16";
  expect_error(u, "config key train.mixed_precision");
  u = minimal();
  u["model"] = {{"path", "x"}};
  expect_error(u, "model");
  EXPECT_NE(error_of(u).find("teacher"), std::string::npos) << error_of(u);
  u = minimal();
  u["student"]["lr"] = 1;
  expect_error(u, "student.lr");
}

TEST(DistillConfig, WidthPruningAndHiddenLossKeys) {
  auto c = resolve_config(minimal());
  EXPECT_FALSE(c.student.width.any());
  EXPECT_EQ(c.student.prune_calibration, 64);
  EXPECT_EQ(c.hidden.type, "none");
  EXPECT_TRUE(c.hidden.uniform);
  // A width alone derives a student of every teacher layer.
  auto u = minimal();
  u["student"] = {{"intermediate_size", 32}, {"num_attention_heads", 4}, {"prune_calibration", 8}};
  c = resolve_config(u);
  EXPECT_EQ(c.student.width.intermediate_size, 32);
  EXPECT_EQ(c.student.width.num_attention_heads, 4);
  EXPECT_EQ(c.student.prune_calibration, 8);
  u["student"]["hidden_size"] = -1;
  expect_error(u, "config key student.hidden_size");
  u = minimal();
  u["student"]["prune_calibration"] = 0;
  expect_error(u, "config key student.prune_calibration");
  u = minimal();
  u["student"] = {{"init", "pretrained"}, {"path", "some/student"}, {"num_key_value_heads", 1}};
  expect_error(u, "config key student.num_key_value_heads: is for student.init \"derived\"");
  u = minimal();
  u["distill"] = {{"hidden_loss", "mse"}, {"hidden_weight", 2.0}, {"hidden_layers", {{1, 2}, {2, 4}}}};
  c = resolve_config(u);
  EXPECT_EQ(c.hidden.type, "mse");
  EXPECT_EQ(c.hidden.weight, 2.0);
  EXPECT_FALSE(c.hidden.uniform);
  EXPECT_EQ(c.hidden.layers, (train::LayerMap{{1, 2}, {2, 4}}));
  u["distill"]["hidden_layers"] = {{1, -2}};
  expect_error(u, "config key distill.hidden_layers: must be \"uniform\" or a list of [student index, teacher index]");
  u["distill"]["hidden_layers"] = "last";
  expect_error(u, "config key distill.hidden_layers");
  u["distill"]["hidden_layers"] = "uniform";
  u["distill"]["hidden_loss"] = "l2";
  expect_error(u, "config key distill.hidden_loss");
  u["distill"]["hidden_loss"] = "cosine";
  u["distill"]["hidden_weight"] = -1;
  expect_error(u, "config key distill.hidden_weight");
}

TEST(DistillConfig, OfflineCacheKeys) {
  auto c = resolve_config(minimal());
  EXPECT_EQ(c.teacher.cache, "");  // online by default
  EXPECT_EQ(c.teacher.cache_k, 64);
  EXPECT_EQ(c.teacher.cache_dtype, "float16");
  EXPECT_EQ(c.teacher.cache_shard_tokens, 1 << 20);
  EXPECT_FALSE(c.teacher.cache_only);
  auto u = minimal();
  u["teacher"]["cache"] = "runs/cache";
  u["teacher"]["cache_k"] = 8;
  u["teacher"]["cache_only"] = true;
  c = resolve_config(u);
  EXPECT_EQ(c.teacher.cache, "runs/cache");
  EXPECT_EQ(c.teacher.cache_k, 8);
  EXPECT_TRUE(c.teacher.cache_only);
  u = minimal();
  u["teacher"]["cache_only"] = true;
  expect_error(u, "config key teacher.cache_only: writes the teacher cache: it needs teacher.cache");
  u = minimal();
  u["teacher"]["cache_k"] = 0;
  expect_error(u, "config key teacher.cache_k");
  u = minimal();
  u["teacher"]["cache_dtype"] = "int8";
  expect_error(u, "config key teacher.cache_dtype");
  u = minimal();
  u["teacher"]["cache_shard_tokens"] = 0;
  expect_error(u, "config key teacher.cache_shard_tokens");
}

TEST(DistillConfig, GenerationModes) {
  // No sequence / on_policy section: an online run's config is as before.
  auto c = resolve_config(minimal());
  EXPECT_EQ(c.mode, "online");
  EXPECT_FALSE(c.use_on_policy);
  EXPECT_FALSE(c.resolved.contains("sequence"));
  EXPECT_FALSE(c.resolved.contains("on_policy"));
  // distill.mode "sequence": prompts default to data.train, the output into output.dir.
  auto user = minimal();
  user["distill"] = {{"mode", "sequence"}};
  user["output"] = {{"dir", "runs/x"}};
  c = resolve_config(user);
  EXPECT_EQ(c.sequence.prompts, "train.jsonl");
  EXPECT_EQ(c.sequence.output, "runs/x/teacher_data.jsonl");
  EXPECT_EQ(c.sequence.max_new_tokens, 128);
  user["sequence"] = {{"batch_size", 0}};
  expect_error(user, "sequence.batch_size");
  // on_policy: TRL's defaults, lambda in [0, 1], the train seed.
  user = minimal();
  user["on_policy"] = json::object();
  user["train"] = {{"seed", 7}};
  c = resolve_config(user);
  EXPECT_TRUE(c.use_on_policy);
  EXPECT_EQ(c.on_policy.lambda, 0.5);
  EXPECT_EQ(c.on_policy.temperature, 0.9);
  EXPECT_EQ(c.on_policy.seed, 7u);
  for (double bad : {-0.1, 1.5}) {
    user["on_policy"] = {{"lambda", bad}};
    expect_error(user, "config key on_policy.lambda");
  }
  user["on_policy"] = {{"max_new_tokens", 0}};
  expect_error(user, "on_policy.max_new_tokens");
  user["on_policy"] = {{"top_p", 0.0}};
  expect_error(user, "on_policy.top_p");
  // on_policy.refresh_from: off by default; a refresh needs a cache, is not the teacher pass, and regenerates a
  // fraction in (0, 1].
  user["on_policy"] = json::object();
  EXPECT_EQ(resolve_config(user).refresh_from, "");
  user["on_policy"] = {{"refresh_from", "checkpoint"}};
  expect_error(user, "config key on_policy.refresh_from: refreshes the on-policy rows of a teacher cache: it needs "
                     "teacher.cache");
  user["teacher"]["cache"] = "runs/cache";
  c = resolve_config(user);
  EXPECT_EQ(c.refresh_from, "checkpoint");
  EXPECT_EQ(c.teacher.cache, "runs/cache");
  user["teacher"]["cache_only"] = true;
  expect_error(user, "config key on_policy.refresh_from: is the student's pass");
  user["teacher"]["cache_only"] = false;
  user["on_policy"]["lambda"] = 0;
  expect_error(user, "config key on_policy.lambda: a refresh");
  user["on_policy"] = {{"lambda", 0}};  // lambda 0 without a refresh: the cache's rounds are read, none chosen
  EXPECT_EQ(resolve_config(user).on_policy.lambda, 0);
  // A sequence section without the mode, and an unknown mode.
  user = minimal();
  user["sequence"] = {{"prompts", "p.jsonl"}};
  expect_error(user, "distill.mode");
  user = minimal();
  user["distill"] = {{"mode", "offline"}};
  expect_error(user, "distill.mode");
}

// distill.vocab "cross-tokenizer" (train/cross_vocab.h): GOLD's uld_* keys, kept only where given; online only.
TEST(DistillConfig, CrossTokenizerKeys) {
  auto u = minimal();
  u["student"] = {{"init", "pretrained"}, {"path", "some/student"}};
  auto c = resolve_config(u);
  EXPECT_FALSE(c.cross.on);
  EXPECT_FALSE(c.resolved["distill"].contains("vocab"));  // a run without the key resolves as before
  EXPECT_FALSE(c.resolved["distill"].contains("uld_use_hybrid_loss"));
  u["distill"]["uld_use_hybrid_loss"] = true;
  expect_error(u, "config key distill.uld_use_hybrid_loss: is for distill.vocab \"cross-tokenizer\"");
  u["distill"]["vocab"] = "same";
  expect_error(u, "distill.vocab is \"same\"");
  u["distill"].erase("uld_use_hybrid_loss");
  EXPECT_EQ(error_of(u), "");
  u["distill"]["vocab"] = "cross";
  expect_error(u, "config key distill.vocab");
  u["distill"]["vocab"] = "cross-tokenizer";
  c = resolve_config(u);
  ASSERT_TRUE(c.cross.on);
  // GOLDConfig's defaults
  EXPECT_FALSE(c.cross.options.uld.hybrid);
  EXPECT_LT(c.cross.options.uld.matched_weight, 0);
  EXPECT_EQ(c.cross.options.distillation_weight, 1.0);
  EXPECT_EQ(c.cross.options.uld.student_temperature, 1.0);
  EXPECT_TRUE(c.cross.options.skip_student_eos);
  EXPECT_TRUE(c.cross.options.skip_teacher_eos);
  EXPECT_EQ(c.cross.options.merge, "observed");
  EXPECT_EQ(c.cross.options.uld.jsd_beta, 0.5);  // distill.jsd_beta: GOLD's beta
  EXPECT_TRUE(c.resolved["distill"]["uld_hybrid_matched_weight"].is_null());
  u["distill"]["uld_use_hybrid_loss"] = true;
  u["distill"]["uld_hybrid_matched_weight"] = 0.3;
  expect_error(u, "config key distill.uld_hybrid_unmatched_weight: must be set together with its pair");
  u["distill"]["uld_hybrid_unmatched_weight"] = 0.6;
  u["distill"]["uld_token_merge_strategy"] = "bayesian";
  u["distill"]["jsd_beta"] = 0.2;
  c = resolve_config(u);
  EXPECT_EQ(c.cross.options.uld.matched_weight, 0.3);
  EXPECT_EQ(c.cross.options.uld.unmatched_weight, 0.6);
  EXPECT_EQ(c.cross.options.merge, "bayesian");
  EXPECT_EQ(c.cross.options.uld.jsd_beta, 0.2);
  u["distill"]["uld_use_hybrid_loss"] = false;
  expect_error(u, "config key distill.uld_hybrid_matched_weight: weighs the hybrid loss's parts");
  u["distill"]["uld_use_hybrid_loss"] = true;
  u["distill"]["uld_token_merge_strategy"] = "mean";
  expect_error(u, "config key distill.uld_token_merge_strategy");
  u["distill"]["uld_token_merge_strategy"] = "observed";
  u["distill"]["uld_student_temperature"] = 0;
  expect_error(u, "config key distill.uld_student_temperature: must be a number in (0, inf)");
  u["distill"]["uld_student_temperature"] = 2;
  u["distill"]["uld_distillation_weight"] = -1;
  expect_error(u, "config key distill.uld_distillation_weight");
  u["distill"]["uld_distillation_weight"] = 1;
  EXPECT_EQ(error_of(u), "");
  // The same-vocabulary divergence's keys do not apply.
  auto v = u;
  v["distill"]["temperature"] = 2.0;
  expect_error(v, "config key distill.temperature: is not used with distill.vocab \"cross-tokenizer\"");
  v = u;
  v["distill"]["loss"] = "jsd";
  expect_error(v, "config key distill.loss: is not used");
  // What is not yet combined with it: each refusal names the key.
  v = u;
  v["teacher"]["cache"] = "runs/cache";
  expect_error(v, "config key teacher.cache: (offline, from the teacher's top-k cache) is not yet combined with "
                  "distill.vocab \"cross-tokenizer\"");
  v = u;
  v["distill"]["mode"] = "sequence";
  expect_error(v, "config key distill.mode: \"sequence\" is not yet combined");
  v = u;
  v["on_policy"] = {{"lambda", 0.5}};
  expect_error(v, "config key on_policy: (the student's generations) is not yet combined");
  v = u;
  v["distill"]["hidden_loss"] = "mse";
  expect_error(v, "config key distill.hidden_loss: (hidden states) is not yet combined");
  v = u;
  v["student"] = {{"layers", {0, 2}}};
  expect_error(v, "config key student.init: \"derived\" gives the student the teacher's tokenizer");
}

}  // namespace
}  // namespace anvil::distill
