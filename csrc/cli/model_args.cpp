// Model options of the CLI (cli/model_args.h).
#include "cli/model_args.h"

#include "anvil/io/safetensors.h"

#include <ATen/Context.h>

#include <iostream>
#include <stdexcept>
#include <string>

namespace anvil::cli {

void add_model_options(cxxopts::Options& opts) {
  opts.add_options()
      ("m,model", "model folder (config.json + safetensors), a llama.cpp .gguf file, or a hub id in the local Hugging Face cache",
       cxxopts::value<std::string>())
      ("tokenizer", "tokenizer folder (default: the model's; a .gguf model's own metadata)", cxxopts::value<std::string>()->default_value(""))
      ("device", "cpu, cuda or cuda:N (default: cuda when a GPU is present)",
       cxxopts::value<std::string>()->default_value(""))
      ("dtype", "auto (the checkpoint's), float32, bfloat16 or float16",
       cxxopts::value<std::string>()->default_value("auto"));
}

LoadedModel load_model_and_tokenizer(const cxxopts::ParseResult& args) {
  if (!args.count("model")) throw std::invalid_argument("--model: required (a model folder or a cached hub id)");
  const std::string path = io::resolve_model_path(args["model"].as<std::string>());
  std::string device = args["device"].as<std::string>();
  if (device.empty()) device = at::hasCUDA() ? "cuda" : "cpu";
  if (device.rfind("cuda", 0) == 0 && !at::hasCUDA())
    throw std::invalid_argument("--device " + device + ": no CUDA device is available (use --device cpu)");
  if (device != "cpu" && device.rfind("cuda", 0) != 0)
    throw std::invalid_argument("--device must be cpu, cuda or cuda:N, got '" + device + "'");
  c10::optional<at::ScalarType> dtype;
  const std::string dt = args["dtype"].as<std::string>();
  if (dt != "auto") {
    if (dt != "float32" && dt != "bfloat16" && dt != "float16")
      throw std::invalid_argument("--dtype must be auto, float32, bfloat16 or float16, got '" + dt + "'");
    dtype = model::dtype_from_name(dt);
  }
  LoadedModel m;
  m.model = model::load_causal_lm(path, dtype, at::Device(device));
  m.model->eval();
  std::string tok_dir = args["tokenizer"].as<std::string>();
  m.tokenizer = data::load_tokenizer(tok_dir.empty() ? path : io::resolve_model_path(tok_dir));
  const auto& cfg = m.model->config();
  std::cerr << "model: " << cfg.architecture << " from " << path << " (" << model::dtype_name(m.model->dtype())
            << ", " << m.model->device().str() << "), tokenizer " << m.tokenizer->kind() << " with "
            << m.tokenizer->vocab_size() << " ids\n";
  return m;
}

}  // namespace anvil::cli
