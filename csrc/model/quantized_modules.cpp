// How one module of a quantized checkpoint becomes a Linear (model/quantized_modules.h).
#include "model/quantized_modules.h"

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace anvil::model {

namespace {

// One module's tensors in a Linear format's layout: (q, scale fp32, zero point or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> to_linear_format(const ct::Scheme& s, const std::string& format,
                                                                const ct::ModuleTensors& t, const std::string& module) {
  const ct::QuantArgs& w = *s.weights;
  at::Tensor q, zp;
  int64_t out = 0, in = 0;
  if (format == "pack-quantized") {
    const at::Tensor shape = t.at("weight_shape").to(at::kCPU, at::kLong).reshape({-1});
    TORCH_CHECK(shape.numel() == 2, "compressed-tensors tensor '", module, ".weight_shape' must hold two integers");
    out = shape[0].item<int64_t>();
    in = shape[1].item<int64_t>();
    q = ct::unpack_int32(t.at("weight_packed"), w.num_bits, {out, in}, 1);
  } else {
    q = t.at("weight");
    out = q.size(0);
    in = q.size(1);
  }
  const auto pshape = ct::weight_scale_shape(w, out, in);
  at::Tensor scale = t.at("weight_scale").to(at::kFloat);
  if (w.strategy == ct::Strategy::kChannel || w.strategy == ct::Strategy::kGroup) scale = scale.reshape(pshape);
  if (!w.symmetric) {
    const at::Tensor& z = t.at("weight_zero_point");
    zp = format == "pack-quantized" ? ct::unpack_int32(z, w.num_bits, pshape, 0) : z.reshape(pshape);
  }
  return {q, scale, zp};
}

}  // namespace

std::string kept_format(const ct::Scheme& s, const std::string& format, const ct::ModuleTensors& t, int64_t in_features,
                        const KeepRules& rules) {
  if (rules.base_weights == "dense" || !s.weights || format == "dense" || t.count("weight_g_idx")) return "";
  const ct::QuantArgs& w = *s.weights;
  const auto& a = s.input_activations;
  std::string f;
  if (w.type == ct::QuantType::kFloat && w.num_bits == 8) {
    if (a && a->type != ct::QuantType::kFloat) return "";
    if (w.strategy == ct::Strategy::kChannel) f = "fp8-channel";
    else if (w.strategy == ct::Strategy::kTensor) f = "fp8-tensor";
    else if (w.strategy == ct::Strategy::kBlock && w.block_structure == std::vector<int64_t>{128, 128} && in_features % 128 == 0)
      f = "fp8";
  } else if (w.type == ct::QuantType::kInt && w.num_bits == 8 && a) {
    if (w.symmetric && w.strategy == ct::Strategy::kChannel && a->type == ct::QuantType::kInt && a->num_bits == 8 &&
        a->symmetric)
      f = "w8a8";
  } else if (w.type == ct::QuantType::kInt && !a && (w.num_bits == 8 || w.num_bits == 4) &&
             (w.strategy == ct::Strategy::kChannel || w.strategy == ct::Strategy::kGroup)) {
    f = w.num_bits == 8 ? "int8" : "int4";
  }
  if (f.empty()) return "";
  if (rules.base_weights == f) return f;
  if (rules.base_weights != "auto") return "";
  if (f == "int8" || f == "int4") return f;
  if (f == "w8a8") return rules.cuda ? f : "";
  return rules.fp8_gemm ? f : "";
}

void load_compressed_module(Linear* linear, const ct::Scheme& scheme, const std::string& format,
                            const ct::ModuleTensors& used, at::ScalarType dtype, const std::string& name,
                            const KeepRules& rules, std::unordered_map<std::string, at::Tensor>& out) {
  const std::string keep = linear == nullptr || !linear->weight_format().empty()
                               ? ""
                               : kept_format(scheme, format, used, linear->weight.size(1), rules);
  if (keep.empty()) {
    out[name + ".weight"] = ct::dequantize_module(used, scheme, format, dtype, name);
    return;
  }
  // Checked as the dense path checks (shapes, dtypes, value ranges, names in the errors), then kept.
  (void)ct::dequantize_module(used, scheme, format, at::kFloat, name);
  auto [q, scale, zp] = to_linear_format(scheme, format, used, name);
  linear->set_quantized_weight(keep, q, scale, zp);
  out[name + ".weight"] = q;
  out[name + (keep == "fp8" ? ".weight_scale_inv" : ".weight_scale")] = linear->weight_scale.cpu();
  if (zp.defined()) out[name + ".weight_zero_point"] = zp;
}

bool keep_fp8_weight(Linear& linear, const io::TensorEntry& w, const io::TensorEntry& s) {
  if (w.dtype != at::kFloat8_e4m3fn || linear.weight.dim() != 2 || linear.weight.size(1) % 128 != 0) return false;
  const auto on = linear.weight.options();
  linear.set_quantized_weight("fp8", at::empty(w.shape, on.dtype(at::kFloat8_e4m3fn)), at::empty(s.shape, on.dtype(at::kFloat)));
  return true;
}

}  // namespace anvil::model
