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

// ---- packed documents on the varlen path --------------------------------------------------------------
// Rows that pack several documents: the varlen path (sparse_attention with cu_seqlens over the flattened
// rows) against the (B, 1, S, S) document mask, on the CPU through the op's reference (forced with
// ANVIL_PACKED_ATTENTION=varlen), logits and gradients; on CUDA in bf16 (the default there).

struct PackedEnv {
  explicit PackedEnv(const char* value) { ::setenv("ANVIL_PACKED_ATTENTION", value, 1); }
  ~PackedEnv() { ::unsetenv("ANVIL_PACKED_ATTENTION"); }
};

TEST(PackedAttention, CuSeqlensOfPackedRows) {
  const auto doc_ids = at::tensor({0, 0, 1, 1, 1, 0, 0, 0, 2, 2}, at::kLong).view({2, 5});
  const auto m = anvil::model::AttentionMask::packed(doc_ids, 7);
  EXPECT_TRUE(at::equal(m.cu_seqlens, at::tensor({0, 2, 5, 8, 10}, at::kInt)));
  EXPECT_FALSE(m.mask.defined());
  EXPECT_EQ(m.window, 7);
  // A row holding one document still starts a document at its first token.
  const auto single = anvil::model::AttentionMask::packed(at::zeros({3, 4}, at::kLong), 0);
  EXPECT_TRUE(at::equal(single.cu_seqlens, at::tensor({0, 4, 8, 12}, at::kInt)));
}

std::shared_ptr<anvil::model::CausalLM> seeded_model(const std::string& json, at::ScalarType dtype) {
  torch::manual_seed(3);
  auto model = std::make_shared<anvil::model::CausalLM>(parse_model_config(json), at::TensorOptions().dtype(at::kFloat));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_(0.0, 0.05);
    for (auto& item : model->named_parameters())
      if (item.key().find("norm") != std::string::npos) item.value().fill_(1.0);
  }
  model->to(dtype);
  return model;
}

// Two rows of 150 tokens, documents of 40 / 70 / 40 and 100 / 50 tokens, positions restarting per document.
std::pair<at::Tensor, at::Tensor> packed_rows_doc_ids_and_positions() {
  auto doc = at::zeros({2, 150}, at::kLong);
  doc[0].narrow(0, 40, 70).fill_(1);
  doc[0].narrow(0, 110, 40).fill_(2);
  doc[1].narrow(0, 100, 50).fill_(1);
  auto pos = at::zeros({2, 150}, at::kLong);
  pos[0].narrow(0, 0, 40).copy_(at::arange(40));
  pos[0].narrow(0, 40, 70).copy_(at::arange(70));
  pos[0].narrow(0, 110, 40).copy_(at::arange(40));
  pos[1].narrow(0, 0, 100).copy_(at::arange(100));
  pos[1].narrow(0, 100, 50).copy_(at::arange(50));
  return {doc, pos};
}

TEST(PackedAttention, VarlenEqualsTheDocumentMaskOnCpu) {
  const auto ids = at::randint(0, 64, {2, 150}, at::TensorOptions().dtype(at::kLong));
  const auto doc_pos = packed_rows_doc_ids_and_positions();
  const at::Tensor doc = doc_pos.first, pos = doc_pos.second;
  // Llama, and the same as Mistral with a sliding window of 32 (shorter than the documents).
  auto mistral = [](std::string text) {
    text.replace(text.find("LlamaForCausalLM"), 16, "MistralForCausalLM");
    text.replace(text.find("\"model_type\": \"llama\""), 21, "\"model_type\": \"mistral\", \"sliding_window\": 32");
    return text;
  };
  for (const std::string& json : {tiny_llama(""), mistral(tiny_llama(""))}) {
    const std::string extra = json.find("mistral") != std::string::npos ? " (mistral, window 32)" : " (llama)";
    auto run = [&](const char* path) {
      PackedEnv env(path);
      auto model = seeded_model(json, at::kFloat);
      auto logits = model->forward(ids, nullptr, pos, doc);  // (B, S, V)
      (logits.square().mean()).backward();
      std::vector<at::Tensor> grads;
      for (auto& p : model->parameters()) grads.push_back(p.grad().clone());
      return std::make_pair(logits.detach(), grads);
    };
    const auto mask_run = run("mask");
    const auto varlen_run = run("varlen");
    const at::Tensor& mask_logits = mask_run.first;
    const at::Tensor& varlen_logits = varlen_run.first;
    const auto& mask_grads = mask_run.second;
    const auto& varlen_grads = varlen_run.second;
    EXPECT_LE((varlen_logits - mask_logits).abs().max().item<double>(), 1e-4 * mask_logits.abs().max().item<double>())
        << "logits" << extra;
    for (size_t i = 0; i < mask_grads.size(); ++i)
      EXPECT_LE((varlen_grads[i] - mask_grads[i]).abs().max().item<double>(),
                1e-4 * mask_grads[i].abs().max().item<double>() + 1e-8)
          << "gradient " << i << extra;
  }
}

TEST(PackedAttention, SparseBackendKeepsPackedDocumentsApart) {
  // The sparse backend with an unlimited window on packed rows equals the dense backend's document mask.
  const auto ids = at::randint(0, 64, {2, 150}, at::TensorOptions().dtype(at::kLong));
  const auto doc_pos = packed_rows_doc_ids_and_positions();
  const at::Tensor doc = doc_pos.first, pos = doc_pos.second;
  torch::NoGradGuard no_grad;
  at::Tensor dense, sparse;
  {
    PackedEnv env("mask");
    dense = seeded_model(tiny_llama(""), at::kFloat)->forward(ids, nullptr, pos, doc);
  }
  {
    PackedEnv env("varlen");
    sparse = seeded_model(tiny_llama(", \"anvil_attention_backend\": \"sparse\", \"anvil_sparse_window\": -1"), at::kFloat)
                 ->forward(ids, nullptr, pos, doc);
  }
  EXPECT_LE((sparse - dense).abs().max().item<double>(), 1e-4 * dense.abs().max().item<double>());
}

TEST(PackedAttentionCuda, VarlenBf16WithinTwiceTheMaskPathsError) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const auto ids = at::randint(0, 64, {2, 150}, at::TensorOptions().dtype(at::kLong));
  const auto doc_pos = packed_rows_doc_ids_and_positions();
  const at::Tensor doc = doc_pos.first, pos = doc_pos.second;
  torch::NoGradGuard no_grad;
  at::Tensor reference;  // fp32 on the CPU, document mask
  {
    PackedEnv env("mask");
    reference = seeded_model(tiny_llama(""), at::kFloat)->forward(ids, nullptr, pos, doc);
  }
  auto on_gpu = [&](const char* path) {
    PackedEnv env(path);
    auto model = seeded_model(tiny_llama(""), at::kBFloat16);
    model->to(at::kCUDA);
    return model->forward(ids.cuda(), nullptr, pos.cuda(), doc.cuda()).cpu().to(at::kFloat);
  };
  const double err_mask = (on_gpu("mask") - reference).abs().max().item<double>();
  const double err_varlen = (on_gpu("varlen") - reference).abs().max().item<double>();
  EXPECT_LE(err_varlen, 2 * err_mask + 1e-3) << "mask path error " << err_mask;
}
