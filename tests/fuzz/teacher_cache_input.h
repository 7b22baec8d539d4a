// The input of fuzz_teacher_cache, shared with the test that writes its seeds (tests/cpp/train/test_teacher_cache.cpp
// TeacherCacheFuzzSeeds): one byte of flags, then the files of a cache directory separated by kFileSeparator:
// manifest.json first, then shard-00000.safetensors, shard-00001.safetensors, ... in that order (the names the
// writer gives them). The documents are fixed: those the seeds were written for, packed at kSeqLen, so that an
// input's keys can hit (the fuzzer cannot forge a 64-bit hash of a document).
#pragma once

#include "anvil/data/dataset.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace anvil::fuzz {

/// Between two files of an input (in tests/fuzz/teacher_cache.dict too).
inline const std::string kFileSeparator = "\n@@anvil-cache-file@@\n";
/// flags bit 0: before the cache is opened, the harness writes each shard's true size and checksum into the manifest
/// entry that names it, so that mutated shard bytes get past the checksum to the header, shapes and values.
inline constexpr uint8_t kFixChecksums = 1;
/// flags bit 1: the manifest's fingerprint is checked against fingerprint() (else it is not: a null fingerprint).
inline constexpr uint8_t kCheckFingerprint = 2;
inline constexpr int64_t kSeqLen = 8;

/// The fingerprint parts the seeds were written with (the writer adds k, temperature, dtype and shard size).
inline nlohmann::json fingerprint() {
  return {{"teacher", {{"config.json", "00000000000000aa"}}}, {"tokenizer", nlohmann::json::object()},
          {"data", {{"documents", "00000000000000bb"}}}};
}

/// Seven documents of ids below 64: one longer than kSeqLen (truncated), one repeated, one with a single token.
inline std::vector<data::Example> documents() {
  std::vector<data::Example> docs;
  for (int i = 0; i < 7; ++i) {
    data::Example e;
    const int n = i == 2 ? int(kSeqLen) + 3 : i == 4 ? 1 : 2 + (i * 3) % 6;
    for (int t = 0; t < n; ++t) e.ids.push_back(int32_t((i * 13 + t * 7) % 64)), e.target.push_back(t % 3 != 1);
    docs.push_back(e);
  }
  docs.push_back(docs[1]);
  return docs;
}

/// The files of an input (flags byte removed); the first is the manifest.
inline std::vector<std::string> split_files(const std::string& body) {
  std::vector<std::string> files;
  size_t at = 0;
  for (;;) {
    const size_t next = body.find(kFileSeparator, at);
    files.push_back(body.substr(at, next == std::string::npos ? std::string::npos : next - at));
    if (next == std::string::npos) return files;
    at = next + kFileSeparator.size();
  }
}

/// An input from flags and files (manifest first).
inline std::string join_files(uint8_t flags, const std::vector<std::string>& files) {
  std::string out(1, char(flags));
  for (size_t i = 0; i < files.size(); ++i) out += (i ? kFileSeparator : "") + files[i];
  return out;
}

}  // namespace anvil::fuzz
