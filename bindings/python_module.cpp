// anvil._C: the pybind11 module (torch's own pybind11, so tensors cross through torch's casters).
// It exposes the C++ core (the self-check now; model loading and pipelines as they land). Ops never
// go through here: Python reaches them as torch.ops.anvil.*, so autograd, torch.compile and vmap compose.
#include "anvil/io/safetensors.h"
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

  // ---- io: safetensors and checkpoints (tests/python/test_safetensors_io.py drives these) ----
  using TensorList = std::vector<std::pair<std::string, at::Tensor>>;
  using StrMap = std::map<std::string, std::string>;
  m.def(
      "load_checkpoint",
      [](const std::string& path, const std::string& device) {
        anvil::io::Checkpoint ckpt(path);
        return ckpt.load_all(at::Device(device));
      },
      py::arg("path"), py::arg("device") = "cpu", py::call_guard<py::gil_scoped_release>(),
      "Every tensor of a .safetensors file or checkpoint directory, on `device` (CPU: zero-copy views).");
  m.def(
      "checkpoint_metadata", [](const std::string& path) { return anvil::io::Checkpoint(path).metadata(); },
      py::arg("path"), "The __metadata__ of a file, or the index's metadata of a sharded directory.");
  m.def(
      "checkpoint_keys", [](const std::string& path) { return anvil::io::Checkpoint(path).keys(); }, py::arg("path"),
      "The sorted tensor names of a file or checkpoint directory.");
  m.def(
      "is_zero_copy",
      [](const std::string& path, const std::string& name) { return anvil::io::SafetensorsFile(path).is_zero_copy(name); },
      py::arg("path"), py::arg("name"), "Whether reading `name` from the file maps its bytes without a copy.");
  m.def(
      "save_safetensors",
      [](const std::string& path, const TensorList& tensors, const StrMap& metadata) {
        anvil::io::save_safetensors(path, tensors, metadata);
      },
      py::arg("path"), py::arg("tensors"), py::arg("metadata") = StrMap{}, py::call_guard<py::gil_scoped_release>(),
      "Writes [(name, tensor)] as one safetensors file, atomically.");
  m.def(
      "save_checkpoint",
      [](const std::string& dir, const TensorList& tensors, int64_t max_shard_bytes, const StrMap& metadata) {
        anvil::io::save_checkpoint(dir, tensors, max_shard_bytes, metadata);
      },
      py::arg("dir"), py::arg("tensors"), py::arg("max_shard_bytes") = 5'000'000'000LL,
      py::arg("metadata") = StrMap{{"format", "pt"}}, py::call_guard<py::gil_scoped_release>(),
      "Writes a checkpoint directory (sharded with an index when larger than max_shard_bytes).");
  m.def("resolve_model_path", &anvil::io::resolve_model_path, py::arg("arg"),
        "A directory, file, or hub id in the local Hugging Face cache -> a local path.");
}
