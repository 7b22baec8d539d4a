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

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/lora/lora.h"
#include "anvil/model/transformer.h"

#include <ATen/Context.h>
#include <cxxopts.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <unistd.h>

namespace anvil::lora {

namespace {

// "1.23 s": elapsed wall time for the progress lines.
std::string seconds_since(std::chrono::steady_clock::time_point start) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f s", std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  return buf;
}

// The adapter folder must hold PEFT's two files; say which one is missing and where.
void check_adapter_dir(const std::string& dir) {
  if (!io::is_directory(dir)) throw std::invalid_argument("--adapter " + dir + ": not a directory");
  for (const char* name : {"adapter_config.json", "adapter_model.safetensors"}) {
    const std::string file = io::join_path(dir, name);
    if (!io::is_regular_file(file))
      throw std::invalid_argument("--adapter " + dir + ": missing " + file + " (a PEFT adapter folder has " +
                                  "adapter_config.json and adapter_model.safetensors)");
  }
}

// OUT must be new (or --force), and never the base or the adapter, which the merge reads.
void check_out_path(const std::string& out, const std::string& base, const std::string& adapter, bool force) {
  if (out.empty()) throw std::invalid_argument("--out: required (the folder to write the merged model to)");
  const std::string resolved = io::real_path(out);
  for (const std::string& input : {base, adapter}) {
    if (resolved == io::real_path(input))
      throw std::invalid_argument("--out " + out + ": is the input folder " + input + "; write the merge elsewhere");
  }
  if (io::path_exists(out) && !force)
    throw std::invalid_argument("--out " + out + ": already exists (pass --force to replace it)");
  const std::string tmp = out + ".tmp";
  if (io::path_exists(tmp) && !force)
    throw std::invalid_argument("--out " + out + ": " + tmp + " exists, left by an interrupted merge? (remove it " +
                                "or pass --force)");
}

// Moves the finished OUT.tmp into place, replacing an old OUT (only reached with --force).
void publish(const std::string& tmp, const std::string& out) {
  std::string old;
  if (io::path_exists(out)) {
    old = out + ".old." + std::to_string(::getpid());
    io::rename_path(out, old);
  }
  io::rename_path(tmp, out);
  if (!old.empty()) io::remove_tree(old);
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

  const auto dtype = model::parse_dtype(args["dtype"].as<std::string>(), "--dtype", /*allow_auto=*/true);
  const at::Device device = model::parse_device(args["device"].as<std::string>(), "--device");

  check_adapter_dir(adapter);
  const std::string base = io::resolve_model_path(args["base"].as<std::string>());
  check_out_path(out, base, adapter, force);

  const auto start = std::chrono::steady_clock::now();
  // Dense: merging adds B A to the weights, so a quantized checkpoint (FP8, compressed-tensors) is dequantized.
  auto model = model::load_causal_lm(base, dtype, device, "dense");
  std::cerr << "merge: loaded " << model->config().architecture << " from " << base << " ("
            << model::dtype_name(model->dtype()) << ", " << model->device().str() << ") in " << seconds_since(start) << "\n";

  const auto config = load_adapter(*model, adapter);
  const size_t modules = adapters_of(*model).size();
  std::cerr << "merge: attached " << (config.use_dora ? "DoRA" : "LoRA") << " adapter from " << adapter << " ("
            << modules << " modules, r=" << config.r << ", alpha=" << config.lora_alpha << ")\n";
  merge_adapter(*model);

  const std::string tmp = out + ".tmp";
  if (io::path_exists(tmp)) io::remove_tree(tmp);  // reached only with --force (check_out_path)
  try {
    model::save_causal_lm(*model, tmp);
    if (io::copy_model_side_files(base, tmp) == 0)
      std::cerr << "merge: warning: " << base << " has no tokenizer files; " << out << " has none\n";
    publish(tmp, out);
  } catch (...) {
    try {
      io::remove_tree(tmp);
    } catch (const std::exception&) {  // the original error matters more
    }
    throw;
  }
  std::cerr << "merge: wrote " << out << " in " << seconds_since(start) << "\n";
  std::cout << out << "\n";
  return 0;
}

}  // namespace anvil::lora
