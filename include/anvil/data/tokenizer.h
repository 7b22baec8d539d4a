// Tokenizers of the model families anvil adapts, in plain C++ (no Python, no torch types), and the
// chat formats that turn a conversation into the text a chat model was trained on.
//
// Two kinds of tokenizer files are read, as transformers' AutoTokenizer finds them in a model folder:
//   tokenizer.json   Hugging Face `tokenizers` byte-level BPE (GPT-2, Llama-3, Qwen2/Qwen3, DeepSeek-V2/V3):
//                    the pipeline is re-implemented step for step (added tokens, normalizer, pre-tokenizer
//                    regexes through PCRE2, BPE merges by rank, post-processor, ByteLevel decoder), so ids
//                    and decoded text equal the `tokenizers` package's.
//   tokenizer.model  SentencePiece (Llama-2, Mistral, Mixtral) through libsentencepiece.
// tokenizer_config.json (bos/eos/pad/unk tokens, add_bos_token/add_eos_token, chat_template),
// chat_template.jinja, special_tokens_map.json and generation_config.json are read when present.
//
// Chat templates are Jinja programs, and no C++ Jinja engine is packaged; anvil therefore carries the
// published templates of its families as built-in formats (ChatFormat), recognises a model's template
// by signature substrings, and refuses a template it does not recognise with an error that says what
// it found. docs/FORMATS.md ("Tokenizers") lists what is supported and each error.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace anvil::data {

/// One turn of a conversation: role is "system", "user" or "assistant"; content is plain text.
/// `reasoning` (Qwen3, DeepSeek-R1 style) is the thinking text of an assistant turn, when kept apart.
struct ChatMessage {
  std::string role;
  std::string content;
  std::optional<std::string> reasoning;
};

/// The built-in chat formats, each equal (string for string) to a published Jinja template.
enum class ChatFormat {
  kLlama2,      ///< meta-llama/Llama-2-*-chat: `<s>[INST] <<SYS>>\n..\n<</SYS>>\n\nuser [/INST] reply </s>`
  kMistral,     ///< Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct-v0.1 (original): no system role
  kMistralV1,   ///< Mistral-7B-Instruct-v0.2/v0.3, Mixtral (updated): system prompt before the first user turn
  kLlama3,      ///< Meta-Llama-3-*-Instruct: `<|start_header_id|>role<|end_header_id|>\n\n..<|eot_id|>`
  kLlama31,     ///< Llama-3.1 / 3.3-*-Instruct: Llama-3 turns after a dated system header (no tool calls)
  kChatml,      ///< Qwen2 / Qwen1.5 ChatML with the default system prompt "You are a helpful assistant."
  kQwen25,      ///< Qwen2.5-*-Instruct ChatML: default system prompt "You are Qwen, created by Alibaba Cloud..."
  kQwen3,       ///< Qwen3 ChatML: no default system prompt, `<think>` blocks, enable_thinking
  kDeepseekV2,  ///< DeepSeek-V2-Chat: `User: ..\n\nAssistant: ..<｜end▁of▁sentence｜>`
  kDeepseekV3,  ///< DeepSeek-V3: `<｜User｜>..<｜Assistant｜>..<｜end▁of▁sentence｜>`
  kSmolLM2,     ///< SmolLM2-*-Instruct ChatML: default system prompt "You are a helpful AI assistant named SmolLM..."
};

/// Options of a chat rendering, named as the Jinja templates name them.
struct ChatOptions {
  bool add_generation_prompt = false;    ///< end with the opening of an assistant turn
  std::optional<bool> enable_thinking;   ///< Qwen3: false closes an empty <think> block in the prompt
  std::string bos_token;                 ///< the text of bos/eos as the template prints them
  std::string eos_token;
  std::string date_string = "26 Jul 2024";  ///< Llama-3.1's "Today Date" (the template's default)
};

/// The format's name as accepted by chat_format_from_name: "llama2", "mistral", "mistral-v1", "llama3",
/// "llama3.1", "chatml" (alias "qwen2"), "qwen2.5", "qwen3", "deepseek-v2", "deepseek-v3".
std::string chat_format_name(ChatFormat format);

/// The format of a name (see chat_format_name); throws std::invalid_argument listing the known names.
ChatFormat chat_format_from_name(const std::string& name);

/// Recognises a tokenizer_config.json chat_template by signature substrings. Throws std::runtime_error
/// naming the markers it found (or a prefix of the template) when it is none of the built-in formats.
ChatFormat detect_chat_format(const std::string& jinja_template);

/// Renders a conversation as the format's Jinja template would. Throws std::invalid_argument (naming the
/// message index and role) where the template raises (roles that must alternate, unsupported roles).
std::string render_chat(ChatFormat format, const std::vector<ChatMessage>& messages, const ChatOptions& options);

/// A tokenizer: text to ids and back, with the special tokens of its model.
/// encode/decode are const and safe to call from several threads at once.
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Ids of `text`. add_special_tokens adds what the model's post-processor adds (bos for Llama-3,
  /// DeepSeek and SentencePiece models whose config asks for it; nothing for GPT-2/Qwen).
  /// Special-token strings inside `text` (e.g. "<|im_start|>") become their ids, as in transformers.
  virtual std::vector<int32_t> encode(const std::string& text, bool add_special_tokens = true) const = 0;

  /// Text of `ids`; skip_special_tokens drops special tokens (bos, eos, ChatML markers...).
  /// Byte sequences that are not valid UTF-8 decode to U+FFFD, as the Python packages do.
  /// Throws std::out_of_range naming the first id outside [0, vocab_size()).
  virtual std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const = 0;

  /// Number of ids (model vocabulary plus added tokens), as len(tokenizer) in transformers.
  virtual int64_t vocab_size() const = 0;

  /// Id of a token string (the vocabulary's spelling, e.g. "Ġthe" or "▁the"); nullopt when absent.
  virtual std::optional<int32_t> token_to_id(const std::string& token) const = 0;

  /// Token string of an id; throws std::out_of_range when the id is not in the vocabulary.
  virtual std::string id_to_token(int32_t id) const = 0;

  /// "hf-bpe" or "sentencepiece".
  virtual std::string kind() const = 0;

  /// Special token ids, -1 where the model has none. eos_ids() holds every id that ends generation
  /// (generation_config.json's eos_token_id list where present, else eos_id()).
  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  int32_t unk_id() const { return unk_id_; }
  const std::vector<int32_t>& eos_ids() const { return eos_ids_; }
  const std::string& bos_token() const { return bos_token_; }
  const std::string& eos_token() const { return eos_token_; }

  /// Every id that skip_special_tokens drops.
  const std::set<int32_t>& special_ids() const { return special_ids_; }
  bool is_special(int32_t id) const { return special_ids_.count(id) != 0; }

  /// The model's Jinja chat template (empty when it has none).
  const std::string& chat_template() const { return chat_template_; }

  /// The built-in format of chat_template(), or the forced one (set_chat_format). Throws when the model
  /// has no template and none was forced, or when its template is not recognised (the error names it).
  ChatFormat chat_format() const;
  void set_chat_format(ChatFormat format) { forced_chat_format_ = format; }

  /// render_chat with this model's format and bos/eos texts. Tokenize the result with
  /// add_special_tokens = false: the rendered text already carries bos where the template puts it.
  std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                          std::optional<bool> enable_thinking = std::nullopt) const;

 protected:
  int32_t bos_id_ = -1, eos_id_ = -1, pad_id_ = -1, unk_id_ = -1;
  std::vector<int32_t> eos_ids_;
  std::string bos_token_, eos_token_;
  std::set<int32_t> special_ids_;
  std::string chat_template_;
  std::optional<ChatFormat> forced_chat_format_;
};

/// Loads the tokenizer of a model folder as AutoTokenizer would: tokenizer.json when it holds a
/// supported byte-level BPE, else tokenizer.model (SentencePiece), plus the config files named above.
/// Throws std::runtime_error naming the file and the rule broken: a missing folder or file, malformed
/// JSON, or an unsupported normalizer / pre-tokenizer / model / post-processor / decoder type.
/// A GGUF file (llama.cpp) instead of a folder: the tokenizer its tokenizer.ggml.* metadata describes
/// (load_gguf_tokenizer).
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& dir);

/// The byte-level BPE tokenizer of a GGUF file's metadata (tokenizer.ggml.model "gpt2"; pre-tokenizers
/// default/gpt-2, smollm, llama-bpe, qwen2), with its bos/eos/pad/unk ids, add_bos/add_eos and chat
/// template. Throws std::runtime_error naming the file and the key for anything else, pointing to a
/// tokenizer.json folder instead.
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const std::string& path);

/// Loads one tokenizer.json alone (no config files): bos/eos come from its post-processor only.
std::unique_ptr<Tokenizer> load_hf_tokenizer_json(const std::string& path);

/// Loads one SentencePiece .model alone: bos/eos ids from the model, add_bos as given.
std::unique_ptr<Tokenizer> load_sentencepiece_model(const std::string& path, bool add_bos = true,
                                                     bool add_eos = false);

}  // namespace anvil::data
