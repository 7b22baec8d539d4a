// The offline teacher cache (include/anvil/train/teacher_cache.h; the format: docs/FORMATS.md, "Teacher cache").
//
// Writing: the documents are packed once in their order (data::pack_examples, the packing training uses), the
// packed rows cut into shards of rows_per_shard rows; per shard the teacher runs over its rows in batches, the
// target rows' logits in chunks become log_softmax(z / T) in fp32, whose top k (sorted, largest first) are
// kept for the documents seen there first; the shard goes to disk atomically, then the manifest records it.
// Reading: the manifest is checked (fingerprint, completeness), each shard verified and mapped, and a map
// from document key to (shard, first row, count) answers a batch's lookups with one memcpy per document.
#include "anvil/train/teacher_cache.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/train/loss.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace anvil::train {

using nlohmann::json;

namespace {

constexpr const char* kFormat = "anvil-teacher-cache";
constexpr int kVersion = 1;
constexpr uint64_t kSampleBytes = 1 << 20, kWholeFileBytes = 64 << 20, kWeightSamples = 16;
constexpr uint64_t kFnvOffset = 14695981039346656037ULL, kFnvPrime = 1099511628211ULL;

uint64_t fnv(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * kFnvPrime;
  return h;
}

std::string hex(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

// Reads `n` bytes at `offset` of an open file (short only at its end).
uint64_t read_at(int fd, void* buf, uint64_t n, uint64_t offset) {
  uint64_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, static_cast<char*>(buf) + got, n - got, off_t(offset + got));
    if (r <= 0) break;
    got += uint64_t(r);
  }
  return got;
}

struct Fd {
  int fd;
  explicit Fd(const std::string& path) : fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    TORCH_CHECK(fd >= 0, "cannot read '", path, "': ", std::strerror(errno));
  }
  ~Fd() { ::close(fd); }
};

uint64_t file_size(const std::string& path) {
  Fd f(path);
  const off_t end = ::lseek(f.fd, 0, SEEK_END);
  TORCH_CHECK(end >= 0, "cannot read '", path, "': ", std::strerror(errno));
  return uint64_t(end);
}

std::string dtype_storage_name(at::ScalarType t) { return io::safetensors_dtype_name(t); }

std::string shard_name(int64_t i) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "shard-%05lld.safetensors", static_cast<long long>(i));
  return buf;
}

// Every field where `have` (the cache's) and `want` (now) differ, as "key: a in the cache, b now".
void differences(const json& have, const json& want, const std::string& prefix, std::vector<std::string>& out) {
  if (have.is_object() && want.is_object()) {
    for (auto it = want.begin(); it != want.end(); ++it) {
      const std::string key = prefix + "." + it.key();
      if (!have.contains(it.key())) out.push_back(key + ": absent in the cache, " + it.value().dump() + " now");
      else differences(have[it.key()], it.value(), key, out);
    }
    for (auto it = have.begin(); it != have.end(); ++it)
      if (!want.contains(it.key())) out.push_back(prefix + "." + it.key() + ": " + it.value().dump() + " in the cache, absent now");
    return;
  }
  if (have != want) out.push_back(prefix + ": " + have.dump() + " in the cache, " + want.dump() + " now");
}

// The full fingerprint: the caller's parts plus what the cache options add.
json full_fingerprint(const json& parts, const CacheOptions& o, int64_t rows_per_shard) {
  json f = parts;
  f["k"] = o.k;
  f["temperature"] = o.temperature;
  f["logprob_dtype"] = dtype_storage_name(o.dtype);
  f["rows_per_shard"] = rows_per_shard;
  return f;
}

// Which config key to blame for a difference in a fingerprint part.
std::string blame(const std::string& part) {
  if (part == "teacher") return "teacher (teacher.path, teacher.dtype, teacher.base_weights)";
  if (part == "tokenizer") return "tokenizer (the teacher folder's tokenizer files)";
  if (part == "data") return "data (data.train, data.validation, data.seq_len, data.loss_on, data.add_eos, "
                             "data.validation_fraction)";
  if (part == "k") return "k (teacher.cache_k)";
  if (part == "temperature") return "temperature (distill.temperature)";
  if (part == "logprob_dtype") return "storage dtype (teacher.cache_dtype)";
  if (part == "rows_per_shard") return "shard size (teacher.cache_shard_tokens)";
  return part;
}

void check_fingerprint(const std::string& dir, const json& have, const json& want) {
  for (auto it = want.begin(); it != want.end(); ++it) {
    const std::string part = it.key();
    std::vector<std::string> diff;
    differences(have.contains(part) ? have[part] : json(), it.value(), part, diff);
    std::string d;
    for (const auto& x : diff) d += (d.empty() ? "" : "; ") + x;
    if (!d.empty())
      throw std::invalid_argument("config key teacher.cache: the cache in " + dir + " was written for another " +
                                  blame(part) + ": " + d + "; delete the directory to rewrite it, or point "
                                  "teacher.cache at another one");
  }
}

json read_manifest(const std::string& dir) {
  const auto path = io::join_path(dir, "manifest.json");
  json m;
  try {
    m = json::parse(io::read_text_file(path));
  } catch (const json::exception& e) {
    throw std::invalid_argument("teacher cache " + path + ": not valid JSON (" + e.what() + ")");
  }
  if (!m.is_object() || !m.contains("format") || m["format"] != kFormat || !m.contains("shards") || !m["shards"].is_array() ||
      !m.contains("fingerprint"))
    throw std::invalid_argument("teacher cache " + path + ": not an anvil teacher cache manifest (format \"" +
                                std::string(kFormat) + "\" with fingerprint and shards)");
  if (!m.contains("version") || m["version"] != kVersion)
    throw std::invalid_argument("teacher cache " + path + ": version " + m.value("version", json()).dump() +
                                ", this anvil reads " + std::to_string(kVersion));
  // The fields the reader and a resuming writer use, each of its JSON type (a wrong one is an error naming it, not
  // a JSON exception from deep inside): settings, then per shard its entry.
  const auto integer = [&](const json& o, const std::string& key, const std::string& where, int64_t min) {
    if (!o.contains(key) || !o[key].is_number_integer() || o[key].get<int64_t>() < min)
      throw std::invalid_argument("teacher cache " + path + ": " + where + key + " must be an integer >= " +
                                  std::to_string(min) + ", got " + o.value(key, json()).dump());
  };
  integer(m, "k", "", 1);
  integer(m, "vocab_size", "", m["k"].get<int64_t>());
  integer(m, "rows_per_shard", "", 1);
  if (!m.contains("temperature") || !m["temperature"].is_number() || !(m["temperature"].get<double>() > 0) ||
      !std::isfinite(m["temperature"].get<double>()))
    throw std::invalid_argument("teacher cache " + path + ": temperature must be a number > 0, got " +
                                m.value("temperature", json()).dump());
  for (size_t i = 0; i < m["shards"].size(); ++i) {
    const json& s = m["shards"][i];
    const std::string where = "shards[" + std::to_string(i) + "].";
    if (!s.is_object()) throw std::invalid_argument("teacher cache " + path + ": shards[" + std::to_string(i) + "] must be an object");
    // A plain file name inside the cache directory (what the writer writes): a manifest never makes the reader
    // open a file elsewhere.
    const auto file = s.value("file", json());
    if (!file.is_string() || file.get<std::string>().empty() || file.get<std::string>()[0] == '.' ||
        file.get<std::string>().find_first_of(std::string("/\\\0", 3)) != std::string::npos)
      throw std::invalid_argument("teacher cache " + path + ": " + where + "file must be a file name in the cache "
                                  "directory (no '/', not hidden), got " + file.dump());
    if (!s.contains("complete") || !s["complete"].is_boolean())
      throw std::invalid_argument("teacher cache " + path + ": " + where + "complete must be true or false");
    const auto rows = s.value("packed_rows", json());
    if (!rows.is_array() || rows.size() != 2 || !rows[0].is_number_integer() || !rows[1].is_number_integer() ||
        rows[0].get<int64_t>() < 0 || rows[1].get<int64_t>() < rows[0].get<int64_t>())
      throw std::invalid_argument("teacher cache " + path + ": " + where + "packed_rows must be [first, end) with "
                                  "0 <= first <= end, got " + rows.dump());
    integer(s, "bytes", where, 0);
    if (!s.contains("checksum") || !s["checksum"].is_string())
      throw std::invalid_argument("teacher cache " + path + ": " + where + "checksum must be a string");
  }
  return m;
}

// Size and checksum of a shard against its manifest entry; the error names the file and the rule.
void verify_shard_bytes(const std::string& path, const json& entry) {
  if (!io::is_regular_file(path))
    throw std::invalid_argument("teacher cache shard " + path + " is missing (the manifest lists it complete); "
                                "delete the cache directory to rewrite it");
  const uint64_t size = file_size(path), want = entry.at("bytes").get<uint64_t>();
  if (size != want)
    throw std::invalid_argument("teacher cache shard " + path + " is " + std::to_string(size) + " bytes, the manifest "
                                "says " + std::to_string(want) + " (truncated or overwritten); delete it and rerun to "
                                "rewrite it");
  const auto sum = hash_file(path);
  if (sum != entry.at("checksum").get<std::string>())
    throw std::invalid_argument("teacher cache shard " + path + ": checksum mismatch (fnv1a64 " + sum +
                                ", the manifest says " + entry.at("checksum").get<std::string>() +
                                "): the file is corrupted; delete it and rerun to rewrite it");
}

// What the losses take from a shard without checking it (kd_loss_sparse's sparse teacher): every row's ids
// (T, k) in [0, vocab) and distinct (an id outside would index past the student's logits: on a GPU a device assert,
// not an error; a repeated one miscounts the student's tail mass), its log-probs (T, k) in [-inf, 0] (no NaN, no
// probability above 1). One pass over the ids with a sorted copy of each row (k log k per row: about a second for
// a shard of 2^20 positions at k = 64, beside the checksum's pass over the file); the log-probs in blocks of rows.
void check_shard_values(const std::string& path, const at::Tensor& ids_t, const at::Tensor& logprobs, int64_t vocab) {
  const auto ids = ids_t.contiguous();  // (T, k) int32
  const int64_t rows = ids.size(0), k = ids.size(1);
  const int32_t* p = ids.data_ptr<int32_t>();
  std::vector<int32_t> row;
  row.resize(static_cast<size_t>(k));
  for (int64_t r = 0; r < rows; ++r, p += k) {
    std::copy(p, p + k, row.begin());
    std::sort(row.begin(), row.end());
    if (k > 0 && (row.front() < 0 || row.back() >= vocab))
      throw std::invalid_argument("teacher cache shard " + path + ": ids must lie in [0, vocab_size " +
                                  std::to_string(vocab) + "), row " + std::to_string(r) + " holds " +
                                  std::to_string(row.front() < 0 ? row.front() : row.back()));
    if (std::adjacent_find(row.begin(), row.end()) != row.end())
      throw std::invalid_argument("teacher cache shard " + path + ": row " + std::to_string(r) + " of ids holds one id "
                                  "twice (the k ids of a position must be distinct)");
  }
  constexpr int64_t kRows = 1 << 16;
  for (int64_t r = 0; r < rows; r += kRows) {
    const auto lp = logprobs.slice(0, r, std::min(rows, r + kRows)).to(at::kFloat);  // (rows, k)
    if (lp.isnan().any().item<bool>() || lp.gt(0).any().item<bool>())
      throw std::invalid_argument("teacher cache shard " + path + ": logprobs must be log-probabilities (<= 0, "
                                  "no NaN)");
  }
}

// The teacher's top-k of log_softmax(z / T) at a batch's target rows (target_rows order), appended as CPU
// pieces: ids (rows, k) int32 and log-probs (rows, k) in the storage dtype. `head` (V, H) is on `device`.
void score_batch(const Teacher& teacher, const at::Tensor& head, const data::Batch& b, const CacheOptions& o,
                 at::Device device, std::vector<at::Tensor>& ids_parts, std::vector<at::Tensor>& lp_parts) {
  const auto all = batch_to_device(b, teacher.model->device());  // (4, B, S)
  auto h = batch_hidden(*teacher.model, all, b.packed);
  h = h.reshape({-1, h.size(-1)}).index_select(0, target_rows(all[3]).to(h.device())).to(device);  // (T, H)
  for (int64_t c = 0; c < h.size(0); c += o.chunk) {
    const auto z = at::linear(h.slice(0, c, std::min(h.size(0), c + o.chunk)), head);  // (rows, V)
    const auto lp = at::log_softmax(z.to(at::kFloat).div_(o.temperature), 1);
    auto [values, indices] = at::topk(lp, o.k, 1, /*largest=*/true, /*sorted=*/true);  // (rows, k)
    ids_parts.push_back(indices.to(at::kInt).cpu());
    lp_parts.push_back(values.to(o.dtype).cpu());
  }
}

// ---- on-policy rounds ----

constexpr const char* kRolloutFormat = "anvil-teacher-cache-rollout";

uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The seed of round r's draws: which documents (with their keys) and the sampling of each batch.
uint64_t round_seed(uint64_t seed, int64_t round) { return splitmix(splitmix(seed ^ 0x726f756e64ULL) ^ uint64_t(round)); }

bool chosen(uint64_t key, uint64_t round_seed_, double lambda) {
  return double(splitmix(round_seed_ ^ key) >> 11) * 0x1p-53 < lambda;
}

std::string round_file(int64_t round, const char* what, int64_t i) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "round-%03lld-%s-%05lld.safetensors", static_cast<long long>(round), what,
                static_cast<long long>(i));
  return buf;
}

// A student's identity without where it was read from (a moved checkpoint is the same student).
json student_identity(json id) {
  if (id.is_object()) id.erase("source");
  return id;
}

std::string describe_student(const json& id) {
  std::string d = id.value("source", std::string("?"));
  if (id.value("kind", "") == "checkpoint") d += " (step " + id.value("step", json(-1)).dump() + ")";
  return d;
}

// The teacher part of the fingerprint as one hash, recorded in every score shard's entry.
std::string teacher_hash(const json& manifest) {
  const auto t = manifest.at("fingerprint").value("teacher", json()).dump();
  return hex(fnv(kFnvOffset, t.data(), t.size()));
}

bool rollouts_complete(const json& round) {
  for (const auto& s : round.at("shards"))
    if (!s.at("rollout").value("complete", false)) return false;
  return true;
}

bool scored(const json& shard) {
  const auto& r = shard.at("rollout");
  const auto& sc = shard.at("scores");
  return r.value("complete", false) && sc.value("complete", false) &&
         sc.value("rollout_checksum", std::string()) == r.value("checksum", std::string());
}

// The prompts and completions of a rollout shard, checked: keys (D) I64, prompt_offsets / completion_offsets
// (D + 1) I64 into prompts / completions (N) I32.
struct Rollouts {
  std::vector<uint64_t> keys;
  std::vector<std::vector<int64_t>> prompts, completions;
};

const int64_t* offsets_of(const io::SafetensorsFile& f, const char* name, int64_t docs, int64_t total) {
  const auto& e = f.entry(name);
  if (e.dtype != at::kLong || e.shape != std::vector<int64_t>{docs + 1})
    throw std::invalid_argument("teacher cache rollout shard " + f.path() + ": \"" + name + "\" must be (D + 1) I64");
  const auto* p = reinterpret_cast<const int64_t*>(f.data(e));
  for (int64_t d = 0; d < docs; ++d)
    if (p[0] != 0 || p[d + 1] < p[d] || p[d + 1] > total)
      throw std::invalid_argument("teacher cache rollout shard " + f.path() + ": \"" + name + "\" are not increasing "
                                  "offsets from 0 within the tokens");
  return p;
}

void check_rollout_tensors(const io::SafetensorsFile& f) {
  for (const char* name : {"keys", "prompt_offsets", "prompts", "completion_offsets", "completions"})
    if (!f.contains(name)) throw std::invalid_argument("teacher cache rollout shard " + f.path() + " has no tensor \"" + name + "\"");
  const auto &keys = f.entry("keys"), &prompts = f.entry("prompts"), &completions = f.entry("completions");
  if (keys.dtype != at::kLong || keys.shape.size() != 1 || prompts.dtype != at::kInt || prompts.shape.size() != 1 ||
      completions.dtype != at::kInt || completions.shape.size() != 1)
    throw std::invalid_argument("teacher cache rollout shard " + f.path() + ": keys (D) I64, prompts (P) I32 and "
                                "completions (C) I32 expected");
  const int64_t docs = keys.shape[0];
  const int64_t* po = offsets_of(f, "prompt_offsets", docs, prompts.shape[0]);
  const int64_t* co = offsets_of(f, "completion_offsets", docs, completions.shape[0]);
  for (int64_t d = 0; d < docs; ++d)
    if (po[d + 1] == po[d] || co[d + 1] == co[d])
      throw std::invalid_argument("teacher cache rollout shard " + f.path() + ": document " + std::to_string(d) +
                                  " has an empty prompt or completion");
}

std::vector<int64_t> tokens_of(const io::SafetensorsFile& f, const char* name, const char* offsets, int64_t d) {
  const int64_t* o = reinterpret_cast<const int64_t*>(f.data(f.entry(offsets)));
  const int32_t* p = reinterpret_cast<const int32_t*>(f.data(f.entry(name)));
  return std::vector<int64_t>(p + o[d], p + o[d + 1]);
}

Rollouts read_rollouts(const io::SafetensorsFile& f) {
  check_rollout_tensors(f);
  Rollouts r;
  const auto& keys = f.entry("keys");
  const auto* kp = reinterpret_cast<const int64_t*>(f.data(keys));
  for (int64_t d = 0; d < keys.shape[0]; ++d) {
    r.keys.push_back(uint64_t(kp[d]));
    r.prompts.push_back(tokens_of(f, "prompts", "prompt_offsets", d));
    r.completions.push_back(tokens_of(f, "completions", "completion_offsets", d));
  }
  return r;
}

}  // namespace

// ---- fingerprints -----------------------------------------------------------------------------------------

std::string hash_file(const std::string& path) {
  Fd f(path);
  std::vector<char> buf(size_t(1) << 20);
  uint64_t h = kFnvOffset, offset = 0;
  for (;;) {
    const uint64_t got = read_at(f.fd, buf.data(), buf.size(), offset);
    if (got == 0) break;
    h = fnv(h, buf.data(), got);
    offset += got;
  }
  return hex(h);
}

json teacher_fingerprint(const std::string& dir, const std::string& dtype, const std::string& base_weights) {
  json f;
  const auto config = io::join_path(dir, "config.json");
  f["config.json"] = io::is_regular_file(config) ? hash_file(config) : "";
  auto names = io::list_directory(dir);
  std::sort(names.begin(), names.end());
  uint64_t h = kFnvOffset;
  int64_t files = 0;
  for (const auto& name : names) {
    if (name.size() < 12 || name.compare(name.size() - 12, 12, ".safetensors") != 0) continue;
    const auto path = io::join_path(dir, name);
    Fd fd(path);
    uint64_t size = file_size(path), n = 0;
    h = fnv(h, name.data(), name.size());
    h = fnv(h, &size, sizeof size);
    if (read_at(fd.fd, &n, 8, 0) == 8 && n <= io::kMaxHeaderBytes && 8 + n <= size) {
      std::string header(n, '\0');
      read_at(fd.fd, header.data(), n, 8);
      h = fnv(h, header.data(), header.size());
    }
    // The weights themselves: all of a small file; kWeightSamples evenly spaced MiB of a large one (a teacher
    // fine-tuned in place keeps its header, not its bytes).
    const uint64_t data_begin = 8 + n, data_bytes = size > data_begin ? size - data_begin : 0;
    std::vector<char> buf(kSampleBytes);
    const bool whole = data_bytes <= kWholeFileBytes;
    const uint64_t pieces = whole ? (data_bytes + kSampleBytes - 1) / kSampleBytes : kWeightSamples;
    for (uint64_t i = 0; i < pieces; ++i) {
      const uint64_t at = whole ? data_begin + i * kSampleBytes
                                : data_begin + (data_bytes - kSampleBytes) / (kWeightSamples - 1) * i;
      h = fnv(h, buf.data(), read_at(fd.fd, buf.data(), kSampleBytes, at));
    }
    ++files;
  }
  f["safetensors"] = files ? hex(h) : "";
  const auto index = io::join_path(dir, "model.safetensors.index.json");
  f["index"] = io::is_regular_file(index) ? hash_file(index) : "";
  f["dtype"] = dtype;
  f["base_weights"] = base_weights;
  return f;
}

json tokenizer_fingerprint(const std::string& dir) {
  json f = json::object();
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                           "vocab.json", "merges.txt", "added_tokens.json"}) {
    const auto path = io::join_path(dir, name);
    if (io::is_regular_file(path)) f[name] = hash_file(path);
  }
  return f;
}

uint64_t document_key(const int32_t* ids, const int32_t* labels, int64_t n) {
  uint64_t h = fnv(kFnvOffset, &n, sizeof n);
  h = fnv(h, ids, size_t(n) * sizeof(int32_t));
  return fnv(h, labels, size_t(n) * sizeof(int32_t));
}

std::vector<Segment> packed_segments(int64_t rows, int64_t row_length, const std::vector<int32_t>& ids,
                                     const std::vector<int32_t>& labels, const std::vector<int32_t>& doc_ids) {
  std::vector<Segment> out;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = r * row_length;
    for (int64_t i = 0; i < row_length;) {
      const int32_t doc = doc_ids[base + i];
      if (doc < 0) {
        ++i;
        continue;
      }
      int64_t j = i;
      Segment s;
      while (j < row_length && doc_ids[base + j] == doc) s.targets += labels[base + j] != data::kNoTarget, ++j;
      s.row = r, s.start = i, s.length = j - i;
      s.key = document_key(&ids[base + i], &labels[base + i], s.length);
      out.push_back(s);
      i = j;
    }
  }
  return out;
}

json data_fingerprint(const DataSection& d, const std::vector<data::Example>& documents) {
  json f;
  f["train"] = d.train.empty() ? "" : hash_file(d.train);
  f["validation"] = d.validation.empty() ? "" : hash_file(d.validation);
  f["seq_len"] = d.seq_len;
  f["loss_on"] = d.loss_on;
  f["add_eos"] = d.add_eos;
  f["validation_fraction"] = d.validation_fraction;
  uint64_t h = kFnvOffset;
  const auto rows = data::pack_examples(documents, d.seq_len, 0);
  for (const auto& s : packed_segments(rows.rows, rows.row_length, rows.ids, rows.labels, rows.doc_ids))
    h = fnv(h, &s.key, sizeof s.key);
  f["documents"] = hex(h);
  return f;
}

json checkpoint_student_fingerprint(const std::string& dir) {
  const auto weights = io::join_path(dir, "trainable.safetensors"), state = io::join_path(dir, "state.json");
  if (!io::is_regular_file(weights) || !io::is_regular_file(state))
    throw std::invalid_argument("config key on_policy.refresh_from: " + dir + " is not a complete training checkpoint "
                                "(trainable.safetensors and state.json expected)");
  json st;
  try {
    st = json::parse(io::read_text_file(state));
  } catch (const json::exception& e) {
    throw std::invalid_argument("config key on_policy.refresh_from: " + state + " is not valid JSON (" + e.what() + ")");
  }
  return {{"kind", "checkpoint"}, {"source", dir}, {"step", st.value("step", int64_t(-1))}, {"weights", hash_file(weights)}};
}

json model_student_fingerprint(const std::string& dir, const std::string& dtype) {
  json f = teacher_fingerprint(dir, dtype, "dense");
  f["kind"] = "model";
  f["source"] = dir;
  return f;
}

// ---- writing ------------------------------------------------------------------------------------------------

TeacherCacheWriter::TeacherCacheWriter(const CacheOptions& o, const json& fingerprint,
                                       const std::vector<data::Example>& documents, int64_t seq_len, int32_t pad_id,
                                       int64_t vocab_size)
    : o_(o) {
  if (o.k < 1 || o.k > vocab_size)
    throw std::invalid_argument("config key teacher.cache_k: must be in [1, " + std::to_string(vocab_size) +
                                "] (the compared vocabulary's size), got " + std::to_string(o.k));
  rows_ = data::pack_examples(documents, seq_len, pad_id);
  segments_ = packed_segments(rows_.rows, rows_.row_length, rows_.ids, rows_.labels, rows_.doc_ids);
  nonempty_before_.assign(1, 0);  // pack_examples gives each non-empty document one segment, in order
  for (const auto& d : documents) nonempty_before_.push_back(nonempty_before_.back() + !d.ids.empty());
  std::unordered_map<uint64_t, int64_t> seen;
  first_.assign(segments_.size(), 0);
  for (size_t i = 0; i < segments_.size(); ++i)
    if (segments_[i].targets > 0 && seen.emplace(segments_[i].key, int64_t(i)).second) first_[i] = 1;
  const int64_t rows_per_shard = std::max<int64_t>(1, o.shard_tokens / seq_len);
  const json want = full_fingerprint(fingerprint, o, rows_per_shard);
  io::make_directories(o.dir);
  if (io::path_exists(io::join_path(o.dir, "manifest.json"))) {
    manifest_ = read_manifest(o.dir);
    check_fingerprint(o.dir, manifest_["fingerprint"], want);
    for (const auto& s : manifest_["shards"])
      if (s.value("complete", false)) verify_shard_bytes(io::join_path(o.dir, s.at("file").get<std::string>()), s);
    return;
  }
  // A new cache: every shard planned, none complete.
  manifest_ = {{"format", kFormat}, {"version", kVersion}, {"fingerprint", want}, {"k", o.k},
               {"temperature", o.temperature}, {"logprob_dtype", dtype_storage_name(o.dtype)},
               {"vocab_size", vocab_size}, {"seq_len", seq_len}, {"rows_per_shard", rows_per_shard}};
  json shards = json::array();
  int64_t documents_total = 0, targets_total = 0;
  size_t seg = 0;
  for (int64_t r0 = 0, i = 0; r0 < rows_.rows; r0 += rows_per_shard, ++i) {
    const int64_t r1 = std::min(rows_.rows, r0 + rows_per_shard);
    int64_t docs = 0, targets = 0;
    for (; seg < segments_.size() && segments_[seg].row < r1; ++seg)
      if (first_[seg]) ++docs, targets += segments_[seg].targets;
    shards.push_back({{"file", shard_name(i)}, {"packed_rows", {r0, r1}}, {"documents", docs}, {"targets", targets},
                      {"complete", false}, {"bytes", 0}, {"checksum", ""}});
    documents_total += docs, targets_total += targets;
  }
  manifest_["documents"] = documents_total;
  manifest_["targets"] = targets_total;
  manifest_["shards"] = shards;
  write_manifest();
}

int64_t TeacherCacheWriter::missing_shards() const {
  int64_t n = 0;
  for (const auto& s : manifest_["shards"]) n += !s.value("complete", false);
  return n;
}

void TeacherCacheWriter::write_manifest() const {
  io::write_text_atomically(io::join_path(o_.dir, "manifest.json"), manifest_.dump(2) + "\n");
}

CacheWriteStats TeacherCacheWriter::write(const Teacher& teacher, at::Device device) {
  CacheWriteStats st;
  const auto t0 = std::chrono::steady_clock::now();
  at::NoGradGuard no_grad;
  auto& shards = manifest_["shards"];
  st.shards = int64_t(shards.size());
  const auto head = teacher.head.to(device);  // (V, H): cut to the compared vocabulary (train/vocab.h)
  TORCH_CHECK(head.size(0) == manifest_["vocab_size"].get<int64_t>(), "teacher cache: the teacher's head compares ",
              head.size(0), " rows, the cache is planned for ", manifest_["vocab_size"].get<int64_t>());
  size_t seg = 0;
  for (auto& s : shards) {
    const int64_t r0 = s["packed_rows"][0].get<int64_t>(), r1 = s["packed_rows"][1].get<int64_t>();
    const size_t seg_begin = seg;
    while (seg < segments_.size() && segments_[seg].row < r1) ++seg;
    if (s.value("complete", false)) {
      ++st.skipped;
      continue;
    }
    std::vector<at::Tensor> ids_parts, lp_parts;  // (rows, k) each
    for (int64_t b0 = r0; b0 < r1; b0 += o_.batch_size) {
      const auto b = data::slice_rows(rows_, b0, std::min(r1, b0 + o_.batch_size));
      if (b.targets > 0) score_batch(teacher, head, b, o_, device, ids_parts, lp_parts);
    }
    auto ids = ids_parts.empty() ? at::empty({0, o_.k}, at::kInt) : at::cat(ids_parts);        // (T_shard, k)
    auto lps = lp_parts.empty() ? at::empty({0, o_.k}, o_.dtype) : at::cat(lp_parts);           // (T_shard, k)
    // Keep the rows of documents stored here (first occurrences); the rows run in segment order.
    std::vector<int64_t> keep, keys, offsets = {0};
    int64_t row = 0;
    for (size_t i = seg_begin; i < seg; ++i) {
      const auto& sg = segments_[i];
      if (first_[i]) {
        for (int64_t t = 0; t < sg.targets; ++t) keep.push_back(row + t);
        keys.push_back(int64_t(sg.key));
        offsets.push_back(offsets.back() + sg.targets);
      }
      row += sg.targets;
    }
    TORCH_CHECK(row == ids.size(0), "teacher cache: internal error: ", row, " target rows planned, ", ids.size(0),
                " computed");
    if (int64_t(keep.size()) != ids.size(0)) {
      const auto sel = at::tensor(keep, at::kLong);
      ids = ids.index_select(0, sel), lps = lps.index_select(0, sel);
    }
    const auto path = io::join_path(o_.dir, s["file"].get<std::string>());
    io::save_safetensors(path,
                         {{"keys", at::tensor(keys, at::kLong)},      // (D) int64: the documents' keys (uint64 bits)
                          {"offsets", at::tensor(offsets, at::kLong)},  // (D + 1) int64: their first rows
                          {"ids", ids},                                 // (T, k) int32, most likely first
                          {"logprobs", lps}},                           // (T, k) log_softmax(z / T)
                         {{"format", kFormat}, {"k", std::to_string(o_.k)}});
    s["bytes"] = file_size(path);
    s["checksum"] = hash_file(path);
    s["complete"] = true;
    write_manifest();
    ++st.written;
    st.targets += ids.size(0);
    st.bytes += s["bytes"].get<int64_t>();
  }
  score_rollouts(teacher, device, st);
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

int64_t TeacherCacheWriter::unscored_rollouts() const {
  int64_t n = 0;
  if (manifest_.contains("rounds"))
    for (const auto& r : manifest_["rounds"])
      for (const auto& s : r.at("shards")) n += s.at("rollout").value("complete", false) && !scored(s);
  return n;
}

// The teacher over the student's sequences of every rollout shard not yet scored: completion_batch rows (the
// completion's tokens are the targets), scored as the base shards are, written as a base shard of those targets.
void TeacherCacheWriter::score_rollouts(const Teacher& teacher, at::Device device, CacheWriteStats& st) {
  if (!manifest_.contains("rounds")) return;
  at::NoGradGuard no_grad;
  const auto head = teacher.head.to(device);  // (V, H)
  const std::string teacher_id = teacher_hash(manifest_);
  for (auto& round : manifest_["rounds"])
    for (auto& s : round["shards"]) {
      if (!s["rollout"].value("complete", false) || scored(s)) continue;
      const auto rollout_path = io::join_path(o_.dir, s["rollout"]["file"].get<std::string>());
      verify_shard_bytes(rollout_path, s["rollout"]);
      const auto r = read_rollouts(io::SafetensorsFile(rollout_path));
      std::vector<at::Tensor> ids_parts, lp_parts;  // (rows, k) each
      std::vector<int64_t> keys, offsets = {0};
      for (size_t d0 = 0; d0 < r.keys.size(); d0 += size_t(o_.batch_size)) {
        const size_t d1 = std::min(r.keys.size(), d0 + size_t(o_.batch_size));
        const std::vector<std::vector<int64_t>> prompts(r.prompts.begin() + int64_t(d0), r.prompts.begin() + int64_t(d1));
        const std::vector<std::vector<int64_t>> completions(r.completions.begin() + int64_t(d0),
                                                            r.completions.begin() + int64_t(d1));
        score_batch(teacher, head, data::completion_batch(prompts, completions, 0), o_, device, ids_parts, lp_parts);
        for (size_t d = d0; d < d1; ++d) {
          keys.push_back(int64_t(r.keys[d]));
          offsets.push_back(offsets.back() + int64_t(r.completions[d].size()));
        }
      }
      const auto ids = ids_parts.empty() ? at::empty({0, o_.k}, at::kInt) : at::cat(ids_parts);  // (T, k)
      const auto lps = lp_parts.empty() ? at::empty({0, o_.k}, o_.dtype) : at::cat(lp_parts);    // (T, k)
      TORCH_CHECK(ids.size(0) == offsets.back(), "teacher cache: internal error: ", offsets.back(),
                  " generated targets, ", ids.size(0), " scored");
      auto& sc = s["scores"];
      const auto path = io::join_path(o_.dir, sc["file"].get<std::string>());
      io::save_safetensors(path, {{"keys", at::tensor(keys, at::kLong)}, {"offsets", at::tensor(offsets, at::kLong)},
                                  {"ids", ids}, {"logprobs", lps}},
                           {{"format", kFormat}, {"k", std::to_string(o_.k)},
                            {"round", std::to_string(round["round"].get<int64_t>())}});
      sc["bytes"] = file_size(path);
      sc["checksum"] = hash_file(path);
      sc["targets"] = ids.size(0);
      sc["rollout_checksum"] = s["rollout"]["checksum"];
      sc["teacher"] = teacher_id;
      sc["complete"] = true;
      write_manifest();
      ++st.scored;
    }
}

RefreshStats TeacherCacheWriter::write_rollouts(model::CausalLM& student, const json& student_id,
                                                const RefreshOptions& r, int64_t train_documents) {
  if (!(r.lambda > 0 && r.lambda <= 1))
    throw std::invalid_argument("config key on_policy.lambda: a refresh needs a fraction in (0, 1] of the documents "
                                "to regenerate, got " + std::to_string(r.lambda));
  TORCH_CHECK(r.batch_size >= 1, "write_rollouts: batch_size must be >= 1, got ", r.batch_size);
  TORCH_CHECK(train_documents >= 0 && train_documents <= int64_t(nonempty_before_.size()) - 1,
              "write_rollouts: ", train_documents, " training documents of ", nonempty_before_.size() - 1);
  const auto t0 = std::chrono::steady_clock::now();
  RefreshStats st;
  const auto& g0 = r.generate;
  const json generation = {{"lambda", r.lambda}, {"max_new_tokens", g0.max_new_tokens}, {"temperature", g0.temperature},
                           {"top_k", g0.top_k}, {"top_p", g0.top_p}, {"seed", g0.seed}, {"batch_size", r.batch_size},
                           {"stop_tokens", g0.stop_tokens}};
  if (!manifest_.contains("rounds")) manifest_["rounds"] = json::array();
  auto& rounds = manifest_["rounds"];
  bool resume = false;
  if (!rounds.empty()) {
    const auto& last = rounds.back();
    const int64_t n = last.at("round").get<int64_t>();
    if (!rollouts_complete(last)) {  // a refresh was interrupted: finish it with the same student and settings
      if (student_identity(last.at("student")) != student_identity(student_id))
        throw std::invalid_argument("config key on_policy.refresh_from: round " + std::to_string(n) + " of the teacher "
                                    "cache " + o_.dir + " is unfinished and was begun by the student " +
                                    describe_student(last.at("student")) + ", not " + describe_student(student_id) +
                                    " (its shards would mix two students); rerun the refresh with that student to "
                                    "finish the round");
      for (auto it = generation.begin(); it != generation.end(); ++it)
        if (last.at("generation").value(it.key(), json()) != it.value())
          throw std::invalid_argument("config key " + std::string(it.key() == "seed" ? "train.seed" : it.key() == "stop_tokens"
                                      ? "teacher.path (the tokenizer's eos ids)" : "on_policy." + it.key()) + ": round " +
                                      std::to_string(n) + " of the teacher cache " + o_.dir + " is unfinished and was "
                                      "begun with " + last["generation"].value(it.key(), json()).dump() + ", now " +
                                      it.value().dump() + "; rerun the refresh with the same settings to finish it");
      resume = true;
    } else if (student_identity(last.at("student")) == student_identity(student_id) && last.at("generation") == generation) {
      st.round = n, st.up_to_date = true;
      st.documents = last.value("documents", int64_t(0));
      return st;
    }
  }
  const int64_t round = resume ? rounds.back()["round"].get<int64_t>()
                               : (rounds.empty() ? 1 : rounds.back()["round"].get<int64_t>() + 1);
  const uint64_t seed = round_seed(g0.seed, round);
  // The round's documents: training documents with targets, each once, chosen by hash(key, round) < lambda.
  std::vector<size_t> docs;
  const int64_t train_segments = nonempty_before_[size_t(train_documents)];
  for (size_t i = 0; i < size_t(train_segments) && i < segments_.size(); ++i)
    if (first_[i] && chosen(segments_[i].key, seed, r.lambda)) docs.push_back(i);
  if (docs.empty())
    throw std::invalid_argument("config key on_policy.lambda: " + std::to_string(r.lambda) + " chose none of the " +
                                std::to_string(train_segments) + " training documents for round " + std::to_string(round));
  const int64_t per_shard = manifest_.at("rows_per_shard").get<int64_t>();
  if (!resume) {
    json shards = json::array();
    for (int64_t a = 0, i = 0; a < int64_t(docs.size()); a += per_shard, ++i) {
      const int64_t b = std::min<int64_t>(int64_t(docs.size()), a + per_shard);
      shards.push_back({{"rollout", {{"file", round_file(round, "rollout", i)}, {"documents", {a, b}}, {"complete", false},
                                     {"bytes", 0}, {"checksum", ""}, {"tokens", 0}}},
                        {"scores", {{"file", round_file(round, "scores", i)}, {"complete", false}, {"bytes", 0},
                                    {"checksum", ""}}}});
    }
    rounds.push_back({{"round", round}, {"student", student_id}, {"generation", generation},
                      {"documents", int64_t(docs.size())}, {"shards", shards}});
    write_manifest();
  }
  auto& entry = rounds.back();
  st.round = round, st.documents = int64_t(docs.size()), st.shards = int64_t(entry["shards"].size());
  const bool was_training = student.is_training();
  student.eval();
  model::GenerateOptions g = g0;
  for (auto& s : entry["shards"]) {
    auto& ro = s["rollout"];
    if (ro.value("complete", false)) {
      ++st.skipped;
      continue;
    }
    const int64_t a = ro["documents"][0].get<int64_t>(), b = ro["documents"][1].get<int64_t>();
    std::vector<int64_t> keys, prompt_offsets = {0}, completion_offsets = {0};
    std::vector<int32_t> prompt_ids, completion_ids;
    for (int64_t d0 = a; d0 < b; d0 += r.batch_size) {
      const int64_t d1 = std::min(b, d0 + r.batch_size);
      std::vector<std::vector<int64_t>> prompts;
      for (int64_t d = d0; d < d1; ++d) {
        // The document's prompt as the online mode takes it (data::document_prompts over its packed row).
        const auto& seg = segments_[docs[size_t(d)]];
        const auto row = data::slice_rows(rows_, seg.row, seg.row + 1);
        size_t nth = 0;
        for (size_t j = docs[size_t(d)]; j > 0 && segments_[j - 1].row == seg.row; --j) nth += segments_[j - 1].targets > 0;
        prompts.push_back(data::document_prompts(row).at(nth));
        keys.push_back(int64_t(seg.key));
      }
      g.seed = splitmix(seed ^ uint64_t(d0));  // a rerun of this batch draws the same tokens
      const auto completions = model::generate_rows(student, prompts, g);
      for (size_t i = 0; i < prompts.size(); ++i) {
        prompt_ids.insert(prompt_ids.end(), prompts[i].begin(), prompts[i].end());
        completion_ids.insert(completion_ids.end(), completions[i].begin(), completions[i].end());
        prompt_offsets.push_back(int64_t(prompt_ids.size()));
        completion_offsets.push_back(int64_t(completion_ids.size()));
        st.generated_tokens += int64_t(completions[i].size());
      }
    }
    const auto path = io::join_path(o_.dir, ro["file"].get<std::string>());
    io::save_safetensors(path,
                         {{"keys", at::tensor(keys, at::kLong)},                        // (D) the documents' keys
                          {"prompt_offsets", at::tensor(prompt_offsets, at::kLong)},    // (D + 1)
                          {"prompts", at::tensor(prompt_ids, at::kInt)},                // (P) the documents' prompts
                          {"completion_offsets", at::tensor(completion_offsets, at::kLong)},  // (D + 1)
                          {"completions", at::tensor(completion_ids, at::kInt)}},       // (C) the student's tokens
                         {{"format", kRolloutFormat}, {"round", std::to_string(round)},
                          {"student", student_identity(student_id).dump()}});
    ro["bytes"] = file_size(path);
    ro["checksum"] = hash_file(path);
    ro["tokens"] = int64_t(completion_ids.size());
    ro["complete"] = true;
    write_manifest();
    ++st.written;
  }
  if (was_training) student.train();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return st;
}

// ---- reading ------------------------------------------------------------------------------------------------

struct TeacherCache::Shard {
  std::unique_ptr<io::SafetensorsFile> file;
  const int32_t* ids = nullptr;
  const uint8_t* logprobs = nullptr;
  at::ScalarType dtype = at::kFloat;
};

TeacherCache::~TeacherCache() = default;

TeacherCache::TeacherCache(const CacheOptions& o, const json& fingerprint) : dir_(o.dir) {
  if (!io::path_exists(io::join_path(o.dir, "manifest.json")))
    throw std::invalid_argument("config key teacher.cache: " + o.dir + " holds no manifest.json (no teacher cache)");
  manifest_ = read_manifest(o.dir);
  if (!fingerprint.is_null())
    check_fingerprint(o.dir, manifest_["fingerprint"],
                      full_fingerprint(fingerprint, o, manifest_.value("rows_per_shard", int64_t(0))));
  k_ = manifest_.at("k").get<int64_t>();
  vocab_ = manifest_.at("vocab_size").get<int64_t>();
  temperature_ = manifest_.at("temperature").get<double>();
  int32_t index = 0;
  for (const auto& s : manifest_["shards"]) {
    const auto path = io::join_path(o.dir, s.at("file").get<std::string>());
    if (!s.value("complete", false))
      throw std::invalid_argument("teacher cache " + o.dir + " is incomplete: " + path + " was never written; rerun "
                                  "anvil distill to finish the cache");
    shards_.push_back(open_scores(path, s, k_, [&](uint64_t key, int64_t begin, int64_t count) {
      where_.emplace(key, Where{index, begin, count});
    }));
    // ids in the vocabulary, no repeats, log-probs <= 0: what the losses can take
    check_shard_values(path, shards_.back()->file->tensor("ids"), shards_.back()->file->tensor("logprobs"), vocab_);
    ++index;
  }
  if (o.on_policy_rows) open_round(o);
}

// A shard of top-k rows (a base shard or a round's scores), verified against its manifest entry and mapped;
// each document's rows reported to `add`.
std::unique_ptr<TeacherCache::Shard> TeacherCache::open_scores(
    const std::string& path, const json& entry, int64_t k, const std::function<void(uint64_t, int64_t, int64_t)>& add) {
  verify_shard_bytes(path, entry);
  auto sh = std::make_unique<Shard>();
  sh->file = std::make_unique<io::SafetensorsFile>(path);  // the header validated
  const auto& f = *sh->file;
  for (const char* name : {"keys", "offsets", "ids", "logprobs"})
    if (!f.contains(name)) throw std::invalid_argument("teacher cache shard " + path + " has no tensor \"" + name + "\"");
  const auto &keys = f.entry("keys"), &offsets = f.entry("offsets"), &ids = f.entry("ids"), &lps = f.entry("logprobs");
  const int64_t docs = keys.shape.empty() ? -1 : keys.shape[0];
  const bool ok = keys.dtype == at::kLong && keys.shape.size() == 1 && offsets.dtype == at::kLong &&
                  offsets.shape == std::vector<int64_t>{docs + 1} && ids.dtype == at::kInt && ids.shape.size() == 2 &&
                  ids.shape[1] == k && lps.shape == ids.shape && at::isFloatingType(lps.dtype);
  if (!ok)
    throw std::invalid_argument("teacher cache shard " + path + ": tensors keys (D) I64, offsets (D+1) I64, ids (T, " +
                                std::to_string(k) + ") I32 and logprobs (T, k) float expected");
  const auto key_t = f.tensor("keys"), off_t = f.tensor("offsets");
  const auto* kp = key_t.data_ptr<int64_t>();
  const auto* op = off_t.data_ptr<int64_t>();
  for (int64_t d = 0; d < docs; ++d) {
    if (op[d] < 0 || op[d + 1] < op[d] || op[d + 1] > ids.shape[0])
      throw std::invalid_argument("teacher cache shard " + path + ": offsets are not increasing within its rows");
    add(uint64_t(kp[d]), op[d], op[d + 1] - op[d]);
  }
  sh->ids = reinterpret_cast<const int32_t*>(f.data(ids));
  sh->logprobs = f.data(lps);
  sh->dtype = lps.dtype;
  return sh;
}

// The latest on-policy round: every rollout shard generated and scored (by this cache's teacher, after the
// rollout was last written), else an error saying which step of the workflow is missing.
void TeacherCache::open_round(const CacheOptions& o) {
  if (!manifest_.contains("rounds") || manifest_["rounds"].empty()) return;
  const auto& round = manifest_["rounds"].back();
  const int64_t n = round.at("round").get<int64_t>();
  int64_t generated = 0, done = 0, total = int64_t(round.at("shards").size());
  for (const auto& s : round["shards"]) generated += s["rollout"].value("complete", false), done += scored(s);
  if (generated < total)
    throw std::invalid_argument("teacher cache " + o.dir + ": on-policy round " + std::to_string(n) + " is unfinished: " +
                                std::to_string(generated) + " of " + std::to_string(total) + " rollout shards "
                                "generated; rerun the refresh (on_policy.refresh_from) to finish it, then the teacher "
                                "pass (teacher.cache_only=true) to score it");
  if (done < total)
    throw std::invalid_argument("teacher cache " + o.dir + ": on-policy round " + std::to_string(n) + " awaits the "
                                "teacher: " + std::to_string(done) + " of " + std::to_string(total) + " rollout shards "
                                "scored; run the teacher pass (teacher.cache_only=true) before training on it");
  const std::string teacher_id = teacher_hash(manifest_);
  for (const auto& s : round["shards"]) {
    const auto rollout_path = io::join_path(o.dir, s["rollout"]["file"].get<std::string>());
    const auto scores_path = io::join_path(o.dir, s["scores"]["file"].get<std::string>());
    if (s["scores"].value("teacher", std::string()) != teacher_id)
      throw std::invalid_argument("teacher cache shard " + scores_path + " was scored by another teacher than the cache's "
                                  "(teacher.path); run the teacher pass again after deleting it");
    verify_shard_bytes(rollout_path, s["rollout"]);
    rollouts_.push_back(std::make_unique<io::SafetensorsFile>(rollout_path));
    const auto& f = *rollouts_.back();
    check_rollout_tensors(f);
    const int32_t ri = int32_t(rollouts_.size() - 1), si = int32_t(shards_.size());
    const auto* kp = reinterpret_cast<const int64_t*>(f.data(f.entry("keys")));
    const auto* co = reinterpret_cast<const int64_t*>(f.data(f.entry("completion_offsets")));
    std::unordered_map<uint64_t, int64_t> doc_of;
    for (int64_t d = 0; d < f.entry("keys").shape[0]; ++d) doc_of.emplace(uint64_t(kp[d]), d);
    shards_.push_back(open_scores(scores_path, s["scores"], k_, [&](uint64_t key, int64_t begin, int64_t count) {
      const auto it = doc_of.find(key);
      if (it == doc_of.end() || co[it->second + 1] - co[it->second] != count)
        throw std::invalid_argument("teacher cache shard " + scores_path + " does not score the documents of " +
                                    rollout_path + " (another rollout?); delete it and run the teacher pass again");
      rollout_where_.emplace(key, RolloutWhere{ri, it->second, Where{si, begin, count}});
    }));
    check_shard_values(scores_path, shards_.back()->file->tensor("ids"), shards_.back()->file->tensor("logprobs"), vocab_);
  }
  round_ = n;
  round_entry_ = round;
}

std::pair<at::Tensor, at::Tensor> TeacherCache::lookup(const data::Batch& b, at::Device device, bool skip_on_policy) const {
  const auto segs = packed_segments(b.rows, b.length, b.ids, b.labels, b.doc_ids);
  int64_t total = 0;
  const auto skipped = [&](const Segment& s) { return skip_on_policy && rollout_where_.count(s.key) != 0; };
  for (const auto& s : segs) total += skipped(s) ? 0 : s.targets;
  auto ids = at::empty({total, k_}, at::kInt);  // (T, k)
  std::vector<at::Tensor> lps;
  int64_t row = 0;
  for (const auto& s : segs) {
    if (s.targets == 0 || skipped(s)) continue;
    const auto it = where_.find(s.key);
    if (it == where_.end() || it->second.count != s.targets)
      throw std::invalid_argument("teacher cache " + dir_ + " holds no entry for a document of this batch (" +
                                  std::to_string(s.length) + " tokens, " + std::to_string(s.targets) +
                                  " targets): it was written for other data");
    const auto& sh = *shards_[it->second.shard];
    std::memcpy(ids.data_ptr<int32_t>() + row * k_, sh.ids + it->second.begin * k_, size_t(s.targets * k_) * 4);
    const int64_t esize = int64_t(c10::elementSize(sh.dtype));
    auto part = at::empty({s.targets, k_}, sh.dtype);
    std::memcpy(part.data_ptr(), sh.logprobs + it->second.begin * k_ * esize, size_t(s.targets * k_ * esize));
    lps.push_back(part.to(at::kFloat));
    row += s.targets;
  }
  auto lp = lps.empty() ? at::empty({0, k_}, at::kFloat) : at::cat(lps);  // (T, k) fp32
  return {ids.to(device, at::kLong), lp.to(device)};
}

// ---- training and validation from the cache -------------------------------------------------------------

TeacherCache::OnPolicyRows TeacherCache::on_policy_rows(const data::Batch& b, at::Device device) const {
  OnPolicyRows r;
  const auto segs = packed_segments(b.rows, b.length, b.ids, b.labels, b.doc_ids);
  r.replaced.assign(segs.size(), 0);
  std::vector<at::Tensor> ids, lps;  // (count, k) each
  for (size_t i = 0; i < segs.size(); ++i) {
    if (segs[i].targets == 0) continue;
    const auto it = rollout_where_.find(segs[i].key);
    if (it == rollout_where_.end()) continue;
    const auto& w = it->second;
    const auto& f = *rollouts_[size_t(w.rollout)];
    r.replaced[i] = 1;
    r.replaced_targets += segs[i].targets;
    r.prompts.push_back(tokens_of(f, "prompts", "prompt_offsets", w.doc));
    r.completions.push_back(tokens_of(f, "completions", "completion_offsets", w.doc));
    const auto& sh = *shards_[size_t(w.scores.shard)];
    auto part = at::empty({w.scores.count, k_}, at::kInt);
    std::memcpy(part.data_ptr<int32_t>(), sh.ids + w.scores.begin * k_, size_t(w.scores.count * k_) * 4);
    ids.push_back(part);
    const int64_t esize = int64_t(c10::elementSize(sh.dtype));
    auto lp = at::empty({w.scores.count, k_}, sh.dtype);
    std::memcpy(lp.data_ptr(), sh.logprobs + w.scores.begin * k_ * esize, size_t(w.scores.count * k_ * esize));
    lps.push_back(lp.to(at::kFloat));
  }
  if (!ids.empty()) r.ids = at::cat(ids).to(device, at::kLong), r.logprobs = at::cat(lps).to(device);
  return r;
}

namespace {

// (1 - kd_ratio) CE + kd_ratio KD of the batch `b` (the student's rows) against the cache's rows of `keyed` (the
// batch as drawn; it differs from `b` in the labels of the documents that left it for their on-policy rows).
struct CachedLoss {
  at::Tensor ce, kd;
};
CachedLoss cached_batch_loss(model::CausalLM& student, const TeacherCache& cache, const data::Batch& b,
                             const data::Batch& keyed, bool skip_on_policy, const KdOptions& o, double kd_ratio,
                             int64_t ce_chunk, double normalizer, at::Device device) {
  const auto all = batch_to_device(b, device);  // (4, B, S)
  const auto labels = all[3].reshape({-1});     // (B*S)
  auto h = batch_hidden(student, all, b.packed);
  h = h.reshape({-1, h.size(-1)});  // (B*S, Hs)
  const auto ws = head_weight(student);
  const bool adapted_head = student.lm_head && student.lm_head->adapter;
  const double inv = normalizer > 0 ? 1.0 / normalizer : 0.0;
  const int64_t vocab = cache.vocab_size();  // the compared rows: the student's padding is in CE only
  at::Tensor kd = at::zeros({}, h.options().dtype(at::kFloat));
  const at::Tensor ce = student_ce(student, h, labels, normalizer, ce_chunk, kd_ratio);
  if (kd_ratio > 0) {
    const auto hs = h.index_select(0, target_rows(labels));              // (T, Hs)
    const auto [tid, tlp] = cache.lookup(keyed, device, skip_on_policy);  // (T, k) each
    if (adapted_head) {
      const auto zs = student.lm_head->forward(hs).narrow(1, 0, vocab);  // (T, V)
      const auto ls = at::log_softmax(zs.to(at::kFloat).div(o.temperature), 1);
      kd = kd_divergence_sparse(ls, tid, tlp, o).sum().to(at::kFloat) * inv;
    } else {
      kd = kd_loss_sparse(hs, ws.narrow(0, 0, vocab), tid, tlp, normalizer, o).to(at::kFloat);
    }
  }
  return {ce, kd};
}

// The on-policy documents: KD alone over the student's generated tokens against their cached teacher rows, the
// mean per generated token weighted by the documents' share of the step (replaced_targets / normalizer).
at::Tensor on_policy_kd(model::CausalLM& student, const TeacherCache::OnPolicyRows& r, int64_t vocab,
                        const KdOptions& o, double normalizer, at::Device device) {
  const auto gen = data::completion_batch(r.prompts, r.completions, 0);
  const double scaled = normalizer * double(gen.targets) / double(r.replaced_targets);
  const auto all = batch_to_device(gen, device);  // (4, B, S)
  const auto labels = all[3].reshape({-1});
  auto h = batch_hidden(student, all, false);
  const auto hs = h.reshape({-1, h.size(-1)}).index_select(0, target_rows(labels));  // (T_gen, Hs)
  TORCH_CHECK(hs.size(0) == r.ids.size(0), "teacher cache: internal error: ", hs.size(0), " generated targets, ",
              r.ids.size(0), " cached rows");
  if (student.lm_head && student.lm_head->adapter) {  // the compared rows only, as cached_batch_loss
    const auto zs = student.lm_head->forward(hs).narrow(1, 0, vocab);  // (T_gen, V)
    const auto ls = at::log_softmax(zs.to(at::kFloat).div(o.temperature), 1);
    return kd_divergence_sparse(ls, r.ids, r.logprobs, o).sum().to(at::kFloat) * (1.0 / scaled);
  }
  return kd_loss_sparse(hs, head_weight(student).narrow(0, 0, vocab), r.ids, r.logprobs, scaled, o).to(at::kFloat);
}

}  // namespace

LossFn kd_cache_loss_fn(model::CausalLM& student, const TeacherCache& cache, const KdOptions& o, double kd_ratio,
                        int64_t ce_chunk, at::Device device) {
  return [&student, &cache, o, kd_ratio, ce_chunk, device](const data::Batch& b, double normalizer) {
    const auto mix = [kd_ratio](const at::Tensor& ce, const at::Tensor& kd) {
      return kd_ratio >= 1 ? kd : kd_ratio <= 0 ? ce : (1 - kd_ratio) * ce + kd_ratio * kd;
    };
    const auto onp = cache.on_policy_round() > 0 ? cache.on_policy_rows(b, device) : TeacherCache::OnPolicyRows{};
    if (onp.replaced_targets == 0) {
      const auto l = cached_batch_loss(student, cache, b, b, false, o, kd_ratio, ce_chunk, normalizer, device);
      if (cache.on_policy_round() > 0)
        return Loss{mix(l.ce, l.kd), {{"kd", l.kd.detach()}, {"ce", l.ce.detach()}, {"on_policy", at::zeros_like(l.kd)}}};
      if (kd_ratio <= 0) return Loss{mix(l.ce, l.kd), {{"ce", l.ce.detach()}}};
      return Loss{mix(l.ce, l.kd), {{"kd", l.kd.detach()}, {"ce", l.ce.detach()}}};
    }
    // The regenerated documents leave the packed batch (labels masked) for their on-policy rows.
    data::Batch off = b;
    const auto segs = packed_segments(b.rows, b.length, b.ids, b.labels, b.doc_ids);
    for (size_t i = 0; i < segs.size(); ++i) {
      if (!onp.replaced[i]) continue;
      const int64_t base = segs[i].row * b.length + segs[i].start;
      std::fill(off.labels.begin() + base, off.labels.begin() + base + segs[i].length, data::kNoTarget);
      off.targets -= segs[i].targets;
    }
    const auto kd_on = on_policy_kd(student, onp, cache.vocab_size(), o, normalizer, device);
    auto total = kd_on, ce = at::zeros_like(kd_on), kd = kd_on.detach();
    if (off.targets > 0) {
      const auto l = cached_batch_loss(student, cache, off, b, true, o, kd_ratio, ce_chunk, normalizer, device);
      total = total + mix(l.ce, l.kd);
      ce = l.ce.detach(), kd = kd + l.kd.detach();
    }
    const auto share = at::zeros_like(kd) + double(onp.replaced_targets) / normalizer;
    return Loss{total, {{"kd", kd}, {"ce", ce}, {"on_policy", share}}};
  };
}

EvalResult evaluate_against_cache(model::CausalLM& student, const TeacherCache& cache, const data::PackedRows& rows,
                                  int64_t batch_size, int64_t max_batches, int64_t chunk, at::Device device,
                                  const EvalShard& shard) {
  KdOptions kl;  // forward KL at the cache's temperature
  kl.temperature = cache.temperature();
  return evaluate_student(student, rows, batch_size, max_batches, chunk, device,
                          [&](const data::Batch& b, const at::Tensor&) -> ChunkScore {
                            const auto teacher = cache.lookup(b, device);  // ids, log-probs (T, k), target-row order
                            return [&kl, vocab = cache.vocab_size(), tid = teacher.first, tlp = teacher.second](
                                       int64_t s, int64_t e, const at::Tensor& zs,
                                                                                    const at::Tensor& ls) {
                              const bool padded = vocab < zs.size(1);  // KL and agreement over the compared rows
                              const auto zk = padded ? zs.narrow(1, 0, vocab) : zs;  // (rows, V)
                              const auto lst = kl.temperature == 1 && !padded ? ls : at::log_softmax(zk / kl.temperature, 1);
                              const auto t = tid.slice(0, s, e);
                              return std::make_pair(kd_divergence_sparse(lst, t, tlp.slice(0, s, e), kl).sum(),
                                                    (zk.argmax(1) == t.select(1, 0)).sum());
                            };
                          }, shard);
}

EvalFn kd_cache_eval_fn(model::CausalLM& student, const TeacherCache& cache, const TrainingData& data,
                        const TrainSection& t, const EvalSection& e, int64_t chunk, at::Device device) {
  if (data.validation_rows.rows == 0) return nullptr;
  return [&student, &cache, &data, batch = t.batch_size, max = e.max_batches, chunk, device](const EvalShard& shard) {
    return evaluate_against_cache(student, cache, data.validation_rows, batch, max, chunk, device, shard);
  };
}

}  // namespace anvil::train
