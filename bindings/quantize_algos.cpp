// anvil._C bindings of the quantization algorithms (quantize/gptq.h, quantize/smoothquant.h), so the Python
// tests can put them beside llm-compressor's own functions on the same tensors. A file of its own: the
// algorithms live in the static library anvil_quantize_algos, not in anvil_core.
#include "quantize/gptq.h"
#include "quantize/smoothquant.h"

#include <torch/extension.h>

#include <optional>
#include <string>

namespace py = pybind11;
namespace aq = anvil::quantize;

namespace {

std::optional<at::ScalarType> dtype_arg(const std::optional<std::string>& name) {
  if (!name) return std::nullopt;
  if (*name == "float32") return at::kFloat;
  if (*name == "bfloat16") return at::kBFloat16;
  if (*name == "float16") return at::kHalf;
  TORCH_CHECK(false, "scale_dtype must be float32, bfloat16 or float16, got '", *name, "'");
}

aq::GptqOptions options(int bits, int64_t group_size, bool act_order, double dampening, int64_t block_size,
                        bool symmetric, const std::optional<std::string>& scale_dtype) {
  aq::GptqOptions o;
  o.bits = bits;
  o.group_size = group_size;
  o.act_order = act_order;
  o.dampening = dampening;
  o.block_size = block_size;
  o.symmetric = symmetric;
  o.scale_dtype = dtype_arg(scale_dtype);
  return o;
}

py::dict result_dict(const aq::GptqResult& r) {
  py::dict d;
  d["q"] = r.q;
  d["scale"] = r.scale;
  d["zero_point"] = r.zero_point.defined() ? py::cast(r.zero_point) : py::none();
  d["g_idx"] = r.g_idx;
  d["dequantized"] = r.dequantized;
  d["loss"] = r.loss;
  d["rtn_fallback"] = r.rtn_fallback;
  return d;
}

}  // namespace

void bind_quantize_algos(py::module_& m) {
  py::class_<aq::HessianAccumulator>(m, "HessianAccumulator")
      .def(py::init([](int64_t in_features, const std::string& device) {
             return aq::HessianAccumulator(in_features, at::Device(device));
           }),
           py::arg("in_features"), py::arg("device") = "cpu")
      .def("add", &aq::HessianAccumulator::add, py::arg("x"))
      .def("hessian", &aq::HessianAccumulator::hessian)
      .def_property_readonly("rows", &aq::HessianAccumulator::rows);
  m.def(
      "gptq_quantize",
      [](const at::Tensor& weight, const at::Tensor& hessian, int bits, int64_t group_size, bool act_order,
         double dampening, int64_t block_size, bool symmetric, std::optional<std::string> scale_dtype) {
        aq::GptqResult r;
        {
          py::gil_scoped_release release;
          r = aq::gptq_quantize(weight, hessian,
                                options(bits, group_size, act_order, dampening, block_size, symmetric, scale_dtype));
        }
        return result_dict(r);
      },
      py::arg("weight"), py::arg("hessian"), py::arg("bits") = 4, py::arg("group_size") = 128,
      py::arg("act_order") = false, py::arg("dampening") = 0.01, py::arg("block_size") = 128,
      py::arg("symmetric") = true, py::arg("scale_dtype") = py::none(),
      "GPTQ of weight (N, K) with Hessian (K, K): dict q, scale, zero_point, g_idx, dequantized, loss, rtn_fallback.");
  m.def(
      "gptq_quantize_shared",
      [](const std::vector<at::Tensor>& weights, const at::Tensor& hessian, int bits, int64_t group_size,
         bool act_order, double dampening, int64_t block_size, bool symmetric, std::optional<std::string> scale_dtype) {
        std::vector<aq::GptqResult> rs;
        {
          py::gil_scoped_release release;
          rs = aq::gptq_quantize_shared(
              weights, hessian, options(bits, group_size, act_order, dampening, block_size, symmetric, scale_dtype));
        }
        py::list out;
        for (const aq::GptqResult& r : rs) out.append(result_dict(r));
        return out;
      },
      py::arg("weights"), py::arg("hessian"), py::arg("bits") = 4, py::arg("group_size") = 128,
      py::arg("act_order") = false, py::arg("dampening") = 0.01, py::arg("block_size") = 128,
      py::arg("symmetric") = true, py::arg("scale_dtype") = py::none(),
      "GPTQ of layers sharing one input (rows concatenated, one sweep): a list of gptq_quantize's dicts.");
  m.def(
      "rtn_quantize",
      [](const at::Tensor& weight, int bits, int64_t group_size, bool symmetric, std::optional<std::string> scale_dtype) {
        return result_dict(aq::rtn_quantize(weight, options(bits, group_size, false, 0.01, 128, symmetric, scale_dtype)));
      },
      py::arg("weight"), py::arg("bits") = 4, py::arg("group_size") = 128, py::arg("symmetric") = true,
      py::arg("scale_dtype") = py::none(), "Round-to-nearest with GPTQ's observer and grid.");
  m.def("gptq_output_error", &aq::gptq_output_error, py::arg("weight"), py::arg("dequantized"), py::arg("hessian"),
        "tr((W - Q) H (W - Q)^T).");
  m.def("smoothquant_scales", &aq::smoothquant_scales, py::arg("act_absmax"), py::arg("weight_absmax"),
        py::arg("alpha"), "s_j = act_j^alpha / w_j^(1 - alpha), with llm-compressor's guards.");
  m.def("consumer_weight_absmax", &aq::consumer_weight_absmax, py::arg("weights"));
  m.def(
      "apply_smoothing",
      [](const at::Tensor& norm_weight, const std::vector<at::Tensor>& weights, const at::Tensor& s) {
        aq::Smoothed r = aq::apply_smoothing(norm_weight, weights, s);
        return py::make_tuple(r.norm_weight, r.weights);
      },
      py::arg("norm_weight"), py::arg("weights"), py::arg("s"), "(norm_weight / s, [W * s ...]).");
  m.def("w8a8_output_mse", &aq::w8a8_output_mse, py::arg("x"), py::arg("weights"), py::arg("s"));
  m.def(
      "search_smoothquant_alpha",
      [](const at::Tensor& x, const std::vector<at::Tensor>& weights, const std::vector<double>& grid,
         std::optional<at::Tensor> act_absmax) {
        aq::AlphaSearch r = aq::search_smoothquant_alpha(x, weights, grid, act_absmax.value_or(at::Tensor()));
        return py::make_tuple(r.alpha, r.mse, r.tried);
      },
      py::arg("x"), py::arg("weights"), py::arg("grid"), py::arg("act_absmax") = py::none(),
      "(alpha, mse, [(alpha, mse) ...]).");
}
