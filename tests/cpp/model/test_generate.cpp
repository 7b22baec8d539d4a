// Token choice (greedy, top-k, top-p as transformers' warpers define them, seeding), the attention
// mask for cached decoding, the layer cache's growth, and a whole random model in C++: generation
// with the cache equals generation without it, and bad arguments fail with messages naming them.
// The transformers oracle tests are in tests/python/test_models.py.
#include "anvil/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>

namespace anvil::model {
namespace {

at::Tensor logits_of(const std::vector<double>& probs) {  // (1, V) log-probabilities
  return at::log(at::tensor(probs, at::kDouble)).to(at::kFloat).unsqueeze(0);
}

std::set<int64_t> drawn(const at::Tensor& logits, GenerateOptions o, int n) {
  std::set<int64_t> seen;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (int i = 0; i < n; ++i) seen.insert(sample_next_token(logits, o, gen).item<int64_t>());
  return seen;
}

TEST(Generate, GreedyTakesTheFirstMaximum) {
  auto logits = at::tensor({0.5f, 2.0f, 2.0f, -1.0f}).unsqueeze(0);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(0);
  EXPECT_EQ(sample_next_token(logits, GenerateOptions{}, gen).item<int64_t>(), 1);
}

TEST(Generate, TopKAndTopPKeepWhatTransformersKeeps) {
  const auto logits = logits_of({0.5, 0.3, 0.15, 0.05});
  GenerateOptions o;
  o.temperature = 1.0;
  EXPECT_EQ(drawn(logits, o, 400), (std::set<int64_t>{0, 1, 2, 3}));
  o.top_k = 2;
  EXPECT_EQ(drawn(logits, o, 200), (std::set<int64_t>{0, 1}));
  o.top_k = 0;
  // Ascending cumulative probabilities 0.05, 0.2, 0.5, 1: top_p 0.7 drops those <= 0.3, keeping {0, 1}.
  o.top_p = 0.7;
  EXPECT_EQ(drawn(logits, o, 200), (std::set<int64_t>{0, 1}));
  o.top_p = 0.45;  // drops those <= 0.55: only the most likely is left
  EXPECT_EQ(drawn(logits, o, 50), (std::set<int64_t>{0}));
  // A high temperature flattens but top_k still bounds the choice.
  o.top_p = 1.0;
  o.top_k = 3;
  o.temperature = 50.0;
  EXPECT_EQ(drawn(logits, o, 300), (std::set<int64_t>{0, 1, 2}));
}

TEST(Generate, AttentionMaskForCachedChunks) {
  // No cache: plain causal, no tensor. One token after a cache: sees everything.
  auto m = AttentionMask::make(4, 0, 0, at::kCPU);
  EXPECT_TRUE(m.causal);
  EXPECT_FALSE(m.mask.defined());
  m = AttentionMask::make(1, 9, 0, at::kCPU);
  EXPECT_FALSE(m.causal);
  EXPECT_FALSE(m.mask.defined());
  // Three tokens after two cached: row i sees keys 0 .. 2 + i.
  m = AttentionMask::make(3, 2, 0, at::kCPU);
  auto expected = at::tensor({1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1}, at::kInt).to(at::kBool).view({3, 5});
  EXPECT_TRUE(at::equal(m.mask, expected));
  // Sliding window 2: row i sees keys 1 + i .. 2 + i.
  m = AttentionMask::make(3, 2, 2, at::kCPU);
  expected = at::tensor({0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1}, at::kInt).to(at::kBool).view({3, 5});
  EXPECT_TRUE(at::equal(m.mask, expected));
}

TEST(Generate, LayerCacheGrowsAndKeepsEarlierEntries) {
  LayerCache cache;
  auto a = at::randn({2, 3, 10, 4}), b = at::randn({2, 3, 10, 5});
  for (int64_t start = 0; start < 10;) {
    const int64_t n = start < 6 ? 1 : 4;  // one at a time, then a chunk past the first capacity
    auto [ka, kb] = cache.append(a.narrow(2, start, n), b.narrow(2, start, n));
    start += n;
    EXPECT_EQ(cache.length(), start);
    EXPECT_TRUE(at::equal(ka, a.narrow(2, 0, start)));
    EXPECT_TRUE(at::equal(kb, b.narrow(2, 0, start)));
  }
}

// A random two-layer DeepSeek-V3 (MLA + MoE, the most involved family) built in C++.
std::shared_ptr<CausalLM> random_model() {
  const std::string json = R"({"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 50, "hidden_size": 32,
    "intermediate_size": 40, "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "first_k_dense_replace": 1, "q_lora_rank": 12, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8, "v_head_dim": 8, "rope_theta": 10000, "max_position_embeddings": 64})";
  auto model = std::make_shared<CausalLM>(parse_model_config(json), at::TensorOptions().dtype(at::kFloat));
  at::manual_seed(3);
  at::NoGradGuard no_grad;
  for (auto& [name, t] : model->state_tensors()) t.copy_(at::randn(t.sizes()) / std::sqrt(double(t.size(-1))));
  return model;
}

TEST(Generate, CachedEqualsUncachedOnARandomModel) {
  auto model = random_model();
  auto prompt = at::randint(0, 50, {2, 5}, at::kLong);
  GenerateOptions o;
  o.max_new_tokens = 6;
  auto cached = generate(*model, prompt, o);
  o.use_cache = false;
  auto uncached = generate(*model, prompt, o);
  EXPECT_EQ(cached.sizes(), (at::IntArrayRef{2, 11}));
  EXPECT_TRUE(at::equal(cached, uncached));
  EXPECT_TRUE(at::equal(cached.narrow(1, 0, 5), prompt));
  // Perplexity of a sequence = exp(its loss).
  auto seq = at::randint(0, 50, {9}, at::kLong);
  const auto r = perplexity(*model, {seq});
  EXPECT_EQ(r.tokens, 8);
  at::NoGradGuard no_grad;
  EXPECT_NEAR(r.perplexity(), std::exp(causal_lm_loss(*model, seq.unsqueeze(0)).item<double>()), 1e-9);
  // Parameter names are the checkpoint's.
  std::set<std::string> names;
  for (auto& [name, t] : model->state_tensors()) names.insert(name);
  EXPECT_TRUE(names.count("model.layers.1.mlp.experts.3.down_proj.weight"));
  EXPECT_TRUE(names.count("model.layers.1.mlp.gate.e_score_correction_bias"));
  EXPECT_TRUE(names.count("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"));
  EXPECT_TRUE(names.count("lm_head.weight"));
}

TEST(Generate, BadArgumentsAreNamed) {
  auto model = random_model();
  auto prompt = at::randint(0, 50, {1, 3}, at::kLong);
  GenerateOptions o;
  o.top_p = 0.0;
  EXPECT_THROW(
      {
        try {
          generate(*model, prompt, o);
        } catch (const c10::Error& e) {
          EXPECT_NE(std::string(e.what()).find("top_p"), std::string::npos);
          throw;
        }
      },
      c10::Error);
  EXPECT_THROW(model->forward(at::zeros({3}, at::kLong)), c10::Error);   // not (B, S)
  EXPECT_THROW(model->forward(at::zeros({1, 3}, at::kInt)), c10::Error);  // not int64
  std::unordered_map<std::string, at::Tensor> partial;
  try {
    model->load_state(partial);
    ADD_FAILURE() << "expected missing tensors";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("missing tensors: model."), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace anvil::model

// ---- padded batches: rows of their own lengths, left-padded ---------------------------------------------

namespace anvil::model {
namespace {

std::vector<int64_t> random_row(int64_t n, int64_t seed) {
  auto g = at::make_generator<at::CPUGeneratorImpl>(uint64_t(seed));
  auto t = at::randint(3, 50, {n}, g, at::kLong);
  return std::vector<int64_t>(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + n);
}

TEST(GeneratePadded, LeftPadShapesAndMask) {
  auto [ids, mask] = left_pad({{5, 6}, {7}, {8, 9, 10}}, 0);
  EXPECT_EQ(ids.sizes(), (at::IntArrayRef{3, 3}));
  EXPECT_TRUE(at::equal(ids, at::tensor({0, 5, 6, 0, 0, 7, 8, 9, 10}, at::kLong).view({3, 3})));
  EXPECT_TRUE(at::equal(mask, at::tensor({0, 1, 1, 0, 0, 1, 1, 1, 1}, at::kLong).view({3, 3})));
  EXPECT_THROW(left_pad({{1}, {}}, 0), c10::Error);
}

TEST(GeneratePadded, EachRowGetsTheTokensItGetsAlone) {
  // A random MLA + MoE model: the padded batch's new tokens equal each row's alone, cached and not,
  // greedy and sampled with top_k 1 (greedy by another road).
  auto model = random_model();
  model->eval();
  const std::vector<int64_t> lengths = {2, 7, 4, 7, 1};
  std::vector<std::vector<int64_t>> rows;
  for (size_t i = 0; i < lengths.size(); ++i) rows.push_back(random_row(lengths[i], 10 + int64_t(i)));
  GenerateOptions o;
  o.max_new_tokens = 6;
  const auto batched = generate_rows(*model, rows, o);
  ASSERT_EQ(batched.size(), rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    auto alone = generate(*model, at::tensor(rows[i], at::kLong).unsqueeze(0), o);  // (1, P + 6)
    std::vector<int64_t> fresh(alone.data_ptr<int64_t>() + lengths[i], alone.data_ptr<int64_t>() + alone.size(1));
    EXPECT_EQ(batched[i], fresh) << "row " << i;
  }
  auto [ids, mask] = left_pad(rows, 0);
  auto cached = generate(*model, ids, o, mask);
  o.use_cache = false;
  EXPECT_TRUE(at::equal(generate(*model, ids, o, mask), cached));
  o.use_cache = true, o.temperature = 0.8, o.top_k = 1, o.seed = 5;
  EXPECT_TRUE(at::equal(generate(*model, ids, o, mask), cached));
}

TEST(GeneratePadded, StopTokensEndRowsOnTheirOwn) {
  auto model = random_model();
  model->eval();
  std::vector<std::vector<int64_t>> rows = {random_row(3, 1), random_row(6, 2)};
  GenerateOptions o;
  o.max_new_tokens = 8;
  const auto free_run = generate_rows(*model, rows, o);
  // Stop on row 0's third token: row 0 ends there (the stop token kept), row 1 runs on to its own stop or the end.
  o.stop_tokens = {free_run[0][2]};
  o.pad_token_id = 0;
  const auto stopped = generate_rows(*model, rows, o);
  const auto first_stop = [&](const std::vector<int64_t>& r) {
    return std::find(r.begin(), r.end(), o.stop_tokens[0]) - r.begin();
  };
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto n = std::min<int64_t>(first_stop(free_run[i]) + 1, int64_t(free_run[i].size()));
    EXPECT_EQ(stopped[i], std::vector<int64_t>(free_run[i].begin(), free_run[i].begin() + n)) << "row " << i;
  }
}

TEST(GeneratePadded, DroppingFinishedRowsKeepsEveryToken) {
  // Rows that stop at different steps leave the batch early (drop_finished, the default); every row's tokens
  // must be those of a run that keeps them in: greedy and sampled (the draws keep the whole batch's shape),
  // cached and not, left-padded rows and rows of one length without a mask.
  auto model = random_model();
  model->eval();
  std::vector<std::vector<int64_t>> rows, even;
  for (int64_t i = 0; i < 6; ++i) rows.push_back(random_row(2 + (i * 3) % 7, 40 + i));
  for (int64_t i = 0; i < 4; ++i) even.push_back(random_row(5, 60 + i));
  for (const bool padded : {true, false}) {
    auto [ids, mask] = left_pad(padded ? rows : even, 0);
    if (!padded) mask = at::Tensor();
    for (const double temperature : {0.0, 1.0}) {
      GenerateOptions o;
      o.max_new_tokens = 10, o.temperature = temperature, o.seed = 11, o.pad_token_id = 0;
      o.drop_finished = false;
      const auto free_run = generate(*model, ids, o, mask).narrow(1, ids.size(1), 10);  // (B, 10)
      // Stop tokens taken from the free run at different steps, so that rows retire one after another.
      o.stop_tokens = {free_run[0][1].item<int64_t>(), free_run[2][4].item<int64_t>(), free_run[3][6].item<int64_t>()};
      for (const bool cached : {true, false}) {
        o.use_cache = cached;
        o.drop_finished = false;
        const auto kept = generate(*model, ids, o, mask);
        o.drop_finished = true;
        const auto dropped = generate(*model, ids, o, mask);
        EXPECT_TRUE(at::equal(dropped, kept)) << "padded " << padded << ", temperature " << temperature << ", cached "
                                              << cached << "\n" << dropped << "\n" << kept;
        // Rows stopped at different steps: the drop was exercised (a row retired while another ran on).
        const auto n = kept.size(1) - ids.size(1);
        const auto is_stop = at::isin(kept.narrow(1, ids.size(1), n), at::tensor(o.stop_tokens, at::kLong));  // (B, n)
        const auto ends = at::where(is_stop.any(1), is_stop.to(at::kLong).argmax(1), at::full({kept.size(0)}, n, at::kLong));
        EXPECT_LT(ends.min().item<int64_t>(), ends.max().item<int64_t>()) << ends;
      }
    }
  }
}

TEST(Generate, KvCacheKeepRowsKeepsThoseRows) {
  KvCache cache;
  cache.layers.resize(2);
  auto a = at::randn({4, 2, 3, 5}), b = at::randn({4, 2, 3, 7});
  for (auto& l : cache.layers) l.append(a, b);
  cache.keep_rows(at::tensor({3, 1}, at::kLong));
  const auto [ka, kb] = cache.layers[1].append(at::zeros({2, 2, 1, 5}), at::zeros({2, 2, 1, 7}));
  EXPECT_EQ(ka.sizes(), (at::IntArrayRef{2, 2, 4, 5}));
  EXPECT_TRUE(at::equal(ka.narrow(2, 0, 3), a.index_select(0, at::tensor({3, 1}, at::kLong))));
  EXPECT_TRUE(at::equal(kb.narrow(2, 0, 3), b.index_select(0, at::tensor({3, 1}, at::kLong))));
  EXPECT_EQ(cache.length(), 3);  // layer 0 untouched since
}

TEST(GeneratePadded, BadMasksAreNamed) {
  auto model = random_model();
  auto ids = at::randint(3, 50, {2, 4}, at::kLong);
  auto right_padded = at::tensor({1, 1, 1, 1, 1, 1, 0, 0}, at::kLong).view({2, 4});
  GenerateOptions o;
  o.max_new_tokens = 2;
  try {
    generate(*model, ids, o, right_padded);
    ADD_FAILURE() << "expected an error for right padding";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("left padding"), std::string::npos) << e.what();
  }
  auto holes = at::tensor({0, 1, 0, 1, 1, 1, 1, 1}, at::kLong).view({2, 4});
  EXPECT_THROW(generate(*model, ids, o, holes), c10::Error);
  EXPECT_THROW(generate(*model, ids, o, at::ones({2, 3}, at::kLong)), c10::Error);  // not the prompt's shape
  EXPECT_THROW(model->forward(ids, nullptr, c10::nullopt, c10::nullopt, at::ones({2, 5}, at::kLong)), c10::Error);
}

}  // namespace
}  // namespace anvil::model
