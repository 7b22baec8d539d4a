// `anvil <subcommand> [options]`: one table of subcommands, each owned by the part of anvil that
// implements it. With no subcommand, anvil runs its self-check (every registered op on the CPU and,
// when present, the GPU), the embedded default job until the LoRA demo takes its place.
#include "anvil/selfcheck.h"
#include "cli/commands.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <cxxopts.hpp>
#include <torch/cuda.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
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

struct Subcommand {
  const char* name;
  const char* summary;
  std::function<int(int, char**)> run;
};

const std::vector<Subcommand>& subcommands() {
  static const std::vector<Subcommand> table = {
      {"selfcheck", "check every registered op on CPU and GPU (the default)", cmd_selfcheck},
      {"ops", "list the registered ops with their schemas", cmd_ops},
      {"version", "print the version", cmd_version},
      {"inspect", "list the tensors, totals and metadata of a safetensors file, checkpoint or cached hub id",
       anvil::cli::cmd_inspect},
      {"generate", "continue a prompt (or answer it as a chat) with a model and its tokenizer", anvil::cli::cmd_generate},
      {"eval", "perplexity of a model on a .txt or .jsonl file", anvil::cli::cmd_eval},
  };
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
