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
      ("device", "auto (cuda when a GPU is present), cpu, cuda or cuda:N",
       cxxopts::value<std::string>()->default_value("auto"))
      ("dtype", "auto (the checkpoint's), float32, bfloat16 or float16",
       cxxopts::value<std::string>()->default_value("auto"));
}

LoadedModel load_model_and_tokenizer(const cxxopts::ParseResult& args) {
  if (!args.count("model")) throw std::invalid_argument("--model: required (a model folder or a cached hub id)");
  const std::string path = io::resolve_model_path(args["model"].as<std::string>());
  const at::Device device = model::parse_device(args["device"].as<std::string>(), "--device");
  const auto dtype = model::parse_dtype(args["dtype"].as<std::string>(), "--dtype", /*allow_auto=*/true);
  LoadedModel m;
  m.model = model::load_causal_lm(path, dtype, device);
  m.model->eval();
  std::string tok_dir = args["tokenizer"].as<std::string>();
  m.tokenizer = data::load_tokenizer(tok_dir.empty() ? path : io::resolve_model_path(tok_dir));
  const auto& cfg = m.model->config();
  // A tokenizer may have fewer ids than the model's (padded) embedding, never more: its extra ids would
  // index past the embedding at the first prompt that holds one.
  if (m.tokenizer->vocab_size() > cfg.vocab_size)
    throw std::invalid_argument((tok_dir.empty() ? "--model" : "--tokenizer") + std::string(": the tokenizer has ") +
                                std::to_string(m.tokenizer->vocab_size()) + " ids but the model's vocabulary only " +
                                std::to_string(cfg.vocab_size) + " (the tokenizer of another model?)");
  std::cerr << "model: " << cfg.architecture << " from " << path << " (" << model::dtype_name(m.model->dtype())
            << ", " << m.model->device().str() << "), tokenizer " << m.tokenizer->kind() << " with "
            << m.tokenizer->vocab_size() << " ids\n";
  return m;
}

}  // namespace anvil::cli
