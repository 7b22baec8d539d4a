// The sparse-teacher KD losses and the offline teacher cache (anvil/train/kd_loss.h, teacher_cache.h):
// - with k = V the sparse divergence is the dense one; for k < V it is the divergence of the coarse k + 1
//   outcome distributions written out here with loops in fp64; the chunked loss's analytic gradient equals
//   autograd through the reference and central differences in fp64;
// - the cache of the tiny teacher holds, for any epoch's packed batch, the top-k of the teacher's own
//   log-probabilities; an interrupted write resumes to a bit-identical cache; a cache from another teacher,
//   tokenizer or data, or with another k, is refused naming the part; a truncated or corrupted shard is an
//   error naming the file.
#include "anvil/train/teacher_cache.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"
#include "anvil/model/transformer.h"

#include "../../fuzz/teacher_cache_input.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace anvil::train {
namespace {

const std::vector<KdLoss> kAll = {KdLoss::kForwardKl,     KdLoss::kReverseKl, KdLoss::kSkewForwardKl,
                                  KdLoss::kSkewReverseKl, KdLoss::kJsd,       KdLoss::kTv};

// Any error (c10::Error or std::invalid_argument) whose message holds every word.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& words) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning '" << words.front() << "'";
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "message lacks '" << w << "': " << msg;
  }
}

// ---- the formulas written out --------------------------------------------------------------------------

double kl(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] > 0) s += a[i] * std::log(a[i] / b[i]);
  return s;
}
std::vector<double> mix(const std::vector<double>& a, double wa, const std::vector<double>& b) {
  std::vector<double> m(a.size());
  for (size_t i = 0; i < a.size(); ++i) m[i] = wa * a[i] + (1 - wa) * b[i];
  return m;
}
double divergence(KdLoss loss, const std::vector<double>& p, const std::vector<double>& q, const KdOptions& o) {
  switch (loss) {
    case KdLoss::kForwardKl: return kl(p, q);
    case KdLoss::kReverseKl: return kl(q, p);
    case KdLoss::kSkewForwardKl: return kl(p, mix(p, o.skew_lambda, q));
    case KdLoss::kSkewReverseKl: return kl(q, mix(p, 1 - o.skew_lambda, q));
    case KdLoss::kJsd: {
      const auto m = mix(p, o.jsd_beta, q);
      return o.jsd_beta * kl(p, m) + (1 - o.jsd_beta) * kl(q, m);
    }
    case KdLoss::kTv: {
      double s = 0;
      for (size_t i = 0; i < p.size(); ++i) s += std::abs(p[i] - q[i]);
      return 0.5 * s;
    }
  }
  return 0;
}

// The coarse divergence of one row: teacher p and student q over V, the k ids' outcomes plus "the rest".
double coarse_written_out(KdLoss loss, const std::vector<double>& p, const std::vector<double>& q,
                          const std::vector<int64_t>& ids, const KdOptions& o) {
  std::vector<double> pc, qc;
  double ps = 0, qs = 0;
  for (auto i : ids) pc.push_back(p[i]), qc.push_back(q[i]), ps += p[i], qs += q[i];
  if (ids.size() < p.size()) pc.push_back(1 - ps), qc.push_back(1 - qs);
  return divergence(loss, pc, qc, o);
}

std::vector<double> row(const at::Tensor& t) {
  const auto c = t.to(at::kDouble).contiguous();
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

KdOptions options(KdLoss loss, double T = 1.0) {
  KdOptions o;
  o.loss = loss, o.temperature = T, o.skew_lambda = 0.3, o.jsd_beta = 0.4, o.chunk = 2;
  return o;
}

TEST(SparseKd, FullVocabularyEqualsDense) {
  at::manual_seed(11);
  const int64_t n = 5, v = 13;
  for (const double T : {1.0, 2.5})
    for (auto loss : kAll) {
      const auto o = options(loss, T);
      const auto zs = at::randn({n, v}, at::kDouble) * 3, zt = at::randn({n, v}, at::kDouble) * 3;
      const auto ls = at::log_softmax(zs / T, 1), lt = at::log_softmax(zt / T, 1);
      const auto [vals, ids] = at::topk(lt, v, 1);  // (n, V) a permutation, sorted
      const auto sparse = kd_divergence_sparse(ls, ids, vals, o);
      const auto dense = kd_divergence(ls, lt, o);
      EXPECT_TRUE(at::allclose(sparse, dense, 1e-12, 1e-12)) << kd_loss_names()[int(loss)] << " T " << T;
    }
}

TEST(SparseKd, TopKEqualsTheCoarseFormula) {
  at::manual_seed(12);
  const int64_t n = 4, v = 9;
  for (const int64_t k : {int64_t(1), int64_t(3), v - 1})
    for (auto loss : kAll) {
      const auto o = options(loss, 1.7);
      const auto zs = at::randn({n, v}, at::kDouble) * 2, zt = at::randn({n, v}, at::kDouble) * 2;
      const auto ls = at::log_softmax(zs / o.temperature, 1), lt = at::log_softmax(zt / o.temperature, 1);
      const auto [vals, ids] = at::topk(lt, k, 1);
      const auto got = kd_divergence_sparse(ls, ids, vals, o);
      for (int64_t r = 0; r < n; ++r) {
        const auto id = ids[r].contiguous();
        const std::vector<int64_t> idv(id.data_ptr<int64_t>(), id.data_ptr<int64_t>() + k);
        const double want = coarse_written_out(loss, row(lt[r].exp()), row(ls[r].exp()), idv, o);
        EXPECT_NEAR(got[r].item<double>(), want, 1e-12) << kd_loss_names()[int(loss)] << " k " << k << " row " << r;
      }
      // Coarsening never increases the divergence (data processing), and 0 when the student is the teacher.
      EXPECT_TRUE((got <= kd_divergence(ls, lt, o) + 1e-12).all().item<bool>()) << kd_loss_names()[int(loss)];
      EXPECT_LT(kd_divergence_sparse(lt, ids, vals, o).abs().max().item<double>(), 1e-12);
    }
}

TEST(SparseKd, ChunkedGradientsMatchAutogradAndDifferences) {
  at::manual_seed(13);
  const int64_t n = 5, h = 4, v = 10;
  for (const int64_t k : {int64_t(3), v})
    for (auto loss : kAll) {
      const auto o = options(loss, 1.3);
      const auto hs0 = at::randn({n, h}, at::kDouble), ws0 = at::randn({v, h}, at::kDouble);
      const auto lt = at::log_softmax(at::randn({n, v}, at::kDouble) * 2 / o.temperature, 1);
      const auto [vals, ids] = at::topk(lt, k, 1);
      auto hs = hs0.clone().requires_grad_(), ws = ws0.clone().requires_grad_();
      const auto got = kd_loss_sparse(hs, ws, ids, vals, 3.0, o);
      got.backward();
      auto hr = hs0.clone().requires_grad_(), wr = ws0.clone().requires_grad_();
      const auto ref = kd_divergence_sparse(at::log_softmax(at::linear(hr, wr) / o.temperature, 1), ids, vals, o).sum() / 3;
      ref.backward();
      const auto name = kd_loss_names()[int(loss)] + " k " + std::to_string(k);
      EXPECT_NEAR(got.item<double>(), ref.item<double>(), 1e-12) << name;
      EXPECT_TRUE(at::allclose(hs.grad(), hr.grad(), 1e-9, 1e-10)) << name;
      EXPECT_TRUE(at::allclose(ws.grad(), wr.grad(), 1e-9, 1e-10)) << name;
      // Central differences on a few hidden entries (tv is not differentiable where p = q: skipped there).
      if (loss == KdLoss::kTv) continue;
      for (int64_t e = 0; e < 4; ++e) {
        const double eps = 1e-6;
        auto plus = hs0.clone(), minus = hs0.clone();
        plus.view(-1)[e * 3] += eps, minus.view(-1)[e * 3] -= eps;
        const double fd = (kd_loss_sparse(plus, ws0, ids, vals, 3.0, o).item<double>() -
                           kd_loss_sparse(minus, ws0, ids, vals, 3.0, o).item<double>()) / (2 * eps);
        EXPECT_NEAR(hs.grad().view(-1)[e * 3].item<double>(), fd, 1e-7) << name;
      }
    }
}

TEST(SparseKd, BadTeacherShapesAreErrors) {
  const auto hs = at::randn({3, 4}), ws = at::randn({6, 4});
  const auto ids = at::zeros({3, 2}, at::kLong), lp = at::zeros({3, 2});
  expect_error([&] { kd_loss_sparse(hs, ws, ids.slice(0, 0, 2), lp.slice(0, 0, 2), 1, KdOptions{}); }, {"rows"});
  expect_error([&] { kd_loss_sparse(hs, ws, at::zeros({3, 7}, at::kLong), at::zeros({3, 7}), 1, KdOptions{}); },
               {"k (7", "[1, vocabulary size 6]"});
  expect_error([&] { kd_loss_sparse(hs, ws, lp, lp, 1, KdOptions{}); }, {"ids must be integers"});
  expect_error([&] { kd_loss_sparse(hs, ws, ids, at::zeros({3, 3}), 1, KdOptions{}); }, {"(N, k)"});
}

// ---- the cache ----------------------------------------------------------------------------------------------

std::string tiny_teacher() { return std::string(ANVIL_TEST_DATA_DIR) + "/../../examples/tiny/base"; }

std::string temp_dir(const std::string& name) {
  const std::string d = "/tmp/anvil_test_cache_" + name + "_" + std::to_string(::getpid());
  io::remove_tree(d);
  return d;
}

// Random documents (ids below the vocabulary), one repeated, one longer than seq_len, one with no target.
std::vector<data::Example> documents(int64_t vocab, int64_t seq_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<data::Example> docs;
  for (int i = 0; i < 23; ++i) {
    const int64_t n = i == 5 ? seq_len + 9 : i == 7 ? 1 : 2 + int64_t(rng() % uint64_t(seq_len - 2));
    data::Example ex;
    for (int64_t t = 0; t < n; ++t) ex.ids.push_back(int32_t(rng() % uint64_t(vocab))), ex.target.push_back(rng() % 4 != 0);
    docs.push_back(ex);
  }
  docs.push_back(docs[3]);
  return docs;
}

struct Fixture {
  std::shared_ptr<model::CausalLM> model = model::load_causal_lm(tiny_teacher(), at::kFloat, at::kCPU, "dense");
  Teacher teacher = freeze_teacher(model, at::kCPU);
  int64_t vocab = model->config().vocab_size, seq_len = 24;
  std::vector<data::Example> docs = documents(vocab, seq_len, 7);
  nlohmann::json fingerprint = {{"teacher", teacher_fingerprint(tiny_teacher(), "float32", "dense")},
                                {"tokenizer", tokenizer_fingerprint(tiny_teacher())},
                                {"data", {{"documents", "abc"}}}};
  CacheOptions opts(const std::string& dir) const {
    CacheOptions o;
    o.dir = dir, o.k = 8, o.dtype = at::kFloat, o.shard_tokens = 3 * seq_len, o.batch_size = 2, o.chunk = 5;
    return o;
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

std::string read_all(const std::string& path) { return io::read_text_file(path, uint64_t(1) << 32); }

TEST(TeacherCache, HoldsTheTeachersTopKForAnyEpochsBatches) {
  auto& f = fixture();
  const auto dir = temp_dir("roundtrip");
  const auto o = f.opts(dir);
  TeacherCacheWriter w(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab);
  EXPECT_GE(w.missing_shards(), 3);
  const auto st = w.write(f.teacher, at::kCPU);
  EXPECT_EQ(st.written, st.shards);
  EXPECT_EQ(w.missing_shards(), 0);
  TeacherCache cache(o, f.fingerprint);
  EXPECT_EQ(cache.k(), 8);
  EXPECT_EQ(cache.vocab_size(), f.vocab);
  data::BatchStream stream(f.docs, f.seq_len, 0, 3, /*seed=*/5);
  stream.seek(2, 0);  // another epoch's order: the rows pack the documents differently from the writer's pass
  at::NoGradGuard no_grad;
  for (int i = 0; i < 4; ++i) {
    const auto b = stream.next();
    const auto [ids, lps] = cache.lookup(b, at::kCPU);  // (T, k)
    ASSERT_EQ(ids.size(0), b.targets);
    const auto all = batch_to_device(b, at::kCPU);
    auto h = f.model->hidden_states(all[0], nullptr, all[1], b.packed ? c10::optional<at::Tensor>(all[2]) : c10::nullopt);
    h = h.reshape({-1, h.size(-1)}).index_select(0, target_rows(all[3]));
    const auto lt = at::log_softmax(at::linear(h, f.teacher.head), 1);  // (T, V)
    const auto [want, want_ids] = at::topk(lt, 8, 1);
    EXPECT_TRUE(at::allclose(lps, want, 1e-5, 1e-5)) << (lps - want).abs().max().item<double>();
    // The cached ids carry the teacher's log-probs (ties may order differently).
    EXPECT_TRUE(at::allclose(lt.gather(1, ids), lps, 1e-5, 1e-5));
  }
  io::remove_tree(dir);
}

TEST(TeacherCache, InterruptedWriteResumesBitExact) {
  auto& f = fixture();
  const auto a = temp_dir("whole"), b = temp_dir("resumed");
  TeacherCacheWriter(f.opts(a), f.fingerprint, f.docs, f.seq_len, 0, f.vocab).write(f.teacher, at::kCPU);
  // The writer "killed" after its second shard: the later shards never reached the manifest (one left as the
  // stale temporary file a kill leaves); a new writer writes exactly those.
  {
    TeacherCacheWriter w(f.opts(b), f.fingerprint, f.docs, f.seq_len, 0, f.vocab);
    w.write(f.teacher, at::kCPU);
    auto m = nlohmann::json::parse(read_all(b + "/manifest.json"));
    for (size_t i = 2; i < m["shards"].size(); ++i) {
      io::remove_tree(b + "/" + m["shards"][i]["file"].get<std::string>());
      m["shards"][i]["complete"] = false, m["shards"][i]["bytes"] = 0, m["shards"][i]["checksum"] = "";
    }
    io::write_text_atomically(b + "/manifest.json", m.dump(2) + "\n");
    io::write_text_atomically(b + "/.shard-00002.safetensors.tmp.1.1", "partial");
  }
  TeacherCacheWriter w(f.opts(b), f.fingerprint, f.docs, f.seq_len, 0, f.vocab);
  const int64_t missing = w.missing_shards();
  EXPECT_GT(missing, 0);
  const auto st = w.write(f.teacher, at::kCPU);
  EXPECT_EQ(st.written, missing);
  EXPECT_EQ(st.skipped, 2);
  EXPECT_EQ(read_all(a + "/manifest.json"), read_all(b + "/manifest.json"));
  const auto m = nlohmann::json::parse(read_all(a + "/manifest.json"));
  for (const auto& s : m["shards"]) {
    const auto name = s["file"].get<std::string>();
    EXPECT_EQ(read_all(a + "/" + name), read_all(b + "/" + name)) << name;
  }
  io::remove_tree(a), io::remove_tree(b);
}

TEST(TeacherCache, OnPolicyRoundIsScoredByTheTeacherAndReplacesItsDocuments) {
  auto& f = fixture();
  const auto dir = temp_dir("round");
  const auto o = f.opts(dir);
  TeacherCacheWriter w(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab);
  w.write(f.teacher, at::kCPU);
  const nlohmann::json student = {{"kind", "model"}, {"source", "here"}, {"weights", "1"}};
  RefreshOptions r;
  r.lambda = 0.6, r.batch_size = 3;
  r.generate.max_new_tokens = 4, r.generate.temperature = 1.0, r.generate.seed = 3;
  const int64_t train_docs = int64_t(f.docs.size()) - 4;  // the last four: "validation", never regenerated
  const auto st = w.write_rollouts(*f.model, student, r, train_docs);
  EXPECT_EQ(st.round, 1);
  EXPECT_GT(st.documents, 2);
  EXPECT_EQ(st.written, st.shards);
  EXPECT_EQ(w.unscored_rollouts(), st.shards);
  // Unscored: a training reader refuses the round; the teacher pass scores it.
  auto reading = o;
  reading.on_policy_rows = true;
  try {
    TeacherCache c(reading, f.fingerprint);
    ADD_FAILURE() << "expected the unscored round to be refused";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("awaits the teacher"), std::string::npos) << e.what();
  }
  EXPECT_EQ(w.write(f.teacher, at::kCPU).scored, st.shards);
  EXPECT_EQ(w.unscored_rollouts(), 0);
  // The same student and settings again: nothing to write. Another student opens round 2.
  EXPECT_TRUE(w.write_rollouts(*f.model, student, r, train_docs).up_to_date);
  TeacherCache cache(reading, f.fingerprint);
  EXPECT_EQ(cache.on_policy_round(), 1);
  EXPECT_EQ(cache.on_policy_documents(), st.documents);
  EXPECT_EQ(TeacherCache(o, f.fingerprint).on_policy_round(), 0);  // not asked for: not read
  data::BatchStream stream(f.docs, f.seq_len, 0, 3, /*seed=*/5);
  at::NoGradGuard no_grad;
  int64_t replaced = 0;
  for (int i = 0; i < 6; ++i) {
    const auto b = stream.next();
    const auto rows = cache.on_policy_rows(b, at::kCPU);
    // The other documents come from the base cache, the regenerated ones from the round.
    EXPECT_EQ(cache.lookup(b, at::kCPU, /*skip_on_policy=*/true).first.size(0) + rows.replaced_targets, b.targets);
    if (rows.prompts.empty()) continue;
    replaced += int64_t(rows.prompts.size());
    // The round's rows are the teacher's top k over the student's generated tokens.
    const auto gen = data::completion_batch(rows.prompts, rows.completions, 0);
    const auto all = batch_to_device(gen, at::kCPU);
    auto h = f.model->hidden_states(all[0], nullptr, all[1]);
    h = h.reshape({-1, h.size(-1)}).index_select(0, target_rows(all[3]));
    const auto lt = at::log_softmax(at::linear(h, f.teacher.head), 1);  // (T_gen, V)
    ASSERT_EQ(rows.ids.size(0), lt.size(0));
    EXPECT_TRUE(at::allclose(rows.logprobs, std::get<0>(at::topk(lt, 8, 1)), 1e-5, 1e-5));
    EXPECT_TRUE(at::allclose(lt.gather(1, rows.ids), rows.logprobs, 1e-5, 1e-5));
    // The loss: KD alone on them, and the "on_policy" term their share of the step.
    KdOptions kd;
    const auto l = kd_cache_loss_fn(*f.model, cache, kd, 0.5, 64, at::kCPU)(b, double(b.targets));
    EXPECT_TRUE(std::isfinite(l.value.item<double>()));
    ASSERT_EQ(l.terms.size(), 3u);
    EXPECT_EQ(l.terms[2].first, "on_policy");
    // The term is a float32 tensor: its share is exact to float32's precision, not double's.
    EXPECT_NEAR(l.terms[2].second.item<double>(), double(rows.replaced_targets) / double(b.targets), 1e-6);
  }
  EXPECT_GT(replaced, 0);
  // An unfinished round 2 (another student) cannot be finished by a third one.
  {
    auto m = nlohmann::json::parse(read_all(dir + "/manifest.json"));
    auto round2 = m["rounds"][0];
    round2["round"] = 2, round2["student"]["weights"] = "2";
    for (auto& sh : round2["shards"]) sh["rollout"]["complete"] = false, sh["scores"]["complete"] = false;
    m["rounds"].push_back(round2);
    io::write_text_atomically(dir + "/manifest.json", m.dump(2) + "\n");
  }
  TeacherCacheWriter w2(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab);
  auto third = student;
  third["weights"] = "3";
  try {
    w2.write_rollouts(*f.model, third, r, train_docs);
    ADD_FAILURE() << "expected another student to be refused";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("config key on_policy.refresh_from"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("unfinished"), std::string::npos) << e.what();
  }
  io::remove_tree(dir);
}

TEST(TeacherCache, AnotherTeacherTokenizerDataOrKIsRefused) {
  auto& f = fixture();
  const auto dir = temp_dir("fingerprint");
  TeacherCacheWriter(f.opts(dir), f.fingerprint, f.docs, f.seq_len, 0, f.vocab).write(f.teacher, at::kCPU);
  auto other = [&](const char* part, const char* key, const char* value) {
    auto fp = f.fingerprint;
    fp[part][key] = value;
    return fp;
  };
  const auto open_writer = [&](const nlohmann::json& fp) { TeacherCacheWriter(f.opts(dir), fp, f.docs, f.seq_len, 0, f.vocab); };
  const auto open_reader = [&](const nlohmann::json& fp) { TeacherCache(f.opts(dir), fp); };
  for (const auto& open : {std::function<void(const nlohmann::json&)>(open_writer),
                           std::function<void(const nlohmann::json&)>(open_reader)}) {
    expect_error([&] { open(other("teacher", "config.json", "0123")); },
                 {"teacher.cache", dir, "another teacher", "teacher.config.json", "0123"});
    expect_error([&] { open(other("teacher", "dtype", "bfloat16")); }, {"another teacher", "teacher.dtype"});
    expect_error([&] { open(other("tokenizer", "tokenizer.json", "ffff")); }, {"another tokenizer", "tokenizer.json"});
    expect_error([&] { open(other("data", "documents", "abd")); }, {"another data", "data.documents"});
  }
  auto o = f.opts(dir);
  o.k = 4;
  expect_error([&] { TeacherCache(o, f.fingerprint); }, {"teacher.cache_k", "8 in the cache, 4 now"});
  o = f.opts(dir);
  o.k = f.vocab + 1;
  expect_error([&] { TeacherCacheWriter(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab); }, {"teacher.cache_k", "[1, "});
  io::remove_tree(dir);
}

void overwrite_byte(const std::string& path, uint64_t offset) {
  auto bytes = read_all(path);
  bytes[offset] = char(bytes[offset] ^ 0x5a);
  io::write_text_atomically(path, bytes);
}

TEST(TeacherCache, CorruptedShardsAreErrorsNamingTheFile) {
  auto& f = fixture();
  const auto dir = temp_dir("corrupt");
  const auto o = f.opts(dir);
  TeacherCacheWriter(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab).write(f.teacher, at::kCPU);
  const auto shard = dir + "/shard-00001.safetensors";
  const auto good = read_all(shard);
  // Truncated.
  io::write_text_atomically(shard, good.substr(0, good.size() - 7));
  expect_error([&] { TeacherCache(o, f.fingerprint); }, {shard, "truncated"});
  expect_error([&] { TeacherCacheWriter(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab); }, {shard, "truncated"});
  // A byte of the header, then of the data.
  for (const uint64_t at_byte : {uint64_t(12), uint64_t(good.size() - 3)}) {
    io::write_text_atomically(shard, good);
    overwrite_byte(shard, at_byte);
    expect_error([&] { TeacherCache(o, f.fingerprint); }, {shard, "checksum mismatch"});
  }
  // Missing.
  io::remove_tree(shard);
  expect_error([&] { TeacherCache(o, f.fingerprint); }, {shard, "missing"});
  // A manifest that is no JSON.
  io::write_text_atomically(shard, good);
  io::write_text_atomically(dir + "/manifest.json", "{\"format\": ");
  expect_error([&] { TeacherCache(o, f.fingerprint); }, {dir + "/manifest.json", "not valid JSON"});
  io::remove_tree(dir);
}

TEST(TeacherCache, SegmentsKeyDocumentsWhereverTheyArePacked) {
  // The same documents in two orders: every document's key is the same in both packings.
  auto docs = documents(50, 16, 3);
  const auto a = data::pack_examples(docs, 16, 0);
  std::reverse(docs.begin(), docs.end());
  const auto b = data::pack_examples(docs, 16, 0);
  auto keys = [](const data::PackedRows& p) {
    std::multiset<uint64_t> k;
    for (const auto& s : packed_segments(p.rows, p.row_length, p.ids, p.labels, p.doc_ids)) k.insert(s.key);
    return k;
  };
  EXPECT_EQ(keys(a), keys(b));
  EXPECT_EQ(keys(a).size(), docs.size());
}


// ---- what fuzz_teacher_cache found, and its seeds --------------------------------------------------------------

// A cache written for the test's own documents, its manifest as JSON; `edit` rewrites it.
struct SmallCache {
  std::string dir;
  CacheOptions o;
  SmallCache(const std::string& name, at::ScalarType dtype = at::kFloat) : dir(temp_dir(name)) {
    auto& f = fixture();
    o = f.opts(dir);
    o.dtype = dtype;
    TeacherCacheWriter(o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab).write(f.teacher, at::kCPU);
  }
  ~SmallCache() { io::remove_tree(dir); }
  nlohmann::json manifest() const { return nlohmann::json::parse(read_all(dir + "/manifest.json")); }
  void write_manifest(const nlohmann::json& m) const { io::write_text_atomically(dir + "/manifest.json", m.dump()); }
  // Shard 0's tensors changed by `change`, rewritten with its true size and checksum in the manifest: only the
  // values are wrong.
  void rewrite_shard(const std::function<void(at::Tensor& ids, at::Tensor& lps)>& change) const {
    const auto path = dir + "/shard-00000.safetensors";
    at::Tensor keys, offsets, ids, lps;
    std::map<std::string, std::string> meta;
    {
      io::SafetensorsFile file(path);
      keys = file.tensor("keys").clone(), offsets = file.tensor("offsets").clone();
      ids = file.tensor("ids").clone(), lps = file.tensor("logprobs").clone();
      meta = file.metadata();
    }
    change(ids, lps);
    io::save_safetensors(path, {{"keys", keys}, {"offsets", offsets}, {"ids", ids}, {"logprobs", lps}}, meta);
    auto m = manifest();
    m["shards"][0]["bytes"] = read_all(path).size();
    m["shards"][0]["checksum"] = hash_file(path);
    write_manifest(m);
  }
};

TEST(TeacherCache, ManifestFieldsOfAnotherTypeAreNamed) {
  // Found by fuzz_teacher_cache: a manifest field of another JSON type ("k": "8", "complete": 1, "file": 5) escaped
  // as nlohmann::json::type_error from deep inside the reader, naming neither the file nor the key; a "file" with a
  // '/' made the reader open a file outside the cache directory.
  auto& f = fixture();
  SmallCache c("manifest_types");
  const auto path = c.dir + "/manifest.json";
  const auto good = c.manifest();
  struct Case {
    std::function<void(nlohmann::json&)> edit;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {[](nlohmann::json& m) { m["format"] = 3; }, {path, "not an anvil teacher cache manifest"}},
      {[](nlohmann::json& m) { m["version"] = "1"; }, {path, "version \"1\""}},
      {[](nlohmann::json& m) { m["k"] = "8"; }, {path, "k must be an integer >= 1", "\"8\""}},
      {[](nlohmann::json& m) { m["k"] = 0; }, {path, "k must be an integer >= 1"}},
      {[](nlohmann::json& m) { m["vocab_size"] = 3; }, {path, "vocab_size must be an integer >= 8"}},
      {[](nlohmann::json& m) { m.erase("rows_per_shard"); }, {path, "rows_per_shard must be an integer"}},
      {[](nlohmann::json& m) { m["temperature"] = "hot"; }, {path, "temperature must be a number > 0"}},
      {[](nlohmann::json& m) { m["shards"][1] = 7; }, {path, "shards[1] must be an object"}},
      {[](nlohmann::json& m) { m["shards"][0]["file"] = 5; }, {path, "shards[0].file must be a file name"}},
      {[](nlohmann::json& m) { m["shards"][0]["file"] = "../manifest.json"; }, {path, "shards[0].file", "no '/'"}},
      {[](nlohmann::json& m) { m["shards"][2]["complete"] = 1; }, {path, "shards[2].complete must be true or false"}},
      {[](nlohmann::json& m) { m["shards"][0]["bytes"] = "12"; }, {path, "shards[0].bytes must be an integer >= 0"}},
      {[](nlohmann::json& m) { m["shards"][0]["bytes"] = -5; }, {path, "shards[0].bytes must be an integer >= 0"}},
      {[](nlohmann::json& m) { m["shards"][0]["checksum"] = nullptr; }, {path, "shards[0].checksum must be a string"}},
      {[](nlohmann::json& m) { m["shards"][0]["packed_rows"] = {3, 1}; }, {path, "shards[0].packed_rows"}},
  };
  for (const auto& k : cases) {
    auto m = good;
    k.edit(m);
    c.write_manifest(m);
    expect_error([&] { TeacherCache(c.o, nlohmann::json()); }, k.words);
    // The writer resuming reads the manifest through the same rules.
    expect_error([&] { TeacherCacheWriter(c.o, f.fingerprint, f.docs, f.seq_len, 0, f.vocab); }, k.words);
  }
  c.write_manifest(good);
  EXPECT_NO_THROW(TeacherCache(c.o, f.fingerprint));
}

TEST(TeacherCache, ShardValuesTheLossCannotTakeAreRefused) {
  // Found by fuzz_teacher_cache: a shard whose checksum matches (a cache written by another tool, or edited) could
  // hold ids outside the vocabulary (kd_loss_sparse gathers the student's logits at them: an index error on the
  // CPU, a device assert on a GPU), a repeated id in a row or a NaN / positive log-prob (a silently wrong loss).
  auto& f = fixture();
  const auto vocab = f.vocab;
  struct Case {
    at::ScalarType dtype;
    std::function<void(at::Tensor&, at::Tensor&)> change;
    std::vector<std::string> words;
  };
  const std::vector<Case> cases = {
      {at::kFloat, [&](at::Tensor& ids, at::Tensor&) { ids[1][2] = int32_t(vocab); }, {"ids must lie in [0, vocab_size"}},
      {at::kFloat, [](at::Tensor& ids, at::Tensor&) { ids[0][3] = -1; }, {"ids must lie in [0, vocab_size", "-1"}},
      {at::kFloat, [](at::Tensor& ids, at::Tensor&) { ids[2][5] = ids[2][1].item<int32_t>(); }, {"holds one id twice"}},
      {at::kHalf, [](at::Tensor&, at::Tensor& lps) { lps[0][0] = NAN; }, {"logprobs must be log-probabilities"}},
      {at::kBFloat16, [](at::Tensor&, at::Tensor& lps) { lps[3][7] = 0.5; }, {"logprobs must be log-probabilities"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SmallCache c("values_" + std::to_string(i), cases[i].dtype);
    c.rewrite_shard(cases[i].change);
    auto words = cases[i].words;
    words.push_back(c.dir + "/shard-00000.safetensors");
    expect_error([&] { TeacherCache(c.o, f.fingerprint); }, words);
  }
  // -inf (a probability that rounded to 0 in the storage dtype) is a log-probability.
  SmallCache c("values_inf", at::kHalf);
  c.rewrite_shard([](at::Tensor&, at::Tensor& lps) { lps[0][7] = -INFINITY; });
  EXPECT_NO_THROW(TeacherCache(c.o, f.fingerprint));
}

// The seeds of fuzz_teacher_cache (tests/fuzz/corpus_teacher_cache): caches the writer wrote for the harness's
// documents with the tiny teacher. ANVIL_WRITE_FUZZ_SEEDS=1 rewrites them; every run checks that each opens as the
// harness opens it and holds every document the harness looks up.
TEST(TeacherCacheFuzzSeeds, AreCachesHoldingTheHarnesssDocuments) {
  auto& f = fixture();
  const std::string corpus = std::string(ANVIL_TEST_DATA_DIR) + "/../fuzz/corpus_teacher_cache";
  struct Seed {
    std::string name;
    uint8_t flags;
    int64_t k, shard_tokens;
    at::ScalarType dtype;
    double temperature;
  };
  const std::vector<Seed> seeds = {
      {"f32_k4_three_shards", fuzz::kFixChecksums | fuzz::kCheckFingerprint, 4, 2 * fuzz::kSeqLen, at::kFloat, 1.0},
      {"f16_k1_one_shard", fuzz::kFixChecksums, 1, 64, at::kHalf, 1.0},
      {"bf16_k8_t2_exact", 0, 8, 3 * fuzz::kSeqLen, at::kBFloat16, 2.0},
  };
  const auto docs = fuzz::documents();
  const auto rows = data::pack_examples(docs, fuzz::kSeqLen, 0);
  const auto shard = [](const std::string& dir, size_t i) {
    char name[40];
    std::snprintf(name, sizeof name, "/shard-%05zu.safetensors", i);
    return dir + name;
  };
  for (const auto& s : seeds) {
    const auto path = corpus + "/" + s.name;
    CacheOptions o;
    o.k = s.k, o.shard_tokens = s.shard_tokens, o.dtype = s.dtype, o.temperature = s.temperature;
    o.batch_size = 2, o.chunk = 3;
    if (std::getenv("ANVIL_WRITE_FUZZ_SEEDS")) {
      o.dir = temp_dir("seed_" + s.name);
      TeacherCacheWriter(o, fuzz::fingerprint(), docs, fuzz::kSeqLen, 0, f.vocab).write(f.teacher, at::kCPU);
      std::vector<std::string> files = {read_all(o.dir + "/manifest.json")};
      for (size_t i = 0; io::path_exists(shard(o.dir, i)); ++i) files.push_back(read_all(shard(o.dir, i)));
      io::remove_tree(o.dir);
      io::make_directories(corpus);
      io::write_text_atomically(path, fuzz::join_files(s.flags, files));
    }
    ASSERT_TRUE(io::path_exists(path)) << path << " is missing: ANVIL_WRITE_FUZZ_SEEDS=1 writes it";
    const auto input = read_all(path);
    ASSERT_EQ(uint8_t(input[0]), s.flags) << path;
    const auto files = fuzz::split_files(input.substr(1));
    ASSERT_GE(files.size(), 2u) << path;
    o.dir = temp_dir("seed_open");
    io::make_directories(o.dir);
    io::write_text_atomically(o.dir + "/manifest.json", files[0]);
    for (size_t i = 1; i < files.size(); ++i)
      io::write_text_atomically(shard(o.dir, i - 1), files[i]);
    TeacherCache cache(o, s.flags & fuzz::kCheckFingerprint ? fuzz::fingerprint() : nlohmann::json());
    EXPECT_EQ(cache.k(), s.k) << path;
    for (int64_t r = 0; r < rows.rows; ++r) {
      const auto b = data::slice_rows(rows, r, r + 1);
      const auto [ids, lps] = cache.lookup(b, at::kCPU);  // (T, k)
      EXPECT_EQ(ids.size(0), b.targets) << path << " row " << r;
    }
    EXPECT_LT(input.size(), 16384u) << path << ": over scripts/fuzz.sh's -max_len";
    io::remove_tree(o.dir);
  }
}

}  // namespace
}  // namespace anvil::train
