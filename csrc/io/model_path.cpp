// resolve_model_path: a model argument as a user types it -> a local path.
//
// A path that exists wins. Otherwise "org/name" (or "org/name@revision") is looked up in the local
// Hugging Face cache with huggingface_hub's layout: <cache>/models--org--name/refs/<revision> holds a
// commit hash, and <cache>/models--org--name/snapshots/<hash>/ is the checkout. A revision that is
// itself a snapshot directory name (a commit hash) is used directly. The cache directory follows
// huggingface_hub's precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub,
// XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub. Nothing is downloaded: anvil runs on
// machines without network, and an error that lists where it looked tells the user what to fetch.
#include "anvil/io/safetensors.h"
#include "io/io_internal.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <vector>

namespace anvil::io {
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : "";
}

std::string hub_cache_dir() {
  if (!env("HF_HUB_CACHE").empty()) return env("HF_HUB_CACHE");
  if (!env("HUGGINGFACE_HUB_CACHE").empty()) return env("HUGGINGFACE_HUB_CACHE");  // the older name
  if (!env("HF_HOME").empty()) return join_path(env("HF_HOME"), "hub");
  if (!env("XDG_CACHE_HOME").empty()) return join_path(env("XDG_CACHE_HOME"), "huggingface/hub");
  return join_path(env("HOME").empty() ? "/root" : env("HOME"), ".cache/huggingface/hub");
}

bool plain_name(const std::string& s) {
  if (s.empty() || s == "." || s == "..") return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.')) return false;
  return true;
}

// "org/name" or "org/name@rev" with plain components, else false.
bool parse_hub_id(const std::string& arg, std::string& org, std::string& name, std::string& revision) {
  std::string id = arg;
  revision = "main";
  const auto at = id.find('@');
  if (at != std::string::npos) {
    revision = id.substr(at + 1);
    id = id.substr(0, at);
  }
  const auto slash = id.find('/');
  if (slash == std::string::npos || id.find('/', slash + 1) != std::string::npos) return false;
  org = id.substr(0, slash);
  name = id.substr(slash + 1);
  return plain_name(org) && plain_name(name) && plain_name(revision);
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.erase(s.begin());
  return s;
}

}  // namespace

std::string resolve_model_path(const std::string& arg) {
  TORCH_CHECK(!arg.empty(), "model: empty model argument");
  if (is_directory(arg) || is_regular_file(arg)) return arg;

  std::string org, name, revision;
  TORCH_CHECK(parse_hub_id(arg, org, name, revision), "model '", arg,
              "': no such file or directory, and not a hub id of the form org/name[@revision]");
  const std::string cache = hub_cache_dir();
  const std::string repo = join_path(cache, "models--" + org + "--" + name);
  std::vector<std::string> looked = {"'" + arg + "' (as a path)"};

  const std::string ref = join_path(repo, "refs/" + revision);
  if (is_regular_file(ref)) {
    const std::string commit = trim(read_text_file(ref, 4096));
    if (plain_name(commit)) {
      const std::string snapshot = join_path(repo, "snapshots/" + commit);
      if (is_directory(snapshot)) return snapshot;
      looked.push_back("'" + snapshot + "' (the snapshot " + ref + " names)");
    } else {
      looked.push_back("'" + ref + "' (holds no commit hash)");
    }
  } else {
    looked.push_back("'" + ref + "'");
  }
  const std::string by_hash = join_path(repo, "snapshots/" + revision);
  if (is_directory(by_hash)) return by_hash;
  looked.push_back("'" + by_hash + "'");

  std::string where;
  for (const auto& l : looked) where += "\n  " + l;
  TORCH_CHECK(false, "model '", arg, "' is not in the local Hugging Face cache (", cache,
              "; set HF_HUB_CACHE or HF_HOME to another cache; nothing is downloaded). Looked at:", where);
}

}  // namespace anvil::io
