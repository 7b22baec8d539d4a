// The model's "sparse" attention backend (anvil_attention_backend = "sparse", keys anvil_sparse_*): a tiny
// Llama (head dim 64, GQA 4/2) whose logits with an unlimited window equal the dense SDPA backend's, and
// differ from them once the window is shorter than the sequence; the settings parse and are checked.
#include "anvil/model/config.h"
#include "anvil/model/sparse_attention.h"
#include "anvil/model/transformer.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <sstream>

namespace {

using anvil::model::parse_model_config;

std::string tiny_llama(const std::string& extra) {
  std::ifstream f(std::string(ANVIL_MODEL_TEST_CONFIGS) + "/tiny_llama3_v5.json");
  std::stringstream ss;
  ss << f.rdbuf();
  std::string text = ss.str();
  auto replace = [&](const std::string& from, const std::string& to) {
    const auto pos = text.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    if (pos != std::string::npos) text.replace(pos, from.size(), to);
  };
  replace("\"head_dim\": 8", "\"head_dim\": 64");
  replace("\"hidden_size\": 32", "\"hidden_size\": 256" + extra);
  return text;
}

at::Tensor logits_of(const std::string& json, const at::Tensor& ids) {
  torch::manual_seed(3);
  auto model = std::make_shared<anvil::model::CausalLM>(parse_model_config(json), at::TensorOptions().dtype(at::kFloat));
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters()) p.normal_(0.0, 0.05);
  for (auto& item : model->named_parameters()) {
    if (item.key().find("norm") != std::string::npos) item.value().fill_(1.0);
  }
  model->eval();
  return model->forward(ids);
}

TEST(SparseBackend, UnlimitedWindowEqualsDenseAndShortWindowDiffers) {
  const auto ids = at::randint(0, 64, {1, 150}, at::TensorOptions().dtype(at::kLong));
  const auto dense = logits_of(tiny_llama(""), ids);
  const auto full = logits_of(tiny_llama(", \"anvil_attention_backend\": \"sparse\", \"anvil_sparse_window\": -1"), ids);
  EXPECT_LE((full - dense).abs().max().item<double>(), 1e-4 * dense.abs().max().item<double>());
  const auto windowed = logits_of(
      tiny_llama(", \"anvil_attention_backend\": \"sparse\", \"anvil_sparse_window\": 16, \"anvil_sparse_top_n\": 1"), ids);
  EXPECT_TRUE(at::allclose(windowed.narrow(1, 0, 16), dense.narrow(1, 0, 16), 1e-4, 1e-5));  // inside the window
  EXPECT_GT((windowed - dense).abs().max().item<double>(), 1e-3);
}

TEST(SparseBackend, SettingsParseAndAreChecked) {
  const auto c = parse_model_config(tiny_llama(", \"anvil_attention_backend\": \"sparse\", \"anvil_sparse_window\": 512, "
                                               "\"anvil_sparse_sink_tokens\": 4, \"anvil_sparse_top_n\": 16"));
  EXPECT_EQ(c.attention_backend, "sparse");
  EXPECT_EQ(c.sparse.window, 512);
  EXPECT_EQ(c.sparse.sink_tokens, 4);
  EXPECT_EQ(c.sparse.top_n, 16);
  EXPECT_EQ(c.sparse.block_size, 64);
  EXPECT_THROW(parse_model_config(tiny_llama(", \"anvil_attention_backend\": \"sparse\", \"anvil_sparse_block_size\": 100")),
               std::runtime_error);
}

TEST(SparseBackend, CuSeqlensFromDocIds) {
  const auto cu = anvil::model::cu_seqlens_from_doc_ids(at::tensor({0, 0, 0, 1, 1, 2}, at::kLong).view({1, 6}));
  EXPECT_TRUE(at::equal(cu, at::tensor({0, 3, 5, 6}, at::kInt)));
}

}  // namespace
