// Derived models (include/anvil/model/derive.h): the kept layers' weights renamed into a model built from the
// rewritten config.json.
#include "anvil/model/derive.h"

#include "anvil/model/attention.h"

#include <nlohmann/json.hpp>

#include <ATen/ATen.h>

#include <cstdio>
#include <stdexcept>
#include <unordered_map>

namespace anvil::model {

std::vector<int64_t> every_nth_layer(int64_t num_layers, int64_t n) {
  if (n < 1) throw std::invalid_argument("every_nth_layer: n must be >= 1, got " + std::to_string(n));
  std::vector<int64_t> keep;
  for (int64_t i = 0; i < num_layers; i += n) keep.push_back(i);
  return keep;
}

std::string derived_config_json(const ModelConfig& source, const std::vector<int64_t>& keep, const std::string& what) {
  const int64_t n = source.num_hidden_layers;
  if (keep.empty()) throw std::invalid_argument(what + ": must keep at least one layer");
  for (size_t j = 0; j < keep.size(); ++j) {
    if (keep[j] < 0 || keep[j] >= n)
      throw std::invalid_argument(what + ": layer " + std::to_string(keep[j]) + " is not one of the source's " +
                                  std::to_string(n) + " layers (0.." + std::to_string(n - 1) + ")");
    if (j > 0 && keep[j] <= keep[j - 1])
      throw std::invalid_argument(what + ": layer indices must be strictly increasing, got " +
                                  std::to_string(keep[j - 1]) + " before " + std::to_string(keep[j]));
  }
  auto j = nlohmann::json::parse(source.json);
  j["num_hidden_layers"] = int64_t(keep.size());
  // Per-layer attention kinds: the kept layers' own, written explicitly (max_window_layers counts from 0,
  // so it cannot say which of the kept layers slide).
  bool any_sliding = false;
  for (const bool s : source.layer_sliding) any_sliding = any_sliding || s;
  if (j.contains("layer_types") || any_sliding) {
    auto types = nlohmann::json::array();
    for (const auto i : keep) {
      const bool sliding = i < int64_t(source.layer_sliding.size()) && source.layer_sliding[i];
      types.push_back(sliding ? "sliding_attention" : "full_attention");
    }
    j["layer_types"] = types;
  }
  if (j.contains("first_k_dense_replace")) {
    int64_t dense = 0;
    for (const auto i : keep) dense += i < source.first_k_dense_replace ? 1 : 0;  // kept dense layers come first
    j["first_k_dense_replace"] = dense;
  }
  if (source.family == ModelFamily::kQwen2Moe || source.family == ModelFamily::kQwen3Moe) {
    // decoder_sparse_step counts from layer 0 and cannot say which of the kept layers are MoE: the dense ones
    // are listed instead, under their new indices.
    auto dense = nlohmann::json::array();
    for (size_t n = 0; n < keep.size(); ++n)
      if (!source.is_moe_layer(keep[n])) dense.push_back(int64_t(n));
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = dense;
  }
  if (j.contains("num_nextn_predict_layers")) j["num_nextn_predict_layers"] = 0;
  return j.dump(2);
}

std::shared_ptr<CausalLM> derive_by_layers(const CausalLM& source, const std::vector<int64_t>& keep,
                                           const at::TensorOptions& options, const std::string& what) {
  for (const auto& [name, linear] : named_linears(const_cast<CausalLM&>(source)))
    if (!linear->weight_format().empty())
      throw std::invalid_argument(what + ": the source model holds " + linear->weight_format() + " weights (" + name +
                                  "); a derived model needs dense ones");
  const auto text = derived_config_json(source.config(), keep, what);
  auto lm = std::make_shared<CausalLM>(parse_model_config(text, "the derived config.json"), options);
  std::unordered_map<int64_t, int64_t> renumber;  // source layer -> derived layer
  for (size_t i = 0; i < keep.size(); ++i) renumber[keep[i]] = int64_t(i);
  std::unordered_map<std::string, at::Tensor> tensors;
  const std::string prefix = "model.layers.";
  for (const auto& [name, t] : source.state_tensors()) {
    if (name.rfind(prefix, 0) != 0) {
      tensors.emplace(name, t);
      continue;
    }
    const auto dot = name.find('.', prefix.size());
    const int64_t layer = std::stoll(name.substr(prefix.size(), dot - prefix.size()));
    const auto it = renumber.find(layer);
    if (it == renumber.end()) continue;
    tensors.emplace(prefix + std::to_string(it->second) + name.substr(dot), t);
  }
  lm->load_state(tensors);
  lm->train();
  return lm;
}

// ---- width pruning ---------------------------------------------------------------------------------

WidthOptions resolve_widths(const ModelConfig& c, const WidthOptions& w, const std::string& key_prefix) {
  const auto fail = [&](const std::string& key, const std::string& rule) {
    throw std::invalid_argument(key_prefix + key + ": " + rule);
  };
  const std::pair<const char*, int64_t> given[] = {{"intermediate_size", w.intermediate_size},
                                                   {"num_attention_heads", w.num_attention_heads},
                                                   {"num_key_value_heads", w.num_key_value_heads},
                                                   {"hidden_size", w.hidden_size}};
  for (const auto& [key, v] : given)
    if (v < 0) fail(key, "must be >= 1 (or 0: the source's), got " + std::to_string(v));
  if (w.any() && (c.mla || c.num_experts > 0)) {
    const char* first = "intermediate_size";
    for (const auto& [key, v] : given)
      if (v > 0) { first = key; break; }
    fail(first, std::string("width pruning needs a dense model with grouped-query attention; the source (") +
                    c.architecture + ") has " + (c.mla ? "multi-head latent attention" : "MoE layers"));
  }
  const int64_t heads = c.num_attention_heads, groups = c.num_key_value_heads, per_group = heads / groups;
  const auto narrower = [&](const char* key, int64_t v, int64_t source) {
    if (v > source)
      fail(key, std::to_string(v) + " is larger than the source's " + key + " " + std::to_string(source) +
                    " (pruning only narrows)");
    return v > 0 ? v : source;
  };
  WidthOptions r;
  r.intermediate_size = narrower("intermediate_size", w.intermediate_size, c.intermediate_size);
  r.hidden_size = narrower("hidden_size", w.hidden_size, c.hidden_size);
  narrower("num_attention_heads", w.num_attention_heads, heads);
  narrower("num_key_value_heads", w.num_key_value_heads, groups);
  // A multi-head source (a group per head) stays multi-head unless both are given.
  r.num_key_value_heads = w.num_key_value_heads > 0 ? w.num_key_value_heads
                          : groups == heads && w.num_attention_heads > 0 ? w.num_attention_heads
                                                                         : groups;
  r.num_attention_heads = w.num_attention_heads > 0 ? w.num_attention_heads : per_group * r.num_key_value_heads;
  if (r.num_attention_heads % r.num_key_value_heads != 0)
    fail("num_attention_heads", std::to_string(r.num_attention_heads) + " must be a multiple of num_key_value_heads (" +
                                    std::to_string(r.num_key_value_heads) + "): every KV group holds as many query heads");
  if (r.num_attention_heads / r.num_key_value_heads > per_group)
    fail("num_attention_heads", std::to_string(r.num_attention_heads) + " heads over " +
                                    std::to_string(r.num_key_value_heads) + " KV groups is " +
                                    std::to_string(r.num_attention_heads / r.num_key_value_heads) +
                                    " per group, more than the source's " + std::to_string(per_group) +
                                    " (heads are kept within their groups: prune num_key_value_heads less, or heads more)");
  // transformers 5.17's LlamaConfig.validate_architecture refuses a config whose hidden_size is not a multiple
  // of num_attention_heads, head_dim explicit or not (Qwen2/3's and Mistral's configs do not check it).
  if (c.model_type == "llama" && r.hidden_size % r.num_attention_heads != 0)
    fail(r.num_attention_heads != heads ? "num_attention_heads" : "hidden_size",
         "a Llama student's hidden_size (" + std::to_string(r.hidden_size) + ") must be a multiple of its "
         "num_attention_heads (" + std::to_string(r.num_attention_heads) + "): transformers' LlamaConfig refuses "
         "it otherwise");
  return r;
}

namespace {

// Records, for one Linear, sum over rows of (mean over the sequence of |x|)^2 per input channel: the squared
// L2-over-rows of the per-row means (Model-Optimizer's MegatronL2NormHook); the square root is taken at the end.
class InputRecorder : public LinearAdapter {
 public:
  at::Tensor forward(const Linear&, const at::Tensor& x, const at::Tensor& base_out) override {
    const auto a = x.detach().to(at::kFloat).abs().mean(1);  // (B, in): mean |x| over the sequence
    const auto sq = a.pow(2).sum(0).cpu();                   // (in)
    sum = sum.defined() ? sum + sq : sq;
    return base_out;
  }
  at::Tensor sum;  // (in) fp32
};

std::shared_ptr<Linear> find_linear(const std::unordered_map<std::string, std::shared_ptr<Linear>>& all,
                                    const std::string& name) {
  const auto it = all.find(name);
  if (it == all.end()) throw std::invalid_argument("activation_importance: the model has no " + name);
  return it->second;
}

// The k top-scored indices of scores (n), ascending; ties go to the lower index (a stable descending sort).
at::Tensor top_indices(const at::Tensor& scores, int64_t k) {
  const auto order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  return std::get<0>(order.slice(0, 0, k).sort()).contiguous();
}

// Rows of whole heads: head indices (k) -> (k * head_dim) indices of the projection's rows.
at::Tensor head_rows(const at::Tensor& heads, int64_t head_dim) {
  return (heads.unsqueeze(1) * head_dim + at::arange(head_dim, heads.options()).unsqueeze(0)).reshape({-1});
}

}  // namespace

Importance activation_importance(CausalLM& model, const std::vector<at::Tensor>& batches) {
  const auto& c = model.config();
  resolve_widths(c, WidthOptions{1, 0, 0, 0}, "activation_importance: ");  // a dense GQA model
  std::unordered_map<std::string, std::shared_ptr<Linear>> linears;
  for (auto& [name, linear] : named_linears(model)) {
    if (linear->adapter) throw std::invalid_argument("activation_importance: " + name + " has an adapter attached");
    linears.emplace(name, linear);
  }
  const std::vector<std::string> roles = {"self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj"};
  std::vector<std::vector<std::shared_ptr<InputRecorder>>> rec(c.num_hidden_layers);
  std::vector<std::shared_ptr<Linear>> attached;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l)
    for (const auto& role : roles) {
      auto linear = find_linear(linears, "model.layers." + std::to_string(l) + "." + role);
      rec[l].push_back(std::make_shared<InputRecorder>());
      linear->adapter = rec[l].back();
      attached.push_back(linear);
    }
  const bool was_training = model.is_training();
  Importance imp;
  try {
    model.eval();
    at::NoGradGuard no_grad;
    for (const auto& ids : batches) {
      TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong, "activation_importance: a batch must be (B, S) int64, got ",
                  ids.sizes(), " ", ids.scalar_type());
      model.hidden_states(ids);
      imp.rows += ids.size(0), imp.tokens += ids.numel();
    }
  } catch (...) {
    for (auto& l : attached) l->adapter.reset();
    if (was_training) model.train();
    throw;
  }
  for (auto& l : attached) l->adapter.reset();
  if (was_training) model.train();
  if (imp.rows == 0) throw std::invalid_argument("activation_importance: no calibration rows");
  imp.hidden = at::zeros({c.hidden_size}, at::kFloat);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    imp.hidden += rec[l][0]->sum.sqrt() + rec[l][1]->sum.sqrt();  // input_layernorm, post_attention_layernorm outputs
    imp.heads.push_back(rec[l][2]->sum.sqrt().view({c.num_attention_heads, c.head_dim}).norm(2, {1}));  // (heads)
    imp.mlp.push_back(rec[l][3]->sum.sqrt());                                                            // (I)
  }
  return imp;
}

PruneSelection select_top(const ModelConfig& c, const Importance& imp, const WidthOptions& w) {
  TORCH_CHECK(int64_t(imp.mlp.size()) == c.num_hidden_layers && int64_t(imp.heads.size()) == c.num_hidden_layers,
              "select_top: importance of ", imp.mlp.size(), " layers for a model of ", c.num_hidden_layers);
  const int64_t groups = c.num_key_value_heads, per_group = c.num_attention_heads / groups;
  const int64_t keep_per_group = w.num_attention_heads / w.num_key_value_heads;
  PruneSelection s;
  s.hidden = top_indices(imp.hidden, w.hidden_size);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    s.mlp.push_back(top_indices(imp.mlp[l], w.intermediate_size));
    // Within each group its top heads; the groups ranked by the sum of the heads they keep.
    const auto by_group = imp.heads[l].view({groups, per_group});                      // (G, g)
    const auto order = std::get<1>(by_group.sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
    const auto kept_in_group = std::get<0>(order.slice(1, 0, keep_per_group).sort(1));  // (G, g') ascending
    const auto group_score = by_group.gather(1, kept_in_group).sum(1);                 // (G)
    const auto kv = top_indices(group_score, w.num_key_value_heads);                   // (G')
    s.kv.push_back(kv);
    s.heads.push_back((kept_in_group.index_select(0, kv) + kv.unsqueeze(1) * per_group).reshape({-1}).contiguous());
  }
  return s;
}

std::string derived_config_json(const ModelConfig& source, const std::vector<int64_t>& keep, const WidthOptions& w,
                                const std::string& what) {
  auto j = nlohmann::json::parse(derived_config_json(source, keep, what));
  j["intermediate_size"] = w.intermediate_size;
  j["num_attention_heads"] = w.num_attention_heads;
  j["num_key_value_heads"] = w.num_key_value_heads;
  j["hidden_size"] = w.hidden_size;
  j["head_dim"] = source.head_dim;  // no longer hidden_size / num_attention_heads in general
  return j.dump(2);
}

std::shared_ptr<CausalLM> derive_pruned(const CausalLM& source, const std::vector<int64_t>& keep, const WidthOptions& w,
                                        const PruneSelection& sel, const at::TensorOptions& options,
                                        const std::string& what) {
  const auto& c = source.config();
  for (const auto& [name, linear] : named_linears(const_cast<CausalLM&>(source)))
    if (!linear->weight_format().empty())
      throw std::invalid_argument(what + ": the source model holds " + linear->weight_format() + " weights (" + name +
                                  "); a derived model needs dense ones");
  const auto text = derived_config_json(c, keep, w, what);  // checks keep
  auto lm = std::make_shared<CausalLM>(parse_model_config(text, "the derived config.json"), options);
  const auto count = [&](const at::Tensor& t, int64_t n, const char* axis) {
    TORCH_CHECK(t.defined() && t.dim() == 1 && t.numel() == n, "derive_pruned: selection of ", axis, " must hold ", n,
                " indices");
  };
  count(sel.hidden, w.hidden_size, "hidden channels");
  const auto dev = source.device();
  const auto hidden = sel.hidden.to(dev);
  const auto rows = [](const at::Tensor& t, const at::Tensor& i) { return t.index_select(0, i.to(t.device())); };
  const auto cols = [](const at::Tensor& t, const at::Tensor& i) { return t.index_select(1, i.to(t.device())); };
  std::unordered_map<int64_t, int64_t> renumber;  // source layer -> derived layer
  for (size_t i = 0; i < keep.size(); ++i) renumber[keep[i]] = int64_t(i);
  std::unordered_map<std::string, at::Tensor> tensors;
  const std::string prefix = "model.layers.";
  for (const auto& [name, t] : source.state_tensors()) {
    if (name.rfind(prefix, 0) != 0) {
      if (name == "model.embed_tokens.weight" || name == "lm_head.weight") tensors.emplace(name, cols(t, hidden));
      else if (name == "model.norm.weight") tensors.emplace(name, rows(t, hidden));
      else throw std::invalid_argument(what + ": no pruning rule for " + name);
      continue;
    }
    const auto dot = name.find('.', prefix.size());
    const int64_t layer = std::stoll(name.substr(prefix.size(), dot - prefix.size()));
    const auto it = renumber.find(layer);
    if (it == renumber.end()) continue;
    count(sel.mlp.at(layer), w.intermediate_size, "intermediate channels");
    count(sel.heads.at(layer), w.num_attention_heads, "attention heads");
    count(sel.kv.at(layer), w.num_key_value_heads, "KV groups");
    const auto mlp = sel.mlp[layer], q = head_rows(sel.heads[layer], c.head_dim), kv = head_rows(sel.kv[layer], c.head_dim);
    const std::string part = name.substr(dot + 1);
    at::Tensor out;
    if (part == "self_attn.q_proj.weight") out = cols(rows(t, q), hidden);  // (nq' hd, H')
    else if (part == "self_attn.q_proj.bias") out = rows(t, q);
    else if (part == "self_attn.k_proj.weight" || part == "self_attn.v_proj.weight") out = cols(rows(t, kv), hidden);
    else if (part == "self_attn.k_proj.bias" || part == "self_attn.v_proj.bias") out = rows(t, kv);
    else if (part == "self_attn.o_proj.weight") out = cols(rows(t, hidden), q);  // (H', nq' hd)
    else if (part == "self_attn.o_proj.bias") out = rows(t, hidden);
    else if (part == "self_attn.q_norm.weight" || part == "self_attn.k_norm.weight") out = t;  // over head_dim
    else if (part == "mlp.gate_proj.weight" || part == "mlp.up_proj.weight") out = cols(rows(t, mlp), hidden);  // (I', H')
    else if (part == "mlp.gate_proj.bias" || part == "mlp.up_proj.bias") out = rows(t, mlp);
    else if (part == "mlp.down_proj.weight") out = cols(rows(t, hidden), mlp);  // (H', I')
    else if (part == "mlp.down_proj.bias") out = rows(t, hidden);
    else if (part == "input_layernorm.weight" || part == "post_attention_layernorm.weight") out = rows(t, hidden);
    else throw std::invalid_argument(what + ": no pruning rule for " + name);
    tensors.emplace(prefix + std::to_string(it->second) + "." + part, out.contiguous());
  }
  lm->load_state(tensors);
  lm->train();
  return lm;
}

std::string pruning_summary(const ModelConfig& c, const WidthOptions& w, const Importance& imp) {
  const auto axis = [](const char* name, int64_t kept, int64_t total) {
    char buf[160];
    if (kept == total) std::snprintf(buf, sizeof buf, "  %-20s %lld (kept)\n", name, static_cast<long long>(total));
    else std::snprintf(buf, sizeof buf, "  %-20s %lld/%lld kept (%.0f%%)\n", name, static_cast<long long>(kept),
                       static_cast<long long>(total), 100.0 * double(kept) / double(total));
    return std::string(buf);
  };
  return "importance pruning (Minitron, activations of " + std::to_string(imp.rows) + " calibration rows, " +
         std::to_string(imp.tokens) + " tokens):\n" + axis("intermediate_size", w.intermediate_size, c.intermediate_size) +
         axis("num_attention_heads", w.num_attention_heads, c.num_attention_heads) +
         axis("num_key_value_heads", w.num_key_value_heads, c.num_key_value_heads) +
         axis("hidden_size", w.hidden_size, c.hidden_size);
}

}  // namespace anvil::model
