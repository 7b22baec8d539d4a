// `anvil export-gguf --model DIR --out FILE [--type T] [--name N] [--overwrite] [--json]`: a Hugging Face
// Llama/Mistral folder as one GGUF file (anvil/model/gguf_export.h) with its tokenizer (anvil/data/gguf_vocab.h),
// and the export's report. A thin front: the rules, names and types live in the core (docs/FORMATS.md
// "GGUF export"); errors propagate to main.cpp, which prints them without a backtrace.
#include "cli/commands.h"

#include "anvil/data/gguf_vocab.h"
#include "anvil/model/gguf_export.h"

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <iostream>
#include <stdexcept>

namespace anvil::cli {

int cmd_export_gguf(int argc, char** argv) {
  cxxopts::Options opts("anvil export-gguf", "Export a Hugging Face Llama/Mistral folder as one GGUF file (llama.cpp)");
  opts.add_options()
      ("model", "the model folder (config.json, safetensors, tokenizer files)", cxxopts::value<std::string>())
      ("out", "the .gguf file to write", cxxopts::value<std::string>())
      ("type", "f32, f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m or q6_k", cxxopts::value<std::string>()->default_value("q8_0"))
      ("name", "general.name (default: the folder's name)", cxxopts::value<std::string>()->default_value(""))
      ("overwrite", "replace an existing --out file")
      ("json", "print the report as one JSON object on stdout")
      ("h,help", "show the options");
  auto args = opts.parse(argc, argv);
  if (args.count("help")) {
    std::cout << opts.help() << "\n";
    return 0;
  }
  if (!args.count("model")) throw std::invalid_argument("--model: required (a Hugging Face model folder)");
  if (!args.count("out")) throw std::invalid_argument("--out: required (the .gguf file to write)");
  const std::string dir = args["model"].as<std::string>();
  anvil::model::GgufExportOptions o;
  o.type = args["type"].as<std::string>();
  o.name = args["name"].as<std::string>();
  o.overwrite = args.count("overwrite") > 0;
  o.tokenizer_metadata = [&](int64_t vocab) { return anvil::data::gguf_tokenizer_metadata(dir, vocab); };
  const auto r = anvil::model::export_gguf(dir, args["out"].as<std::string>(), o);
  nlohmann::json per_type = nlohmann::json::object();
  for (const auto& [t, n] : r.tensors_per_type) per_type[t] = n;
  if (args.count("json")) {
    std::cout << nlohmann::json{{"path", r.path}, {"type", r.type}, {"file_type", r.file_type},
                                {"tensors", r.tensors}, {"tensors_per_type", per_type}, {"parameters", r.parameters},
                                {"bytes", r.bytes}, {"source_bytes", r.source_bytes}, {"seconds", r.seconds}}
                     .dump()
              << "\n";
  } else {
    std::printf("wrote %s: %s (file_type %lld), %lld tensors %s, %lld parameters, %llu bytes (from %llu), %.2f s\n",
                r.path.c_str(), r.type.c_str(), static_cast<long long>(r.file_type), static_cast<long long>(r.tensors),
                per_type.dump().c_str(), static_cast<long long>(r.parameters), static_cast<unsigned long long>(r.bytes),
                static_cast<unsigned long long>(r.source_bytes), r.seconds);
  }
  return 0;
}

}  // namespace anvil::cli
