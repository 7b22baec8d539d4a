// anvil._C: the pybind11 module (torch's own pybind11, so tensors cross through torch's casters).
// It exposes the C++ core (the self-check now; model loading and pipelines as they land). Ops never
// go through here: Python reaches them as torch.ops.anvil.*, so autograd, torch.compile and vmap compose.
#include "anvil/ops.h"
#include "anvil/selfcheck.h"

#include <torch/extension.h>

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anvil C++ core";
  m.def(
      "selfcheck",
      [](bool cuda) {
        std::vector<anvil::SelfCheckRow> rows;
        {
          py::gil_scoped_release no_gil;  // the checks run autograd from C++, which must not hold the GIL
          rows = anvil::run_selfcheck(cuda);
        }
        py::list out;
        for (const auto& r : rows) {
          py::dict d;
          d["op"] = r.op;
          d["device"] = r.device;
          d["status"] = r.status;
          d["detail"] = r.detail;
          d["ms"] = r.ms;
          out.append(d);
        }
        return out;
      },
      py::arg("cuda") = true, "Run the op self-check; a list of dicts (op, device, status, detail, ms).");
  m.def(
      "format_selfcheck",
      [](bool cuda) { return anvil::format_selfcheck(anvil::run_selfcheck(cuda)); }, py::arg("cuda") = true,
      py::call_guard<py::gil_scoped_release>(),
      "Run the op self-check and return its table as text.");
  m.def("fp8_gemm_configs", &anvil::ops::fp8_gemm_configs,
        "The sm_90a fp8_gemm configurations compiled into this build, as 'name:dtype'.");
  m.def(
      "fp8_gemm_config",
      [](int64_t m_, int64_t n, int64_t k, const std::string& out_dtype) {
        const at::ScalarType dt = out_dtype == "float16" ? at::kHalf : out_dtype == "float32" ? at::kFloat : at::kBFloat16;
        return anvil::ops::fp8_gemm_config(m_, n, k, dt);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("out_dtype") = "bfloat16",
      "The configuration fp8_gemm runs for (m, n, k) on the current device ('' when the fallback runs).");
}
