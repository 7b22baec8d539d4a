// anvil._C: the pybind11 module (torch's own pybind11, so tensors cross through torch's casters).
// It exposes the C++ core (the self-check, the tokenizers; model loading and pipelines as they land). Ops never
// go through here: Python reaches them as torch.ops.anvil.*, so autograd, torch.compile and vmap compose.
#include "anvil/data/dataset.h"
#include "anvil/data/gguf_vocab.h"
#include "anvil/data/token_offsets.h"
#include "anvil/data/tokenizer.h"
#include "anvil/io/gguf.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/compressed_tensors.h"
#include "anvil/model/derive.h"
#include "anvil/model/layer_outputs.h"
#include "anvil/model/generate.h"
#include "anvil/model/gguf_export.h"
#include "anvil/model/gguf_model.h"
#include "anvil/model/transformer.h"
#include "anvil/ops.h"
#include "anvil/selfcheck.h"
#include "anvil/lora/lora.h"
#include "anvil/train/hidden_loss.h"
#include "anvil/train/cross_vocab.h"
#include "anvil/train/kd_loss.h"
#include "anvil/train/vocab.h"

#include <map>
#include <torch/extension.h>

namespace py = pybind11;

void bind_quantize_algos(py::module_& m);  // bindings/quantize_algos.cpp
void bind_pipelines(py::module_& m);       // bindings/pipelines.cpp

namespace {

// anvil._C.CausalLM: a loaded model (a holder, so pybind11 never sees torch::nn::Module). The
// oracle tests drive it; the pipelines will grow a richer Python API on top.
struct PyCausalLM {
  std::shared_ptr<anvil::model::CausalLM> model;
};

void bind_model(py::module_& m) {
  namespace am = anvil::model;
  py::class_<PyCausalLM>(m, "CausalLM", "A Hugging Face causal LM loaded into anvil's LibTorch modules.")
      .def(py::init([](const std::string& path, const std::string& dtype, const std::string& device,
                       const std::string& base_weights) {
             c10::optional<at::ScalarType> dt;
             if (!dtype.empty()) dt = am::dtype_from_name(dtype);
             py::gil_scoped_release no_gil;
             return PyCausalLM{am::load_causal_lm(path, dt, at::Device(device), base_weights)};
           }),
           py::arg("path"), py::arg("dtype") = "", py::arg("device") = "cpu", py::arg("base_weights") = "auto",
           "Loads config.json + safetensors from a directory (or a hub id in the local HF cache). base_weights: "
           "auto | dense | fp8 | fp8-channel | fp8-tensor | w8a8 | int8 | int4 (how the Linear weights are held; "
           "anvil::model::load_causal_lm).")
      .def("weight_formats",
           [](PyCausalLM& s) {
             std::map<std::string, std::string> out;
             for (auto& [name, linear] : am::named_linears(*s.model))
               out[name] = linear->weight_format().empty() ? "dense" : linear->weight_format();
             return out;
           },
           "{module name: 'dense' | 'fp8' | 'fp8-channel' | 'fp8-tensor' | 'w8a8' | 'int8' | 'int4'} for every Linear.")
      .def(
          "quantize_weights",
          [](PyCausalLM& s, const std::string& format, int64_t group_size) {
            return am::quantize_base_weights(*s.model, format, group_size);
          },
          py::arg("format"), py::arg("group_size") = 0,
          "Quantizes every dense Linear but lm_head in place (anvil::model::quantize_base_weights); -> layers quantized.")
      .def(
          "set_quantized_weight",
          [](PyCausalLM& s, const std::string& name, const std::string& format, const at::Tensor& q,
             const at::Tensor& scale, const c10::optional<at::Tensor>& zero_point, int64_t group_size) {
            for (auto& [n, linear] : am::named_linears(*s.model))
              if (n == name) return linear->set_quantized_weight(format, q, scale, zero_point.value_or(at::Tensor()), group_size);
            throw std::invalid_argument("set_quantized_weight: no Linear named '" + name + "'");
          },
          py::arg("name"), py::arg("format"), py::arg("q"), py::arg("scale"), py::arg("zero_point") = py::none(),
          py::arg("group_size") = 0, "Gives the Linear `name` a quantized weight (anvil::model::Linear::set_quantized_weight).")
      .def(
          "dense_weight",
          [](PyCausalLM& s, const std::string& name, const std::string& dtype) {
            for (auto& [n, linear] : am::named_linears(*s.model))
              if (n == name) return linear->dense_weight(am::dtype_from_name(dtype));
            throw std::invalid_argument("dense_weight: no Linear named '" + name + "'");
          },
          py::arg("name"), py::arg("dtype") = "float32", "The Linear's weight, dequantized, (out, in).")
      .def_property_readonly("architecture", [](const PyCausalLM& s) { return s.model->config().architecture; })
      .def_property_readonly("dtype", [](const PyCausalLM& s) { return am::dtype_name(s.model->dtype()); })
      .def(
          "logits",
          [](PyCausalLM& s, const at::Tensor& ids) {
            at::NoGradGuard no_grad;
            return s.model->forward(ids);
          },
          py::arg("input_ids"), py::call_guard<py::gil_scoped_release>(), "input_ids (B, S) int64 -> logits (B, S, V).")
      .def(
          "packed_logits",
          [](PyCausalLM& s, const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& doc_ids) {
            at::NoGradGuard no_grad;
            return s.model->forward(ids, nullptr, positions, doc_ids);
          },
          py::arg("input_ids"), py::arg("positions"), py::arg("doc_ids"), py::call_guard<py::gil_scoped_release>(),
          "Logits of packed rows: per-document positions and document ids (B, S), documents kept apart.")
      .def(
          "cached_logits",
          [](PyCausalLM& s, const at::Tensor& ids, int64_t chunk) {
            // The same logits computed through the KV cache, `chunk` tokens per forward.
            at::NoGradGuard no_grad;
            auto cache = s.model->make_cache();
            std::vector<at::Tensor> parts;
            for (int64_t start = 0; start < ids.size(1); start += chunk)
              parts.push_back(s.model->forward(ids.narrow(1, start, std::min(chunk, ids.size(1) - start)), &cache));
            return at::cat(parts, 1);
          },
          py::arg("input_ids"), py::arg("chunk") = 1, py::call_guard<py::gil_scoped_release>())
      .def(
          "generate",
          [](PyCausalLM& s, const at::Tensor& ids, int64_t max_new_tokens, double temperature, int64_t top_k,
             double top_p, std::vector<int64_t> stop_tokens, int64_t pad_token_id, uint64_t seed, bool use_cache,
             c10::optional<at::Tensor> attention_mask) {
            am::GenerateOptions o;
            o.max_new_tokens = max_new_tokens;
            o.temperature = temperature;
            o.top_k = top_k;
            o.top_p = top_p;
            o.stop_tokens = std::move(stop_tokens);
            o.pad_token_id = pad_token_id;
            o.seed = seed;
            o.use_cache = use_cache;
            return am::generate(*s.model, ids, o, attention_mask ? *attention_mask : at::Tensor());
          },
          py::arg("input_ids"), py::arg("max_new_tokens") = 32, py::arg("temperature") = 0.0, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0, py::arg("stop_tokens") = std::vector<int64_t>{}, py::arg("pad_token_id") = -1,
          py::arg("seed") = 0, py::arg("use_cache") = true, py::arg("attention_mask") = py::none(),
          py::call_guard<py::gil_scoped_release>(),
          "Greedy (temperature 0) or sampled generation -> (B, S + n) int64; attention_mask (B, S): left-padded "
          "rows (1 real, 0 pad), as transformers' generate takes them.")
      .def(
          "loss",
          [](PyCausalLM& s, const at::Tensor& ids, c10::optional<at::Tensor> labels) {
            at::NoGradGuard no_grad;
            return am::causal_lm_loss(*s.model, ids, labels).item<double>();
          },
          py::arg("input_ids"), py::arg("labels") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def(
          "perplexity",
          [](PyCausalLM& s, const std::vector<at::Tensor>& seqs, int64_t max_length) {
            am::PerplexityResult r;
            {
              py::gil_scoped_release no_gil;
              r = am::perplexity(*s.model, seqs, max_length);
            }
            py::dict d;
            d["nll_sum"] = r.nll_sum;
            d["tokens"] = r.tokens;
            d["perplexity"] = r.perplexity();
            return d;
          },
          py::arg("sequences"), py::arg("max_length") = 0)
      .def(
          "save",
          [](PyCausalLM& s, const std::string& dir, int64_t max_shard_bytes) {
            am::save_causal_lm(*s.model, dir, max_shard_bytes);
          },
          py::arg("dir"), py::arg("max_shard_bytes") = 5'000'000'000LL, py::call_guard<py::gil_scoped_release>())
      .def(
          "loss_gradients",
          [](PyCausalLM& s, const at::Tensor& ids) {
            // Gradients of the mean next-token loss with respect to every parameter (zeros where
            // none flows), for checking the backward pass against transformers'.
            std::vector<std::pair<std::string, at::Tensor>> grads;
            {
              py::gil_scoped_release no_gil;
              s.model->zero_grad();
              am::causal_lm_loss(*s.model, ids).backward();
              for (auto& p : s.model->named_parameters(true)) {
                auto g = p.value().grad();
                grads.emplace_back(p.key(), g.defined() ? g.clone() : at::zeros_like(p.value()));
              }
              s.model->zero_grad();
            }
            py::dict d;
            for (auto& [name, g] : grads) d[py::str(name)] = g;
            return d;
          },
          py::arg("input_ids"))
      .def("state_dict", [](PyCausalLM& s) {
        py::dict d;
        for (auto& [name, t] : s.model->state_tensors()) d[py::str(name)] = t.detach();
        return d;
      });
}

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
      .def(
          "encode_with_offsets",
          [](const Tokenizer& t, const std::string& text, bool add_special_tokens) {
            auto e = anvil::data::encode_with_offsets(t, text, add_special_tokens);
            return std::make_pair(e.ids, e.offsets);
          },
          py::arg("text"), py::arg("add_special_tokens") = true,
          "(ids, [(start, end)] UTF-8 byte spans): return_offsets_mapping in bytes, as TRL GOLD normalises it")
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

// Training data (anvil/data/dataset.h): examples as (ids, target) lists, packed rows as a dict of lists.
void bind_dataset(py::module_& m) {
  namespace ad = anvil::data;
  m.def(
      "tokenize_example",
      [](const std::string& line, const ad::Tokenizer& tok, bool completion_only, bool add_eos) {
        ad::ReadOptions o;
        o.loss_on = completion_only ? ad::LossOn::kCompletion : ad::LossOn::kAll;
        o.add_eos = add_eos;
        const auto ex = ad::tokenize_example(line, tok, o, "line");
        return py::make_tuple(ex.ids, std::vector<int>(ex.target.begin(), ex.target.end()));
      },
      py::arg("line"), py::arg("tokenizer"), py::arg("completion_only") = false, py::arg("add_eos") = true,
      "One JSONL line -> (ids, target flags).");
  m.def(
      "pack_examples",
      [](const std::vector<std::pair<std::vector<int32_t>, std::vector<int>>>& examples, int64_t row_length,
         int32_t pad_id) {
        std::vector<ad::Example> exs;
        for (const auto& [ids, target] : examples) exs.push_back({ids, std::vector<uint8_t>(target.begin(), target.end())});
        const auto p = ad::pack_examples(exs, row_length, pad_id);
        py::dict d;
        d["rows"] = p.rows;
        d["ids"] = p.ids;
        d["labels"] = p.labels;
        d["positions"] = p.positions;
        d["doc_ids"] = p.doc_ids;
        return d;
      },
      py::arg("examples"), py::arg("row_length"), py::arg("pad_id"));
  m.def("shuffled_order", &ad::shuffled_order, py::arg("n"), py::arg("seed"));
}

// LoRA (lora/): the config crosses as adapter_config.json text, so Python writes PEFT's own field
// names and anvil's parser (with its errors) is the one under test.
void bind_lora(py::module_& m) {
  namespace al = anvil::lora;
  using TensorList = std::vector<std::pair<std::string, at::Tensor>>;
  m.def(
      "apply_lora",
      [](PyCausalLM& s, const std::string& config_json, uint64_t seed) {
        return al::apply_lora(*s.model, al::parse_adapter_config(config_json, "config"), seed);
      },
      py::arg("model"), py::arg("config_json"), py::arg("seed") = 0, py::call_guard<py::gil_scoped_release>(),
      "Attaches LoRA adapters per an adapter_config.json text; -> [(PEFT name, trainable tensor)].");
  m.def(
      "save_adapter",
      [](PyCausalLM& s, const std::string& config_json, const std::string& dir) {
        al::save_adapter(*s.model, al::parse_adapter_config(config_json, "config"), dir);
      },
      py::arg("model"), py::arg("config_json"), py::arg("dir"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "load_adapter",
      [](PyCausalLM& s, const std::string& dir) {
        auto c = al::load_adapter(*s.model, dir);
        std::vector<std::string> names;
        for (auto& [name, a] : al::adapters_of(*s.model)) names.push_back(name);
        return al::adapter_config_json(c, names);
      },
      py::arg("model"), py::arg("dir"), py::call_guard<py::gil_scoped_release>(),
      "Attaches a PEFT adapter directory; -> the config as anvil would write it.");
  m.def(
      "adapter_state", [](PyCausalLM& s) -> TensorList { return al::adapter_state(*s.model, true); }, py::arg("model"));
  m.def(
      "merge_adapter", [](PyCausalLM& s) { al::merge_adapter(*s.model); }, py::arg("model"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "trainable_parameter_names",
      [](PyCausalLM& s) {
        std::vector<std::string> names;
        for (auto& p : s.model->named_parameters(true))
          if (p.value().requires_grad()) names.push_back(p.key());
        return names;
      },
      py::arg("model"), "Base-model parameters with requires_grad (empty once adapters are attached).");
  m.def(
      "adapter_gradients",
      [](PyCausalLM& s, const at::Tensor& ids) {
        // Gradients of the mean next-token loss with respect to the adapter tensors, by PEFT file
        // name (the base is frozen: its gradients must stay undefined).
        TensorList out;
        {
          py::gil_scoped_release no_gil;
          auto state = al::adapter_state(*s.model, true);
          for (auto& [name, t] : state) t.mutable_grad() = at::Tensor();
          anvil::model::causal_lm_loss(*s.model, ids).backward();
          for (auto& [name, t] : state) out.emplace_back(name, t.grad().defined() ? t.grad().clone() : at::Tensor());
          for (auto& [name, t] : state) t.mutable_grad() = at::Tensor();
          for (auto& p : s.model->parameters())
            if (p.grad().defined()) throw std::runtime_error("adapter_gradients: a frozen base parameter got a gradient");
        }
        py::dict d;
        for (auto& [name, g] : out) d[py::str(name)] = g.defined() ? py::cast(g) : py::none();
        return d;
      },
      py::arg("model"), py::arg("input_ids"));
  m.def(
      "set_training", [](PyCausalLM& s, bool on) { s.model->train(on); }, py::arg("model"), py::arg("on"),
      "Training mode (LoRA dropout active) or eval mode; a loaded model starts in training mode.");
  m.def(
      "linear_names",
      [](PyCausalLM& s) {
        std::vector<std::string> names;
        for (auto& [name, l] : anvil::model::named_linears(*s.model)) names.push_back(name);
        return names;
      },
      py::arg("model"));
}

}  // namespace

// GGUF (anvil/io/gguf.h): the header as Python values and the dequantized tensors, for the gguf-py oracle tests.
py::object gguf_value_to_python(const anvil::io::GgufValue& v) {
  py::list items;
  for (size_t i = 0; i < v.size(); ++i) {
    if (v.is_string()) items.append(py::bytes(v.strings[i]));
    else if (v.is_float()) items.append(v.floats[i]);
    else if (v.is_bool()) items.append(v.ints[i] != 0);
    else items.append(v.ints[i]);
  }
  if (v.is_array()) return std::move(items);
  return items[0];
}

void bind_gguf(py::module_& m) {
  m.def(
      "gguf_read",
      [](const std::string& path) {
        anvil::io::GgufFile f(path);
        py::dict out, meta;
        out["version"] = f.version();
        out["alignment"] = f.alignment();
        out["data_offset"] = f.data_offset();
        for (const auto& [key, v] : f.metadata())
          meta[py::str(key)] = py::make_tuple(anvil::io::gguf_type_name(v.type),
                                              anvil::io::gguf_type_name(v.element_type), gguf_value_to_python(v));
        out["metadata"] = meta;
        py::list tensors;
        for (const auto& t : f.tensors())
          tensors.append(py::make_tuple(t.name, t.dims, anvil::io::ggml_type_name(t.type), t.offset, t.nbytes));
        out["tensors"] = tensors;
        return out;
      },
      py::arg("path"),
      "A GGUF file's header: {version, alignment, data_offset, metadata {key: (type, element type, value; strings "
      "as bytes)}, tensors [(name, dims in ggml order, ggml type, offset, nbytes)]}.");
  m.def(
      "gguf_tensors",
      [](const std::string& path, const std::string& dtype) {
        anvil::io::GgufFile f(path);
        const at::ScalarType dt = anvil::model::dtype_from_name(dtype);
        std::map<std::string, at::Tensor> out;
        for (const auto& t : f.tensors()) out[t.name] = f.tensor(t.name, dt);
        return out;
      },
      py::arg("path"), py::arg("dtype") = "float32", py::call_guard<py::gil_scoped_release>(),
      "Every tensor of a GGUF file dequantized to dtype (float32, bfloat16, float16), PyTorch shapes.");
  m.def(
      "gguf_config_json",
      [](const std::string& path) { return anvil::model::gguf_config_json(anvil::io::GgufFile(path)); },
      py::arg("path"), "The config.json text anvil derives from a GGUF file's metadata.");
  m.def(
      "gguf_model_tensors",
      [](const std::string& path) {
        anvil::io::GgufFile f(path);
        const auto config = anvil::model::gguf_model_config(f);
        const auto tensors = anvil::model::gguf_model_tensors(f, config);
        return std::map<std::string, at::Tensor>(tensors.begin(), tensors.end());
      },
      py::arg("path"), py::call_guard<py::gil_scoped_release>(),
      "A GGUF model's tensors under Hugging Face names, fp32, q/k un-permuted.");
  // ---- export (anvil/model/gguf_export.h) ----
  m.def(
      "gguf_quantize",
      [](const at::Tensor& x, const std::string& type) {
        uint32_t t = 0;
        if (type == "F32") t = anvil::io::ggml_type::kF32;
        else if (type == "F16") t = anvil::io::ggml_type::kF16;
        else if (type == "BF16") t = anvil::io::ggml_type::kBF16;
        else if (type == "Q8_0") t = anvil::io::ggml_type::kQ8_0;
        else if (type == "Q4_0") t = anvil::io::ggml_type::kQ4_0;
        else if (type == "Q5_0") t = anvil::io::ggml_type::kQ5_0;
        else if (type == "Q5_1") t = anvil::io::ggml_type::kQ5_1;
        else if (type == "Q4_K") t = anvil::io::ggml_type::kQ4_K;
        else if (type == "Q5_K") t = anvil::io::ggml_type::kQ5_K;
        else if (type == "Q6_K") t = anvil::io::ggml_type::kQ6_K;
        else TORCH_CHECK(false, "gguf_quantize: type '", type, "' is not one of F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, "
                         "Q4_K, Q5_K, Q6_K");
        std::vector<uint8_t> bytes;
        {
          py::gil_scoped_release release;
          bytes = anvil::io::quantize_ggml(x, t);
        }
        return py::bytes(reinterpret_cast<const char*>(bytes.data()), bytes.size());
      },
      py::arg("x"), py::arg("type"), "ggml's bytes of a CPU float tensor quantized to F32/F16/BF16/Q8_0/Q4_0/Q5_0/Q5_1/Q4_K/Q5_K/Q6_K.");
  m.def(
      "gguf_tokenizer_metadata",
      [](const std::string& dir, int64_t vocab_size) {
        py::dict out;
        for (const auto& [key, v] : anvil::data::gguf_tokenizer_metadata(dir, vocab_size))
          out[py::str(key)] = py::make_tuple(anvil::io::gguf_type_name(v.type),
                                             anvil::io::gguf_type_name(v.element_type), gguf_value_to_python(v));
        return out;
      },
      py::arg("model_dir"), py::arg("vocab_size"),
      "The tokenizer.* GGUF metadata of a model folder: {key: (type, element type, value)}.");
  m.def(
      "export_gguf",
      [](const std::string& model_dir, const std::string& out_path, const std::string& type, bool overwrite,
         const std::string& name) {
        anvil::model::GgufExportReport r;
        {
          py::gil_scoped_release release;
          anvil::model::GgufExportOptions o;
          o.type = type;
          o.overwrite = overwrite;
          o.name = name;
          // The tokenizer comes from data/ (model does not depend on it).
          o.tokenizer_metadata = [&](int64_t vocab) { return anvil::data::gguf_tokenizer_metadata(model_dir, vocab); };
          r = anvil::model::export_gguf(model_dir, out_path, o);
        }
        py::dict out, per_type;
        out["path"] = r.path;
        out["type"] = r.type;
        out["file_type"] = r.file_type;
        for (const auto& [k, v] : r.tensors_per_type) per_type[py::str(k)] = v;
        out["tensors_per_type"] = per_type;
        out["tensors"] = r.tensors;
        out["parameters"] = r.parameters;
        out["bytes"] = r.bytes;
        out["source_bytes"] = r.source_bytes;
        out["seconds"] = r.seconds;
        out["tensor_types"] = r.tensor_types;
        return out;
      },
      py::arg("model_dir"), py::arg("out_path"), py::arg("type") = "q8_0", py::arg("overwrite") = false,
      py::arg("name") = "",
      "Exports a Hugging Face Llama/Mistral folder as one GGUF file (f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k) with its "
      "tokenizer; returns the report {path, type, file_type, tensors_per_type, tensors, parameters, bytes, "
      "source_bytes, seconds, tensor_types}.");
}

// ---- distillation: the KD losses (tests/python/test_distill.py compares them with torchtune's and TRL's) ----
void bind_distill(py::module_& m) {
  namespace tr = anvil::train;
  const auto options = [](const std::string& loss, double temperature, double skew_lambda, double jsd_beta,
                          int64_t chunk) {
    tr::KdOptions o;
    o.loss = tr::parse_kd_loss(loss, "loss");
    o.temperature = temperature, o.skew_lambda = skew_lambda, o.jsd_beta = jsd_beta, o.chunk = chunk;
    return o;
  };
  m.def(
      "kd_loss",
      [options](const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
                const at::Tensor& teacher_weight, double normalizer, const std::string& loss, double temperature,
                double skew_lambda, double jsd_beta, int64_t chunk) {
        return tr::kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, normalizer,
                            options(loss, temperature, skew_lambda, jsd_beta, chunk));
      },
      py::arg("student_hidden"), py::arg("student_weight"), py::arg("teacher_hidden"), py::arg("teacher_weight"),
      py::arg("normalizer"), py::arg("loss") = "forward_kl", py::arg("temperature") = 1.0, py::arg("skew_lambda") = 0.1,
      py::arg("jsd_beta") = 0.5, py::arg("chunk") = 1024,
      "The chunked KD loss (anvil/train/kd_loss.h): sum over rows of the divergence between the student's and the "
      "teacher's softmax(h W^T / temperature), / normalizer; autograd to the student's hidden rows and head.");
  m.def(
      "kd_divergence_from_logits",
      [options](const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::string& loss,
                double temperature, double skew_lambda, double jsd_beta) {
        return tr::kd_divergence_from_logits(student_logits, teacher_logits,
                                              options(loss, temperature, skew_lambda, jsd_beta, 1));
      },
      py::arg("student_logits"), py::arg("teacher_logits"), py::arg("loss") = "forward_kl", py::arg("temperature") = 1.0,
      py::arg("skew_lambda") = 0.1, py::arg("jsd_beta") = 0.5,
      "Each row's divergence (N) from logits (N, V): the plain-ATen reference the chunked loss shares its formula with.");
  // The sparse teacher (top-k ids + log-probs, the offline cache; tests/python/test_distill_cache.py).
  m.def(
      "kd_loss_sparse",
      [options](const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_ids,
                const at::Tensor& teacher_logprobs, double normalizer, const std::string& loss, double temperature,
                double skew_lambda, double jsd_beta, int64_t chunk) {
        return tr::kd_loss_sparse(student_hidden, student_weight, teacher_ids, teacher_logprobs, normalizer,
                                  options(loss, temperature, skew_lambda, jsd_beta, chunk));
      },
      py::arg("student_hidden"), py::arg("student_weight"), py::arg("teacher_ids"), py::arg("teacher_logprobs"),
      py::arg("normalizer"), py::arg("loss") = "forward_kl", py::arg("temperature") = 1.0, py::arg("skew_lambda") = 0.1,
      py::arg("jsd_beta") = 0.5, py::arg("chunk") = 1024,
      "kd_loss with the teacher as top-k ids (N, k) and tempered log-probs (N, k), the tail an 'other' bucket.");
  m.def(
      "kd_divergence_sparse",
      [options](const at::Tensor& student_logprobs, const at::Tensor& teacher_ids, const at::Tensor& teacher_logprobs,
                const std::string& loss, double skew_lambda, double jsd_beta) {
        return tr::kd_divergence_sparse(student_logprobs, teacher_ids, teacher_logprobs,
                                        options(loss, 1.0, skew_lambda, jsd_beta, 1));
      },
      py::arg("student_logprobs"), py::arg("teacher_ids"), py::arg("teacher_logprobs"), py::arg("loss") = "forward_kl",
      py::arg("skew_lambda") = 0.1, py::arg("jsd_beta") = 0.5,
      "Each row's divergence (N) between the student's log-probs (N, V) and the sparse teacher (coarse k + 1 outcomes).");
  m.def("kd_loss_names", &tr::kd_loss_names, "The names distill.loss accepts.");
  // Vocabularies (anvil/train/vocab.h) and ULD (tests/python/test_distill_vocab.py compares them with TRL's GOLD).
  m.def(
      "uld_divergence",
      [](const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& shared_student_ids,
         const at::Tensor& shared_teacher_ids, double student_temperature, double teacher_temperature, bool hybrid,
         double beta, double matched_weight, double unmatched_weight) {
        tr::UldOptions o;
        o.student_temperature = student_temperature, o.teacher_temperature = teacher_temperature, o.hybrid = hybrid;
        o.jsd_beta = beta, o.matched_weight = matched_weight, o.unmatched_weight = unmatched_weight;
        return tr::uld_divergence(student_logits, teacher_logits, shared_student_ids, shared_teacher_ids, o);
      },
      py::arg("student_logits"), py::arg("teacher_logits"), py::arg("shared_student_ids"),
      py::arg("shared_teacher_ids"), py::arg("student_temperature") = 1.0, py::arg("teacher_temperature") = 1.0,
      py::arg("hybrid") = true, py::arg("beta") = 0.5, py::arg("matched_weight") = -1.0,
      py::arg("unmatched_weight") = -1.0, "Each aligned row's ULD value (N): sorted L1, hybrid with the shared tokens' JSD.");
  m.def(
      "shared_tokens",
      [](const anvil::data::Tokenizer& teacher, const anvil::data::Tokenizer& student) {
        const auto s = tr::shared_tokens(teacher, student);
        return std::make_pair(s.teacher_ids, s.student_ids);
      },
      py::arg("teacher"), py::arg("student"), "(teacher ids, student ids) of the tokens both spell the same.");
  m.def("first_differing_token", &tr::first_differing_token, py::arg("a"), py::arg("b"),
        "The first id whose token differs between two tokenizers; -1 when they are the same.");
  m.def("align_by_byte_offsets", &tr::align_by_byte_offsets, py::arg("student_offsets"), py::arg("teacher_offsets"),
        "GOLD's byte-offset alignment: (student groups, teacher groups).");
  m.def(
      "cross_document_loss",
      [](const at::Tensor& zs, const at::Tensor& zt, const std::vector<int32_t>& s_ids, const std::vector<uint8_t>& s_target,
         const std::vector<anvil::data::ByteSpan>& s_offsets, const std::vector<int32_t>& t_ids,
         const std::vector<uint8_t>& t_target, const std::vector<anvil::data::ByteSpan>& t_offsets,
         const at::Tensor& sid, const at::Tensor& tid, double student_temperature, double teacher_temperature,
         bool hybrid, double beta, double matched_weight, double unmatched_weight, bool skip_student_eos,
         bool skip_teacher_eos, const std::string& merge, int64_t chunk) {
        tr::CrossVocabOptions o;
        o.uld.student_temperature = student_temperature, o.uld.teacher_temperature = teacher_temperature;
        o.uld.hybrid = hybrid, o.uld.jsd_beta = beta;
        o.uld.matched_weight = matched_weight, o.uld.unmatched_weight = unmatched_weight;
        o.skip_student_eos = skip_student_eos, o.skip_teacher_eos = skip_teacher_eos, o.merge = merge, o.chunk = chunk;
        return tr::cross_document_loss(zs, zt, {s_ids, s_target, s_offsets}, {t_ids, t_target, t_offsets}, sid, tid, o);
      },
      py::arg("student_logits"), py::arg("teacher_logits"), py::arg("student_ids"), py::arg("student_target"),
      py::arg("student_offsets"), py::arg("teacher_ids"), py::arg("teacher_target"), py::arg("teacher_offsets"),
      py::arg("shared_student_ids"), py::arg("shared_teacher_ids"), py::arg("student_temperature") = 1.0,
      py::arg("teacher_temperature") = 1.0, py::arg("hybrid") = false, py::arg("beta") = 0.5,
      py::arg("matched_weight") = -1.0, py::arg("unmatched_weight") = -1.0, py::arg("skip_student_eos") = true,
      py::arg("skip_teacher_eos") = true, py::arg("merge") = "observed", py::arg("chunk") = 1024,
      "GOLD's extended-ULD loss of one document pair (train/cross_vocab.h): () the mean over aligned groups.");
  m.def("merge_aligned_probabilities", &tr::merge_aligned_probabilities, py::arg("probs"), py::arg("groups"),
        py::arg("token_ids"), py::arg("strategy") = "observed", "GOLD's merge of aligned groups: (groups, V).");
  m.def(
      "derive_by_layers",
      [](PyCausalLM& source, const std::vector<int64_t>& keep, const std::string& dtype) {
        const auto dt = dtype.empty() ? source.model->dtype() : anvil::model::dtype_from_name(dtype);
        auto lm = anvil::model::derive_by_layers(*source.model, keep,
                                                 at::TensorOptions().dtype(dt).device(source.model->device()), "keep");
        lm->eval();
        return PyCausalLM{lm};
      },
      py::arg("source"), py::arg("keep"), py::arg("dtype") = "", py::call_guard<py::gil_scoped_release>(),
      "A model of the source's layers `keep`, renumbered (anvil/model/derive.h), in eval mode.");

  // ---- width pruning (Minitron) and hidden-state losses: tests/python/test_distill_prune.py ----
  namespace am = anvil::model;
  const auto importance_dict = [](const am::Importance& imp) {
    py::dict d;
    d["mlp"] = imp.mlp, d["heads"] = imp.heads, d["hidden"] = imp.hidden, d["rows"] = imp.rows, d["tokens"] = imp.tokens;
    return d;
  };
  m.def(
      "activation_importance",
      [importance_dict](PyCausalLM& source, const std::vector<at::Tensor>& batches) {
        am::Importance imp;
        {
          py::gil_scoped_release release;
          imp = am::activation_importance(*source.model, batches);
        }
        return importance_dict(imp);
      },
      py::arg("source"), py::arg("batches"),
      "Minitron's activation importance of every MLP channel, head and hidden channel: {mlp: [(I)], heads: [(nh)], "
      "hidden: (H), rows, tokens}.");
  m.def(
      "derive_pruned",
      [importance_dict](PyCausalLM& source, const std::vector<int64_t>& keep, int64_t intermediate_size,
                        int64_t num_attention_heads, int64_t num_key_value_heads, int64_t hidden_size,
                        const std::vector<at::Tensor>& batches, const std::string& dtype) {
        std::shared_ptr<am::CausalLM> lm;
        am::Importance imp;
        am::PruneSelection sel;
        std::string summary;
        {
          py::gil_scoped_release release;
          const auto& c = source.model->config();
          const auto w = am::resolve_widths(c, {intermediate_size, num_attention_heads, num_key_value_heads, hidden_size},
                                            "config key student.");
          imp = am::activation_importance(*source.model, batches);
          sel = am::select_top(c, imp, w);
          const auto dt = dtype.empty() ? source.model->dtype() : am::dtype_from_name(dtype);
          std::vector<int64_t> layers = keep;
          if (layers.empty()) layers = am::every_nth_layer(c.num_hidden_layers, 1);
          lm = am::derive_pruned(*source.model, layers, w, sel, at::TensorOptions().dtype(dt).device(source.model->device()),
                                 "keep");
          lm->eval();
          summary = am::pruning_summary(c, w, imp);
        }
        py::dict d;
        d["mlp"] = sel.mlp, d["heads"] = sel.heads, d["kv"] = sel.kv, d["hidden"] = sel.hidden, d["summary"] = summary;
        d["importance"] = importance_dict(imp);
        return py::make_tuple(PyCausalLM{lm}, d);
      },
      py::arg("source"), py::arg("keep"), py::arg("intermediate_size") = 0, py::arg("num_attention_heads") = 0,
      py::arg("num_key_value_heads") = 0, py::arg("hidden_size") = 0, py::arg("batches") = std::vector<at::Tensor>{},
      py::arg("dtype") = "",
      "A width-pruned derived model (anvil/model/derive.h) and its selection {mlp, heads, kv, hidden, summary, "
      "importance}; keep [] keeps every layer.");
  m.def(
      "layer_outputs",
      [](PyCausalLM& s, const at::Tensor& ids) {
        std::vector<at::Tensor> out;
        const am::LayerOutputsScope record(*s.model->model, &out);
        s.model->hidden_states(ids);
        return out;
      },
      py::arg("model"), py::arg("ids"), "TransformerModel::set_layer_outputs' states for ids (B, S).");
  m.def(
      "hidden_divergence",
      [](const at::Tensor& s, const at::Tensor& t, const std::string& type) {
        return tr::hidden_divergence(s, t, tr::parse_hidden_loss(type, "type"));
      },
      py::arg("student"), py::arg("teacher"), py::arg("type"), "Per-row hidden-state loss (N): mse or cosine.");
  py::class_<tr::HiddenLoss, std::shared_ptr<tr::HiddenLoss>>(m, "HiddenLoss")
      .def(py::init([](const std::string& type, double weight, const tr::LayerMap& map, int64_t student_layers,
                       int64_t teacher_layers, int64_t student_width, int64_t teacher_width, const std::string& dtype,
                       uint64_t seed) {
             tr::check_layer_map(map, student_layers, teacher_layers, "layers");
             return std::make_shared<tr::HiddenLoss>(tr::parse_hidden_loss(type, "type"), weight, map, student_width,
                                                     teacher_width,
                                                     at::TensorOptions().dtype(dtype == "float64" ? at::kDouble
                                                                                                  : am::dtype_from_name(dtype)),
                                                     seed);
           }),
           py::arg("type"), py::arg("weight"), py::arg("layers"), py::arg("student_layers"), py::arg("teacher_layers"),
           py::arg("student_width"), py::arg("teacher_width"), py::arg("dtype") = "float32", py::arg("seed") = 0)
      .def("parameters", [](const tr::HiddenLoss& l) { return l.parameters(); })
      .def("__call__", [](const tr::HiddenLoss& l, const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& t,
                          const at::Tensor& rows, double normalizer) { return l(s, t, rows, normalizer); });
  m.def("uniform_layer_map", &tr::uniform_layer_map, py::arg("student_layers"), py::arg("teacher_layers"));
}

// compressed-tensors format (anvil/model/compressed_tensors.h), for tests against the package itself:
// configs and schemes cross as JSON text.
void bind_compressed_tensors(py::module_& m) {
  namespace ct = anvil::model::ct;
  using json = nlohmann::json;
  auto dtype_or_none = [](const std::string& name) -> std::optional<at::ScalarType> {
    if (name.empty()) return std::nullopt;
    return anvil::model::dtype_from_name(name);
  };
  m.def(
      "ct_pack_int32", [](const at::Tensor& v, int64_t bits, int64_t dim) { return ct::pack_int32(v, bits, dim); },
      py::arg("values"), py::arg("num_bits"), py::arg("packed_dim") = 1, "compressed-tensors' pack_to_int32.");
  m.def(
      "ct_unpack_int32",
      [](const at::Tensor& p, int64_t bits, const std::vector<int64_t>& shape, int64_t dim) {
        return ct::unpack_int32(p, bits, shape, dim);
      },
      py::arg("packed"), py::arg("num_bits"), py::arg("shape"), py::arg("packed_dim") = 1,
      "compressed-tensors' unpack_from_int32.");
  m.def(
      "ct_parse_config", [](const std::string& text) { return ct::to_json(ct::parse_quantization_config(json::parse(text))).dump(); },
      py::arg("quantization_config"), "quantization_config JSON -> parsed and written back (to_json) as JSON text.");
  m.def(
      "ct_dequantize_module",
      [dtype_or_none](const std::map<std::string, at::Tensor>& tensors, const std::string& scheme,
                      const std::string& format, const std::string& dtype, const std::string& module) {
        return ct::dequantize_module(tensors, ct::parse_scheme(json::parse(scheme)), format, dtype_or_none(dtype), module);
      },
      py::arg("tensors"), py::arg("scheme"), py::arg("format"), py::arg("dtype") = "", py::arg("module") = "",
      "One module's checkpoint tensors (local names) -> its dense weight.");
  m.def(
      "ct_compress_module",
      [](const at::Tensor& weight, const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
         const std::string& scheme, const std::string& format) {
        return ct::compress_module(weight, scale, zero_point.value_or(at::Tensor()), ct::parse_scheme(json::parse(scheme)),
                                   format);
      },
      py::arg("weight"), py::arg("scale"), py::arg("zero_point") = py::none(), py::arg("scheme"), py::arg("format"),
      "A dense weight and its scale (zero point) -> the module's checkpoint tensors.");
  m.def(
      "ct_required_keys",
      [](const std::string& module, const std::string& scheme, const std::string& format) {
        return ct::required_keys(module, ct::parse_scheme(json::parse(scheme)), format);
      },
      py::arg("module"), py::arg("scheme"), py::arg("format"));
  m.def(
      "ct_check_complete",
      [](const std::set<std::string>& keys, const std::string& config,
         const std::vector<std::pair<std::string, std::vector<std::string>>>& modules) {
        std::vector<ct::ModuleRef> refs;
        for (const auto& [name, classes] : modules) refs.push_back({name, classes});
        return ct::check_complete(keys, ct::parse_quantization_config(json::parse(config)), refs);
      },
      py::arg("keys"), py::arg("config"), py::arg("modules"));
  m.def(
      "ct_scheme_for",
      [](const std::string& config, const std::string& module, const std::vector<std::string>& classes) -> py::object {
        const auto c = ct::parse_quantization_config(json::parse(config));
        auto hit = ct::scheme_for(c, module, classes);
        if (!hit) return py::none();
        return py::str(hit->first);
      },
      py::arg("config"), py::arg("module"), py::arg("classes"), "The name of the config group covering a module, or None.");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "anvil C++ core";
  bind_model(m);
  bind_distill(m);
  bind_tokenizer(m);
  bind_dataset(m);
  bind_lora(m);
  bind_gguf(m);
  bind_compressed_tensors(m);
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
  m.def(
      "int8_gemm_path",
      [](int64_t m_, int64_t n, int64_t k, const std::string& out_dtype) {
        const at::ScalarType dt = out_dtype == "float16" ? at::kHalf : out_dtype == "float32" ? at::kFloat : at::kBFloat16;
        return anvil::ops::int8_gemm_path(m_, n, k, dt);
      },
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("out_dtype") = "bfloat16",
      "The path int8_gemm takes for (m, n, k) on the current device: sm90 | int_mm | simt ('cpu' without CUDA).");
  bind_quantize_algos(m);
  bind_pipelines(m);
}
