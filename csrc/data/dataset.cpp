// JSONL examples and packing (include/anvil/data/dataset.h). A chat example is cut into the pieces each
// turn adds to the rendered conversation (render(messages[:k]) minus render(messages[:k-1])), and an
// assistant turn further into the generation prompt and the reply, so the targets are exactly the
// reply's tokens (and what the template closes the turn with). Pieces are tokenized one by one; the chat
// formats put special tokens at every boundary, so this equals tokenizing the whole text.
#include "anvil/data/dataset.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <limits>
#include <random>
#include <stdexcept>

namespace anvil::data {
namespace {

void append(Example& ex, const std::vector<int32_t>& ids, bool target) {
  ex.ids.insert(ex.ids.end(), ids.begin(), ids.end());
  ex.target.insert(ex.target.end(), ids.size(), target ? 1 : 0);
}

const std::string& string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  if (!j[key].is_string()) throw std::runtime_error(where + ": \"" + key + "\" must be a string");
  return j[key].get_ref<const std::string&>();
}

// text = whole + rest, or an error naming the turn.
std::string suffix_after(const std::string& whole, const std::string& prefix, size_t turn, const std::string& where) {
  if (whole.compare(0, prefix.size(), prefix) != 0)
    throw std::runtime_error(where + ": the chat format does not render messages[" + std::to_string(turn) +
                             "] as an extension of the turns before it (it rewrites earlier turns), so its "
                             "tokens cannot be marked; use \"text\" or \"prompt\"/\"completion\" instead");
  return whole.substr(prefix.size());
}

std::vector<ChatMessage> chat_turns(const nlohmann::json& messages, const std::string& where) {
  if (!messages.is_array() || messages.empty()) throw std::runtime_error(where + ": \"messages\" must be a non-empty array");
  std::vector<ChatMessage> turns;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    const std::string w = where + " messages[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("role") || !m.contains("content"))
      throw std::runtime_error(w + ": must be {\"role\": ..., \"content\": ...}");
    turns.push_back({string_field(m, "role", w), string_field(m, "content", w), std::nullopt});
  }
  return turns;
}

// The pieces of turns[0, n): each turn's addition to the rendering, an assistant turn split into the
// generation prompt (no target) and the reply (targets). Returns render(turns[:n]).
std::string append_turns(Example& ex, const std::vector<ChatMessage>& turns, size_t n, const Tokenizer& tok,
                         const std::string& where) {
  std::string before;  // render(turns[:k]) so far
  for (size_t k = 1; k <= n; ++k) {
    const std::vector<ChatMessage> upto(turns.begin(), turns.begin() + static_cast<std::ptrdiff_t>(k));
    const std::string now = tok.render_chat(upto, /*add_generation_prompt=*/false);
    const bool assistant = turns[k - 1].role == "assistant";
    if (assistant) {
      const std::vector<ChatMessage> prev(turns.begin(), turns.begin() + static_cast<std::ptrdiff_t>(k - 1));
      const std::string prompt = tok.render_chat(prev, /*add_generation_prompt=*/true);
      append(ex, tok.encode(suffix_after(prompt, before, k - 1, where), false), false);
      append(ex, tok.encode(suffix_after(now, prompt, k - 1, where), false), true);
    } else {
      append(ex, tok.encode(suffix_after(now, before, k - 1, where), false), false);
    }
    before = now;
  }
  return before;
}

Example chat_example(const nlohmann::json& messages, const Tokenizer& tok, const ReadOptions& o,
                     const std::string& where) {
  const auto turns = chat_turns(messages, where);
  Example ex;
  if (o.loss_on == LossOn::kAll) {  // no targets to mark: the whole rendering, as transformers tokenizes it
    append(ex, tok.encode(tok.render_chat(turns, /*add_generation_prompt=*/false), false), true);
    return ex;
  }
  append_turns(ex, turns, turns.size(), tok, where);
  return ex;
}

}  // namespace

Example tokenize_example(const std::string& json_line, const Tokenizer& tok, const ReadOptions& o,
                         const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_line);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(where + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw std::runtime_error(where + ": a line must be a JSON object");
  Example ex;
  if (j.contains("messages")) return chat_example(j["messages"], tok, o, where);
  if (j.contains("text")) {
    append(ex, tok.encode(string_field(j, "text", where), true), true);
  } else if (j.contains("prompt") && j.contains("completion")) {
    append(ex, tok.encode(string_field(j, "prompt", where), true), o.loss_on == LossOn::kAll);
    append(ex, tok.encode(string_field(j, "completion", where), false), true);
  } else {
    throw std::runtime_error(where + ": a line needs \"text\", \"prompt\" + \"completion\", or \"messages\"");
  }
  if (o.add_eos) {
    if (tok.eos_id() < 0) throw std::runtime_error(where + ": add_eos is set but the tokenizer has no eos token");
    append(ex, {tok.eos_id()}, true);
  }
  return ex;
}

ChatPrompt chat_prompt(const std::string& json_line, const Tokenizer& tok, const std::string& where) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(json_line);
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(where + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object() || !j.contains("messages")) throw std::runtime_error(where + ": a chat line needs \"messages\"");
  ChatPrompt p;
  p.turns = chat_turns(j["messages"], where);
  if (p.turns.back().role == "assistant") p.turns.pop_back();  // the reply to generate anew
  if (p.turns.empty())
    throw std::runtime_error(where + ": \"messages\" holds only an assistant turn; a prompt needs the turns before it");
  // The pieces of a conversation whose next turn is the assistant's, up to that reply (its generation prompt
  // included): the ids the SFT example of turns + reply starts with.
  Example ex;
  const std::string before = append_turns(ex, p.turns, p.turns.size(), tok, where);
  const std::string prompt = tok.render_chat(p.turns, /*add_generation_prompt=*/true);
  append(ex, tok.encode(suffix_after(prompt, before, p.turns.size(), where), false), false);
  p.ids = std::move(ex.ids);
  return p;
}

PackedRows pack_examples(const std::vector<Example>& examples, int64_t row_length, int32_t pad_id) {
  if (row_length < 2) throw std::invalid_argument("pack_examples: row_length must be >= 2, got " + std::to_string(row_length));
  PackedRows p;
  p.row_length = row_length;
  int64_t used = row_length;  // tokens used in the current row; starts "full" so the first example opens a row
  int32_t doc = 0;
  auto open_row = [&] {
    p.ids.insert(p.ids.end(), row_length, pad_id);
    p.labels.insert(p.labels.end(), row_length, kNoTarget);
    p.positions.insert(p.positions.end(), row_length, 0);
    p.doc_ids.insert(p.doc_ids.end(), row_length, -1);
    ++p.rows;
    used = 0;
    doc = 0;
  };
  for (const auto& ex : examples) {
    if (ex.ids.size() != ex.target.size()) throw std::invalid_argument("pack_examples: an example's ids and target differ in length");
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(ex.ids.size()), row_length);
    if (n == 0) continue;
    if (used + n > row_length) open_row();
    const int64_t base = (p.rows - 1) * row_length + used;
    for (int64_t i = 0; i < n; ++i) {
      p.ids[base + i] = ex.ids[i];
      p.positions[base + i] = static_cast<int32_t>(i);
      p.doc_ids[base + i] = doc;
      if (i + 1 < n && ex.target[i + 1]) p.labels[base + i] = ex.ids[i + 1];
    }
    used += n;
    ++doc;
  }
  return p;
}

std::vector<int64_t> shuffled_order(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed);  // the standard fixes its output sequence; the draw below is our own
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t bound = static_cast<uint64_t>(i) + 1;
    const uint64_t limit = std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
    uint64_t r;
    do r = rng(); while (r >= limit);  // rejection: no modulo bias
    std::swap(order[i], order[static_cast<int64_t>(r % bound)]);
  }
  return order;
}

}  // namespace anvil::data
