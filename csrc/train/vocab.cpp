// Teacher and student vocabularies (include/anvil/train/vocab.h).
#include "anvil/train/vocab.h"

#include <algorithm>
#include <stdexcept>
#include <unordered_map>

namespace anvil::train {

namespace {

std::string quoted_token(const data::Tokenizer& t, int64_t id) {
  if (id >= t.vocab_size()) return "(none: " + std::to_string(t.vocab_size()) + " ids)";
  return "\"" + t.id_to_token(int32_t(id)) + "\"";
}

[[noreturn]] void vocab_error(const VocabSide& student, const std::string& rule) {
  throw std::invalid_argument("config key " + student.key + ": " + rule);
}

}  // namespace

int64_t first_differing_token(const data::Tokenizer& a, const data::Tokenizer& b) {
  const int64_t n = std::min(a.vocab_size(), b.vocab_size());
  for (int64_t i = 0; i < n; ++i)
    if (a.id_to_token(int32_t(i)) != b.id_to_token(int32_t(i))) return i;
  return a.vocab_size() == b.vocab_size() ? -1 : n;
}

VocabPlan plan_vocabularies(const VocabSide& teacher, const VocabSide& student) {
  VocabPlan p;
  p.teacher_rows = teacher.rows, p.student_rows = student.rows;
  const std::string sizes = "the teacher (" + teacher.folder + ") has vocab_size " + std::to_string(teacher.rows) +
                            ", the student (" + student.folder + ") " + std::to_string(student.rows);
  if (teacher.tokenizer && student.tokenizer) {
    const int64_t d = first_differing_token(*teacher.tokenizer, *student.tokenizer);
    if (d >= 0)
      vocab_error(student, "the student's tokenizer (" + student.folder + ", " +
                               std::to_string(student.tokenizer->vocab_size()) + " ids) is not the teacher's (" +
                               teacher.folder + ", " + std::to_string(teacher.tokenizer->vocab_size()) +
                               " ids): id " + std::to_string(d) + " is " + quoted_token(*teacher.tokenizer, d) +
                               " in the teacher's and " + quoted_token(*student.tokenizer, d) +
                               " in the student's. Distillation compares distributions over the same token ids; "
                               "for a student with its own tokenizer set distill.vocab \"cross-tokenizer\" (experimental: TRL GOLD's "
                               "ULD, which aligns the two tokenizations by their bytes)");
  }
  const data::Tokenizer* tok = teacher.tokenizer ? teacher.tokenizer : student.tokenizer;
  const std::string tok_folder = teacher.tokenizer ? teacher.folder : student.folder;
  const int64_t ids = tok ? tok->vocab_size() : -1;
  if (teacher.rows == student.rows && (ids < 0 || ids >= teacher.rows)) {
    p.mapping = VocabMapping::kSame, p.compared = teacher.rows;
    p.line = "vocabulary: same, " + std::to_string(p.compared) + " rows in both models" +
             (tok ? ", one tokenizer (" + std::to_string(ids) + " ids)" : " (no tokenizer: pre-tokenized data)");
    return p;
  }
  if (ids < 0)
    vocab_error(student, sizes + ", and neither folder has a tokenizer to say which rows are real tokens; vocabularies "
                "that differ only in padded rows need the tokenizer (its size is the shared real vocabulary)");
  if (ids > student.rows || ids > teacher.rows) {
    const bool s = ids > student.rows;
    vocab_error(student, sizes + ", but the tokenizer (" + tok_folder + ") has " + std::to_string(ids) +
                             " ids: ids " + std::to_string(s ? student.rows : teacher.rows) + ".." + std::to_string(ids - 1) +
                             " have no row in the " + (s ? "student" : "teacher") +
                             "'s head, so the vocabularies differ in real tokens, not in padding");
  }
  p.mapping = VocabMapping::kPadded, p.compared = ids;
  p.line = "vocabulary: padded, compared over the tokenizer's " + std::to_string(ids) + " real tokens (" + tok_folder +
           "); the teacher's " + std::to_string(teacher.rows - ids) + " and the student's " +
           std::to_string(student.rows - ids) + " padded rows left out of the divergence (both softmaxes renormalised "
           "over the real tokens; the student's cross-entropy keeps all its " + std::to_string(student.rows) + " rows)";
  return p;
}

SharedTokens shared_tokens(const data::Tokenizer& teacher, const data::Tokenizer& student) {
  std::unordered_map<std::string, int64_t> sid;
  for (int64_t i = 0; i < student.vocab_size(); ++i) sid.emplace(student.id_to_token(int32_t(i)), i);
  std::vector<int64_t> t, s;
  for (int64_t i = 0; i < teacher.vocab_size(); ++i) {
    const auto it = sid.find(teacher.id_to_token(int32_t(i)));
    if (it == sid.end()) continue;
    t.push_back(i), s.push_back(it->second);
  }
  return {at::tensor(t, at::kLong), at::tensor(s, at::kLong)};
}

std::pair<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>> align_by_byte_offsets(
    const std::vector<std::pair<int64_t, int64_t>>& so, const std::vector<std::pair<int64_t, int64_t>>& to) {
  std::vector<std::vector<int64_t>> sg, tg;
  const int64_t ns = int64_t(so.size()), nt = int64_t(to.size());
  int64_t s0 = 0, t0 = 0, s = 0, t = 0;
  auto range = [](int64_t a, int64_t b) {
    std::vector<int64_t> r;
    for (int64_t i = a; i < b; ++i) r.push_back(i);
    return r;
  };
  // Advance the side whose token ends first; a group closes where both end on the same byte.
  while (s < ns && t < nt) {
    const int64_t se = so[size_t(s)].second, te = to[size_t(t)].second;
    if (se < te) {
      ++s;
    } else if (se > te) {
      ++t;
    } else {
      ++s, ++t;
      sg.push_back(range(s0, s)), tg.push_back(range(t0, t));
      s0 = s, t0 = t;
    }
  }
  if (s < ns || t < nt) sg.push_back(range(s0, ns)), tg.push_back(range(t0, nt));
  return {sg, tg};
}

at::Tensor merge_aligned_probabilities(const at::Tensor& probs, const std::vector<std::vector<int64_t>>& groups,
                                       const std::vector<int64_t>& token_ids, const std::string& strategy) {
  TORCH_CHECK(probs.dim() == 2, "merge_aligned_probabilities: probs must be (S, V), got ", probs.sizes());
  if (strategy != "observed" && strategy != "bayesian")
    throw std::invalid_argument("merge_aligned_probabilities: strategy must be \"observed\" or \"bayesian\", got \"" +
                                strategy + "\"");
  if (groups.empty()) return probs;
  const bool bayesian = strategy == "bayesian";
  std::vector<at::Tensor> rows;  // (V) each
  for (const auto& g : groups) {
    for (const auto i : g)
      TORCH_CHECK(i >= 0 && i < probs.size(0), "merge_aligned_probabilities: position ", i, " outside the ",
                  probs.size(0), " rows");
    if (g.empty()) {
      rows.push_back(at::zeros({probs.size(1)}, probs.options()));
      continue;
    }
    const at::Tensor base = probs[bayesian ? g.back() : g.front()];  // (V) the distribution the group keeps
    at::Tensor product;  // () the scalar probabilities of the group's other tokens as they occurred (chain rule)
    for (size_t j = bayesian ? 0 : 1; j < (bayesian ? g.size() - 1 : g.size()); ++j) {
      const int64_t pos = g[j];
      TORCH_CHECK(pos < int64_t(token_ids.size()) && token_ids[size_t(pos)] >= 0 &&
                      token_ids[size_t(pos)] < probs.size(1),
                  "merge_aligned_probabilities: a token id for position ", pos, " in [0, ", probs.size(1),
                  ") is needed to merge a group of ", g.size());
      const auto p = probs[pos][token_ids[size_t(pos)]].clamp_min(1e-8);
      product = product.defined() ? product * p : p;  // TRL's order: the product first, then the row times it
    }
    rows.push_back(product.defined() ? base * product : base);
  }
  return at::stack(rows);  // (groups, V)
}

}  // namespace anvil::train
