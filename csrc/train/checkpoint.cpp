// Training checkpoints (include/anvil/train/checkpoint.h).
#include "anvil/train/checkpoint.h"

#include "anvil/io/fs.h"
#include "anvil/io/safetensors.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace anvil::train {

using nlohmann::json;

namespace {

// A test hook (tests/python/test_train.py): ANVIL_TEST_CHECKPOINT_CRASH="<save>:<stage>" ends the process
// with status 86 at `stage` of the `save`-th save of this process, to prove that every stage of the
// rotation leaves a checkpoint that --resume finds. Stages: 0 halfway through checkpoint.tmp/, 1 tmp
// complete, 2 checkpoint.old/ removed, 3 checkpoint/ moved to .old, 4 tmp renamed into place, 5 .old removed.
void crash_point(int64_t save, int stage) {
  static const char* spec = std::getenv("ANVIL_TEST_CHECKPOINT_CRASH");
  if (!spec) return;
  long long want_save = -1;
  int want_stage = -1;
  if (std::sscanf(spec, "%lld:%d", &want_save, &want_stage) == 2 && want_save == save && want_stage == stage)
    std::_Exit(86);
}

// checkpoint.tmp/ and checkpoint.old/ beside checkpoint/.
std::string sibling(const std::string& out_dir, const char* name) { return io::join_path(out_dir, name); }

// state.json is written last: a folder that has it is complete.
bool complete(const std::string& dir) { return io::is_regular_file(io::join_path(dir, "state.json")); }

}  // namespace

NamedTensors generator_states(at::Device device) {
  NamedTensors rng = {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}};
  if (device.is_cuda()) rng.emplace_back("cuda", at::globalContext().defaultGenerator(device).get_state());
  return rng;
}

void save_training_checkpoint(const std::string& out_dir, const NamedTensors& trainable, const AdamW& optimizer,
                              const TrainState& st, const json& config, const NamedTensors& generators,
                              const std::vector<CheckpointFile>& extra) {
  static int64_t saves = 0;
  const int64_t save = ++saves;
  const std::string dir = sibling(out_dir, "checkpoint"), tmp = sibling(out_dir, "checkpoint.tmp"),
                    old = sibling(out_dir, "checkpoint.old");
  io::remove_tree(tmp);  // an incomplete one (find_checkpoint has promoted a complete one)
  io::make_directories(tmp);
  NamedTensors weights;
  for (const auto& [name, t] : trainable) weights.emplace_back(name, t.detach());
  io::save_safetensors(io::join_path(tmp, "trainable.safetensors"), weights);
  crash_point(save, 0);
  io::save_safetensors(io::join_path(tmp, "optimizer.safetensors"), optimizer.state_tensors());
  for (const auto& f : extra) io::save_safetensors(io::join_path(tmp, f.name), f.tensors);
  io::save_safetensors(io::join_path(tmp, "rng.safetensors"), generators);
  json state = {{"step", st.step},     {"epoch", st.epoch},       {"batch_index", st.index},
                {"tokens", st.tokens}, {"elapsed_s", st.elapsed}, {"config", config}};
  io::write_text_atomically(io::join_path(tmp, "state.json"), state.dump(2) + "\n");  // last: tmp is complete
  crash_point(save, 1);
  // The rotation. At every moment one of checkpoint/, checkpoint.tmp/ (complete) or checkpoint.old/ is a
  // complete checkpoint, and find_checkpoint takes the newest: .old is only removed while checkpoint/
  // exists, so after a resume from .old (checkpoint/ absent) it stays until tmp is in place.
  if (io::path_exists(dir)) {
    io::remove_tree(old);
    crash_point(save, 2);
    io::rename_path(dir, old);
    crash_point(save, 3);
  }
  io::rename_path(tmp, dir);
  crash_point(save, 4);
  io::remove_tree(old);
  crash_point(save, 5);
}

namespace {

// state.json of a checkpoint folder, parsed; errors name the file (a torn or hand-edited one must not
// surface as a bare JSON message).
json read_state(const std::string& dir) {
  const std::string path = io::join_path(dir, "state.json");
  json state;
  try {
    state = json::parse(io::read_text_file(path));
  } catch (const json::exception& e) {
    throw std::runtime_error("--resume: " + path + " is not valid JSON: " + e.what());
  }
  if (!state.is_object()) throw std::runtime_error("--resume: " + path + " must hold a JSON object");
  return state;
}

// state[key] as T, or an error naming the file and the key.
template <class T>
T state_value(const json& state, const std::string& dir, const char* key) {
  const std::string path = io::join_path(dir, "state.json");
  if (!state.contains(key)) throw std::runtime_error("--resume: " + path + " lacks the key \"" + key + "\"");
  try {
    return state[key].get<T>();
  } catch (const json::exception&) {
    throw std::runtime_error("--resume: " + path + ": \"" + key + "\" has the wrong type (" + state[key].dump() + ")");
  }
}

}  // namespace

std::string find_checkpoint(const std::string& out_dir) {
  const std::string dir = sibling(out_dir, "checkpoint"), tmp = sibling(out_dir, "checkpoint.tmp"),
                    old = sibling(out_dir, "checkpoint.old");
  // Finish a save that was interrupted, so that the next save starts from checkpoint/ alone. A complete
  // tmp is the newest (it was written after checkpoint/ and .old); a .old without checkpoint/ is newer
  // than nothing.
  if (complete(tmp)) {
    if (io::path_exists(dir)) {
      io::remove_tree(old);
      io::rename_path(dir, old);
    }
    io::rename_path(tmp, dir);
    io::remove_tree(old);
  } else if (!io::path_exists(dir) && complete(old)) {
    io::rename_path(old, dir);
  }
  if (complete(dir)) return dir;
  throw std::runtime_error("--resume: no checkpoint in " + dir +
                           " (start without --resume, or set output.dir to the run to continue)");
}

json checkpoint_config(const std::string& checkpoint_dir) {
  const json state = read_state(checkpoint_dir);
  auto config = state_value<json>(state, checkpoint_dir, "config");
  if (!config.is_object())
    throw std::runtime_error("--resume: " + io::join_path(checkpoint_dir, "state.json") + ": \"config\" must be an object");
  return config;
}

void check_same_run(const json& now, const json& then, const std::vector<std::string>& sections) {
  for (const auto& section : sections) {
    if (!now.contains(section) || !now.at(section).is_object()) continue;
    const auto then_section = then.find(section);
    const bool has = then_section != then.end() && then_section->is_object();
    for (auto it = now.at(section).begin(); it != now.at(section).end(); ++it) {
      const json was = has ? then_section->value(it.key(), json()) : json();
      if (was != it.value())
        throw std::runtime_error("--resume: config key " + section + "." + it.key() + " is " + it.value().dump() +
                                 " but the checkpoint was made with " + was.dump());
    }
  }
  // Read without operator[] on a const json, which is undefined behaviour for a missing key.
  const auto value = [](const json& config, const char* key) {
    const auto train = config.find("train");
    return train != config.end() && train->is_object() ? train->value(key, json()) : json();
  };
  for (const char* key : {"batch_size", "grad_accum", "seed"})
    if (value(then, key) != value(now, key))
      throw std::runtime_error(std::string("--resume: config key train.") + key + " is " + value(now, key).dump() +
                               " but the checkpoint was made with " + value(then, key).dump());
}

namespace {

void copy_trainable(const std::string& dir, const NamedTensors& trainable, const std::string& what) {
  io::SafetensorsFile f(io::join_path(dir, "trainable.safetensors"));
  at::NoGradGuard no_grad;
  for (const auto& [name, t] : trainable) {
    if (!f.contains(name)) throw std::runtime_error(what + ": " + f.path() + " lacks tensor '" + name + "'");
    auto src = f.tensor(name);
    if (src.sizes() != t.sizes())
      throw std::runtime_error(what + ": tensor '" + name + "' in " + f.path() + " has shape " + c10::str(src.sizes()) +
                               ", the model needs " + c10::str(t.sizes()));
    auto dst = t;
    dst.copy_(src);
  }
}

}  // namespace

int64_t load_checkpoint_weights(const std::string& dir, const NamedTensors& trainable, const std::string& what) {
  const json state = read_state(dir);
  copy_trainable(dir, trainable, what);
  return state_value<int64_t>(state, dir, "step");
}

TrainState load_training_checkpoint(const std::string& dir, const NamedTensors& trainable, AdamW& optimizer,
                                    at::Device device) {
  const json state = read_state(dir);  // every key checked before any tensor is touched
  TrainState st;
  st.step = state_value<int64_t>(state, dir, "step");
  st.epoch = state_value<int64_t>(state, dir, "epoch");
  st.index = state_value<int64_t>(state, dir, "batch_index");
  st.tokens = state_value<int64_t>(state, dir, "tokens");
  st.elapsed = state_value<double>(state, dir, "elapsed_s");
  copy_trainable(dir, trainable, "--resume");
  {
    io::SafetensorsFile f(io::join_path(dir, "optimizer.safetensors"));
    NamedTensors tensors;
    for (const auto& e : f.entries()) tensors.emplace_back(e.name, f.tensor(e.name));
    optimizer.load_state(tensors);
  }
  {
    io::SafetensorsFile f(io::join_path(dir, "rng.safetensors"));
    auto cpu = at::detail::getDefaultCPUGenerator();
    cpu.set_state(f.tensor("cpu").clone());
    if (device.is_cuda() && f.contains("cuda")) {
      auto gen = at::globalContext().defaultGenerator(device);
      gen.set_state(f.tensor("cuda").clone());
    }
  }
  return st;
}

NamedTensors load_checkpoint_file(const std::string& dir, const std::string& name, const std::string& why_needed) {
  const std::string path = io::join_path(dir, name);
  if (!io::path_exists(path)) throw std::runtime_error("--resume: " + path + " is missing; " + why_needed);
  io::SafetensorsFile f(path);
  NamedTensors out;
  for (const auto& e : f.entries()) out.emplace_back(e.name, f.tensor(e.name));
  return out;
}

}  // namespace anvil::train
