// libFuzzer target for the offline teacher cache's reader (csrc/train/teacher_cache.cpp, the format: docs/FORMATS.md
// "Teacher cache"): a whole cache directory, manifest.json and its shards, through the public reading API
// (TeacherCache's constructor, then lookup of fixed documents). The input is split into the directory's files
// (tests/fuzz/teacher_cache_input.h: a flags byte, then manifest.json and shard-NNNNN.safetensors separated by a
// marker) and written to a scratch directory (the reader maps files). With flag kFixChecksums the harness first
// writes each shard's true size and checksum into the manifest, so that mutations of a shard's bytes reach its
// safetensors header, shapes, offsets and values instead of stopping at the checksum. teacher_cache.cpp (its
// reader, with the writer's and the losses' code the linker drops: GC_SECTIONS), the safetensors reader, io/fs and
// data/batches are compiled into this binary with ASan, UBSan and coverage.
// The reader must refuse with std::invalid_argument / std::runtime_error / c10::Error naming the file or key, or
// open; an open cache must keep its promises: k >= 1, vocab_size >= k, and each lookup that succeeds gives ids
// (T, k) distinct per row in [0, vocab_size) and log-probs (T, k) in [-inf, 0] (what kd_loss_sparse takes
// unchecked). Any other exception, a broken promise, a crash or a sanitizer report is a finding.
#include "anvil/train/teacher_cache.h"

#include "teacher_cache_input.h"

#include <c10/util/Exception.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using anvil::train::TeacherCache;

void write_file(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) std::abort();
  std::fclose(f);
}

std::string shard_name(size_t i) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "shard-%05zu.safetensors", i);
  return buf;
}

// The lookup's promises (teacher_cache.h); a broken one aborts (a finding).
void check_lookup(const TeacherCache& cache, const anvil::data::Batch& b) {
  std::pair<at::Tensor, at::Tensor> got;
  try {
    got = cache.lookup(b, at::kCPU);
  } catch (const std::invalid_argument&) {
    return;  // a document the cache does not hold
  }
  const auto& [ids, lps] = got;
  const int64_t k = cache.k();
  if (ids.dim() != 2 || ids.size(0) != b.targets || ids.size(1) != k || lps.sizes() != ids.sizes() ||
      ids.scalar_type() != at::kLong || lps.scalar_type() != at::kFloat)
    std::abort();
  if (ids.numel() == 0) return;
  if (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= cache.vocab_size()) std::abort();
  const auto sorted = std::get<0>(ids.sort(1));
  if (k > 1 && sorted.slice(1, 1).eq(sorted.slice(1, 0, k - 1)).any().item<bool>()) std::abort();
  if (lps.isnan().any().item<bool>() || lps.gt(0).any().item<bool>()) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = "/tmp/anvil-fuzz-teacher-cache-" + std::to_string(getpid());
  static const auto rows = anvil::data::pack_examples(anvil::fuzz::documents(), anvil::fuzz::kSeqLen, 0);
  static std::vector<std::string> written;  // the last input's files, removed before the next
  if (size == 0) return 0;
  for (const auto& f : written) ::unlink(f.c_str());
  written.clear();
  ::mkdir(dir.c_str(), 0755);
  const uint8_t flags = data[0];
  auto files = anvil::fuzz::split_files(std::string(reinterpret_cast<const char*>(data) + 1, size - 1));
  for (size_t i = 1; i < files.size(); ++i) {
    written.push_back(dir + "/" + shard_name(i - 1));
    write_file(written.back(), files[i]);
  }
  if (flags & anvil::fuzz::kFixChecksums) {
    // Each manifest entry naming a file of this input gets its true size and checksum (a manifest that is no JSON,
    // or whose entries are not objects with a string "file", is left as it is).
    auto m = nlohmann::json::parse(files[0], nullptr, /*allow_exceptions=*/false);
    if (m.is_object() && m.contains("shards") && m["shards"].is_array()) {
      for (auto& s : m["shards"]) {
        if (!s.is_object() || !s.contains("file") || !s["file"].is_string()) continue;
        const auto name = s["file"].get<std::string>();
        for (size_t i = 1; i < files.size(); ++i)
          if (name == shard_name(i - 1)) {
            s["bytes"] = files[i].size();
            s["checksum"] = anvil::train::hash_file(dir + "/" + name);
          }
      }
      files[0] = m.dump();
    }
  }
  written.push_back(dir + "/manifest.json");
  write_file(written.back(), files[0]);
  anvil::train::CacheOptions o;
  o.dir = dir;
  const nlohmann::json fingerprint = flags & anvil::fuzz::kCheckFingerprint ? anvil::fuzz::fingerprint() : nlohmann::json();
  if (flags & anvil::fuzz::kCheckFingerprint) {
    // The options the fingerprint check adds: the manifest's own where they have the right type, so that a check
    // against a cache's settings can pass.
    auto m = nlohmann::json::parse(files[0], nullptr, false);
    if (m.is_object() && m.contains("k") && m["k"].is_number_integer()) o.k = m["k"].get<int64_t>();
    if (m.is_object() && m.contains("temperature") && m["temperature"].is_number())
      o.temperature = m["temperature"].get<double>();
    if (m.is_object() && m.contains("logprob_dtype") && m["logprob_dtype"].is_string()) {
      const auto d = m["logprob_dtype"].get<std::string>();
      o.dtype = d == "F32" ? at::kFloat : d == "BF16" ? at::kBFloat16 : at::kHalf;
    }
  }
  try {
    TeacherCache cache(o, fingerprint);
    if (cache.k() < 1 || cache.vocab_size() < cache.k()) std::abort();
    check_lookup(cache, anvil::data::slice_rows(rows, 0, rows.rows));
    for (int64_t r = 0; r < rows.rows; ++r) check_lookup(cache, anvil::data::slice_rows(rows, r, r + 1));
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error&) {
  } catch (const c10::Error&) {
    // clean refusals
  }
  return 0;
}
