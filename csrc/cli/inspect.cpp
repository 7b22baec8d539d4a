// `anvil inspect <file|dir|hub id>`: what a checkpoint holds, read from the headers alone (no tensor
// data is touched, so inspecting a 70B checkpoint is instant): every tensor's name, dtype, shape, bytes
// and shard, the totals per dtype and overall, and the metadata. Names are sorted naturally
// (layers.2 before layers.10) so a model reads top to bottom. --json prints the same as one object.
// A GGUF file lists the same way: ggml types for dtypes, the PyTorch shape (ggml's dims reversed), and its
// metadata with long arrays (the tokenizer's vocabulary) summarised by type and length.
#include "cli/commands.h"

#include "anvil/io/gguf.h"
#include "anvil/io/safetensors.h"

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace anvil::cli {
namespace {

// "layers.10" after "layers.2": runs of digits compare as numbers.
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) && std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      const std::string na = a.substr(i, ie - i), nb = b.substr(j, je - j);
      const std::string ta = na.substr(std::min(na.find_first_not_of('0'), na.size()));
      const std::string tb = nb.substr(std::min(nb.find_first_not_of('0'), nb.size()));
      if (ta.size() != tb.size()) return ta.size() < tb.size();
      if (ta != tb) return ta < tb;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string human_bytes(uint64_t b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(b);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.2f %s", v, units[u]);
  return buf;
}

std::string base_name(const std::string& path) { return path.substr(path.find_last_of('/') + 1); }

uint64_t numel(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (auto d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

std::string count(uint64_t n, const char* noun) {
  return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}

struct Totals {
  uint64_t tensors = 0, elements = 0, bytes = 0;
};

// One row of the listing, whatever the format.
struct Row {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t bytes = 0;
  std::string file;  // the shard, for sharded checkpoints
};

// A GGUF metadata value as text: scalars as they are, arrays of up to 8 elements in full, longer ones as
// "[TYPE x n]" with their first 3 elements.
std::string gguf_value_text(const io::GgufValue& v) {
  const size_t n = v.size();
  auto element = [&](size_t i) -> std::string {
    if (v.is_string()) return v.strings[i];
    if (v.is_float()) {
      std::ostringstream o;
      o << v.floats[i];
      return o.str();
    }
    if (v.is_bool()) return v.ints[i] ? "true" : "false";
    return std::to_string(v.ints[i]);
  };
  if (!v.is_array()) return element(0);
  std::string s = "[";
  const size_t shown = n <= 8 ? n : 3;
  for (size_t i = 0; i < shown; ++i) s += (i ? ", " : "") + (v.is_string() ? "\"" + element(i) + "\"" : element(i));
  if (shown < n) s += ", ... (" + io::gguf_type_name(v.element_type) + " x " + std::to_string(n) + ")";
  return s + "]";
}

}  // namespace

int cmd_inspect(int argc, char** argv) {
  cxxopts::Options options("anvil inspect",
                           "List the tensors of a safetensors file, checkpoint directory, cached hub id or GGUF file");
  options.positional_help("<file|dir|hub id>");
  options.add_options()
      ("model", "a .safetensors file, a checkpoint directory, org/name[@revision] in the local HF cache, or a .gguf file",
       cxxopts::value<std::string>())
      ("filter", "only tensors whose name contains this text", cxxopts::value<std::string>()->default_value(""))
      ("json", "print one JSON object instead of the table")
      ("h,help", "show this help");
  options.parse_positional({"model"});
  const auto args = options.parse(argc, argv);
  if (args.count("help")) {
    std::cout << options.help() << "\n";
    return 0;
  }
  if (!args.count("model")) {
    std::cerr << "anvil inspect: missing the model argument\n\n" << options.help() << "\n";
    return 2;
  }
  const std::string model = args["model"].as<std::string>();
  const std::string path = io::is_gguf_file(model) ? model : io::resolve_model_path(model);
  const std::string filter = args["filter"].as<std::string>();

  // The rows and metadata of either format.
  std::vector<Row> rows;
  std::vector<std::pair<std::string, std::string>> metadata;
  nlohmann::ordered_json files = nlohmann::ordered_json::array();
  std::unique_ptr<io::Checkpoint> ckpt;
  size_t file_count = 1;
  if (io::is_gguf_file(path)) {
    io::GgufFile g(path);
    for (const auto& t : g.tensors())
      if (filter.empty() || t.name.find(filter) != std::string::npos)
        rows.push_back({t.name, io::ggml_type_name(t.type), t.shape(), t.nbytes, ""});
    metadata.emplace_back("gguf.version", std::to_string(g.version()));
    for (const auto& [k, v] : g.metadata()) metadata.emplace_back(k, gguf_value_text(v));
    files.push_back({{"name", base_name(path)}, {"format", "gguf"}, {"data_offset", g.data_offset()}});
  } else {
    ckpt = std::make_unique<io::Checkpoint>(path);
    file_count = ckpt->files().size();
    for (const auto& k : ckpt->keys()) {
      if (!filter.empty() && k.find(filter) == std::string::npos) continue;
      const auto& e = ckpt->entry(k);
      rows.push_back({k, e.dtype_name, e.shape, e.nbytes(), base_name(ckpt->file_of(k).path())});
    }
    for (const auto& [k, v] : ckpt->metadata()) metadata.emplace_back(k, v);
    for (const auto& f : ckpt->files())
      files.push_back({{"name", base_name(f->path())}, {"bytes", f->file_bytes()}, {"header_bytes", f->header_bytes()}});
  }
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) { return natural_less(a.name, b.name); });
  const bool sharded = file_count > 1;

  Totals all;
  std::map<std::string, Totals> by_dtype;
  for (const auto& r : rows) {
    for (Totals* t : {&all, &by_dtype[r.dtype]}) {
      t->tensors += 1;
      t->elements += numel(r.shape);
      t->bytes += r.bytes;
    }
  }

  if (args.count("json")) {
    nlohmann::ordered_json out;
    out["path"] = path;
    out["files"] = files;
    out["tensors"] = nlohmann::ordered_json::array();
    for (const auto& r : rows) {
      nlohmann::ordered_json t = {{"name", r.name}, {"dtype", r.dtype}, {"shape", r.shape}, {"bytes", r.bytes}};
      if (ckpt) {
        const auto& e = ckpt->entry(r.name);
        t["file"] = r.file;
        t["data_offsets"] = {e.begin, e.end};
      }
      out["tensors"].push_back(t);
    }
    out["total"] = {{"tensors", all.tensors}, {"elements", all.elements}, {"bytes", all.bytes}};
    out["by_dtype"] = nlohmann::ordered_json::object();
    for (const auto& [d, t] : by_dtype)
      out["by_dtype"][d] = {{"tensors", t.tensors}, {"elements", t.elements}, {"bytes", t.bytes}};
    out["metadata"] = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) out["metadata"][k] = v;
    std::cout << out.dump(2) << "\n";
    return 0;
  }

  size_t w_name = 4, w_dtype = 5, w_shape = 5;
  for (const auto& r : rows) {
    w_name = std::max(w_name, r.name.size());
    w_dtype = std::max(w_dtype, r.dtype.size());
    w_shape = std::max(w_shape, shape_text(r.shape).size());
  }
  std::cout << path << ": " << file_count << (sharded ? " files" : " file") << (ckpt ? "" : " (GGUF)") << "\n\n";
  std::printf("%-*s  %-*s  %-*s  %14s%s\n", static_cast<int>(w_name), "name", static_cast<int>(w_dtype), "dtype",
              static_cast<int>(w_shape), "shape", "bytes", sharded ? "  file" : "");
  for (const auto& r : rows) {
    std::printf("%-*s  %-*s  %-*s  %14llu%s%s\n", static_cast<int>(w_name), r.name.c_str(), static_cast<int>(w_dtype),
                r.dtype.c_str(), static_cast<int>(w_shape), shape_text(r.shape).c_str(),
                static_cast<unsigned long long>(r.bytes), sharded ? "  " : "", sharded ? r.file.c_str() : "");
  }
  std::printf("\ntotal: %s, %s, %s (%s)\n", count(all.tensors, "tensor").c_str(),
              count(all.elements, "element").c_str(), count(all.bytes, "byte").c_str(), human_bytes(all.bytes).c_str());
  for (const auto& [d, t] : by_dtype)
    std::printf("  %-*s %s, %s, %s (%s)\n", static_cast<int>(w_dtype) + 1, (d + ":").c_str(),
                count(t.tensors, "tensor").c_str(), count(t.elements, "element").c_str(),
                count(t.bytes, "byte").c_str(), human_bytes(t.bytes).c_str());
  std::cout << "\nmetadata:" << (metadata.empty() ? " (none)" : "") << "\n";
  for (const auto& [k, v] : metadata) std::cout << "  " << k << ": " << v << "\n";
  return 0;
}

}  // namespace anvil::cli
