// `anvil merge` (lora/merge_cli.h): base model + PEFT adapter -> one Hugging Face checkpoint.
//
// The steps are the library's: load_causal_lm, load_adapter (which checks every tensor against the
// base and names what does not fit), merge_adapter (PEFT's merge, in the weight's dtype as PEFT's
// merge_and_unload does), save_causal_lm. What this file adds is what a command needs around them:
// paths checked up front with the path in the message, the tokenizer files copied beside the weights
// so the output is a complete model folder, and an atomic result: everything is written into OUT.tmp,
// which is renamed to OUT only when complete, so an interrupted merge never leaves a half-written model
// where a later command would load it. An existing OUT is replaced only with --force (and never when
// it is the base or the adapter folder itself).
#include "lora/merge_cli.h"

#include "anvil/io/safetensors.h"
#include "anvil/model/transformer.h"
#include "io/io_internal.h"
#include "lora/lora.h"

#include <ATen/Context.h>
#include <cxxopts.hpp>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <ftw.h>
#include <iostream>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <unistd.h>

namespace anvil::lora {

namespace {

namespace detail = anvil::io::detail;  // POSIX paths: std::filesystem is unsafe beside libtorch

// The files of a model folder that are not weights or config.json and that a merged model needs to be
// used as the base was (tokenizers of both kinds, chat template, generation defaults).
constexpr const char* kTokenizerFiles[] = {
    "tokenizer.json",      "tokenizer.model",    "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",   "chat_template.jinja", "vocab.json",           "merges.txt",
    "generation_config.json",
};

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) ? std::string(buf) : path;
}

// rm -r through nftw (depth first, links not followed).
void remove_tree(const std::string& path) {
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); };
  if (path_exists(path) && ::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0)
    throw std::runtime_error("cannot remove " + path);
}

void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + from);
  std::ofstream out(to, std::ios::binary | std::ios::trunc);
  out << in.rdbuf();
  out.flush();
  if (!out) throw std::runtime_error("cannot write " + to);
}

// "1.23 s": elapsed wall time for the progress lines.
std::string seconds_since(std::chrono::steady_clock::time_point start) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f s", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return buf;
}

// The adapter folder must hold PEFT's two files; say which one is missing and where.
void check_adapter_dir(const std::string& dir) {
  if (!detail::is_directory(dir)) throw std::invalid_argument("--adapter " + dir + ": not a directory");
  for (const char* name : {"adapter_config.json", "adapter_model.safetensors"}) {
    const std::string file = detail::join_path(dir, name);
    if (!detail::is_regular_file(file))
      throw std::invalid_argument("--adapter " + dir + ": missing " + file + " (a PEFT adapter folder has " +
                                  "adapter_config.json and adapter_model.safetensors)");
  }
}

// OUT must be new (or --force), and never the base or the adapter, which the merge reads.
void check_out_path(const std::string& out, const std::string& base, const std::string& adapter, bool force) {
  if (out.empty()) throw std::invalid_argument("--out: required (the folder to write the merged model to)");
  const std::string resolved = real_path(out);
  for (const std::string& input : {base, adapter}) {
    if (resolved == real_path(input))
      throw std::invalid_argument("--out " + out + ": is the input folder " + input + "; write the merge elsewhere");
  }
  if (path_exists(out) && !force)
    throw std::invalid_argument("--out " + out + ": already exists (pass --force to replace it)");
  const std::string tmp = out + ".tmp";
  if (path_exists(tmp) && !force)
    throw std::invalid_argument("--out " + out + ": " + tmp + " exists, left by an interrupted merge? (remove it " +
                                "or pass --force)");
}

// Moves the finished OUT.tmp into place, replacing an old OUT (only reached with --force).
void publish(const std::string& tmp, const std::string& out) {
  std::string old;
  if (path_exists(out)) {
    old = out + ".old." + std::to_string(::getpid());
    if (::rename(out.c_str(), old.c_str()) != 0) throw std::runtime_error("cannot move the old " + out + " aside");
  }
  if (::rename(tmp.c_str(), out.c_str()) != 0) throw std::runtime_error("cannot rename " + tmp + " to " + out);
  if (!old.empty()) remove_tree(old);
}

}  // namespace

int cmd_merge(int argc, char** argv) {
  cxxopts::Options options("anvil merge", "Fold a PEFT LoRA/DoRA adapter into its base model and save a plain "
                                          "Hugging Face checkpoint");
  options.add_options()
      ("base", "the base model: a folder (config.json + safetensors) or a hub id in the local cache",
       cxxopts::value<std::string>())
      ("adapter", "the adapter folder (adapter_config.json + adapter_model.safetensors)", cxxopts::value<std::string>())
      ("out", "the folder to write (must not exist unless --force)", cxxopts::value<std::string>())
      ("dtype", "auto (the base checkpoint's), float32, bfloat16 or float16: the merge and the saved weights",
       cxxopts::value<std::string>()->default_value("auto"))
      ("device", "cpu or cuda[:N], where the merge runs", cxxopts::value<std::string>()->default_value("cpu"))
      ("force", "replace an existing --out (and a leftover OUT.tmp)")
      ("h,help", "show this help");
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  if (!args.count("base")) throw std::invalid_argument("--base: required (the model the adapter was trained on)");
  if (!args.count("adapter")) throw std::invalid_argument("--adapter: required (a PEFT adapter folder)");
  if (!args.count("out")) throw std::invalid_argument("--out: required (the folder to write the merged model to)");
  const std::string adapter = args["adapter"].as<std::string>();
  const std::string out = args["out"].as<std::string>();
  const bool force = args.count("force") > 0;

  c10::optional<at::ScalarType> dtype;
  const std::string dt = args["dtype"].as<std::string>();
  if (dt != "auto") {
    if (dt != "float32" && dt != "bfloat16" && dt != "float16")
      throw std::invalid_argument("--dtype must be auto, float32, bfloat16 or float16, got '" + dt + "'");
    dtype = model::dtype_from_name(dt);
  }
  const std::string device = args["device"].as<std::string>();
  if (device != "cpu" && device.rfind("cuda", 0) != 0)
    throw std::invalid_argument("--device must be cpu, cuda or cuda:N, got '" + device + "'");
  if (device != "cpu" && !at::hasCUDA())
    throw std::invalid_argument("--device " + device + ": no CUDA device is available (use --device cpu)");

  check_adapter_dir(adapter);
  const std::string base = io::resolve_model_path(args["base"].as<std::string>());
  check_out_path(out, base, adapter, force);

  const auto start = std::chrono::steady_clock::now();
  auto model = model::load_causal_lm(base, dtype, at::Device(device));
  std::cerr << "merge: loaded " << model->config().architecture << " from " << base << " ("
            << model::dtype_name(model->dtype()) << ", " << model->device().str() << ") in " << seconds_since(start) << "\n";

  const auto config = load_adapter(*model, adapter);
  const size_t modules = adapters_of(*model).size();
  std::cerr << "merge: attached " << (config.use_dora ? "DoRA" : "LoRA") << " adapter from " << adapter << " ("
            << modules << " modules, r=" << config.r << ", alpha=" << config.lora_alpha << ")\n";
  merge_adapter(*model);

  const std::string tmp = out + ".tmp";
  if (path_exists(tmp)) remove_tree(tmp);  // reached only with --force (check_out_path)
  try {
    model::save_causal_lm(*model, tmp);
    int copied = 0;
    for (const char* name : kTokenizerFiles) {
      const std::string from = detail::join_path(base, name);
      if (!detail::is_regular_file(from)) continue;
      copy_file(from, detail::join_path(tmp, name));
      ++copied;
    }
    if (copied == 0) std::cerr << "merge: warning: " << base << " has no tokenizer files; " << out << " has none\n";
    publish(tmp, out);
  } catch (...) {
    try {
      remove_tree(tmp);
    } catch (const std::exception&) {  // the original error matters more
    }
    throw;
  }
  std::cerr << "merge: wrote " << out << " in " << seconds_since(start) << "\n";
  std::cout << out << "\n";
  return 0;
}

}  // namespace anvil::lora
