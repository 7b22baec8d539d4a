// `anvil eval`: perplexity of a model on a text or JSONL file, with a progress line. A .txt file is one
// document; a .jsonl file is one document per line: its "text", its "prompt" + "completion", or its
// "messages" rendered with the model's chat format. Each document is scored in windows of at most
// --max-length tokens (each window's first token is context only, as transformers' loss counts it), and
// the result is the token-weighted mean negative log-likelihood and its exponential.
#include "cli/commands.h"
#include "cli/model_args.h"

#include "anvil/data/dataset.h"
#include "anvil/data/tokenizer.h"
#include "anvil/model/generate.h"
#include "anvil/model/transformer.h"
#include "anvil/train/progress.h"

#include <ATen/ATen.h>
#include <cxxopts.hpp>
#include <nlohmann/json.hpp>  // --json output

#include <cmath>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace anvil::cli {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The documents of the file, tokenized: a .txt file is one document (with the tokenizer's special
// tokens); a .jsonl line is read as training data is (anvil/data/dataset.h), every token scored, no eos
// added, so the perplexity is that of the text as transformers tokenizes it.
std::vector<std::vector<int32_t>> read_documents(const std::string& path, const data::Tokenizer& tok, int64_t limit) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("--data: cannot open '" + path + "'");
  std::vector<std::vector<int32_t>> docs;
  if (ends_with(path, ".jsonl")) {
    data::ReadOptions o;
    o.loss_on = data::LossOn::kAll;
    o.add_eos = false;
    std::string line;
    for (int64_t n = 1; std::getline(in, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      docs.push_back(data::tokenize_example(line, tok, o, path + " line " + std::to_string(n)).ids);
      if (limit > 0 && int64_t(docs.size()) >= limit) break;
    }
  } else {
    std::stringstream ss;
    ss << in.rdbuf();
    docs.push_back(tok.encode(ss.str(), /*add_special_tokens=*/true));
  }
  if (docs.empty()) throw std::runtime_error("--data: '" + path + "' holds no documents");
  return docs;
}

}  // namespace

int cmd_eval(int argc, char** argv) {
  cxxopts::Options opts("anvil eval", "Perplexity of a model on a text (.txt) or JSONL (.jsonl) file");
  add_model_options(opts);
  opts.add_options()
      ("d,data", "a .txt file (one document) or .jsonl (text | prompt+completion | messages per line)",
       cxxopts::value<std::string>())
      ("max-length", "tokens per scoring window (0: the model's max_position_embeddings, at most 4096)",
       cxxopts::value<int64_t>()->default_value("0"))
      ("limit", "score only the first N documents of a .jsonl (0: all)", cxxopts::value<int64_t>()->default_value("0"))
      ("json", "print the result as one JSON object on stdout")
      ("h,help", "show the options");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  if (!args.count("data")) throw std::invalid_argument("--data: required (a .txt or .jsonl file)");
  int64_t max_length = args["max-length"].as<int64_t>();
  if (max_length < 0 || max_length == 1) throw std::invalid_argument("--max-length must be 0 or >= 2, got " + std::to_string(max_length));
  const int64_t limit = args["limit"].as<int64_t>();
  if (limit < 0) throw std::invalid_argument("--limit must be >= 0, got " + std::to_string(limit));

  LoadedModel m = load_model_and_tokenizer(args);
  if (max_length == 0) {
    const int64_t ctx = m.model->config().max_position_embeddings;
    max_length = ctx > 0 ? std::min<int64_t>(ctx, 4096) : 2048;
  }
  const std::string path = args["data"].as<std::string>();
  const auto docs = read_documents(path, *m.tokenizer, limit);

  at::NoGradGuard no_grad;
  model::PerplexityResult total;
  train::Progress progress("eval", int64_t(docs.size()), "docs");
  for (size_t i = 0; i < docs.size(); ++i) {
    const auto& ids = docs[i];
    if (ids.size() >= 2) {
      auto seq = at::tensor(std::vector<int64_t>(ids.begin(), ids.end()), at::kLong).to(m.model->device());
      const auto r = model::perplexity(*m.model, {seq}, max_length);
      total.nll_sum += r.nll_sum;
      total.tokens += r.tokens;
    }
    char ppl[32];
    std::snprintf(ppl, sizeof(ppl), "%.4f", total.tokens ? total.perplexity() : 0.0);
    progress.update(int64_t(i + 1), {{"ppl", ppl}}, total.tokens);
  }
  if (total.tokens == 0) throw std::runtime_error("--data: no document of '" + path + "' has 2 or more tokens to score");
  char ppl[32];
  std::snprintf(ppl, sizeof(ppl), "%.4f", total.perplexity());
  progress.finish({{"ppl", ppl}}, total.tokens);
  if (args.count("json")) {
    nlohmann::json out = {{"data", path},        {"documents", docs.size()},      {"tokens", total.tokens},
                          {"mean_nll", total.mean_nll()}, {"perplexity", total.perplexity()},
                          {"max_length", max_length}};
    std::cout << out.dump() << std::endl;
  } else {
    std::printf("perplexity %.4f (mean NLL %.6f nats over %lld tokens, %zu documents, windows of %lld)\n",
                total.perplexity(), total.mean_nll(), static_cast<long long>(total.tokens), docs.size(),
                static_cast<long long>(max_length));
  }
  return 0;
}

}  // namespace anvil::cli
