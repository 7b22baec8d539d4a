// Distillation on generated text (include/anvil/train/kd_generation.h): the teacher's completions written as
// SFT data (sequence-level KD), and micro-batches replaced by the student's own completions (on-policy, GKD).
// Both go through model::generate_rows, one left-padded batch per group of prompts.
#include "anvil/train/kd_generation.h"

#include "anvil/data/dataset.h"
#include "anvil/io/fs.h"
#include "anvil/train/progress.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace anvil::train {

namespace {

using nlohmann::json;

// One prompt of the prompts file: a {"prompt"} text (tokenized with the special tokens) or a {"messages"}
// conversation (rendered with the chat template and its generation prompt, data::chat_prompt).
struct Prompt {
  std::string text;           // {"prompt"} lines
  json messages;              // {"messages"} lines: the turns before the reply (a trailing assistant turn dropped)
  std::vector<int64_t> ids;   // what the model is given
  bool chat() const { return !messages.is_null(); }
  // The row written for this prompt with the model's reply.
  json row(const std::string& reply) const {
    if (!chat()) return {{"prompt", text}, {"completion", reply}};
    json m = messages;
    m.push_back({{"role", "assistant"}, {"content", reply}});
    return {{"messages", m}};
  }
  // Whether an earlier run's row answers this prompt.
  bool answered_by(const json& j) const {
    if (!j.is_object()) return false;
    if (!chat()) return j.contains("prompt") && j["prompt"] == text;
    if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].size() != messages.size() + 1) return false;
    const auto& m = j["messages"];
    return json(m.begin(), m.end() - 1) == messages && m.back().is_object() && m.back().value("role", "") == "assistant";
  }
};

// Every non-blank line of a JSONL file, tokenized; errors name the file (and line).
std::vector<Prompt> read_prompts(const std::string& path, const std::string& what, const data::Tokenizer& tok) {
  if (!io::is_regular_file(path))
    throw std::invalid_argument(what + ": the prompts file " + path + " does not exist (or is not a file)");
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(what + ": cannot open the prompts file " + path);
  std::vector<Prompt> prompts;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(n);
    json j;
    try {
      j = json::parse(line);
    } catch (const std::exception& e) {
      throw std::invalid_argument(where + ": not a JSON object (" + e.what() + ")");
    }
    Prompt p;
    if (j.is_object() && j.contains("messages")) {
      data::ChatPrompt c;
      try {
        c = data::chat_prompt(line, tok, where);
      } catch (const std::exception& e) {  // the template's own errors (no chat template, roles out of order)
        const std::string m = e.what();
        throw std::invalid_argument(m.rfind(where, 0) == 0 ? m : where + ": " + m);
      }
      p.messages = j["messages"];
      if (p.messages.back().value("role", "") == "assistant") p.messages.erase(p.messages.size() - 1);
      p.ids.assign(c.ids.begin(), c.ids.end());
    } else if (j.is_object() && j.contains("prompt") && j["prompt"].is_string()) {
      p.text = j["prompt"].get<std::string>();
      const auto ids = tok.encode(p.text, true);
      p.ids.assign(ids.begin(), ids.end());
    } else {
      throw std::invalid_argument(where + ": a prompts line needs a string \"prompt\" or a \"messages\" array (the "
                                  "teacher answers it)");
    }
    if (p.ids.empty()) throw std::invalid_argument(where + ": the prompt encodes to no tokens");
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) throw std::invalid_argument(what + ": the prompts file " + path + " has no prompts");
  return prompts;
}

// The rows of an earlier run's output, each checked to answer prompt i. Returns the lines (with newlines).
std::string read_kept_rows(const std::string& path, const std::vector<Prompt>& prompts, int64_t& kept) {
  kept = 0;
  if (!io::path_exists(path)) return "";
  std::ifstream in(path);
  if (!in) throw std::invalid_argument("cannot open the earlier teacher data " + path);
  std::string text, line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const std::exception&) {
      throw std::invalid_argument(path + ":" + std::to_string(n) + ": not a JSON line; remove " + path +
                                  " to generate the teacher data again");
    }
    if (kept >= int64_t(prompts.size()) || !prompts[size_t(kept)].answered_by(j))
      throw std::invalid_argument(path + ":" + std::to_string(n) + ": this row does not answer prompt " +
                                  std::to_string(kept + 1) + " of the prompts file (written from another prompts "
                                  "file?); remove " + path + " to generate the teacher data again");
    text += line + "\n";
    ++kept;
  }
  return text;
}

}  // namespace

TeacherDataResult write_teacher_completions(model::CausalLM& teacher, const data::Tokenizer& tok,
                                            const TeacherDataOptions& o) {
  TORCH_CHECK(o.batch_size >= 1, "write_teacher_completions: batch_size must be >= 1, got ", o.batch_size);
  const auto prompts = read_prompts(o.prompts, o.prompts_what, tok);
  TeacherDataResult result;
  std::string text = read_kept_rows(o.output, prompts, result.kept);
  result.rows = result.kept;
  const int64_t total = int64_t(prompts.size());
  if (result.kept == total) return result;

  model::GenerateOptions g = o.generate;
  if (g.stop_tokens.empty())
    for (const auto id : tok.eos_ids()) g.stop_tokens.push_back(id);
  const auto is_stop = [&](int64_t id) { return std::find(g.stop_tokens.begin(), g.stop_tokens.end(), id) != g.stop_tokens.end(); };
  const std::string dir = io::parent_dir(o.output);
  if (!dir.empty()) io::make_directories(dir);

  const bool was_training = teacher.is_training();
  teacher.eval();
  Progress progress("teacher data", total, "rows");
  progress.resume_from(result.kept);
  auto last_flush = std::chrono::steady_clock::now();
  for (int64_t start = result.kept; start < total; start += o.batch_size) {
    const int64_t end = std::min(total, start + o.batch_size);
    std::vector<std::vector<int64_t>> rows;
    for (int64_t i = start; i < end; ++i) rows.push_back(prompts[size_t(i)].ids);
    g.seed = o.generate.seed + uint64_t(start);  // a rerun from a batch boundary draws the same tokens
    const auto fresh = model::generate_rows(teacher, rows, g);
    for (int64_t i = start; i < end; ++i) {
      std::vector<int32_t> answer;
      for (const auto id : fresh[size_t(i - start)]) {
        ++result.generated_tokens;
        if (is_stop(id)) break;
        answer.push_back(int32_t(id));
      }
      text += prompts[size_t(i)].row(tok.decode(answer, true)).dump() + "\n";
    }
    result.rows = end;
    const double since = std::chrono::duration<double>(std::chrono::steady_clock::now() - last_flush).count();
    if (end == total || since >= o.flush_seconds) {
      io::write_text_atomically(o.output, text);
      last_flush = std::chrono::steady_clock::now();
    }
    if (end < total) progress.update(end, {{"tokens", std::to_string(result.generated_tokens)}}, result.generated_tokens);
  }
  progress.finish({{"tokens", std::to_string(result.generated_tokens)}}, result.generated_tokens);
  if (was_training) teacher.train();
  return result;
}

uint64_t on_policy_hash(const data::Batch& b, uint64_t seed, int64_t epoch, int64_t index) {
  // splitmix64 steps over (seed, epoch, index, ids): a pure function of what a resumed run sees again.
  auto mix = [](uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
  };
  uint64_t h = mix(seed ^ 0x6f6e2d706f6c6963ULL);  // "on-polic"
  h = mix(h ^ uint64_t(epoch));
  h = mix(h ^ uint64_t(index));
  for (const auto id : b.ids) h = mix(h ^ uint64_t(uint32_t(id)));
  return h;
}

LossFn on_policy_loss_fn(model::CausalLM& student, const Teacher& teacher, const KdOptions& kd, double kd_ratio,
                         int64_t ce_chunk, at::Device device, const OnPolicyOptions& o,
                         const data::BatchStream& stream) {
  TORCH_CHECK(o.lambda >= 0 && o.lambda <= 1, "on_policy lambda must be in [0, 1], got ", o.lambda);
  TORCH_CHECK(o.max_new_tokens >= 1, "on_policy max_new_tokens must be >= 1, got ", o.max_new_tokens);
  return [&student, &teacher, kd, kd_ratio, ce_chunk, device, o, &stream](const data::Batch& b, double normalizer) {
    const uint64_t h = on_policy_hash(b, o.seed, stream.epoch(), stream.index());
    const double u = double(h >> 11) * 0x1p-53;  // uniform in [0, 1)
    auto zero = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
    auto prompts = u < o.lambda && b.targets > 0 ? data::document_prompts(b) : std::vector<std::vector<int64_t>>{};
    if (prompts.empty()) {  // off-policy: the batch as it is
      auto l = kd_batch_loss(student, teacher, b, normalizer, kd, kd_ratio, ce_chunk, device);
      return Loss{l.total, {{"kd", l.kd}, {"ce", l.ce}, {"on_policy", zero}}};
    }
    model::GenerateOptions g;
    g.max_new_tokens = o.max_new_tokens, g.temperature = o.temperature, g.top_k = o.top_k, g.top_p = o.top_p;
    g.stop_tokens = o.stop_tokens, g.pad_token_id = o.pad_id, g.seed = h;
    std::vector<std::vector<int64_t>> completions;
    {
      const bool was_training = student.is_training();
      student.eval();
      const size_t group = o.batch_size > 0 ? size_t(o.batch_size) : prompts.size();
      for (size_t start = 0; start < prompts.size(); start += group) {
        std::vector<std::vector<int64_t>> part(prompts.begin() + int64_t(start),
                                               prompts.begin() + int64_t(std::min(prompts.size(), start + group)));
        for (auto& c : model::generate_rows(student, part, g)) completions.push_back(std::move(c));
        g.seed += 1;
      }
      if (was_training) student.train();
    }
    const auto generated = data::completion_batch(prompts, completions, o.pad_id);
    // The micro-batch keeps its share of the step: its loss is the mean over the generated targets times
    // b.targets / normalizer.
    const double scaled = normalizer * double(generated.targets) / double(b.targets);
    auto l = kd_batch_loss(student, teacher, generated, scaled, kd, /*kd_ratio=*/1.0, ce_chunk, device);
    return Loss{l.total, {{"kd", l.kd}, {"ce", l.ce}, {"on_policy", zero + double(b.targets) / normalizer}}};
  };
}

}  // namespace anvil::train
