// C++ tests of the tokenizers (anvil/data/tokenizer.h) on the fixtures of tests/data/tokenizers: lossless
// round trips, edge cases (empty text, whitespace runs, invalid UTF-8, ids out of range, lstrip/rstrip
// added tokens, both merge formats, threads), and the errors that must name what is unsupported or
// malformed. Parity of ids with the Python packages is tests/python/test_tokenizer.py's job.
#include "anvil/data/tokenizer.h"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <thread>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>

namespace {

namespace fs = std::filesystem;
using anvil::data::ChatFormat;
using anvil::data::ChatMessage;
using anvil::data::load_tokenizer;
using json = nlohmann::json;

const fs::path kData = fs::path(ANVIL_TEST_DATA_DIR) / "tokenizers";
const std::vector<std::string> kBpeFamilies = {"gpt2", "llama3", "qwen2", "deepseek_v3"};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string sample() { return read_file(kData / "multilingual_sample.txt"); }

// A scratch folder holding modified copies of fixture files. POSIX calls, not std::filesystem: libtorch
// exports copies of some std::filesystem functions that crash when a test binds to them.
struct ScratchDir {
  fs::path path;
  std::vector<std::string> files;
  ScratchDir() {
    static int counter = 0;
    const char* tmp = std::getenv("TMPDIR");
    const std::string name = "anvil_tok_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++);
    path = fs::path(tmp ? tmp : "/tmp") / name;
    ::mkdir(path.c_str(), 0700);
  }
  ~ScratchDir() {
    for (const auto& f : files) std::remove((path / f).c_str());
    ::rmdir(path.c_str());
  }
  void write(const std::string& name, const std::string& text) {
    std::ofstream(path / name, std::ios::binary) << text;
    files.push_back(name);
  }
};

json fixture_json(const std::string& family) { return json::parse(read_file(kData / family / "tokenizer.json")); }

// Loading a fixture's tokenizer.json with one change must fail with a message holding every word.
void expect_load_error(const std::function<void(json&)>& change, const std::vector<std::string>& words) {
  json j = fixture_json("gpt2");
  change(j);
  ScratchDir dir;
  dir.write("tokenizer.json", j.dump());
  try {
    load_tokenizer(dir.path.string());
    FAIL() << "no error; expected one naming " << words[0];
  } catch (const std::runtime_error& e) {
    const std::string msg = e.what();
    for (const auto& w : words) EXPECT_NE(msg.find(w), std::string::npos) << "\"" << w << "\" not in: " << msg;
  }
}

TEST(Tokenizer, RoundTripsTheSampleExactly) {
  const std::string text = sample() + "\r\n\t \u00a0 trailing   ";
  for (const auto& family : kBpeFamilies) {
    const auto tok = load_tokenizer((kData / family).string());
    EXPECT_EQ(tok->kind(), "hf-bpe");
    const auto ids = tok->encode(text, false);
    EXPECT_GT(ids.size(), text.size() / 8) << family;
    EXPECT_EQ(tok->decode(ids), text) << family;  // the sample is already NFC, so qwen2 keeps it too
  }
  const auto spm = load_tokenizer((kData / "llama2").string());
  EXPECT_EQ(spm->kind(), "sentencepiece");
  const auto ids = spm->encode(text, true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), spm->bos_id());
  EXPECT_EQ(spm->decode(ids, true), text);
}

TEST(Tokenizer, EmptyAndWhitespaceOnlyText) {
  const auto llama3 = load_tokenizer((kData / "llama3").string());
  EXPECT_TRUE(llama3->encode("", false).empty());
  EXPECT_EQ(llama3->encode("", true), std::vector<int32_t>{llama3->bos_id()});
  EXPECT_EQ(llama3->decode({}), "");
  for (const std::string& ws : std::vector<std::string>{" ", "   ", "\n\n\n", " \t\r\n ", std::string(5000, ' ')}) {
    EXPECT_EQ(llama3->decode(llama3->encode(ws, false)), ws);
  }
  const auto qwen = load_tokenizer((kData / "qwen2").string());
  EXPECT_TRUE(qwen->encode("", true).empty());  // Qwen adds no bos
  EXPECT_EQ(qwen->bos_id(), -1);
}

TEST(Tokenizer, SpecialTokensInTextBecomeIdsAndCanBeSkipped) {
  const auto qwen = load_tokenizer((kData / "qwen2").string());
  const int32_t start = *qwen->token_to_id("<|im_start|>"), end = *qwen->token_to_id("<|im_end|>");
  const auto ids = qwen->encode("<|im_start|>user\nhi<|im_end|>", false);
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), start);
  EXPECT_EQ(ids.back(), end);
  EXPECT_TRUE(qwen->is_special(start));
  EXPECT_EQ(qwen->decode(ids, true), "user\nhi");
  EXPECT_EQ(qwen->decode(ids, false), "<|im_start|>user\nhi<|im_end|>");
  // <think> is an added token but not special: kept by skip_special_tokens.
  const int32_t think = *qwen->token_to_id("<think>");
  EXPECT_FALSE(qwen->is_special(think));
  EXPECT_EQ(qwen->decode(qwen->encode("<think>x</think>", false), true), "<think>x</think>");
}

TEST(Tokenizer, AddedTokenLstripAndRstripSwallowWhitespace) {
  const auto gpt2 = load_tokenizer((kData / "gpt2").string());
  const int32_t mask = *gpt2->token_to_id("<mask>"), sep = *gpt2->token_to_id("<sep/>");
  // "<mask>" has lstrip: the spaces before it belong to it; "<sep/>" has rstrip: the spaces after it.
  const auto a = gpt2->encode("a   <mask>b", false);
  EXPECT_EQ(a, (std::vector<int32_t>{*gpt2->token_to_id("a"), mask, *gpt2->token_to_id("b")}));
  const auto b = gpt2->encode("x<sep/>   y", false);
  EXPECT_EQ(b, (std::vector<int32_t>{*gpt2->token_to_id("x"), sep, *gpt2->token_to_id("y")}));
  EXPECT_EQ(gpt2->decode(b), "x<sep/>y");
}

TEST(Tokenizer, NormalizedAddedTokenMatchesAfterNfc) {
  const auto qwen = load_tokenizer((kData / "qwen2").string());
  const int32_t id = *qwen->token_to_id("caf\u00e9 au lait");
  EXPECT_EQ(qwen->encode("caf\u00e9 au lait", false), std::vector<int32_t>{id});
  EXPECT_EQ(qwen->encode("cafe\u0301 au lait", false), std::vector<int32_t>{id});  // decomposed spelling
}

TEST(Tokenizer, BothMergeFormatsGiveTheSameIds) {
  json j = fixture_json("gpt2");
  ASSERT_TRUE(j["model"]["merges"][0].is_string());  // the fixture keeps the older "a b" format
  json pairs = json::array();
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  j["model"]["merges"] = pairs;
  ScratchDir dir;
  dir.write("tokenizer.json", j.dump());
  const auto strings = anvil::data::load_hf_tokenizer_json((kData / "gpt2" / "tokenizer.json").string());
  const auto arrays = anvil::data::load_hf_tokenizer_json((dir.path / "tokenizer.json").string());
  const std::string text = sample();
  EXPECT_EQ(strings->encode(text), arrays->encode(text));
}

TEST(Tokenizer, VocabularyLookupIsConsistent) {
  for (const auto& family : std::vector<std::string>{"gpt2", "llama3", "qwen2", "deepseek_v3", "llama2"}) {
    const auto tok = load_tokenizer((kData / family).string());
    for (int32_t id = 0; id < tok->vocab_size(); ++id) {
      ASSERT_EQ(tok->token_to_id(tok->id_to_token(id)), id) << family << " id " << id;
    }
    EXPECT_FALSE(tok->token_to_id("no such token \xE2\x98\x83").has_value());
    EXPECT_THROW(tok->id_to_token(static_cast<int32_t>(tok->vocab_size())), std::out_of_range);
  }
}

TEST(Tokenizer, BadInputsNameTheRule) {
  const auto tok = load_tokenizer((kData / "llama3").string());
  try {
    tok->encode(std::string("ok \xC3\x28 bad"), false);
    FAIL() << "invalid UTF-8 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("invalid UTF-8 at byte 3"), std::string::npos) << e.what();
  }
  try {
    tok->decode({1, 2, 999999});
    FAIL() << "out-of-range id accepted";
  } catch (const std::out_of_range& e) {
    EXPECT_NE(std::string(e.what()).find("id 999999"), std::string::npos) << e.what();
  }
  const auto spm = load_tokenizer((kData / "llama2").string());
  EXPECT_THROW(spm->decode({-5}), std::out_of_range);
  EXPECT_THROW(spm->encode("\xFF", false), std::invalid_argument);
}

// A tokenizer.model whose piece holds a NUL byte made libsentencepiece abort the process (its trie builder throws
// where nothing catches it; found by tests/fuzz/fuzz_tokenizer_model, the input kept in hostile_nul_piece/): it is
// refused before the library sees it, naming the file and the piece.
TEST(Tokenizer, SentencePieceModelWithANulPieceIsRefused) {
  try {
    load_tokenizer((kData / "hostile_nul_piece").string());
    FAIL() << "a piece holding a NUL byte was accepted";
  } catch (const std::runtime_error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("hostile_nul_piece/tokenizer.model"), std::string::npos) << m;
    EXPECT_NE(m.find("holds a NUL byte"), std::string::npos) << m;
  }
}

TEST(Tokenizer, DecodeOfPartialUtf8GivesReplacementCharacters) {
  const auto tok = load_tokenizer((kData / "gpt2").string());
  // "Ã" (U+00C3) stands for byte 0xC3, the lead of a two-byte sequence: alone it is invalid UTF-8.
  const int32_t lead = *tok->token_to_id("\xC3\x83");
  const int32_t a = *tok->token_to_id("a");
  EXPECT_EQ(tok->decode({lead}), "\xEF\xBF\xBD");
  EXPECT_EQ(tok->decode({a, lead, a}), "a\xEF\xBF\xBD" "a");
  EXPECT_EQ(tok->decode({lead, lead}), "\xEF\xBF\xBD\xEF\xBF\xBD");
}

TEST(Tokenizer, EncodeIsThreadSafe) {
  const auto tok = load_tokenizer((kData / "qwen2").string());
  const std::string text = sample();
  const auto expected = tok->encode(text);
  std::vector<std::vector<int32_t>> results(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 5; ++rep) results[t] = tok->encode(text);
    });
  }
  for (auto& th : threads) th.join();
  for (const auto& r : results) EXPECT_EQ(r, expected);
}

TEST(Tokenizer, UnsupportedTypesAreNamed) {
  expect_load_error([](json& j) { j["normalizer"] = {{"type", "Lowercase"}}; }, {"normalizer", "Lowercase"});
  expect_load_error([](json& j) { j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "x"}}; },
                    {"pre_tokenizer", "Metaspace"});
  expect_load_error([](json& j) { j["model"]["type"] = "WordPiece"; }, {"model", "WordPiece"});
  expect_load_error([](json& j) { j["decoder"] = {{"type", "WordPiece"}}; }, {"decoder", "WordPiece"});
  expect_load_error([](json& j) { j["post_processor"] = {{"type", "Frobnicate"}}; }, {"post_processor", "Frobnicate"});
  expect_load_error([](json& j) { j["model"]["byte_fallback"] = true; }, {"byte_fallback"});
  expect_load_error([](json& j) { j["model"]["merges"][0] = "nospace"; }, {"merges[0]", "one space"});
  expect_load_error([](json& j) { j["model"]["merges"][1] = "\xE2\x98\x83 x"; }, {"merges[1]", "not in model.vocab"});
  expect_load_error([](json& j) { j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}},
                                                        {"behavior", "Isolated"}, {"invert", false}}; },
                    {"regex does not compile"});
  expect_load_error([](json& j) { j["added_tokens"][0]["single_word"] = true; }, {"added_tokens[0]", "single_word"});
}

// Hostile ids ([hardening] item 1): at 878962f an added-token id of -1 wrapped size_t(-1) + 1 to 0 and wrote at
// id_to_token_[SIZE_MAX] (heap corruption, SIGABRT), vocab ids were narrowed to int32 unchecked, and a tiny
// file with id 2^31 - 1 asked for ~64 GB. Each is now an error naming the field and the bound.
TEST(Tokenizer, HostileIdsAreErrorsNotCorruption) {
  expect_load_error([](json& j) { j["added_tokens"][0]["id"] = -1; }, {"added_tokens[0].id = -1", "outside [0, 4194303]"});
  expect_load_error([](json& j) { j["added_tokens"][0]["id"] = "7"; }, {"added_tokens[0].id", "not an integer id"});
  expect_load_error([](json& j) { j["added_tokens"][0]["id"] = 2147483647; }, {"added_tokens[0].id = 2147483647"});
  expect_load_error([](json& j) { j["added_tokens"][0] = json::array({1}); }, {"added_tokens[0]", "integer \"id\""});
  expect_load_error([](json& j) { j["model"]["vocab"]["!"] = 4294967297LL; }, {"model.vocab[\"!\"] = 4294967297"});
  expect_load_error([](json& j) { j["model"]["vocab"]["!"] = 1000000000; }, {"model.vocab[\"!\"]", "outside"});
  expect_load_error([](json& j) { j["model"]["vocab"]["!"] = -3; }, {"model.vocab[\"!\"] = -3"});
  expect_load_error([](json& j) { j["model"]["vocab"]["!"] = 1.5; }, {"model.vocab[\"!\"]", "not an integer id"});
}

TEST(Tokenizer, FolderErrorsNameTheFile) {
  try {
    load_tokenizer("/nonexistent/anvil/model");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("not a directory"), std::string::npos) << e.what();
  }
  ScratchDir empty;
  try {
    load_tokenizer(empty.path.string());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("neither tokenizer.json nor tokenizer.model"), std::string::npos);
  }
  ScratchDir broken;
  broken.write("tokenizer.json", "{\"model\": [1, 2");
  try {
    load_tokenizer(broken.path.string());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json: not valid JSON"), std::string::npos) << e.what();
  }
  ScratchDir bad_config;
  bad_config.write("tokenizer.json", read_file(kData / "gpt2" / "tokenizer.json"));
  bad_config.write("tokenizer_config.json", "{\"eos_token\": 5}");
  try {
    load_tokenizer(bad_config.path.string());
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("\"eos_token\" is neither a string"), std::string::npos) << e.what();
  }
  ScratchDir not_spm;
  not_spm.write("tokenizer.model", "this is not a protobuf");
  EXPECT_THROW(load_tokenizer(not_spm.path.string()), std::runtime_error);
}

TEST(Tokenizer, ConfigFilesSetSpecialTokens) {
  const auto llama3 = load_tokenizer((kData / "llama3").string());
  EXPECT_EQ(llama3->bos_id(), *llama3->token_to_id("<|begin_of_text|>"));
  EXPECT_EQ(llama3->eos_id(), *llama3->token_to_id("<|eot_id|>"));
  EXPECT_EQ(llama3->eos_ids().size(), 2u);  // generation_config.json lists two
  EXPECT_EQ(llama3->chat_format(), ChatFormat::kLlama3);
  const auto qwen = load_tokenizer((kData / "qwen2").string());
  EXPECT_EQ(qwen->pad_id(), *qwen->token_to_id("<|endoftext|>"));
  EXPECT_EQ(qwen->chat_format(), ChatFormat::kQwen3);
  // A config that asks for eos too: transformers rebuilds the post-processor as bos $A eos.
  ScratchDir dir;
  dir.write("tokenizer.json", read_file(kData / "llama3" / "tokenizer.json"));
  dir.write("tokenizer_config.json",
            R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "add_bos_token": true, "add_eos_token": true,
                "chat_template": [{"name": "default", "template": "x <|im_start|> <think> enable_thinking"}]})");
  const auto both = load_tokenizer(dir.path.string());
  const auto ids = both->encode("hi");
  EXPECT_EQ(ids.front(), both->bos_id());
  EXPECT_EQ(ids.back(), both->eos_id());
  EXPECT_EQ(both->chat_format(), ChatFormat::kQwen3);
}

TEST(ChatFormat, NamesRoundTripAndUnknownNamesAreListed) {
  for (const auto f : {ChatFormat::kLlama2, ChatFormat::kMistral, ChatFormat::kMistralV1, ChatFormat::kLlama3,
                       ChatFormat::kLlama31, ChatFormat::kQwen25,
                       ChatFormat::kChatml, ChatFormat::kQwen3, ChatFormat::kDeepseekV2, ChatFormat::kDeepseekV3,
                       ChatFormat::kSmolLM2}) {
    EXPECT_EQ(anvil::data::chat_format_from_name(anvil::data::chat_format_name(f)), f);
  }
  try {
    anvil::data::chat_format_from_name("vicuna");
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("\"vicuna\""), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("deepseek-v3"), std::string::npos);
  }
}

TEST(ChatFormat, DetectsTheStoredTemplates) {
  const fs::path dir = fs::path(ANVIL_TEST_DATA_DIR) / "chat_templates";
  const std::vector<std::pair<std::string, ChatFormat>> cases = {
      {"llama2", ChatFormat::kLlama2},         {"mistral", ChatFormat::kMistral},
      {"mistral_v1", ChatFormat::kMistralV1},  {"llama3", ChatFormat::kLlama3},
      {"llama3_1", ChatFormat::kLlama31},
      {"qwen2", ChatFormat::kChatml},          {"qwen2_5", ChatFormat::kQwen25},
      {"qwen3", ChatFormat::kQwen3},
      {"deepseek_v2", ChatFormat::kDeepseekV2}, {"deepseek_v3", ChatFormat::kDeepseekV3},
      {"smollm2", ChatFormat::kSmolLM2}};
  for (const auto& [file, format] : cases) {
    EXPECT_EQ(anvil::data::detect_chat_format(read_file(dir / (file + ".jinja"))), format) << file;
  }
  try {
    anvil::data::detect_chat_format("{{ messages }}");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("no known markers"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("{{ messages }}"), std::string::npos) << e.what();
  }
}

TEST(ChatFormat, TemplateErrorsNameTheMessage) {
  anvil::data::ChatOptions o;
  const std::vector<ChatMessage> twice_user = {{"user", "a", std::nullopt}, {"user", "b", std::nullopt}};
  try {
    anvil::data::render_chat(ChatFormat::kLlama2, twice_user, o);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("messages[1] (role \"user\")"), std::string::npos) << e.what();
  }
  const std::vector<ChatMessage> with_system = {{"system", "s", std::nullopt}, {"user", "u", std::nullopt}};
  EXPECT_THROW(anvil::data::render_chat(ChatFormat::kMistral, with_system, o), std::invalid_argument);
  EXPECT_THROW(anvil::data::render_chat(ChatFormat::kChatml, {}, o), std::invalid_argument);
  // Qwen3: enable_thinking = false closes an empty think block in the generation prompt.
  o.add_generation_prompt = true;
  o.enable_thinking = false;
  const std::string text = anvil::data::render_chat(ChatFormat::kQwen3, {{"user", "hi", std::nullopt}}, o);
  EXPECT_EQ(text, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

}  // namespace
