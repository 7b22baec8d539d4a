// The causal LM (include/anvil/model/transformer.h): decoder layers, the forward pass with an
// optional KV cache, and the Hugging Face checkpoint bridge (load with name canonicalisation and
// FP8 dequantization, save in HF layout through anvil::io).
//
// Name canonicalisation exists because one architecture has several spellings in the wild:
// transformers 5.17 holds experts fused in memory (`mlp.experts.gate_up_proj` (E, 2I, H),
// `mlp.experts.down_proj` (E, H, I)) but its save_pretrained writes them per expert, and Mixtral's
// published checkpoints say `block_sparse_moe.experts.{e}.w1` where a converted one may say
// `mlp.experts.{e}.gate_proj`. Everything is mapped to the module names here, which are what
// save_pretrained writes, so anvil's output loads in transformers and in anvil alike.
#include "anvil/model/transformer.h"
#include "anvil/model/layer_outputs.h"

#include "anvil/io/safetensors.h"
#include "anvil/model/compressed_tensors.h"
#include "anvil/model/gguf_model.h"
#include "anvil/ops.h"
#include "anvil/model/checkpointing.h"
#include "model/quantized_modules.h"
#include "anvil/io/fs.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <nlohmann/json.hpp>
#include <torch/nn/module.h>

#include <regex>
#include <set>
#include <stdexcept>

namespace anvil::model {

// ---- decoder layer and base model ----------------------------------------------------------------

DecoderLayer::DecoderLayer(const ModelConfig& c, int64_t layer_index, const at::TensorOptions& options) {
  if (c.mla) mla_ = register_module("self_attn", std::make_shared<MlaAttention>(c, options));
  else gqa_ = register_module("self_attn", std::make_shared<GqaAttention>(c, options));
  if (c.is_moe_layer(layer_index)) {
    moe_ = register_module(c.family == ModelFamily::kMixtral ? "block_sparse_moe" : "mlp",
                           std::make_shared<MoeBlock>(c, options));
  } else {
    mlp_ = register_module("mlp", std::make_shared<SwiGluMlp>(c.hidden_size, c.intermediate_size, c.mlp_bias,
                                                              std::array<std::string, 3>{"gate_proj", "up_proj", "down_proj"},
                                                              options));
  }
  input_layernorm_ = register_module("input_layernorm", std::make_shared<RmsNorm>(c.hidden_size, c.rms_norm_eps, options));
  post_attention_layernorm_ =
      register_module("post_attention_layernorm", std::make_shared<RmsNorm>(c.hidden_size, c.rms_norm_eps, options));
}

at::Tensor DecoderLayer::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const AttentionMask& mask, LayerCache* cache) {
  auto normed = input_layernorm_->forward(x);
  auto attn = mla_ ? mla_->forward(normed, cos, sin, mask, cache) : gqa_->forward(normed, cos, sin, mask, cache);
  auto h = x + attn;
  normed = post_attention_layernorm_->forward(h);
  return h + (moe_ ? moe_->forward(normed) : mlp_->forward(normed));
}

TransformerModel::TransformerModel(const ModelConfig& c, const at::TensorOptions& options)
    : config_(c), rotary_(c.rope) {
  embed_tokens = register_module("embed_tokens", std::make_shared<Embedding>(c.vocab_size, c.hidden_size, options));
  layers_ = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    auto layer = std::make_shared<DecoderLayer>(c, i, options);
    layers_->push_back(layer);
    layer_list_.push_back(layer);
  }
  norm_ = register_module("norm", std::make_shared<RmsNorm>(c.hidden_size, c.rms_norm_eps, options));
}

namespace {

// Packed documents: the causal (and sliding-window) mask further limited to keys of the query's own
// document, (B, 1, S, S) bool. O(S^2) memory per row: fine for the fine-tuning lengths of the dense path.
AttentionMask document_mask(const AttentionMask& base, int64_t s, const at::Tensor& doc_ids) {
  auto allowed = base.mask.defined() ? base.mask
                                     : at::ones({s, s}, doc_ids.options().dtype(at::kBool)).tril();  // (S, S)
  auto same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1);                                        // (B, S, S)
  AttentionMask m;
  m.mask = (same & allowed.unsqueeze(0)).unsqueeze(1);  // (B, 1, S, S)
  m.causal = false;
  return m;
}

// Left-padded rows: the causal (and sliding-window) mask of S new tokens after `offset` cached ones, further
// limited to the keys that hold real tokens, (B, 1, S, L) bool. A query at a pad position keeps its own key:
// a softmax row with no key would give NaN, and 0 * NaN in a real row's probs @ v would spread it.
AttentionMask padding_mask(const AttentionMask& base, int64_t s, int64_t offset, const at::Tensor& key_mask) {
  const int64_t l = offset + s;
  const auto opts = key_mask.options().dtype(at::kLong);
  auto q = at::arange(offset, l, opts).unsqueeze(1);  // (S, 1)
  auto k = at::arange(0, l, opts).unsqueeze(0);       // (1, L)
  auto allowed = base.mask.defined() ? base.mask : (base.causal ? k <= q : at::ones({s, l}, key_mask.options()));  // (S, L)
  AttentionMask m;
  m.mask = (allowed.unsqueeze(0) & (key_mask.unsqueeze(1) | (k == q).unsqueeze(0))).unsqueeze(1);  // (B, 1, S, L)
  m.causal = false;
  return m;
}

}  // namespace

// ---- the per-layer states registry (anvil/model/layer_outputs.h) ----------------------------------------

namespace {
thread_local std::vector<std::pair<const TransformerModel*, std::vector<at::Tensor>*>> tls_layer_sinks;
}  // namespace

LayerOutputsScope::LayerOutputsScope(const TransformerModel& model, std::vector<at::Tensor>* sink)
    : model_(&model), active_(sink != nullptr) {
  if (active_) tls_layer_sinks.emplace_back(model_, sink);
}

LayerOutputsScope::~LayerOutputsScope() {
  if (!active_) return;
  for (auto it = tls_layer_sinks.rbegin(); it != tls_layer_sinks.rend(); ++it)
    if (it->first == model_) {
      tls_layer_sinks.erase(std::next(it).base());
      return;
    }
}

std::vector<at::Tensor>* layer_outputs_sink(const TransformerModel& model) {
  for (auto it = tls_layer_sinks.rbegin(); it != tls_layer_sinks.rend(); ++it)
    if (it->first == &model) return it->second;
  return nullptr;
}

at::Tensor TransformerModel::forward(const at::Tensor& input_ids, const at::Tensor& positions, KvCache* cache,
                                     const at::Tensor& doc_ids, const at::Tensor& key_mask) {
  const int64_t s = input_ids.size(1);
  const int64_t offset = cache ? cache->length() : 0;
  auto h = embed_tokens->forward(input_ids);  // (B, S, H)
  auto [cos, sin] = rotary_.cos_sin(positions, h.scalar_type());  // (B, S, rope_dim)
  auto full = AttentionMask::make(s, offset, 0, h.device());
  AttentionMask sliding;
  if (config_.sliding_window > 0) sliding = AttentionMask::make(s, offset, config_.sliding_window, h.device());
  if (doc_ids.defined()) {
    const int64_t qk_dim = config_.mla ? config_.qk_nope_head_dim + config_.qk_rope_head_dim : config_.head_dim;
    const int64_t v_dim = config_.mla ? config_.v_head_dim : config_.head_dim;
    if (!cache && use_varlen_for_packed(h.device(), h.scalar_type(), qk_dim, v_dim, s)) {
      full = AttentionMask::packed(doc_ids, 0);
      if (config_.sliding_window > 0) sliding = AttentionMask::packed(doc_ids, config_.sliding_window);
    } else {
      full = document_mask(full, s, doc_ids);
      if (config_.sliding_window > 0) sliding = document_mask(sliding, s, doc_ids);
    }
  }
  std::vector<at::Tensor>* const layer_outputs = layer_outputs_sink(*this);  // hidden-state losses; usually null
  if (layer_outputs) layer_outputs->push_back(h);
  if (key_mask.defined()) {
    full = padding_mask(full, s, offset, key_mask);
    if (config_.sliding_window > 0) sliding = padding_mask(sliding, s, offset, key_mask);
  }
  for (size_t i = 0; i < layer_list_.size(); ++i) {
    const bool window = config_.sliding_window > 0 && config_.layer_sliding[i];
    if (layer_wrapper_ && !cache) {
      // The bound forward keeps its own handles, as checkpoint's: a wrapper may run it again in backward.
      h = layer_wrapper_(
          int64_t(i),
          [layer = layer_list_[i], cos, sin, mask = window ? sliding : full](const at::Tensor& x) {
            return layer->forward(x, cos, sin, mask, nullptr);
          },
          h);
      if (layer_outputs) layer_outputs->push_back(h);
      continue;
    }
    if (gradient_checkpointing_ && !cache && at::GradMode::is_enabled()) {
      // The lambda keeps its own handles: backward runs it again after this function has returned.
      h = checkpoint(
          [layer = layer_list_[i], cos, sin, mask = window ? sliding : full](const at::Tensor& x) {
            return layer->forward(x, cos, sin, mask, nullptr);
          },
          h);
      if (layer_outputs) layer_outputs->push_back(h);
      continue;
    }
    h = layer_list_[i]->forward(h, cos, sin, window ? sliding : full, cache ? &cache->layers[i] : nullptr);
    if (layer_outputs) layer_outputs->push_back(h);
  }
  return norm_->forward(h);
}

// ---- causal LM -------------------------------------------------------------------------------------

CausalLM::CausalLM(ModelConfig config, const at::TensorOptions& options) : config_(std::move(config)) {
  model = register_module("model", std::make_shared<TransformerModel>(config_, options));
  if (!config_.tie_word_embeddings)
    lm_head = register_module("lm_head", std::make_shared<Linear>(config_.hidden_size, config_.vocab_size, false, options));
}

at::Tensor CausalLM::hidden_states(const at::Tensor& input_ids, KvCache* cache, const c10::optional<at::Tensor>& positions,
                                   const c10::optional<at::Tensor>& doc_ids,
                                   const c10::optional<at::Tensor>& attention_mask) {
  TORCH_CHECK(input_ids.dim() == 2, "input_ids must be (B, S), got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == at::kLong, "input_ids must be int64, got ", input_ids.scalar_type());
  if (cache) TORCH_CHECK(int64_t(cache->layers.size()) == config_.num_hidden_layers, "cache has ",
                         cache->layers.size(), " layers, the model ", config_.num_hidden_layers);
  auto ids = input_ids.to(device());
  at::Tensor pos;
  if (positions) {
    TORCH_CHECK(positions->sizes() == input_ids.sizes(), "positions must be shaped like input_ids ", input_ids.sizes(),
                ", got ", positions->sizes());
    pos = positions->to(device(), at::kLong);
  } else {
    const int64_t offset = cache ? cache->length() : 0;
    pos = at::arange(offset, offset + ids.size(1), ids.options()).unsqueeze(0).expand({ids.size(0), -1});
  }
  at::Tensor docs;
  if (doc_ids) {
    TORCH_CHECK(!cache, "doc_ids (packed documents) cannot be combined with a KV cache");
    TORCH_CHECK(doc_ids->sizes() == input_ids.sizes(), "doc_ids must be shaped like input_ids ", input_ids.sizes(),
                ", got ", doc_ids->sizes());
    docs = doc_ids->to(device(), at::kLong);
  }
  at::Tensor keys;
  if (attention_mask) {
    TORCH_CHECK(!doc_ids, "attention_mask (padded rows) cannot be combined with doc_ids (packed documents)");
    const int64_t l = (cache ? cache->length() : 0) + ids.size(1);
    TORCH_CHECK(attention_mask->dim() == 2 && attention_mask->size(0) == ids.size(0) && attention_mask->size(1) == l,
                "attention_mask must be (B, cached + new tokens) = (", ids.size(0), ", ", l, "), got ",
                attention_mask->sizes());
    keys = attention_mask->to(device()).ne(0);  // (B, L) bool
  }
  return model->forward(ids, pos, cache, docs, keys);
}

at::Tensor CausalLM::forward(const at::Tensor& input_ids, KvCache* cache, const c10::optional<at::Tensor>& positions,
                             const c10::optional<at::Tensor>& doc_ids, const c10::optional<at::Tensor>& attention_mask) {
  auto h = hidden_states(input_ids, cache, positions, doc_ids, attention_mask);  // (B, S, H)
  return lm_head ? lm_head->forward(h) : at::linear(h, model->embed_tokens->weight);  // (B, S, V)
}

KvCache CausalLM::make_cache() const {
  KvCache cache;
  cache.layers.resize(config_.num_hidden_layers);
  return cache;
}

at::ScalarType CausalLM::dtype() const { return model->embed_tokens->weight.scalar_type(); }
at::Device CausalLM::device() const { return model->embed_tokens->weight.device(); }

std::vector<std::pair<std::string, at::Tensor>> CausalLM::state_tensors() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& p : named_parameters(/*recurse=*/true)) out.emplace_back(p.key(), p.value());
  for (const auto& b : named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

// ---- checkpoint names ------------------------------------------------------------------------------

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size())) s.replace(pos, from.size(), to);
}

// Keys a checkpoint may carry that the model has no use for: rotary tables some old checkpoints
// saved, DeepSeek-V3's multi-token-prediction layers (model.layers.{N..}), a tied lm_head.
bool ignored_key(const ModelConfig& c, const std::string& key) {
  if (key.find("rotary_emb.inv_freq") != std::string::npos) return true;
  if (c.tie_word_embeddings && key == "lm_head.weight") return true;
  static const std::regex kLayer(R"(^model\.layers\.(\d+)\.)");
  std::smatch m;
  if (std::regex_search(key, m, kLayer) && std::stoll(m[1]) >= c.num_hidden_layers) return true;
  return false;
}

// FineGrainedFP8: `X.weight` F8_E4M3 with `X.weight_scale_inv` fp32 (ceil(N/128), ceil(K/128)),
// dequantized one tensor at a time (on the model's device) so that the peak memory is one weight.
at::Tensor dequantize_if_fp8(const std::string& key, const at::Tensor& t,
                             const std::unordered_map<std::string, at::Tensor>& all, at::ScalarType dtype,
                             const at::Device& device, std::set<std::string>& used) {
  if (t.scalar_type() != at::kFloat8_e4m3fn) return t;
  const std::string scale_key = key + "_scale_inv";
  auto it = all.find(scale_key);
  if (it == all.end())
    throw std::runtime_error("checkpoint tensor '" + key + "' is float8_e4m3fn but '" + scale_key +
                             "' (its block128x128 scales) is missing");
  if (t.dim() != 2)
    throw std::runtime_error("checkpoint tensor '" + key + "' is float8_e4m3fn with " + std::to_string(t.dim()) +
                             " dims; only 2-D weights with block128x128 scales are supported");
  used.insert(scale_key);
  return anvil::ops::dequantize_fp8(t.to(device), it->second.to(device, at::kFloat), "block128x128", dtype);
}

// One tensor of a fused expert layout (E, ...) split into the per-expert keys.
void split_fused_experts(const std::string& prefix, const std::string& kind, const at::Tensor& t, bool mixtral,
                         std::unordered_map<std::string, at::Tensor>& out) {
  const std::string gate = mixtral ? "w1" : "gate_proj", up = mixtral ? "w3" : "up_proj", down = mixtral ? "w2" : "down_proj";
  if (t.dim() != 3) throw std::runtime_error("fused expert tensor '" + prefix + "experts." + kind + "' must be 3-D, got " +
                                             std::to_string(t.dim()) + " dims");
  for (int64_t e = 0; e < t.size(0); ++e) {
    const std::string base = prefix + "experts." + std::to_string(e) + ".";
    if (kind == "gate_up_proj") {  // (E, 2I, H): gate rows then up rows
      const int64_t i = t.size(1) / 2;
      out[base + gate + ".weight"] = t[e].narrow(0, 0, i);
      out[base + up + ".weight"] = t[e].narrow(0, i, i);
    } else {  // down_proj (E, H, I)
      out[base + down + ".weight"] = t[e];
    }
  }
}

std::unordered_map<std::string, at::Tensor> canonical_tensors(const ModelConfig& c,
                                                              const std::unordered_map<std::string, at::Tensor>& in) {
  const bool mixtral = c.family == ModelFamily::kMixtral;
  static const std::regex kFused(R"(^(.*\.)experts\.(gate_up_proj|down_proj)$)");
  static const std::regex kExpert(R"(\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.)");
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [key_in, t] : in) {
    if (ignored_key(c, key_in)) continue;
    std::string key = key_in;
    if (c.num_experts > 0) {
      if (mixtral) {
        replace_all(key, ".mlp.gate.", ".block_sparse_moe.gate.");
        replace_all(key, ".mlp.experts.", ".block_sparse_moe.experts.");
      } else {
        replace_all(key, ".block_sparse_moe.", ".mlp.");
      }
      std::smatch m;
      if (std::regex_match(key, m, kFused)) {
        split_fused_experts(m[1], m[2], t, mixtral, out);
        continue;
      }
      if (std::regex_search(key, m, kExpert)) {
        static const std::map<std::string, std::string> kToMixtral = {
            {"gate_proj", "w1"}, {"up_proj", "w3"}, {"down_proj", "w2"}, {"w1", "w1"}, {"w2", "w2"}, {"w3", "w3"}};
        static const std::map<std::string, std::string> kToHf = {{"w1", "gate_proj"},     {"w3", "up_proj"},
                                                                 {"w2", "down_proj"},     {"gate_proj", "gate_proj"},
                                                                 {"up_proj", "up_proj"}, {"down_proj", "down_proj"}};
        const std::string name = (mixtral ? kToMixtral : kToHf).at(m[2]);
        key = m.prefix().str() + ".experts." + m[1].str() + "." + name + "." + m.suffix().str();
      }
    }
    out[key] = t;
  }
  return out;
}

std::string join_first(const std::vector<std::string>& names, size_t n = 8) {
  std::string s;
  for (size_t i = 0; i < names.size() && i < n; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > n) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s;
}

// compressed-tensors (anvil/model/compressed_tensors.h, llm-compressor's checkpoints): the tensors of each
// module are grouped by module name as stored, the config group that covers the module is found with the
// checkpoint's own names (targets and ignore are written in them), and the module's tensors are replaced
// by a dense `<module>.weight` in `dtype`; load_state then canonicalises names as for any checkpoint.
// Every missing tensor is collected and named in one error; quantized tensors no group covers are an
// error; tensors a scheme does not use are left for load_state to report as unexpected.
//
// Modules whose scheme is one of the Linear weight formats may instead keep their quantized weights as stored
// (model/quantized_modules.h, load_compressed_module).
std::unordered_map<std::string, at::Tensor> dequantize_compressed_tensors(CausalLM& model,
                                                                          const std::unordered_map<std::string, at::Tensor>& in,
                                                                          at::ScalarType dtype, const std::string& dir,
                                                                          const KeepRules& rules) {
  namespace ct = anvil::model::ct;
  const ModelConfig& c = model.config();
  const ct::Config config = ct::parse_quantization_config(nlohmann::json::parse(c.json).at("quantization_config"));
  static const std::set<std::string> kLocal = {"weight",       "weight_packed",    "weight_scale", "weight_shape",
                                               "weight_zero_point", "weight_g_idx", "input_scale",  "input_zero_point",
                                               "output_scale", "output_zero_point"};
  std::map<std::string, ct::ModuleTensors> modules;
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& [key, t] : in) {
    const auto dot = key.rfind('.');
    if (dot != std::string::npos && kLocal.count(key.substr(dot + 1))) modules[key.substr(0, dot)][key.substr(dot + 1)] = t;
    else out[key] = t;
  }
  std::map<std::string, std::shared_ptr<Linear>> linears;
  for (const auto& [name, linear] : named_linears(model)) linears[name] = linear;
  std::vector<std::string> missing;
  for (auto& [name, tensors] : modules) {
    const auto canonical = canonical_tensors(c, {{name + ".weight", at::Tensor()}});
    if (canonical.empty()) continue;  // a layer the model does not have (DeepSeek-V3's MTP layer)
    std::string canon = canonical.begin()->first;
    canon = canon.substr(0, canon.size() - std::string(".weight").size());
    auto w = tensors.find("weight");
    const bool quantized = tensors.size() > 1 || w == tensors.end() || !at::isFloatingType(w->second.scalar_type()) ||
                           w->second.scalar_type() == at::kFloat8_e4m3fn;
    // Class names as llm-compressor saw them: the projections (and anything it quantized) are Linear.
    std::vector<std::string> classes;
    if (quantized || linears.count(canon)) classes = {"Linear"};
    else if (canon == "model.embed_tokens") classes = {"Embedding"};
    auto hit = ct::scheme_for(config, name, classes);
    if (!hit) {
      if (quantized) {
        std::string held;
        for (const auto& [local, t] : tensors) held += (held.empty() ? "" : ", ") + name + "." + local;
        throw std::runtime_error(dir + ": compressed-tensors module '" + name + "' holds quantized tensors (" + held +
                                 ") but no quantization_config.config_groups entry covers it (ignored or not targeted)");
      }
      for (const auto& [local, t] : tensors) out[name + "." + local] = t;
      continue;
    }
    const ct::Scheme& scheme = *hit->second;
    const std::string format = ct::effective_format(config, scheme);
    const auto required = ct::required_keys("", scheme, format);
    bool complete = true;
    for (const auto& k : required)
      if (!tensors.count(k)) {
        missing.push_back(name + "." + k);
        complete = false;
      }
    if (!complete) continue;
    ct::ModuleTensors used;
    for (const auto& [local, t] : tensors) {
      if (std::find(required.begin(), required.end(), local) != required.end() || local == "weight_g_idx") used[local] = t;
      else out[name + "." + local] = t;  // not part of the scheme: load_state reports it as unexpected
    }
    auto linear = linears.find(canon);
    load_compressed_module(linear == linears.end() ? nullptr : linear->second.get(), scheme, format, used, dtype, name,
                           rules, out);
  }
  if (!missing.empty()) {
    std::sort(missing.begin(), missing.end());
    throw std::runtime_error(dir + ": compressed-tensors checkpoint is missing tensors its quantization_config needs: " +
                             join_first(missing, 16));
  }
  return out;
}

// Copies each target (checkpoint name, model tensor) from the canonical checkpoint tensors: FP8 targets take the
// stored bytes, the rest dequantize where the checkpoint is FP8. Marks what it used; returns the missing and
// wrongly shaped names as an error text ("" when every target was filled). One loop for a whole model and for
// one decoder layer, so both refuse a checkpoint alike.
std::string copy_checkpoint_tensors(const std::vector<std::pair<std::string, at::Tensor>>& targets,
                                    const std::unordered_map<std::string, at::Tensor>& canonical,
                                    std::set<std::string>& used) {
  std::vector<std::string> missing, mismatched;
  for (const auto& [name, target] : targets) {
    auto it = canonical.find(name);
    if (it == canonical.end()) {
      missing.push_back(name);
      continue;
    }
    if (it->second.sizes() != target.sizes()) {
      std::ostringstream msg;
      msg << name << " " << it->second.sizes() << " (model expects " << target.sizes() << ")";
      mismatched.push_back(msg.str());
      continue;
    }
    at::Tensor t = target;
    if (t.scalar_type() == at::kFloat8_e4m3fn) {
      t.copy_(it->second);  // a Linear that keeps the checkpoint's FP8 weight: as stored
    } else {
      t.copy_(dequantize_if_fp8(name, it->second, canonical, t.scalar_type(), t.device(), used));
    }
    used.insert(name);
  }
  std::string problems;
  if (!missing.empty()) problems += " missing tensors: " + join_first(missing) + ";";
  if (!mismatched.empty()) problems += " wrong shapes: " + join_first(mismatched) + ";";
  return problems;
}

}  // namespace

void CausalLM::load_state(const std::unordered_map<std::string, at::Tensor>& tensors) {
  at::NoGradGuard no_grad;
  const auto canonical = canonical_tensors(config_, tensors);
  std::set<std::string> used;
  std::string problems = copy_checkpoint_tensors(state_tensors(), canonical, used);
  std::vector<std::string> unexpected;
  for (const auto& [name, t] : canonical)
    if (!used.count(name)) unexpected.push_back(name);
  std::sort(unexpected.begin(), unexpected.end());
  if (!unexpected.empty()) problems += " unexpected tensors: " + join_first(unexpected) + ";";
  if (!problems.empty())
    throw std::runtime_error("loading " + config_.architecture + " weights:" + problems);
}

// ---- one decoder layer alone (streaming work: anvil quantize) ---------------------------------------

std::shared_ptr<DecoderLayer> load_decoder_layer(const ModelConfig& config, int64_t index,
                                                 const std::unordered_map<std::string, at::Tensor>& tensors,
                                                 const at::TensorOptions& options) {
  at::NoGradGuard no_grad;
  const std::string prefix = "model.layers." + std::to_string(index) + ".";
  std::unordered_map<std::string, at::Tensor> mine;
  for (const auto& [name, t] : tensors)
    if (name.compare(0, prefix.size(), prefix) == 0) mine.emplace(name, t);
  const auto canonical = canonical_tensors(config, mine);
  auto layer = std::make_shared<DecoderLayer>(config, index, options);
  std::set<std::string> used;
  std::vector<std::pair<std::string, at::Tensor>> targets;
  for (const auto& p : layer->named_parameters(/*recurse=*/true)) targets.emplace_back(prefix + p.key(), p.value());
  for (const auto& b : layer->named_buffers(/*recurse=*/true)) targets.emplace_back(prefix + b.key(), b.value());
  const std::string problems = copy_checkpoint_tensors(targets, canonical, used);
  if (!problems.empty())
    throw std::runtime_error("loading decoder layer " + std::to_string(index) + " of " + config.architecture + ":" + problems);
  layer->eval();
  return layer;
}

DecoderLayerInputs decoder_layer_inputs(const ModelConfig& config, int64_t index, const at::Tensor& positions,
                                        at::ScalarType dtype) {
  DecoderLayerInputs in;
  RotaryEmbedding rotary(config.rope);
  std::tie(in.cos, in.sin) = rotary.cos_sin(positions, dtype);
  const bool window = config.sliding_window > 0 && config.layer_sliding[index];
  in.mask = AttentionMask::make(positions.size(1), 0, window ? config.sliding_window : 0, positions.device());
  return in;
}

// ---- load and save ---------------------------------------------------------------------------------

at::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32" || name == "fp32") return at::kFloat;
  if (name == "bfloat16" || name == "bf16") return at::kBFloat16;
  if (name == "float16" || name == "fp16") return at::kHalf;
  throw std::runtime_error("dtype '" + name + "' is not supported (float32, bfloat16, float16)");
}

c10::optional<at::ScalarType> parse_dtype(const std::string& name, const std::string& what, bool allow_auto) {
  if (allow_auto && name == "auto") return c10::nullopt;
  if (name != "float32" && name != "bfloat16" && name != "float16")
    throw std::invalid_argument(what + " must be " + (allow_auto ? "auto, " : "") + "float32, bfloat16 or float16, got '" +
                                name + "'");
  return dtype_from_name(name);
}

at::Device parse_device(const std::string& name, const std::string& what) {
  if (name.empty() || name == "auto") return at::hasCUDA() ? at::Device("cuda") : at::Device(at::kCPU);
  const bool cuda_n = name.rfind("cuda:", 0) == 0 && name.size() > 5 &&
                      name.find_first_not_of("0123456789", 5) == std::string::npos;
  if (name != "cpu" && name != "cuda" && !cuda_n)
    throw std::invalid_argument(what + " must be auto, cpu, cuda or cuda:N, got '" + name + "'");
  if (name != "cpu" && !at::hasCUDA())
    throw std::invalid_argument(what + " " + name + ": no CUDA device is available (use cpu)");
  return at::Device(name);
}

std::string dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: throw std::runtime_error(std::string("model dtype ") + c10::toString(dtype) + " has no config.json name");
  }
}

namespace {

// Whether anvil's FP8 GEMM kernel runs on `device` (an sm_90 GPU with the sm_90a build).
bool fp8_gemm_runs_on(const at::Device& device) {
  if (!device.is_cuda()) return false;
  c10::DeviceGuard guard(device);
  return !anvil::ops::fp8_gemm_config(4096, 4096, 4096).empty();
}

// Before loading an FP8 checkpoint with FP8 kept: each Linear whose checkpoint weight is F8_E4M3 becomes
// an fp8 Linear with empty tensors of the stored shapes, which load_state then fills as stored (so the
// dense weight is never materialized).
void keep_checkpoint_fp8(CausalLM& model, const anvil::io::Checkpoint& checkpoint) {
  for (auto& [name, linear] : named_linears(model)) {
    const std::string key = name + ".weight";
    if (checkpoint.contains(key) && checkpoint.contains(key + "_scale_inv"))
      keep_fp8_weight(*linear, checkpoint.entry(key), checkpoint.entry(key + "_scale_inv"));
  }
}

}  // namespace

namespace {

bool is_quantized_format(const std::string& f) {
  return f == "fp8" || f == "fp8-channel" || f == "fp8-tensor" || f == "w8a8" || f == "int8" || f == "int4";
}
constexpr const char* kBaseWeights = "auto, dense, fp8, fp8-channel, fp8-tensor, w8a8, int8, int4";

}  // namespace

int64_t quantize_base_weights(CausalLM& model, const std::string& format, int64_t group_size) {
  TORCH_CHECK(is_quantized_format(format), "quantize_base_weights: format '", format,
              "' is not one of fp8, fp8-channel, fp8-tensor, w8a8, int8, int4");
  TORCH_CHECK(group_size >= 0 && (group_size == 0 || format == "int8" || format == "int4"),
              "quantize_base_weights: group_size applies to int8 and int4 only (a positive divisor of in_features), got ",
              group_size, " for ", format);
  int64_t n = 0;
  for (auto& [name, linear] : named_linears(model)) {
    // lm_head, and Qwen2-MoE's (1, H) shared-expert gate: a router, kept dense as the routers are (they are no Linear).
    if (name == "lm_head" || ends_with(name, ".shared_expert_gate") || !linear->weight_format().empty()) continue;
    const int64_t in = linear->weight.size(1);
    if (format == "fp8" && in % 128 != 0) continue;  // the GEMM's 1x128 activation blocks
    // Grouped weight-only formats: a layer the group does not tile stays dense, as fp8's rule above.
    const int64_t group = group_size > 0 ? group_size : format == "int4" ? 128 : 0;
    if (group > 0 && in % group != 0) continue;
    linear->quantize_weight(format, group_size);
    ++n;
  }
  return n;
}

// A GGUF file (include/anvil/model/gguf_model.h): config from its metadata, weights dequantized to fp32
// and renamed; fp32 unless a dtype is asked for (GGUF holds no dtype of the original model).
std::shared_ptr<CausalLM> load_gguf_causal_lm(const std::string& path, c10::optional<at::ScalarType> dtype,
                                              at::Device device, const std::string& base_weights) {
  anvil::io::GgufFile file(path);
  ModelConfig config = gguf_model_config(file);
  const auto tensors = gguf_model_tensors(file, config);
  auto model = std::make_shared<CausalLM>(std::move(config), at::TensorOptions().dtype(dtype.value_or(at::kFloat)).device(device));
  model->load_state(tensors);
  if (is_quantized_format(base_weights)) quantize_base_weights(*model, base_weights);
  model->eval();
  return model;
}

std::shared_ptr<CausalLM> load_causal_lm(const std::string& path, c10::optional<at::ScalarType> dtype, at::Device device,
                                         const std::string& base_weights) {
  if (base_weights != "auto" && base_weights != "dense" && !is_quantized_format(base_weights))
    throw std::runtime_error("base_weights '" + base_weights + "' is not one of " + kBaseWeights);
  const std::string dir = anvil::io::resolve_model_path(path);
  if (anvil::io::is_gguf_file(dir)) return load_gguf_causal_lm(dir, dtype, device, base_weights);
  ModelConfig config = load_model_config(dir);
  at::ScalarType chosen = at::kFloat;
  if (dtype) chosen = *dtype;
  else if (config.fp8_checkpoint) chosen = at::kBFloat16;
  else if (!config.dtype.empty() && config.dtype != "auto") chosen = dtype_from_name(config.dtype);
  const bool fp8_checkpoint = config.fp8_checkpoint;
  auto model = std::make_shared<CausalLM>(std::move(config), at::TensorOptions().dtype(chosen).device(device));
  anvil::io::Checkpoint checkpoint(dir);
  const bool keep_fp8 = fp8_checkpoint && (base_weights == "fp8" || (base_weights == "auto" && fp8_gemm_runs_on(device)));
  if (keep_fp8) keep_checkpoint_fp8(*model, checkpoint);
  if (model->config().compressed_tensors_checkpoint)
    model->load_state(dequantize_compressed_tensors(*model, checkpoint.load_all(at::kCPU), chosen, dir,
                                                    KeepRules{base_weights, fp8_gemm_runs_on(device), device.is_cuda()}));
  else
    model->load_state(checkpoint.load_all(at::kCPU));
  if (is_quantized_format(base_weights) && !(base_weights == "fp8" && fp8_checkpoint))
    quantize_base_weights(*model, base_weights);
  model->eval();  // as transformers' from_pretrained: dropout (LoRA's) off until a trainer calls train()
  return model;
}

void save_causal_lm(const CausalLM& model, const std::string& dir, int64_t max_shard_bytes) {
  for (const auto& [name, t] : model.state_tensors())
    if (t.scalar_type() == at::kFloat8_e4m3fn || t.scalar_type() == at::kChar)
      throw std::runtime_error("save_causal_lm: '" + name + "' is a quantized base weight (" +
                               std::string(c10::toString(t.scalar_type())) +
                               "); save a model loaded with base_weights=dense (or merge LoRA adapters into one)");
  io::make_directories(dir);
  auto json = nlohmann::json::parse(model.config().json);
  json["dtype"] = dtype_name(model.dtype());
  if (json.contains("torch_dtype")) json["torch_dtype"] = dtype_name(model.dtype());
  json.erase("quantization_config");  // the weights are written dequantized
  const std::string text = json.dump(2) + "\n";
  io::write_text_atomically(io::join_path(dir, "config.json"), text);

  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, t] : model.state_tensors()) tensors.emplace_back(name, t.detach().to(at::kCPU).contiguous());
  anvil::io::save_checkpoint(dir, tensors, max_shard_bytes);
}

}  // namespace anvil::model
