// Derived models (include/anvil/model/derive.h): the kept layers' weights renamed into a model built from the
// rewritten config.json.
#include "anvil/model/derive.h"

#include "anvil/model/attention.h"

#include <nlohmann/json.hpp>

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

}  // namespace anvil::model
