// `anvil generate`: load a Hugging Face model folder (or a hub id in the local cache) with its
// tokenizer, and continue a prompt (or answer it as a chat, through the model's chat format) with a KV
// cache: greedy by default, or sampled with temperature / top-k / top-p from a seed. The continuation
// goes to stdout; timing (tokens/s) to stderr.
#include "cli/commands.h"
#include "cli/model_args.h"

#include "anvil/data/tokenizer.h"
#include "anvil/model/generate.h"
#include "anvil/model/transformer.h"
#include "anvil/train/progress.h"

#include <ATen/ATen.h>
#include <cxxopts.hpp>

#include <algorithm>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace anvil::cli {
namespace {

std::string read_text_file(const std::string& path, const char* option) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(std::string(option) + ": cannot open '" + path + "'");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The prompt's ids: the raw text with the tokenizer's special tokens (bos), or a one-turn chat rendered
// by the model's chat format with the assistant's turn opened.
std::vector<int32_t> prompt_ids(const data::Tokenizer& tok, const std::string& text, bool chat,
                                const std::string& system) {
  if (!chat) return tok.encode(text, /*add_special_tokens=*/true);
  std::vector<data::ChatMessage> messages;
  if (!system.empty()) messages.push_back({"system", system, std::nullopt});
  messages.push_back({"user", text, std::nullopt});
  return tok.encode(tok.render_chat(messages, /*add_generation_prompt=*/true), /*add_special_tokens=*/false);
}

}  // namespace

int cmd_generate(int argc, char** argv) {
  cxxopts::Options opts("anvil generate", "Continue a prompt (or answer it as a chat) with a model from a folder");
  add_model_options(opts);
  opts.add_options()
      ("p,prompt", "the prompt text", cxxopts::value<std::string>()->default_value(""))
      ("prompt-file", "read the prompt from a file", cxxopts::value<std::string>()->default_value(""))
      ("chat", "render the prompt as a user turn with the model's chat format (and open the assistant turn)")
      ("system", "a system message for --chat", cxxopts::value<std::string>()->default_value(""))
      ("chat-format", "force a built-in chat format (llama2, mistral, mistral-v1, llama3, llama3.1, chatml, qwen3, "
                      "deepseek-v2, deepseek-v3) instead of detecting it from tokenizer_config.json",
       cxxopts::value<std::string>()->default_value(""))
      ("n,max-new-tokens", "tokens to generate at most", cxxopts::value<int64_t>()->default_value("128"))
      ("temperature", "0: greedy; > 0: sample from softmax(logits / temperature)",
       cxxopts::value<double>()->default_value("0"))
      ("top-k", "sample among the k most likely tokens (0: all)", cxxopts::value<int64_t>()->default_value("0"))
      ("top-p", "sample among the smallest set of tokens reaching probability p (1: all)",
       cxxopts::value<double>()->default_value("1"))
      ("seed", "seed of the sampler", cxxopts::value<uint64_t>()->default_value("0"))
      ("ignore-eos", "do not stop at the model's end-of-sequence tokens")
      ("show-prompt", "print the prompt before the continuation")
      ("h,help", "show the options");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  std::string text = args["prompt"].as<std::string>();
  const std::string prompt_file = args["prompt-file"].as<std::string>();
  if (!prompt_file.empty()) {
    if (!text.empty()) throw std::invalid_argument("--prompt and --prompt-file: give one of them, not both");
    text = read_text_file(prompt_file, "--prompt-file");
  }
  if (text.empty() && !args.count("chat"))
    throw std::invalid_argument("--prompt: empty; give the text to continue (or --prompt-file)");
  model::GenerateOptions g;
  g.max_new_tokens = args["max-new-tokens"].as<int64_t>();
  g.temperature = args["temperature"].as<double>();
  g.top_k = args["top-k"].as<int64_t>();
  g.top_p = args["top-p"].as<double>();
  g.seed = args["seed"].as<uint64_t>();
  if (g.max_new_tokens < 1) throw std::invalid_argument("--max-new-tokens must be >= 1, got " + std::to_string(g.max_new_tokens));
  if (g.temperature < 0) throw std::invalid_argument("--temperature must be >= 0, got " + std::to_string(g.temperature));
  if (g.top_k < 0) throw std::invalid_argument("--top-k must be >= 0, got " + std::to_string(g.top_k));
  if (!(g.top_p > 0 && g.top_p <= 1)) throw std::invalid_argument("--top-p must be in (0, 1], got " + std::to_string(g.top_p));

  LoadedModel m = load_model_and_tokenizer(args);
  const std::string forced = args["chat-format"].as<std::string>();
  if (!forced.empty()) m.tokenizer->set_chat_format(data::chat_format_from_name(forced));
  const auto ids = prompt_ids(*m.tokenizer, text, args.count("chat") > 0, args["system"].as<std::string>());
  if (ids.empty()) throw std::invalid_argument("--prompt: the prompt encodes to no tokens");
  if (!args.count("ignore-eos")) {
    for (int32_t e : m.tokenizer->eos_ids()) g.stop_tokens.push_back(e);
    for (int64_t e : m.model->config().eos_token_ids)
      if (std::find(g.stop_tokens.begin(), g.stop_tokens.end(), e) == g.stop_tokens.end()) g.stop_tokens.push_back(e);
  }
  auto prompt = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).unsqueeze(0);

  at::NoGradGuard no_grad;
  train::Progress timer("generate", 0, "tok");
  const auto out = model::generate(*m.model, prompt.to(m.model->device()), g).to(at::kCPU);
  const int64_t n_new = out.size(1) - prompt.size(1);
  std::vector<int32_t> new_ids;
  for (int64_t i = 0; i < n_new; ++i) new_ids.push_back(static_cast<int32_t>(out[0][prompt.size(1) + i].item<int64_t>()));
  if (args.count("show-prompt")) std::cout << text;
  std::cout << m.tokenizer->decode(new_ids, /*skip_special_tokens=*/true) << std::endl;
  const double secs = timer.elapsed();
  std::fprintf(stderr, "generate: %lld prompt + %lld new tokens in %.2f s (%.1f new tokens/s, %s)\n",
               static_cast<long long>(ids.size()), static_cast<long long>(n_new), secs, double(n_new) / secs,
               m.model->device().str().c_str());
  return 0;
}

}  // namespace anvil::cli
