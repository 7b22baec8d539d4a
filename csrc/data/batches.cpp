// Reading, splitting and batching training data (include/anvil/data/batches.h).
#include "anvil/data/batches.h"

#include "data/tokenizer_impl.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <stdexcept>

namespace anvil::data {

using nlohmann::json;

Example read_example_line(const std::string& line, const Tokenizer* tok, const ReadOptions& options,
                          const std::string& where) {
  const auto j = json::parse(line, nullptr, false);
  if (j.is_object() && j.contains("input_ids")) {
    Example e;
    const auto& ids = j["input_ids"];
    if (!ids.is_array() || ids.empty()) throw std::runtime_error(where + ": \"input_ids\" must be a non-empty list of ids");
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto& id = ids[i];
      // Checked as JSON before any narrowing: 4294967297 must not train as token 1.
      const auto v = detail::json_token_id(id, int64_t(1) << 31);
      if (!v)
        throw std::runtime_error(where + ": \"input_ids\"[" + std::to_string(i) +
                                 "] must be a non-negative integer below 2^31, got " + id.dump());
      if (options.vocab_size > 0 && *v >= options.vocab_size)
        throw std::runtime_error(where + ": \"input_ids\"[" + std::to_string(i) + "] = " + std::to_string(*v) +
                                 " is outside the model's vocabulary of " + std::to_string(options.vocab_size) + " ids");
      e.ids.push_back(*v);
    }
    e.target.assign(e.ids.size(), 1);
    if (j.contains("labels")) {
      const auto& labels = j["labels"];
      if (!labels.is_array() || labels.size() != ids.size())
        throw std::runtime_error(where + ": \"labels\" must be a list as long as \"input_ids\"");
      for (size_t i = 0; i < labels.size(); ++i) {
        if (!labels[i].is_number_integer())
          throw std::runtime_error(where + ": \"labels\" must hold integers (-100 = no target)");
        e.target[i] = labels[i].get<int64_t>() != kNoTarget;
      }
    }
    return e;
  }
  if (!tok)
    throw std::runtime_error(where + ": a text example needs a tokenizer, and none was found (set model.tokenizer to a "
                             "folder with tokenizer.json or tokenizer.model, or give pre-tokenized {\"input_ids\": [...]} lines)");
  Example e = tokenize_example(line, *tok, options, where);
  if (options.vocab_size > 0)
    for (const auto id : e.ids)
      if (id >= options.vocab_size)
        throw std::runtime_error(where + ": the tokenizer gave id " + std::to_string(id) +
                                 ", outside the model's vocabulary of " + std::to_string(options.vocab_size) +
                                 " ids (the tokenizer of another model? set model.tokenizer)");
  return e;
}

int64_t for_each_jsonl_line(const std::string& path, const std::string& what,
                            const std::function<void(const std::string& line, const std::string& where)>& each) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(what + ": cannot open \"" + path + "\"");
  std::string line;
  int64_t given = 0;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r\n") == std::string::npos) continue;
    each(line, path + ":" + std::to_string(n));
    ++given;
  }
  return given;
}

std::vector<Example> read_examples(const std::string& path, const Tokenizer* tok, const ReadOptions& options,
                                   const std::string& what) {
  std::vector<Example> out;
  for_each_jsonl_line(path, what, [&](const std::string& line, const std::string& where) {
    out.push_back(read_example_line(line, tok, options, where));
  });
  if (out.empty()) throw std::runtime_error(what + ": \"" + path + "\" holds no examples");
  return out;
}

void split_validation(std::vector<Example>& train, std::vector<Example>& validation, double fraction, uint64_t seed) {
  const int64_t n = int64_t(train.size());
  int64_t k = std::llround(fraction * double(n));
  k = std::max<int64_t>(1, std::min<int64_t>(k, n - 1));
  if (n < 2) throw std::runtime_error("config key data.validation_fraction: needs at least 2 training examples");
  const auto order = shuffled_order(n, seed ^ 0x5eed5a1177ULL);
  std::vector<uint8_t> is_val(n, 0);
  for (int64_t i = 0; i < k; ++i) is_val[order[i]] = 1;
  std::vector<Example> rest;
  for (int64_t i = 0; i < n; ++i) (is_val[i] ? validation : rest).push_back(std::move(train[i]));
  train = std::move(rest);
}

namespace {

// A batch's targets, non-padding tokens and whether it is packed, from its rows.
void count_batch(Batch& b) {
  for (size_t i = 0; i < b.labels.size(); ++i) {
    b.targets += b.labels[i] != kNoTarget;
    b.tokens += b.doc_ids[i] >= 0;
    b.packed = b.packed || b.doc_ids[i] > 0;
  }
}

}  // namespace

Batch slice_rows(const PackedRows& r, int64_t begin, int64_t end) {
  Batch b;
  b.rows = end - begin, b.length = r.row_length;
  const auto from = begin * r.row_length, to = end * r.row_length;
  b.ids.assign(r.ids.begin() + from, r.ids.begin() + to);
  b.labels.assign(r.labels.begin() + from, r.labels.begin() + to);
  b.positions.assign(r.positions.begin() + from, r.positions.begin() + to);
  b.doc_ids.assign(r.doc_ids.begin() + from, r.doc_ids.begin() + to);
  count_batch(b);
  return b;
}

Batch shard_rows(const Batch& in, int64_t rank, int64_t world) {
  Batch b;
  b.length = in.length;
  for (int64_t r = rank; r < in.rows; r += world) {
    const auto from = r * in.length, to = (r + 1) * in.length;
    b.ids.insert(b.ids.end(), in.ids.begin() + from, in.ids.begin() + to);
    b.labels.insert(b.labels.end(), in.labels.begin() + from, in.labels.begin() + to);
    b.positions.insert(b.positions.end(), in.positions.begin() + from, in.positions.begin() + to);
    b.doc_ids.insert(b.doc_ids.end(), in.doc_ids.begin() + from, in.doc_ids.begin() + to);
    ++b.rows;
  }
  count_batch(b);
  return b;
}

std::vector<std::vector<int64_t>> document_prompts(const Batch& b) {
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t r = 0; r < b.rows; ++r) {
    const int64_t base = r * b.length;
    int64_t i = 0;
    while (i < b.length) {
      const int32_t doc = b.doc_ids[size_t(base + i)];
      int64_t end = i;
      while (end < b.length && b.doc_ids[size_t(base + end)] == doc) ++end;
      if (doc >= 0) {
        // labels[j] != -100: token j + 1 is a target, so the prompt is tokens [i, first].
        int64_t first = -1;
        for (int64_t j = i; j < end && first < 0; ++j)
          if (b.labels[size_t(base + j)] != kNoTarget) first = j;
        if (first >= 0) {
          const int64_t n = first > i ? first - i + 1 : std::max<int64_t>(1, (end - i) / 2);
          prompts.emplace_back(b.ids.begin() + base + i, b.ids.begin() + base + i + n);
        }
      }
      i = end;
    }
  }
  return prompts;
}

Batch completion_batch(const std::vector<std::vector<int64_t>>& prompts,
                       const std::vector<std::vector<int64_t>>& completions, int32_t pad_id) {
  if (prompts.size() != completions.size())
    throw std::invalid_argument("completion_batch: " + std::to_string(prompts.size()) + " prompts but " +
                                std::to_string(completions.size()) + " completions");
  Batch b;
  b.rows = int64_t(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty() || completions[i].empty())
      throw std::invalid_argument("completion_batch: row " + std::to_string(i) + " has an empty prompt or completion");
    b.length = std::max<int64_t>(b.length, int64_t(prompts[i].size() + completions[i].size()));
  }
  const size_t n = size_t(b.rows * b.length);
  b.ids.assign(n, pad_id), b.labels.assign(n, kNoTarget), b.positions.assign(n, 0), b.doc_ids.assign(n, -1);
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<int64_t> row(prompts[i]);
    row.insert(row.end(), completions[i].begin(), completions[i].end());
    const size_t base = i * size_t(b.length), p = prompts[i].size();
    for (size_t j = 0; j < row.size(); ++j) {
      b.ids[base + j] = int32_t(row[j]);
      b.positions[base + j] = int32_t(j);
      b.doc_ids[base + j] = 0;
      if (j + 1 >= p && j + 1 < row.size()) b.labels[base + j] = int32_t(row[j + 1]);
    }
    b.targets += int64_t(completions[i].size());
    b.tokens += int64_t(row.size());
  }
  return b;
}

BatchStream::BatchStream(const std::vector<Example>& examples, int64_t seq_len, int32_t pad_id, int64_t batch_size,
                         uint64_t seed)
    : examples_(examples), seq_len_(seq_len), pad_id_(pad_id), batch_size_(batch_size), seed_(seed) {}

PackedRows BatchStream::pack_epoch(int64_t epoch) const {
  const auto order = shuffled_order(int64_t(examples_.size()), epoch_seed(seed_, epoch));
  std::vector<Example> ordered;
  ordered.reserve(order.size());
  for (const auto i : order) ordered.push_back(examples_[i]);
  return pack_examples(ordered, seq_len_, pad_id_);
}

int64_t BatchStream::batches_in_epoch(int64_t epoch) const {
  return (pack_epoch(epoch).rows + batch_size_ - 1) / batch_size_;
}

void BatchStream::seek(int64_t epoch, int64_t index) {
  epoch_ = epoch, index_ = index;
  rows_ = pack_epoch(epoch_);
}

Batch BatchStream::next() {
  if (rows_.rows == 0) rows_ = pack_epoch(epoch_);
  if (index_ * batch_size_ >= rows_.rows) {
    ++epoch_, index_ = 0;
    rows_ = pack_epoch(epoch_);
  }
  Batch b = slice_rows(rows_, index_ * batch_size_, std::min(rows_.rows, (index_ + 1) * batch_size_));
  ++index_;
  return b;
}

}  // namespace anvil::data
