// Built-in chat formats: each function below is one published Jinja chat template translated line for
// line (the template texts are in tests/data/chat_templates/, with their sources), so that its output
// equals transformers' apply_chat_template string for string. Where a template raises (roles that must
// alternate, roles it does not know), the translation throws std::invalid_argument naming the message.
//
// Jinja's `x.strip()` and `| trim` are Python's str.strip(): they remove Python whitespace (which,
// unlike C's isspace, includes U+001C..U+001F, U+0085, U+00A0 and the Unicode spaces); python_strip
// does the same. Tool calls are not modelled: a message role the translation does not cover is
// rendered as its template renders it (usually not at all) or refused where the template refuses it.
#include "anvil/data/tokenizer.h"
#include "data/unicode_text.h"

#include <cstdio>
#include <stdexcept>

namespace anvil::data {

namespace {

bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python's str.strip() (both ends) / lstrip() / rstrip() with no argument.
std::string python_strip(const std::string& s, bool left = true, bool right = true) {
  size_t begin = 0, end = s.size();
  while (left && begin < end) {
    size_t len = 0;
    if (!is_python_space(unicode::decode_at(s, begin, &len))) break;
    begin += len;
  }
  while (right && end > begin) {
    size_t lead = end - 1;
    while (lead > begin && (static_cast<unsigned char>(s[lead]) & 0xC0) == 0x80) --lead;
    size_t len = 0;
    if (!is_python_space(unicode::decode_at(s, lead, &len))) break;
    end = lead;
  }
  return s.substr(begin, end - begin);
}

// Python's str.strip('\n') family: only newline characters.
std::string strip_newlines(const std::string& s, bool left, bool right) {
  size_t begin = 0, end = s.size();
  while (left && begin < end && s[begin] == '\n') ++begin;
  while (right && end > begin && s[end - 1] == '\n') --end;
  return s.substr(begin, end - begin);
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Python's s.split(sep)[0] and s.split(sep)[-1].
std::string before_first(const std::string& s, const std::string& sep) { return s.substr(0, s.find(sep)); }
std::string after_last(const std::string& s, const std::string& sep) {
  const size_t pos = s.rfind(sep);
  return pos == std::string::npos ? s : s.substr(pos + sep.size());
}

[[noreturn]] void raise(ChatFormat format, size_t index, const ChatMessage& m, const std::string& rule) {
  throw std::invalid_argument("render_chat(" + chat_format_name(format) + "): messages[" + std::to_string(index) +
                              "] (role \"" + m.role + "\"): " + rule);
}

void check_alternation(ChatFormat format, size_t loop_index, size_t message_index, const ChatMessage& m,
                       const char* rule) {
  if ((m.role == "user") != (loop_index % 2 == 0)) raise(format, message_index, m, rule);
}

constexpr const char* kAlternate = "conversation roles must alternate user/assistant/user/assistant/...";

// meta-llama/Llama-2-*-chat-hf
std::string render_llama2(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  const bool has_system = messages[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  std::string out;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t k = i - first;
    check_alternation(ChatFormat::kLlama2, k, i, m, kAlternate);
    const std::string content = (k == 0 && has_system)
                                    ? "<<SYS>>\n" + messages[0].content + "\n<</SYS>>\n\n" + m.content
                                    : m.content;
    if (m.role == "user") {
      out += o.bos_token + "[INST] " + python_strip(content) + " [/INST]";
    } else if (m.role == "assistant") {
      out += " " + python_strip(content) + " " + o.eos_token;
    }
  }
  return out;
}

// mistralai/Mistral-7B-Instruct-v0.1, Mixtral-8x7B-Instruct-v0.1 (original template)
std::string render_mistral(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  std::string out = o.bos_token;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    check_alternation(ChatFormat::kMistral, i, i, m, kAlternate);
    if (m.role == "user") {
      out += "[INST] " + m.content + " [/INST]";
    } else if (m.role == "assistant") {
      out += m.content + o.eos_token;
    } else {
      raise(ChatFormat::kMistral, i, m, "only user and assistant roles are supported");
    }
  }
  return out;
}

// mistralai/Mistral-7B-Instruct-v0.2/v0.3 and the updated Mixtral template: an optional system prompt
std::string render_mistral_v1(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  const bool has_system = messages[0].role == "system";
  const size_t first = has_system ? 1 : 0;
  std::string out = o.bos_token;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t k = i - first;
    check_alternation(ChatFormat::kMistralV1, k, i, m, "after the optional system message, conversation roles "
                                                         "must alternate user/assistant/user/assistant/...");
    if (m.role == "user") {
      if (k == 0 && has_system) {
        out += " [INST] " + messages[0].content + "\n\n" + m.content + " [/INST]";
      } else {
        out += " [INST] " + m.content + " [/INST]";
      }
    } else if (m.role == "assistant") {
      out += " " + m.content + o.eos_token;
    } else {
      raise(ChatFormat::kMistralV1, i, m,
            "only user and assistant roles are supported, with the exception of an initial optional system message");
    }
  }
  return out;
}

// meta-llama/Meta-Llama-3-*-Instruct
std::string render_llama3(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (i == 0) out += o.bos_token;
    out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + python_strip(m.content) + "<|eot_id|>";
  }
  if (o.add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Python's json.dumps(s, ensure_ascii=False): transformers' `tojson` filter on a string.
std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          char buffer[8];
          std::snprintf(buffer, sizeof(buffer), "\\u%04x", c);
          out += buffer;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

// meta-llama/Llama-3.1-*-Instruct, Llama-3.3-70B-Instruct: a system header with the knowledge cutoff and
// the date, then Llama-3 turns; tool outputs as JSON strings under the ipython role (tool calls are not
// modelled).
std::string render_llama31(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  const bool has_system = messages[0].role == "system";
  std::string out = o.bos_token + "<|start_header_id|>system<|end_header_id|>\n\n";
  out += "Cutting Knowledge Date: December 2023\nToday Date: " + o.date_string + "\n\n";
  out += (has_system ? python_strip(messages[0].content) : std::string()) + "<|eot_id|>";
  for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "tool" || m.role == "ipython") {  // a string is "iterable" in Jinja: the template's tojson
      out += "<|start_header_id|>ipython<|end_header_id|>\n\n" + json_string(m.content) + "<|eot_id|>";
      continue;
    }
    out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + python_strip(m.content) + "<|eot_id|>";
  }
  if (o.add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// ChatML with a default system prompt when the conversation brings none: Qwen/Qwen2-*-Instruct ("You are a
// helpful assistant.") and HuggingFaceTB/SmolLM2-*-Instruct (its own prompt); the templates differ in
// nothing else.
constexpr const char* kChatmlSystem = "You are a helpful assistant.";
constexpr const char* kSmolLM2System = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

std::string render_chatml(const std::vector<ChatMessage>& messages, const ChatOptions& o,
                          const std::string& default_system) {
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (i == 0 && messages[0].role != "system") out += "<|im_start|>system\n" + default_system + "<|im_end|>\n";
    out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  }
  if (o.add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

// Qwen's ChatML tool outputs: consecutive tool messages share one user turn.
void append_qwen_tool_output(const std::vector<ChatMessage>& messages, size_t i, std::string& out) {
  if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
  out += "\n<tool_response>\n" + messages[i].content + "\n</tool_response>";
  if (i + 1 == messages.size() || messages[i + 1].role != "tool") out += "<|im_end|>\n";
}

// Qwen/Qwen2.5-*-Instruct: ChatML with Qwen's own default system prompt; roles it does not know are dropped
std::string render_qwen25(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  std::string out = "<|im_start|>system\n";
  const char* kDefaultSystem = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";
  out += messages[0].role == "system" ? messages[0].content : std::string(kDefaultSystem);
  out += "<|im_end|>\n";
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user" || (m.role == "system" && i != 0) || m.role == "assistant") {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "tool") {
      append_qwen_tool_output(messages, i, out);
    }
  }
  if (o.add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

bool starts_with(const std::string& s, const std::string& p) { return s.compare(0, p.size(), p) == 0; }
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Qwen/Qwen3-*: thinking kept only for assistant turns after the last real user query
std::string render_qwen3(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  std::string out;
  if (messages[0].role == "system") out += "<|im_start|>system\n" + messages[0].content + "<|im_end|>\n";
  size_t last_query = messages.size() - 1;
  for (size_t r = messages.size(); r-- > 0;) {
    const ChatMessage& m = messages[r];
    if (m.role == "user" && !(starts_with(m.content, "<tool_response>") && ends_with(m.content, "</tool_response>"))) {
      last_query = r;
      break;
    }
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool last = i + 1 == messages.size();
    if (m.role == "user" || (m.role == "system" && i != 0)) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      std::string content = m.content, reasoning;
      if (m.reasoning) {
        reasoning = *m.reasoning;
      } else if (contains(m.content, "</think>")) {
        content = strip_newlines(after_last(m.content, "</think>"), true, false);
        reasoning = strip_newlines(
            after_last(strip_newlines(before_first(m.content, "</think>"), false, true), "<think>"), true, false);
      }
      if (i > last_query && (last || !reasoning.empty())) {
        out += "<|im_start|>" + m.role + "\n<think>\n" + strip_newlines(reasoning, true, true) + "\n</think>\n\n" +
               strip_newlines(content, true, false);
      } else {
        out += "<|im_start|>" + m.role + "\n" + content;
      }
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {
      append_qwen_tool_output(messages, i, out);
    }
  }
  if (o.add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (o.enable_thinking.has_value() && !*o.enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

// deepseek-ai/DeepSeek-V2-Chat
std::string render_deepseek_v2(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  std::string out = o.bos_token;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      out += "User: " + m.content + "\n\n";
    } else if (m.role == "assistant") {
      out += "Assistant: " + m.content + o.eos_token;
    } else if (m.role == "system") {
      out += m.content + "\n\n";
    }
  }
  if (o.add_generation_prompt) out += "Assistant:";
  return out;
}

// deepseek-ai/DeepSeek-V3: system prompts joined up front, tool outputs between the tool markers
std::string render_deepseek_v3(const std::vector<ChatMessage>& messages, const ChatOptions& o) {
  const std::string eos = "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>";
  std::string system;
  bool first_system = true;
  for (const ChatMessage& m : messages) {
    if (m.role != "system") continue;
    system += (first_system ? "" : "\n\n") + m.content;
    first_system = false;
  }
  std::string out = o.bos_token + system;
  bool is_tool = false, is_output_first = true;
  for (const ChatMessage& m : messages) {
    if (m.role == "user") {
      is_tool = false;
      out += "<\xEF\xBD\x9CUser\xEF\xBD\x9C>" + m.content;
    } else if (m.role == "assistant") {
      if (is_tool) {
        out += "<\xEF\xBD\x9Ctool\xE2\x96\x81outputs\xE2\x96\x81" "end\xEF\xBD\x9C>" + m.content + eos;
        is_tool = false;
      } else {
        out += "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>" + m.content + eos;
      }
    } else if (m.role == "tool") {
      is_tool = true;
      const std::string output = "<\xEF\xBD\x9Ctool\xE2\x96\x81output\xE2\x96\x81" "begin\xEF\xBD\x9C>" + m.content +
                                 "<\xEF\xBD\x9Ctool\xE2\x96\x81output\xE2\x96\x81" "end\xEF\xBD\x9C>";
      if (is_output_first) {
        out += "<\xEF\xBD\x9Ctool\xE2\x96\x81outputs\xE2\x96\x81" "begin\xEF\xBD\x9C>" + output;
        is_output_first = false;
      } else {
        out += "\n" + output;
      }
    }
  }
  if (is_tool) out += "<\xEF\xBD\x9Ctool\xE2\x96\x81outputs\xE2\x96\x81" "end\xEF\xBD\x9C>";
  if (o.add_generation_prompt && !is_tool) out += "<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>";
  return out;
}

struct FormatName {
  ChatFormat format;
  const char* name;
};
constexpr FormatName kFormatNames[] = {
    {ChatFormat::kLlama2, "llama2"},         {ChatFormat::kMistral, "mistral"},
    {ChatFormat::kMistralV1, "mistral-v1"},  {ChatFormat::kLlama3, "llama3"},
    {ChatFormat::kLlama31, "llama3.1"},
    {ChatFormat::kChatml, "chatml"},         {ChatFormat::kQwen25, "qwen2.5"},
    {ChatFormat::kQwen3, "qwen3"},
    {ChatFormat::kDeepseekV2, "deepseek-v2"}, {ChatFormat::kDeepseekV3, "deepseek-v3"},
    {ChatFormat::kSmolLM2, "smollm2"},
};

std::string known_names() {
  std::string s;
  for (const auto& f : kFormatNames) s += (s.empty() ? "" : ", ") + std::string(f.name);
  return s;
}

}  // namespace

std::string chat_format_name(ChatFormat format) {
  for (const auto& f : kFormatNames) {
    if (f.format == format) return f.name;
  }
  return "unknown";
}

ChatFormat chat_format_from_name(const std::string& name) {
  if (name == "qwen2") return ChatFormat::kChatml;
  for (const auto& f : kFormatNames) {
    if (name == f.name) return f.format;
  }
  throw std::invalid_argument("chat format \"" + name + "\" is not built in (known: " + known_names() + ", qwen2)");
}

ChatFormat detect_chat_format(const std::string& t) {
  const auto has = [&](const char* s) { return contains(t, s); };
  std::string why;  // what was recognised, for the error
  if (has("<\xEF\xBD\x9CUser\xEF\xBD\x9C>") && has("<\xEF\xBD\x9C" "Assistant\xEF\xBD\x9C>")) {
    if (!has("</think>") && !has("<think>")) return ChatFormat::kDeepseekV3;
    why = "a DeepSeek-R1 style template (<｜User｜> with <think> handling)";
  } else if (has("<|im_start|>")) {
    if (has("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.") && !has("<think>")) {
      return ChatFormat::kQwen25;
    } else if (has("Alibaba")) {
      why = "a Qwen ChatML template with another default system prompt";
    } else if (has("<think>") && has("enable_thinking")) {
      return ChatFormat::kQwen3;
    } else if (has("<think>")) {
      why = "a ChatML template with <think> handling but no enable_thinking switch";
    } else if (has(kSmolLM2System) && !has("tools")) {
      return ChatFormat::kSmolLM2;
    } else if (has(kChatmlSystem) && !has("tools")) {
      return ChatFormat::kChatml;
    } else {
      why = "a ChatML template (<|im_start|>) with another default system prompt or tool handling";
    }
  } else if (has("<|start_header_id|>") && has("<|eot_id|>")) {
    if (has("Cutting Knowledge Date") && has("strftime_now")) {
      why = "a Llama-3.2 style template (today's date through strftime_now)";
    } else if (has("Cutting Knowledge Date") && has("26 Jul 2024") && !has("<|image|>")) {
      return ChatFormat::kLlama31;
    } else if (has("Cutting Knowledge Date")) {
      why = "a Llama-3.1+ template variant (system header with \"Cutting Knowledge Date\")";
    } else if (has("tools")) {
      why = "a Llama-3 template with tool handling";
    } else {
      return ChatFormat::kLlama3;
    }
  } else if (has("[INST]")) {
    if (has("<<SYS>>")) return ChatFormat::kLlama2;
    if (has("[AVAILABLE_TOOLS]")) {
      why = "a Mistral v3 template with tools ([AVAILABLE_TOOLS])";
    } else if (has("After the optional system message")) {
      return ChatFormat::kMistralV1;
    } else if (has("Only user and assistant roles are supported!")) {
      return ChatFormat::kMistral;
    } else {
      why = "an [INST] template of an unknown variant";
    }
  } else if (has("'User: '") && has("'Assistant: '")) {
    return ChatFormat::kDeepseekV2;
  } else {
    why = "no known markers";
  }
  const std::string head = t.substr(0, 80);
  throw std::runtime_error("chat_template is not one of anvil's built-in formats (" + known_names() + "): found " +
                           why + "; template begins \"" + head + (t.size() > 80 ? "...\"" : "\"") +
                           "; force a built-in format by name if the model was trained on one");
}

std::string render_chat(ChatFormat format, const std::vector<ChatMessage>& messages, const ChatOptions& options) {
  if (messages.empty()) {
    throw std::invalid_argument("render_chat(" + chat_format_name(format) + "): messages is empty");
  }
  switch (format) {
    case ChatFormat::kLlama2:
      return render_llama2(messages, options);
    case ChatFormat::kMistral:
      return render_mistral(messages, options);
    case ChatFormat::kMistralV1:
      return render_mistral_v1(messages, options);
    case ChatFormat::kLlama3:
      return render_llama3(messages, options);
    case ChatFormat::kLlama31:
      return render_llama31(messages, options);
    case ChatFormat::kChatml:
      return render_chatml(messages, options, kChatmlSystem);
    case ChatFormat::kSmolLM2:
      return render_chatml(messages, options, kSmolLM2System);
    case ChatFormat::kQwen25:
      return render_qwen25(messages, options);
    case ChatFormat::kQwen3:
      return render_qwen3(messages, options);
    case ChatFormat::kDeepseekV2:
      return render_deepseek_v2(messages, options);
    case ChatFormat::kDeepseekV3:
      return render_deepseek_v3(messages, options);
  }
  throw std::invalid_argument("render_chat: unknown format");
}

}  // namespace anvil::data
