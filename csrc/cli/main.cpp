// `anvil <subcommand> [options]`: one table of subcommands, each owned by the part of anvil that
// implements it. With no subcommand, anvil runs its self-check (every registered op on the CPU and,
// when present, the GPU), the embedded default job until the LoRA demo takes its place.
#include "anvil/data/tokenizer.h"
#include "anvil/selfcheck.h"
#include "cli/commands.h"
#include "cli/recipe_command.h"
#include "lora/merge_cli.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <cxxopts.hpp>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {


constexpr const char* kVersion = "0.1.0";

int cmd_selfcheck(int argc, char** argv) {
  cxxopts::Options options("anvil selfcheck", "Run every registered op on random data and compare with its reference");
  options.add_options()
      ("cpu-only", "skip the GPU even when one is present")
      ("h,help", "show this help");
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  const bool cuda = !args.count("cpu-only");
  std::cout << "anvil " << kVersion << " self-check (torch " << TORCH_VERSION << ", CUDA device: "
            << (torch::cuda::is_available() ? "yes" : "no") << ")\n\n";
  const auto rows = anvil::run_selfcheck(cuda);
  std::cout << anvil::format_selfcheck(rows);
  return anvil::selfcheck_passed(rows) ? 0 : 1;
}

int cmd_ops(int, char**) {
  std::vector<std::string> lines;
  for (const auto& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("anvil::", 0) != 0) continue;
    const auto op = c10::Dispatcher::singleton().findOp(name);
    lines.push_back(op && op->hasSchema() ? c10::toString(op->schema()) : name.name);
  }
  std::sort(lines.begin(), lines.end());
  for (const auto& l : lines) std::cout << l << "\n";
  return 0;
}

int cmd_version(int, char**) {
  std::cout << "anvil " << kVersion << " (torch " << TORCH_VERSION << ")\n";
  return 0;
}

// `anvil tokenize`: a model folder's tokenizer on text (ids out) or on ids (text out); docs/CLI.md.
int cmd_tokenize(int argc, char** argv) {
  cxxopts::Options options("anvil tokenize", "Encode text to ids (or decode ids) with a model folder's tokenizer");
  options.add_options()
      ("model", "model folder with tokenizer.json or tokenizer.model (+ tokenizer_config.json)",
       cxxopts::value<std::string>())
      ("text", "the text to encode (default: standard input)", cxxopts::value<std::string>())
      ("file", "encode this file's contents instead", cxxopts::value<std::string>())
      ("no-special-tokens", "do not add bos/eos")
      ("tokens", "print one 'id<TAB>token' line per id instead of one line of ids")
      ("decode", "decode these ids (separated by spaces or commas) instead of encoding", cxxopts::value<std::string>())
      ("skip-special-tokens", "with --decode: drop special tokens")
      ("h,help", "show this help");
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  if (!args.count("model")) throw cxxopts::exceptions::exception("anvil tokenize: --model is required");
  const auto tok = anvil::data::load_tokenizer(args["model"].as<std::string>());
  if (args.count("decode")) {
    std::string list = args["decode"].as<std::string>();
    std::replace(list.begin(), list.end(), ',', ' ');
    std::istringstream in(list);
    std::vector<int32_t> ids;
    for (std::string word; in >> word;) {
      try {
        ids.push_back(static_cast<int32_t>(std::stol(word)));
      } catch (const std::exception&) {
        throw cxxopts::exceptions::exception("anvil tokenize: --decode: '" + word + "' is not an integer id");
      }
    }
    std::cout << tok->decode(ids, args.count("skip-special-tokens") > 0) << "\n";
    return 0;
  }
  std::string text;
  if (args.count("text")) {
    text = args["text"].as<std::string>();
  } else if (args.count("file")) {
    std::ifstream in(args["file"].as<std::string>(), std::ios::binary);
    if (!in) throw std::runtime_error("anvil tokenize: --file: cannot open " + args["file"].as<std::string>());
    text.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  } else {
    text.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
  }
  const auto ids = tok->encode(text, args.count("no-special-tokens") == 0);
  if (args.count("tokens")) {
    for (const int32_t id : ids) std::cout << id << "\t" << tok->id_to_token(id) << "\n";
  } else {
    for (size_t i = 0; i < ids.size(); ++i) std::cout << (i ? " " : "") << ids[i];
    std::cout << "\n";
  }
  return 0;
}

struct Subcommand {
  const char* name;
  const char* summary;
  std::function<int(int, char**)> run;
};

const std::vector<Subcommand>& subcommands() {
  static const std::vector<Subcommand> table = [] {
    std::vector<Subcommand> t = {
      {"selfcheck", "check every registered op on CPU and GPU (the default)", cmd_selfcheck},
      {"ops", "list the registered ops with their schemas", cmd_ops},
      {"version", "print the version", cmd_version},
      {"inspect", "list the tensors, totals and metadata of a safetensors file, checkpoint or cached hub id",
       anvil::cli::cmd_inspect},
      {"tokenize", "encode text to ids (or decode ids) with a model's tokenizer", cmd_tokenize},
      {"generate", "continue a prompt (or answer it as a chat) with a model and its tokenizer", anvil::cli::cmd_generate},
      {"eval", "perplexity of a model on a .txt or .jsonl file", anvil::cli::cmd_eval},
      {"export-gguf", "write a Llama/Mistral folder as one GGUF file (f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k)",
       anvil::cli::cmd_export_gguf},
      {"merge", "fold a LoRA adapter into its base model and save the merged checkpoint", anvil::lora::cmd_merge},
    };
    for (const auto& r : anvil::recipes::all())  // recipes/registry.h: each recipe is a subcommand
      t.push_back({r.name.c_str(), r.summary.c_str(),
                   [&r](int argc, char** argv) { return anvil::cli::run_recipe_command(argc, argv, r); }});
    return t;
  }();
  return table;
}

void print_usage() {
  std::cout << "usage: anvil [<subcommand>] [options]   (anvil <subcommand> --help for its options)\n\n";
  for (const auto& s : subcommands()) std::printf("  %-10s %s\n", s.name, s.summary);
  std::cout << "\nWith no subcommand: selfcheck. Every option is documented in docs/CLI.md.\n";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || argv[1][0] == '-') {
      if (argc >= 2 && (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help")) {
        print_usage();
        return 0;
      }
      return cmd_selfcheck(argc, argv);
    }
    const std::string name = argv[1];
    for (const auto& s : subcommands())
      if (name == s.name) return s.run(argc - 1, argv + 1);
    std::cerr << "anvil: unknown subcommand '" << name << "'\n\n";
    print_usage();
    return 2;
  } catch (const cxxopts::exceptions::exception& e) {
    std::cerr << "anvil: " << e.what() << "\n";
    return 2;
  } catch (const c10::Error& e) {  // the message without the C++ backtrace, which users cannot act on
    std::cerr << "anvil: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "anvil: error: " << e.what() << "\n";
    return 1;
  }
}
