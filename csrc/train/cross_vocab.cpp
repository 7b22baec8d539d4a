// Cross-tokenizer distillation, TRL GOLD's extended ULD (include/anvil/train/cross_vocab.h).
#include "anvil/train/cross_vocab.h"

#include "anvil/data/dataset.h"
#include "anvil/train/loss.h"
#include "anvil/train/setup.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <stdexcept>

namespace anvil::train {

namespace {

[[noreturn]] void line_error(const std::string& what, const std::string& where, const std::string& rule) {
  throw std::runtime_error(what + ": " + where + ": " + rule);
}

// The student's ids as a packed row holds them (cut to the row), as bytes: the lookup key.
std::string ids_key(const int32_t* ids, int64_t n) {
  return std::string(reinterpret_cast<const char*>(ids), size_t(n) * sizeof(int32_t));
}

// GOLD's _get_start_and_size_answers over a side's first n tokens: the first target and the number of targets.
std::pair<int64_t, int64_t> answer_span(const CrossSide& s, int64_t n) {
  int64_t start = -1, size = 0;
  for (int64_t k = 0; k < n; ++k)
    if (s.target[size_t(k)]) {
      if (start < 0) start = k;
      ++size;
    }
  return {std::max<int64_t>(start, 0), size};
}

template <typename T>
std::vector<T> slice(const std::vector<T>& v, int64_t begin, int64_t n) {
  return std::vector<T>(v.begin() + begin, v.begin() + begin + n);
}

// A side cut to its first n tokens.
CrossSide cut(const CrossSide& s, int64_t n) {
  return {slice(s.ids, 0, n), slice(s.target, 0, n), slice(s.offsets, 0, n)};
}

}  // namespace

namespace {

// A line as a JSON object, or the error naming it.
nlohmann::json parse_line(const std::string& json_line, const std::string& what, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_line);
  } catch (const nlohmann::json::exception& e) {
    line_error(what, where, std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) line_error(what, where, "a line must be a JSON object");
  return j;
}

// cross_side of a parsed line (add_line parses once for both tokenizers).
CrossSide side_of(const nlohmann::json& j, const data::Tokenizer& tok, const data::ReadOptions& o,
                  const std::string& what, const std::string& where) {
  const std::string needs = " (distill.vocab \"cross-tokenizer\" tokenizes each document's text with both "
                            "tokenizers: it reads \"text\" and \"prompt\"/\"completion\" lines)";
  if (j.contains("input_ids")) line_error(what, where, "a pre-tokenized line has no text for the other tokenizer" + needs);
  if (j.contains("messages"))
    line_error(what, where, "chat lines (\"messages\") are not yet supported across tokenizers: each side would render "
               "its own chat template, and their texts differ" + needs);
  auto text_of = [&](const char* key) {
    if (!j.at(key).is_string()) line_error(what, where, std::string("\"") + key + "\" must be a string");
    return j.at(key).get<std::string>();
  };
  CrossSide s;
  // One byte coordinate for both tokenizers: the text, or the prompt then the completion.
  auto add = [&](const std::string& text, bool special, bool target, int64_t base) {
    const auto e = data::encode_with_offsets(tok, text, special, what + ": " + where);
    for (size_t i = 0; i < e.ids.size(); ++i) {
      s.ids.push_back(e.ids[i]);
      s.target.push_back(target ? 1 : 0);
      s.offsets.emplace_back(e.offsets[i].first + base, e.offsets[i].second + base);
    }
  };
  int64_t end = 0;
  if (j.contains("text")) {
    const auto t = text_of("text");
    add(t, true, true, 0);
    end = int64_t(t.size());
  } else if (j.contains("prompt") && j.contains("completion")) {
    const auto p = text_of("prompt"), c = text_of("completion");
    add(p, true, o.loss_on == data::LossOn::kAll, 0);
    add(c, false, true, int64_t(p.size()));
    end = int64_t(p.size() + c.size());
  } else {
    line_error(what, where, "a line needs \"text\" or \"prompt\" + \"completion\"" + needs);
  }
  if (o.add_eos) {  // as tokenize_example: the eos a target, an empty span at the text's end (GOLD's)
    if (tok.eos_id() < 0) line_error(what, where, "add_eos is set but the tokenizer has no eos token");
    s.ids.push_back(tok.eos_id()), s.target.push_back(1), s.offsets.emplace_back(end, end);
  }
  return s;
}

}  // namespace

CrossSide cross_side(const std::string& json_line, const data::Tokenizer& tok, const data::ReadOptions& o,
                     const std::string& what, const std::string& where) {
  return side_of(parse_line(json_line, what, where), tok, o, what, where);
}

CrossDocuments::CrossDocuments(const data::Tokenizer& student, const data::Tokenizer& teacher,
                               const data::ReadOptions& options, int64_t seq_len)
    : student_(student), teacher_(teacher), options_(options), seq_len_(seq_len) {
  teacher_pad_ = teacher.pad_id() >= 0 ? teacher.pad_id() : teacher.eos_id() >= 0 ? teacher.eos_id() : 0;
}

void CrossDocuments::add_line(const std::string& line, const std::string& what, const std::string& where) {
  const auto j = parse_line(line, what, where);
  CrossDocument d;
  d.student = side_of(j, student_, options_, what, where);
  d.teacher = side_of(j, teacher_, options_, what, where);
  // The student's batches come from data::tokenize_example: the lookup needs its very ids.
  const auto e = data::tokenize_example(line, student_, options_, where);
  if (e.ids != d.student.ids)
    throw std::logic_error(where + ": the cross-tokenizer document's student ids differ from tokenize_example's");
  const int64_t n = std::min<int64_t>(int64_t(d.student.ids.size()), seq_len_);
  docs_.emplace(ids_key(d.student.ids.data(), n), std::move(d));  // equal ids: equal text, one entry serves both
}

void CrossDocuments::add_file(const std::string& path, const std::string& what) {
  data::for_each_jsonl_line(path, what, [&](const std::string& line, const std::string& where) {
    add_line(line, what, where);
  });
}

std::unique_ptr<CrossDocuments> read_cross_documents(const DataSection& d, const data::Tokenizer& student,
                                                     const data::Tokenizer& teacher) {
  data::ReadOptions o;  // as read_training_data's
  o.loss_on = d.loss_on == "all" ? data::LossOn::kAll : data::LossOn::kCompletion;
  o.add_eos = d.add_eos;
  auto docs = std::make_unique<CrossDocuments>(student, teacher, o, d.seq_len);
  docs->add_file(d.train, "config key data.train");
  if (!d.validation.empty()) docs->add_file(d.validation, "config key data.validation");
  return docs;
}

const CrossDocument* CrossDocuments::find(const int32_t* ids, int64_t n) const {
  const auto it = docs_.find(ids_key(ids, n));
  return it == docs_.end() ? nullptr : &it->second;
}

at::Tensor cross_document_loss(const at::Tensor& zs, const at::Tensor& zt, const CrossSide& student,
                               const CrossSide& teacher, const at::Tensor& sid, const at::Tensor& tid,
                               const CrossVocabOptions& o) {
  TORCH_CHECK(zs.dim() == 2 && zt.dim() == 2 && zs.size(0) == int64_t(student.ids.size()) &&
                  zt.size(0) == int64_t(teacher.ids.size()),
              "cross_document_loss: student logits ", zs.sizes(), " for ", student.ids.size(), " tokens, teacher ",
              zt.sizes(), " for ", teacher.ids.size());
  if (o.merge != "observed" && o.merge != "bayesian")
    throw std::invalid_argument("cross_document_loss: merge must be \"observed\" or \"bayesian\", got \"" + o.merge + "\"");
  const auto zero = zs.sum() * 0.0;  // nothing aligned: 0 with a graph (GOLD's student_logits[i].sum() * 0.0)
  auto [s0, sn] = answer_span(student, zs.size(0));
  auto [t0, tn] = answer_span(teacher, zt.size(0));
  if (o.skip_student_eos) --sn;
  if (o.skip_teacher_eos) --tn;
  if (sn <= 0 || tn <= 0) return zero;
  const bool bayesian = o.merge == "bayesian";
  if (bayesian && (s0 == 0 || t0 == 0)) {  // no logit predicts token 0: the first aligned group pair is dropped
    const auto [sg, tg] = align_by_byte_offsets(slice(student.offsets, s0, sn), slice(teacher.offsets, t0, tn));
    if (sg.empty() || tg.empty()) return zero;
    const int64_t ds = int64_t(sg[0].size()), dt = int64_t(tg[0].size());
    s0 += ds, sn -= ds, t0 += dt, tn -= dt;
    if (sn <= 0 || tn <= 0) return zero;
  }
  const int64_t shift = bayesian ? 1 : 0;  // "bayesian": probs[k] predicts token k, so the rows start one earlier
  const auto acc = zs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto q = at::softmax(zs.narrow(0, s0 - shift, sn).to(acc) / o.uld.student_temperature, 1);  // (sn, Vs)
  const auto p = at::softmax(zt.narrow(0, t0 - shift, tn).to(acc) / o.uld.teacher_temperature, 1);  // (tn, Vt)
  auto [sg, tg] = align_by_byte_offsets(slice(student.offsets, s0, sn), slice(teacher.offsets, t0, tn));
  // Pairs with an empty side merge to a zero row and would only inflate the loss (GOLD drops them).
  std::vector<std::vector<int64_t>> sgk, tgk;
  for (size_t g = 0; g < std::min(sg.size(), tg.size()); ++g)
    if (!sg[g].empty() && !tg[g].empty()) sgk.push_back(sg[g]), tgk.push_back(tg[g]);
  if (sgk.empty()) return zero;
  auto ids64 = [](const std::vector<int32_t>& v, int64_t b, int64_t n) {
    return std::vector<int64_t>(v.begin() + b, v.begin() + b + n);
  };
  const auto qm = merge_aligned_probabilities(q, sgk, ids64(student.ids, s0, sn), o.merge);  // (G, Vs)
  const auto pm = merge_aligned_probabilities(p, tgk, ids64(teacher.ids, t0, tn), o.merge);  // (G, Vt)
  const int64_t groups = qm.size(0);
  at::Tensor sum;
  for (int64_t b = 0; b < groups; b += o.chunk) {  // the sorts hold (rows, V) each: chunks bound them
    const int64_t n = std::min(o.chunk, groups - b);
    const auto part = uld_divergence_probs(qm.narrow(0, b, n), pm.narrow(0, b, n), sid, tid, o.uld).sum();
    sum = sum.defined() ? sum + part : part;
  }
  return sum / double(groups);  // GOLD's aligned_loss: the mean over the aligned rows
}

CrossBatchLoss cross_batch_loss(model::CausalLM& student, const Teacher& teacher, const CrossDocuments& docs,
                                const SharedTokens& shared, const data::Batch& b, double normalizer,
                                const CrossVocabOptions& o, double kd_ratio, int64_t ce_chunk, at::Device device) {
  const auto all = batch_to_device(b, device);  // (4, B, S) ids, positions, doc ids, labels
  const auto h = batch_hidden(student, all, b.packed);  // (B, S, Hs)
  CrossBatchLoss out;
  out.ce = student_ce(student, h.reshape({-1, h.size(-1)}), all[3].reshape({-1}), normalizer, ce_chunk, kd_ratio);
  out.uld = at::zeros({}, h.options().dtype(at::kFloat));
  if (kd_ratio <= 0) {
    out.total = out.ce;
    out.ce = out.ce.detach(), out.uld = out.uld.detach();
    return out;
  }
  // The batch's documents in row order, each cut as its row cut it, and the teacher's side cut at the same byte.
  struct Segment {
    int64_t row, begin;
    CrossSide student, teacher;
  };
  std::vector<Segment> segs;
  for (int64_t r = 0; r < b.rows; ++r)
    for (int64_t i = 0; i < b.length;) {
      const int32_t doc = b.doc_ids[size_t(r * b.length + i)];
      int64_t e = i;
      while (e < b.length && b.doc_ids[size_t(r * b.length + e)] == doc) ++e;
      if (doc >= 0) {
        const auto* d = docs.find(&b.ids[size_t(r * b.length + i)], e - i);
        if (!d)
          throw std::logic_error("cross_batch_loss: a document of the batch (row " + std::to_string(r) + ", " +
                                 std::to_string(e - i) + " tokens) is not among the cross-tokenizer documents");
        const int64_t n = e - i;
        int64_t kt = int64_t(d->teacher.ids.size());
        if (n < int64_t(d->student.ids.size())) {  // the row cut the document: the teacher keeps the same bytes
          const int64_t last = d->student.offsets[size_t(n - 1)].second;
          kt = 0;
          while (kt < int64_t(d->teacher.ids.size()) && d->teacher.offsets[size_t(kt)].second <= last) ++kt;
        }
        segs.push_back({r, i, cut(d->student, n), cut(d->teacher, std::max<int64_t>(kt, 1))});
      }
      i = e;
    }
  out.documents = int64_t(segs.size());
  if (segs.empty()) {
    out.total = (1 - kd_ratio) * out.ce;
    out.ce = out.ce.detach(), out.uld = out.uld.detach();
    return out;
  }
  // The teacher's batch: one row per document, in the student's order, over the teacher's own ids.
  data::Batch tb;
  tb.rows = int64_t(segs.size());
  for (const auto& s : segs) tb.length = std::max<int64_t>(tb.length, int64_t(s.teacher.ids.size()));
  const size_t cells = size_t(tb.rows * tb.length);
  tb.ids.assign(cells, docs.teacher_pad_id()), tb.labels.assign(cells, data::kNoTarget);
  tb.positions.assign(cells, 0), tb.doc_ids.assign(cells, -1);
  for (int64_t r = 0; r < tb.rows; ++r)
    for (int64_t k = 0; k < int64_t(segs[size_t(r)].teacher.ids.size()); ++k) {
      const size_t c = size_t(r * tb.length + k);
      tb.ids[c] = segs[size_t(r)].teacher.ids[size_t(k)], tb.positions[c] = int32_t(k), tb.doc_ids[c] = 0;
      ++tb.tokens;
    }
  at::Tensor ht;  // (D, St, Ht)
  {
    at::NoGradGuard no_grad;
    ht = batch_hidden(*teacher.model, batch_to_device(tb, teacher.model->device()), false).to(device);
  }
  const bool adapted_head = student.lm_head && student.lm_head->adapter;
  const auto ws = head_weight(student);
  const auto sid = shared.student_ids.defined() ? shared.student_ids.to(device) : at::Tensor();
  const auto tid = shared.teacher_ids.defined() ? shared.teacher_ids.to(device) : at::Tensor();
  at::Tensor sum;
  for (size_t d = 0; d < segs.size(); ++d) {
    const auto& s = segs[d];
    const auto hs = h[s.row].narrow(0, s.begin, int64_t(s.student.ids.size()));  // (n, Hs)
    const auto zs = adapted_head ? student.lm_head->forward(hs) : at::linear(hs, ws);  // (n, Vs)
    const auto zt = at::linear(ht[int64_t(d)].narrow(0, 0, int64_t(s.teacher.ids.size())), teacher.head);  // (kt, Vt)
    const auto l = cross_document_loss(zs, zt, s.student, s.teacher, sid, tid, o);
    sum = sum.defined() ? sum + l : l;
  }
  const double share = normalizer > 0 ? double(b.targets) / normalizer : 0.0;  // the micro-batch's weight in the step
  const auto uld = (sum / double(segs.size()) * (o.distillation_weight * share)).to(at::kFloat);
  out.total = kd_ratio >= 1 ? uld : (1 - kd_ratio) * out.ce + kd_ratio * uld;
  out.uld = uld.detach(), out.ce = out.ce.detach();
  return out;
}

LossFn cross_loss_fn(model::CausalLM& student, const Teacher& teacher, const CrossDocuments& docs,
                     const SharedTokens& shared, const CrossVocabOptions& o, double kd_ratio, int64_t ce_chunk,
                     at::Device device) {
  return [&student, &teacher, &docs, shared, o, kd_ratio, ce_chunk, device](const data::Batch& b, double normalizer) {
    const auto l = cross_batch_loss(student, teacher, docs, shared, b, normalizer, o, kd_ratio, ce_chunk, device);
    if (kd_ratio <= 0) return Loss{l.total, {{"ce", l.ce}}};
    return Loss{l.total, {{"uld", l.uld}, {"ce", l.ce}}};
  };
}

}  // namespace anvil::train
