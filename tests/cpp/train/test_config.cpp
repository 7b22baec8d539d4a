// The config file reader every recipe uses (anvil/train/config.h): comments are allowed, a repeated key
// is an error naming it (at 878962f a second "train" section silently replaced the first), and errors
// name the file.
#include "anvil/train/config.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>

namespace anvil::train {
namespace {

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + name;
  std::ofstream(path) << text;
  return path;
}

// The message read_config_file throws for `text` ("" when it parses).
std::string error_reading(const std::string& text) {
  const auto path = write_temp("anvil_config_test.json", text);
  try {
    read_config_file(path);
  } catch (const std::invalid_argument& e) {
    std::remove(path.c_str());
    return e.what();
  }
  std::remove(path.c_str());
  return "";
}

TEST(ConfigFile, CommentsAreAllowed) {
  const auto path = write_temp("anvil_config_comments.json",
                               "// a recipe config\n{\n  \"train\": {\"lr\": 1e-3},  /* inline */\n"
                               "  \"data\": {\"train\": \"t.jsonl\"}\n}\n");
  const auto c = read_config_file(path);
  EXPECT_DOUBLE_EQ(c["train"]["lr"].get<double>(), 1e-3);
  EXPECT_EQ(c["data"]["train"], "t.jsonl");
  std::remove(path.c_str());
}

TEST(ConfigFile, DuplicateKeysAreErrors) {
  auto e = error_reading("{\"train\": {\"lr\": 1e-3}, // first\n \"train\": {\"steps\": 5}}");
  EXPECT_NE(e.find("duplicate key 'train'"), std::string::npos) << e;
  EXPECT_NE(e.find("anvil_config_test.json"), std::string::npos) << e;
  e = error_reading("{\"train\": {\"lr\": 1e-3, \"lr\": 2e-3}}");
  EXPECT_NE(e.find("duplicate key 'lr'"), std::string::npos) << e;
  // The same key in two different sections is no duplicate.
  EXPECT_EQ(error_reading("{\"data\": {\"train\": \"a\"}, \"train\": {\"train\": 1}}"), "");
}

TEST(ConfigFile, BadFilesNameTheFile) {
  auto e = error_reading("{\"train\": {\"lr\": }");
  EXPECT_NE(e.find("not valid JSON"), std::string::npos) << e;
  EXPECT_NE(e.find("anvil_config_test.json"), std::string::npos) << e;
  const std::string missing = ::testing::TempDir() + "anvil_no_such_config.json";
  try {
    read_config_file(missing);
    FAIL() << "no error for a missing file";
  } catch (const std::invalid_argument& err) {
    EXPECT_NE(std::string(err.what()).find(missing), std::string::npos) << err.what();
  }
}

}  // namespace
}  // namespace anvil::train
