// anvil._C: the pybind11 module (torch's own pybind11, so tensors cross through torch's casters).
// It exposes the C++ core (the self-check, the tokenizers; model loading and pipelines as they land). Ops never
// go through here: Python reaches them as torch.ops.anvil.*, so autograd, torch.compile and vmap compose.
#include "anvil/data/tokenizer.h"
#include "anvil/selfcheck.h"

#include <torch/extension.h>

namespace py = pybind11;

namespace {

// [{"role": ..., "content": ..., "reasoning_content": ...}, ...] to ChatMessage (reasoning_content as
// transformers' Qwen3 template names it).
std::vector<anvil::data::ChatMessage> chat_messages(const py::list& messages) {
  std::vector<anvil::data::ChatMessage> out;
  for (const auto& item : messages) {
    const auto d = item.cast<py::dict>();
    anvil::data::ChatMessage m;
    m.role = d["role"].cast<std::string>();
    m.content = d["content"].cast<std::string>();
    if (d.contains("reasoning_content") && !d["reasoning_content"].is_none()) {
      m.reasoning = d["reasoning_content"].cast<std::string>();
    }
    out.push_back(std::move(m));
  }
  return out;
}

void bind_tokenizer(py::module_& m) {
  using anvil::data::Tokenizer;
  py::class_<Tokenizer>(m, "Tokenizer", "A model's tokenizer (anvil/data/tokenizer.h): load with Tokenizer.load(dir)")
      .def_static("load", &anvil::data::load_tokenizer, py::arg("dir"),
                  "Load tokenizer.json or tokenizer.model plus the config files of a model folder")
      .def_static("from_tokenizer_json", &anvil::data::load_hf_tokenizer_json, py::arg("path"))
      .def_static("from_sentencepiece", &anvil::data::load_sentencepiece_model, py::arg("path"),
                  py::arg("add_bos") = true, py::arg("add_eos") = false)
      .def("encode", &Tokenizer::encode, py::arg("text"), py::arg("add_special_tokens") = true,
           py::call_guard<py::gil_scoped_release>())
      .def("decode", &Tokenizer::decode, py::arg("ids"), py::arg("skip_special_tokens") = false,
           py::call_guard<py::gil_scoped_release>())
      .def("token_to_id", &Tokenizer::token_to_id, py::arg("token"))
      .def("id_to_token", &Tokenizer::id_to_token, py::arg("id"))
      .def_property_readonly("vocab_size", &Tokenizer::vocab_size)
      .def_property_readonly("kind", &Tokenizer::kind)
      .def_property_readonly("bos_id", &Tokenizer::bos_id)
      .def_property_readonly("eos_id", &Tokenizer::eos_id)
      .def_property_readonly("pad_id", &Tokenizer::pad_id)
      .def_property_readonly("unk_id", &Tokenizer::unk_id)
      .def_property_readonly("eos_ids", &Tokenizer::eos_ids)
      .def_property_readonly("bos_token", &Tokenizer::bos_token)
      .def_property_readonly("eos_token", &Tokenizer::eos_token)
      .def_property_readonly("special_ids", &Tokenizer::special_ids)
      .def_property_readonly("chat_template", &Tokenizer::chat_template)
      .def_property_readonly("chat_format",
                             [](const Tokenizer& t) { return anvil::data::chat_format_name(t.chat_format()); })
      .def("set_chat_format",
           [](Tokenizer& t, const std::string& name) { t.set_chat_format(anvil::data::chat_format_from_name(name)); },
           py::arg("name"))
      .def(
          "render_chat",
          [](const Tokenizer& t, const py::list& messages, bool add_generation_prompt,
             std::optional<bool> enable_thinking) {
            return t.render_chat(chat_messages(messages), add_generation_prompt, enable_thinking);
          },
          py::arg("messages"), py::arg("add_generation_prompt") = false, py::arg("enable_thinking") = py::none());
  m.def(
      "render_chat",
      [](const std::string& format, const py::list& messages, bool add_generation_prompt,
         std::optional<bool> enable_thinking, const std::string& bos_token, const std::string& eos_token,
         const std::string& date_string) {
        anvil::data::ChatOptions o;
        o.date_string = date_string;
        o.add_generation_prompt = add_generation_prompt;
        o.enable_thinking = enable_thinking;
        o.bos_token = bos_token;
        o.eos_token = eos_token;
        return anvil::data::render_chat(anvil::data::chat_format_from_name(format), chat_messages(messages), o);
      },
      py::arg("format"), py::arg("messages"), py::arg("add_generation_prompt") = false,
      py::arg("enable_thinking") = py::none(), py::arg("bos_token") = "", py::arg("eos_token") = "",
      py::arg("date_string") = "26 Jul 2024",
      "Render a conversation with a built-in chat format (llama2, mistral, mistral-v1, llama3, llama3.1, chatml, "
      "qwen2.5, qwen3, deepseek-v2, deepseek-v3)");
  m.def(
      "detect_chat_format",
      [](const std::string& jinja_template) {
        return anvil::data::chat_format_name(anvil::data::detect_chat_format(jinja_template));
      },
      py::arg("template"), "The built-in format a Jinja chat_template is recognised as; RuntimeError otherwise");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anvil C++ core";
  bind_tokenizer(m);
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
}
