// The offline teacher cache: one pass of a frozen teacher over the training and validation documents writes
// each target position's top-k tempered log-probabilities to a directory of safetensors shards plus a
// manifest.json (docs/FORMATS.md, "Teacher cache"); the student then trains from it (kd_loss_sparse) without
// the teacher in the process.
//
// Why it is built this way:
// - Keyed by document, not by batch: a document's teacher outputs depend only on the document (packed rows
//   mask attention per document and restart positions), while the packing order changes every epoch. Each
//   document of a packed row is found by a 64-bit FNV-1a hash of its (truncated) ids and labels, so any
//   epoch's batches, resumed or not, look their rows up; a duplicated document is stored once.
// - Shards of a fixed number of packed rows, each written atomically (io::save_safetensors: temporary name,
//   fsync, rename) and then recorded in the manifest (written atomically too) with its size and checksum: a
//   killed writer loses at most the shard it was writing, and a rerun writes exactly the shards the manifest
//   does not list as complete, each a pure function of its rows, so the cache ends bit-identical.
// - The manifest's fingerprint (teacher config.json and safetensors headers, tokenizer files, data files and
//   settings, the documents' hashes, k, temperature, storage dtype) is compared part by part on every open;
//   a cache from another teacher / tokenizer / data is refused with the part and the field that differ.
// - Every shard is checked on open (size, checksum over the whole file, safetensors header, tensor shapes):
//   a truncated or corrupted shard is an error naming the file, never wrong targets.
//
// On-policy rounds (GKD's lambda without the teacher in the training process): a refresh has a student (a
// checkpoint of the run, or a model folder) generate completions for a fraction lambda of the training
// documents' prompts, written as rollout shards of round r; the teacher pass (the same writer that writes the
// base shards) then scores each rollout shard's generated tokens into a score shard, laid out as a base shard.
// A run with on_policy rows reads the latest complete round: those documents train on the student's completions,
// KD alone over the generated tokens (as TRL's GKDTrainer on its on-policy batches), the others on the base cache.
// - Which documents and which tokens are pure functions of (lambda, seed, round, the documents, the student):
//   a killed refresh reruns into the same round and writes only the shards the manifest lacks.
// - A round records its student (source, step, a hash of its weights) and its generation settings: finishing
//   an unfinished round with another student, or other settings, is an error naming the key; each score
//   shard records the checksum of the rollout shard it scored and the teacher's fingerprint, so a rollout
//   rewritten after scoring, or scores from another teacher, are refused on open.
#pragma once

#include "anvil/data/batches.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/generate.h"
#include "anvil/model/transformer.h"
#include "anvil/train/config.h"
#include "anvil/train/kd_loss.h"
#include "anvil/train/setup.h"
#include "anvil/train/trainer.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace anvil::train {

/// How a cache is written (the settings that shape its files are part of its fingerprint).
struct CacheOptions {
  std::string dir;                 ///< teacher.cache
  int64_t k = 64;                  ///< teacher.cache_k: ids per position, in [1, vocabulary size]
  double temperature = 1.0;        ///< distill.temperature: the log-probs are log_softmax(z / temperature)
  at::ScalarType dtype = at::kHalf;  ///< teacher.cache_dtype: the log-probs' storage (kFloat, kHalf, kBFloat16)
  int64_t shard_tokens = 1 << 20;  ///< teacher.cache_shard_tokens: packed positions per shard (rounded to rows)
  int64_t batch_size = 8;          ///< packed rows per teacher forward
  int64_t chunk = 1024;            ///< target rows per logits chunk
  /// Reading only (not in the fingerprint): the latest complete on-policy round is read too, and an unfinished
  /// last round is an error (its rollouts await the teacher pass).
  bool on_policy_rows = false;
};

/// How a refresh generates (the on_policy section; lambda is the fraction of the training documents).
struct RefreshOptions {
  double lambda = 0.5;              ///< on_policy.lambda: each document is chosen when hash(key, round) < lambda
  model::GenerateOptions generate;  ///< sampling, max_new_tokens, stop tokens (eos), pad; seed: the train seed
  int64_t batch_size = 16;          ///< prompts generated together
};

struct RefreshStats {
  int64_t round = 0, documents = 0;              ///< the round written; the documents it regenerates
  int64_t shards = 0, written = 0, skipped = 0;  ///< rollout shards: planned; written now; complete already
  int64_t generated_tokens = 0;                  ///< tokens generated now
  bool up_to_date = false;                       ///< the last round already holds this student's rollouts
  double seconds = 0;
};

// ---- fingerprints ---------------------------------------------------------------------------------------

/// 64-bit FNV-1a of a file's bytes as 16 hex digits; the error names the file.
std::string hash_file(const std::string& path);
/// The teacher's identity: config.json's hash, a hash over every *.safetensors file's name, size, header and
/// weights (all bytes of a file up to 64 MiB; 16 evenly spaced MiB of a larger one, so that a 14B teacher is
/// not re-read), the index's hash, the load dtype and base_weights.
nlohmann::json teacher_fingerprint(const std::string& teacher_dir, const std::string& dtype,
                                   const std::string& base_weights);
/// The hash of each tokenizer file present in `dir` (tokenizer.json, tokenizer.model, ...).
nlohmann::json tokenizer_fingerprint(const std::string& dir);
/// The data: the train / validation files' hashes, seq_len, loss_on, add_eos, validation_fraction, and one
/// hash over every document's key (so a change in the split or the tokenization shows too).
nlohmann::json data_fingerprint(const DataSection& d, const std::vector<data::Example>& documents);
/// A refresh's student from a training checkpoint: {"kind": "checkpoint", "source", "step", "weights": the hash
/// of trainable.safetensors}; the error names the folder.
nlohmann::json checkpoint_student_fingerprint(const std::string& checkpoint_dir);
/// A refresh's student from a model folder: {"kind": "model", "source", and teacher_fingerprint's parts}.
nlohmann::json model_student_fingerprint(const std::string& model_dir, const std::string& dtype);

/// The key of one packed document: FNV-1a over its length, ids and labels (n of each).
uint64_t document_key(const int32_t* ids, const int32_t* labels, int64_t n);

/// The documents of packed rows in row-major order: (row, start, length) with their keys and target counts.
struct Segment {
  int64_t row = 0, start = 0, length = 0, targets = 0;
  uint64_t key = 0;
};
std::vector<Segment> packed_segments(int64_t rows, int64_t row_length, const std::vector<int32_t>& ids,
                                     const std::vector<int32_t>& labels, const std::vector<int32_t>& doc_ids);

// ---- writing ---------------------------------------------------------------------------------------------

struct CacheWriteStats {
  int64_t shards = 0, written = 0, skipped = 0;  ///< planned; written now; complete already
  int64_t scored = 0;                            ///< score shards of on-policy rounds written now
  int64_t targets = 0;                           ///< target positions written now
  int64_t bytes = 0;                             ///< bytes of the shards written now
  double seconds = 0;                            ///< writing them (teacher forward included)
};

/// The cache of `documents` (train then validation examples; packed with seq_len and pad_id) in options.dir.
/// Construction creates the directory and the manifest (every shard planned, none complete) or reads the
/// existing manifest and checks it against `fingerprint` (an object: "teacher", "tokenizer", "data" parts;
/// k, temperature, dtype and shard size are added here): a difference is a std::invalid_argument naming
/// teacher.cache, the part and the field. A shard listed complete is verified (size, checksum, header).
class TeacherCacheWriter {
 public:
  TeacherCacheWriter(const CacheOptions& options, const nlohmann::json& fingerprint,
                     const std::vector<data::Example>& documents, int64_t seq_len, int32_t pad_id, int64_t vocab_size);
  int64_t missing_shards() const;
  /// Rollout shards of on-policy rounds that the teacher has not scored yet (or that were rewritten since).
  int64_t unscored_rollouts() const;
  /// Writes every missing shard with the teacher on `device`, then the score shard of every unscored rollout
  /// shard; the manifest updated after each.
  CacheWriteStats write(const Teacher& teacher, at::Device device);
  /// On-policy refresh: `student` (in eval mode while it generates) completes the prompts (data::document_prompts)
  /// of the chosen documents among the first `train_documents` documents (the training ones) into the rollout
  /// shards of a new round, or of the last round when it is unfinished (the same `student_id` and settings are
  /// then required: a difference is an std::invalid_argument naming on_policy.refresh_from or the on_policy key).
  /// Nothing is written when the last round already holds this student's rollouts.
  RefreshStats write_rollouts(model::CausalLM& student, const nlohmann::json& student_id, const RefreshOptions& r,
                              int64_t train_documents);
  const nlohmann::json& manifest() const { return manifest_; }

 private:
  void write_manifest() const;
  void score_rollouts(const Teacher& teacher, at::Device device, CacheWriteStats& st);
  CacheOptions o_;
  data::PackedRows rows_;
  std::vector<Segment> segments_;
  std::vector<uint8_t> first_;  // segment i is the first with its key: its rows are stored
  std::vector<int64_t> nonempty_before_;  // [d]: segments of documents 0..d-1
  nlohmann::json manifest_;
};

// ---- reading ---------------------------------------------------------------------------------------------

/// A complete cache, every shard verified and mapped; lookups by document key.
class TeacherCache {
 public:
  /// `fingerprint` null: no check (tests); else as TeacherCacheWriter's, the same error on a difference.
  TeacherCache(const CacheOptions& options, const nlohmann::json& fingerprint);
  ~TeacherCache();
  int64_t k() const { return k_; }
  int64_t vocab_size() const { return vocab_; }  ///< the compared vocabulary (train/vocab.h): every cached id is below it
  double temperature() const { return temperature_; }
  const nlohmann::json& manifest() const { return manifest_; }
  /// The cached teacher of a batch's target positions, in target_rows order: ids (T, k) int64 and
  /// log-probabilities (T, k) fp32, on `device`. A document the cache does not hold is an error.
  /// skip_on_policy: the documents of the on-policy round are left out (their rows are on_policy_rows').
  std::pair<at::Tensor, at::Tensor> lookup(const data::Batch& b, at::Device device, bool skip_on_policy = false) const;

  /// The on-policy round read (options.on_policy_rows), 0 when none; its manifest entry; its documents.
  int64_t on_policy_round() const { return round_; }
  const nlohmann::json& on_policy_round_entry() const { return round_entry_; }
  int64_t on_policy_documents() const { return int64_t(rollout_where_.size()); }
  /// The documents of a batch that the round regenerated, in packed_segments order.
  struct OnPolicyRows {
    std::vector<uint8_t> replaced;  ///< per packed_segments(b) segment: 1 when it is on-policy
    std::vector<std::vector<int64_t>> prompts, completions;  ///< the student's sequences (data::completion_batch)
    at::Tensor ids, logprobs;       ///< the teacher over their completion tokens: (T, k) int64, (T, k) fp32
    int64_t replaced_targets = 0;   ///< the replaced documents' own targets
  };
  OnPolicyRows on_policy_rows(const data::Batch& b, at::Device device) const;

 private:
  struct Shard;
  struct Where {
    int32_t shard;
    int64_t begin, count;
  };
  struct RolloutWhere {
    int32_t rollout;  // index into rollouts_
    int64_t doc;      // within it
    Where scores;     // into shards_
  };
  void open_round(const CacheOptions& o);
  static std::unique_ptr<Shard> open_scores(const std::string& path, const nlohmann::json& entry, int64_t k,
                                            const std::function<void(uint64_t, int64_t, int64_t)>& add);
  std::vector<std::unique_ptr<io::SafetensorsFile>> rollouts_;
  std::unordered_map<uint64_t, RolloutWhere> rollout_where_;
  int64_t round_ = 0;
  nlohmann::json round_entry_;
  std::string dir_;
  int64_t k_ = 0, vocab_ = 0;
  double temperature_ = 1;
  nlohmann::json manifest_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unordered_map<uint64_t, Where> where_;
};

/// kd_batch_loss with the cached teacher: total = (1 - kd_ratio) ce + kd_ratio kd_loss_sparse, as the trainer's
/// loss callback with terms "kd" and "ce". A student's head with an adapter takes its logits whole.
/// With an on-policy round, the batch's documents that it regenerated leave the batch (their labels masked) and
/// train on the student's completions instead: kd_loss_sparse alone over the generated tokens, their mean
/// weighted by those documents' share of the step's targets (as on_policy_loss_fn weighs a replaced
/// micro-batch); term "on_policy" is that share.
LossFn kd_cache_loss_fn(model::CausalLM& student, const TeacherCache& cache, const KdOptions& o, double kd_ratio,
                        int64_t ce_chunk, at::Device device);

/// evaluate_against_teacher from the cache: loss, ppl, "kl" (kd_divergence_sparse's forward KL at the cache's
/// temperature: the online "kl" when it is 1 and k = V) and "top1" (the student's argmax is the teacher's).
EvalResult evaluate_against_cache(model::CausalLM& student, const TeacherCache& cache, const data::PackedRows& rows,
                                  int64_t batch_size, int64_t max_batches, int64_t chunk, at::Device device,
                                  const EvalShard& shard = {});
EvalFn kd_cache_eval_fn(model::CausalLM& student, const TeacherCache& cache, const TrainingData& data,
                        const TrainSection& t, const EvalSection& e, int64_t chunk, at::Device device);

}  // namespace anvil::train
