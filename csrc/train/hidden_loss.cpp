// Hidden-state distillation losses (include/anvil/train/hidden_loss.h): plain ATen ops, autograd does the rest
// (the states are (T, H) rows, small next to the logits kd_loss.cpp chunks).
#include "anvil/train/hidden_loss.h"

#include "anvil/model/layer_outputs.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <stdexcept>

namespace anvil::train {

HiddenLossType parse_hidden_loss(const std::string& name, const std::string& what) {
  if (name == "mse") return HiddenLossType::kMse;
  if (name == "cosine") return HiddenLossType::kCosine;
  throw std::invalid_argument(what + ": unknown hidden-state loss \"" + name + "\" (one of \"mse\", \"cosine\")");
}

LayerMap uniform_layer_map(int64_t student_layers, int64_t teacher_layers) {
  LayerMap map;
  for (int64_t i = 1; i <= student_layers; ++i)
    map.emplace_back(i, int64_t(std::llround(double(i) * double(teacher_layers) / double(student_layers))));
  return map;
}

void check_layer_map(const LayerMap& map, int64_t student_layers, int64_t teacher_layers, const std::string& what) {
  if (map.empty()) throw std::invalid_argument(what + ": the layer map is empty");
  for (const auto& [s, t] : map) {
    const auto pair = "[" + std::to_string(s) + ", " + std::to_string(t) + "]";
    if (s < 0 || s > student_layers)
      throw std::invalid_argument(what + ": pair " + pair + ": student index " + std::to_string(s) +
                                  " is out of range 0.." + std::to_string(student_layers) +
                                  " (0 the embeddings, i the output of layer i - 1)");
    if (t < 0 || t > teacher_layers)
      throw std::invalid_argument(what + ": pair " + pair + ": teacher index " + std::to_string(t) +
                                  " is out of range 0.." + std::to_string(teacher_layers) +
                                  " (0 the embeddings, i the output of layer i - 1)");
  }
}

at::Tensor hidden_divergence(const at::Tensor& student, const at::Tensor& teacher, HiddenLossType type) {
  TORCH_CHECK(student.dim() == 2 && student.sizes() == teacher.sizes(), "hidden_divergence: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must be the same (N, H)");
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto s = student.to(acc), t = teacher.to(acc);
  if (type == HiddenLossType::kMse) return (s - t).pow(2).mean(1);  // (N)
  // 1 - cos with the eps of torch.nn.functional.cosine_similarity (1e-8 on each norm)
  const auto dot = (s * t).sum(1);
  const auto ns = s.norm(2, {1}).clamp_min(1e-8), nt = t.norm(2, {1}).clamp_min(1e-8);
  return 1 - dot / (ns * nt);
}

HiddenLoss::HiddenLoss(HiddenLossType type, double weight, LayerMap map, int64_t student_width, int64_t teacher_width,
                       const at::TensorOptions& options, uint64_t seed)
    : type_(type), weight_(weight), map_(std::move(map)) {
  if (student_width == teacher_width) return;
  // nn.Linear's default init: weight and bias uniform in +-1/sqrt(in_features), from a generator of our own so
  // that the student's init draws do not shift.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const double bound = 1.0 / std::sqrt(double(student_width));
  for (size_t i = 0; i < map_.size(); ++i) {
    auto w = at::empty({teacher_width, student_width}, at::kFloat).uniform_(-bound, bound, gen);  // (Ht, Hs)
    auto b = at::empty({teacher_width}, at::kFloat).uniform_(-bound, bound, gen);                 // (Ht)
    w = w.to(options).set_requires_grad(true);
    b = b.to(options).set_requires_grad(true);
    parameters_.emplace_back("hidden_projection." + std::to_string(i) + ".weight", w);
    parameters_.emplace_back("hidden_projection." + std::to_string(i) + ".bias", b);
  }
}

at::Tensor HiddenLoss::project(size_t pair, const at::Tensor& h) const {
  if (parameters_.empty()) return h;
  return at::linear(h, parameters_.at(2 * pair).second.to(h.scalar_type()), parameters_.at(2 * pair + 1).second.to(h.scalar_type()));
}

at::Tensor HiddenLoss::operator()(const std::vector<at::Tensor>& student_layers,
                                  const std::vector<at::Tensor>& teacher_layers, const at::Tensor& rows,
                                  double normalizer) const {
  TORCH_CHECK(!map_.empty(), "HiddenLoss: empty layer map");
  at::Tensor total;
  for (size_t i = 0; i < map_.size(); ++i) {
    const auto [s, t] = map_[i];
    TORCH_CHECK(s < int64_t(student_layers.size()) && t < int64_t(teacher_layers.size()), "HiddenLoss: pair [", s, ", ",
                t, "] beyond the ", student_layers.size(), " student and ", teacher_layers.size(), " teacher states");
    const auto& hs = student_layers[s];
    const auto& ht = teacher_layers[t];
    const auto xs = hs.reshape({-1, hs.size(-1)}).index_select(0, rows.to(hs.device()));       // (T, Hs)
    const auto xt = ht.reshape({-1, ht.size(-1)}).index_select(0, rows.to(ht.device())).to(hs.device());  // (T, Ht)
    const auto d = hidden_divergence(project(i, xs), xt.detach(), type_).sum();
    total = total.defined() ? total + d : d;
  }
  const double scale = normalizer > 0 ? weight_ / (normalizer * double(map_.size())) : 0.0;
  return total * scale;
}

KdHiddenBatchLoss kd_hidden_batch_loss(model::CausalLM& student, const Teacher& teacher, const data::Batch& b,
                                       double normalizer, const KdOptions& o, double kd_ratio, int64_t ce_chunk,
                                       at::Device device, const HiddenLoss& hidden) {
  std::vector<at::Tensor> student_layers, teacher_layers;  // (B, S, H) each, as the forwards compute them
  KdHiddenBatchLoss out;
  {
    const model::LayerOutputsScope record_student(*student.model, &student_layers);
    const model::LayerOutputsScope record_teacher(*teacher.model->model, &teacher_layers);
    out.logits = kd_batch_loss(student, teacher, b, normalizer, o, kd_ratio, ce_chunk, device);
    if (teacher_layers.empty()) {  // kd_ratio 0 does not run the teacher: run it for its states
      at::NoGradGuard no_grad;
      const auto all = batch_to_device(b, teacher.model->device());  // (4, B, S)
      teacher.model->hidden_states(all[0], nullptr, all[1], b.packed ? c10::optional<at::Tensor>(all[2]) : c10::nullopt);
    }
  }
  const auto labels = at::from_blob(const_cast<int32_t*>(b.labels.data()), {int64_t(b.labels.size())}, at::kInt);
  const auto rows = target_rows(labels.to(device, at::kLong));  // (T)
  const auto h = hidden(student_layers, teacher_layers, rows, normalizer).to(at::kFloat);
  out.logits.total = out.logits.total + h;
  out.hidden = h.detach();
  return out;
}

LossFn kd_hidden_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& o, double kd_ratio,
                         int64_t ce_chunk, at::Device device, const HiddenLoss& hidden) {
  return [&student, &teacher, o, kd_ratio, ce_chunk, device, &hidden](const data::Batch& b, double normalizer) {
    const auto l = kd_hidden_batch_loss(student, teacher, b, normalizer, o, kd_ratio, ce_chunk, device, hidden);
    Loss loss{l.logits.total, {}};
    if (kd_ratio > 0) loss.terms.emplace_back("kd", l.logits.kd);  // kd_ratio 0: no kd to log
    loss.terms.emplace_back("ce", l.logits.ce);
    loss.terms.emplace_back("hidden", l.hidden);
    return loss;
  };
}

}  // namespace anvil::train
