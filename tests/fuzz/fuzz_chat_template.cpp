// libFuzzer target for the chat formats (csrc/data/chat_template.cpp): the template recognizer that reads a
// tokenizer_config.json's `chat_template` (detect_chat_format) and the renderers that turn a conversation from a
// training file into text (render_chat), compiled into this binary with ASan, UBSan and coverage. An input is a
// JSON object {"chat_template": str, "messages": [{"role", "content", "reasoning"?}], "add_generation_prompt":
// bool, "enable_thinking": bool, "bos": str, "eos": str}; inputs that are not of that shape are skipped (the JSON
// parser and the dataset's field checks are not what this target tests). The recognizer must give a format or
// refuse with std::runtime_error; each of the eleven renderers must give a string or refuse with
// std::invalid_argument naming the message. Any other exception, a crash or a sanitizer report is a finding.
#include "anvil/data/tokenizer.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::string string_or(const nlohmann::json& j, const char* key, const std::string& fallback) {
  const auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : fallback;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto j = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return 0;
  using anvil::data::ChatFormat;
  try {
    anvil::data::detect_chat_format(string_or(j, "chat_template", ""));
  } catch (const std::runtime_error&) {
    // a clean refusal: not one of the built-in formats
  }
  std::vector<anvil::data::ChatMessage> messages;
  const auto m = j.find("messages");
  if (m == j.end() || !m->is_array()) return 0;
  for (const auto& e : *m) {
    if (!e.is_object() || !e.contains("role") || !e["role"].is_string() || !e.contains("content") ||
        !e["content"].is_string())
      return 0;
    anvil::data::ChatMessage msg{e["role"].get<std::string>(), e["content"].get<std::string>(), std::nullopt};
    if (e.contains("reasoning") && e["reasoning"].is_string()) msg.reasoning = e["reasoning"].get<std::string>();
    messages.push_back(std::move(msg));
  }
  anvil::data::ChatOptions o;
  // j.value() would throw for a non-boolean value: the harness skips such a field instead (its shape is not under test)
  if (j.contains("add_generation_prompt") && j["add_generation_prompt"].is_boolean())
    o.add_generation_prompt = j["add_generation_prompt"].get<bool>();
  if (j.contains("enable_thinking") && j["enable_thinking"].is_boolean()) o.enable_thinking = j["enable_thinking"].get<bool>();
  o.bos_token = string_or(j, "bos", "<s>");
  o.eos_token = string_or(j, "eos", "</s>");
  for (int f = 0; f <= int(ChatFormat::kSmolLM2); ++f) {
    try {
      anvil::data::render_chat(ChatFormat(f), messages, o);
    } catch (const std::invalid_argument&) {
      // the template raises for this conversation (roles that must alternate, unknown roles)
    }
  }
  return 0;
}
