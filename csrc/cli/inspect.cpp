// `anvil inspect <file|dir|hub id>`: what a checkpoint holds, read from the headers alone (no tensor
// data is touched, so inspecting a 70B checkpoint is instant): every tensor's name, dtype, shape, bytes
// and shard, the totals per dtype and overall, and the metadata. Names are sorted naturally
// (layers.2 before layers.10) so a model reads top to bottom. --json prints the same as one object.
#include "cli/commands.h"

#include "anvil/io/safetensors.h"

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <iostream>
#include <map>
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

}  // namespace

int cmd_inspect(int argc, char** argv) {
  cxxopts::Options options("anvil inspect", "List the tensors of a safetensors file, checkpoint directory or cached hub id");
  options.positional_help("<file|dir|hub id>");
  options.add_options()
      ("model", "a .safetensors file, a checkpoint directory, or org/name[@revision] in the local HF cache",
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
  const std::string path = io::resolve_model_path(args["model"].as<std::string>());
  const std::string filter = args["filter"].as<std::string>();
  io::Checkpoint ckpt(path);

  std::vector<std::string> names;
  for (const auto& k : ckpt.keys())
    if (filter.empty() || k.find(filter) != std::string::npos) names.push_back(k);
  std::sort(names.begin(), names.end(), natural_less);
  const bool sharded = ckpt.files().size() > 1;

  Totals all;
  std::map<std::string, Totals> by_dtype;
  for (const auto& n : names) {
    const auto& e = ckpt.entry(n);
    for (Totals* t : {&all, &by_dtype[e.dtype_name]}) {
      t->tensors += 1;
      t->elements += numel(e.shape);
      t->bytes += e.nbytes();
    }
  }

  if (args.count("json")) {
    nlohmann::ordered_json out;
    out["path"] = path;
    out["files"] = nlohmann::ordered_json::array();
    for (const auto& f : ckpt.files())
      out["files"].push_back({{"name", base_name(f->path())}, {"bytes", f->file_bytes()}, {"header_bytes", f->header_bytes()}});
    out["tensors"] = nlohmann::ordered_json::array();
    for (const auto& n : names) {
      const auto& e = ckpt.entry(n);
      nlohmann::ordered_json t = {{"name", n}, {"dtype", e.dtype_name}, {"shape", e.shape}, {"bytes", e.nbytes()},
                                  {"file", base_name(ckpt.file_of(n).path())}, {"data_offsets", {e.begin, e.end}}};
      out["tensors"].push_back(t);
    }
    out["total"] = {{"tensors", all.tensors}, {"elements", all.elements}, {"bytes", all.bytes}};
    out["by_dtype"] = nlohmann::ordered_json::object();
    for (const auto& [d, t] : by_dtype)
      out["by_dtype"][d] = {{"tensors", t.tensors}, {"elements", t.elements}, {"bytes", t.bytes}};
    out["metadata"] = ckpt.metadata();
    std::cout << out.dump(2) << "\n";
    return 0;
  }

  size_t w_name = 4, w_dtype = 5, w_shape = 5;
  for (const auto& n : names) {
    const auto& e = ckpt.entry(n);
    w_name = std::max(w_name, n.size());
    w_dtype = std::max(w_dtype, e.dtype_name.size());
    w_shape = std::max(w_shape, shape_text(e.shape).size());
  }
  std::cout << path << ": " << ckpt.files().size() << (sharded ? " files" : " file") << "\n\n";
  std::printf("%-*s  %-*s  %-*s  %14s%s\n", static_cast<int>(w_name), "name", static_cast<int>(w_dtype), "dtype",
              static_cast<int>(w_shape), "shape", "bytes", sharded ? "  file" : "");
  for (const auto& n : names) {
    const auto& e = ckpt.entry(n);
    std::printf("%-*s  %-*s  %-*s  %14llu%s%s\n", static_cast<int>(w_name), n.c_str(), static_cast<int>(w_dtype),
                e.dtype_name.c_str(), static_cast<int>(w_shape), shape_text(e.shape).c_str(),
                static_cast<unsigned long long>(e.nbytes()), sharded ? "  " : "",
                sharded ? base_name(ckpt.file_of(n).path()).c_str() : "");
  }
  std::printf("\ntotal: %s, %s, %s (%s)\n", count(all.tensors, "tensor").c_str(),
              count(all.elements, "element").c_str(), count(all.bytes, "byte").c_str(), human_bytes(all.bytes).c_str());
  for (const auto& [d, t] : by_dtype)
    std::printf("  %-*s %s, %s, %s (%s)\n", static_cast<int>(w_dtype) + 1, (d + ":").c_str(),
                count(t.tensors, "tensor").c_str(), count(t.elements, "element").c_str(),
                count(t.bytes, "byte").c_str(), human_bytes(t.bytes).c_str());
  std::cout << "\nmetadata:" << (ckpt.metadata().empty() ? " (none)" : "") << "\n";
  for (const auto& [k, v] : ckpt.metadata()) std::cout << "  " << k << ": " << v << "\n";
  return 0;
}

}  // namespace anvil::cli
