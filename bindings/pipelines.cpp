// anvil._C bindings of the recipes (recipes/registry.h): the pipelines anvil.lora, anvil.train, anvil.distill
// and anvil.quantize run through the same table, config resolution and trainer as `anvil <recipe>`.
//
// The run releases the GIL (other Python threads go on; the C++ loop never calls into Python except for the
// progress callback, which takes the GIL back for each report). Ctrl-C during the run reaches the trainer's
// handler (train/trainer.h: it saves a checkpoint and stops), which Python's is displaced by for that time.
// A config error and any other C++ exception arrive as Python exceptions (std::invalid_argument as ValueError,
// the rest as RuntimeError) with the message the command line prints.
#include "anvil/train/config.h"
#include "recipes/registry.h"

#include <torch/extension.h>

#include <string>
#include <vector>

namespace py = pybind11;
namespace tr = anvil::train;

namespace {

// The user's config: the JSON text given (an object), or the recipe's embedded demo when it is empty; the
// overrides ("section.key=value", as on the command line) applied on top.
nlohmann::json user_config(const anvil::recipes::Recipe& recipe, const std::string& config_json,
                           const std::vector<std::string>& overrides, const std::string& demo_root) {
  nlohmann::json user;
  if (config_json.empty()) {
    user = anvil::recipes::demo_config(recipe, demo_root);
  } else {
    user = nlohmann::json::parse(config_json);
    if (!user.is_object()) throw std::invalid_argument("anvil " + recipe.name + ": config must be a JSON object");
  }
  for (const auto& o : overrides) tr::apply_override(user, o);
  return user;
}

py::dict step_dict(const tr::StepReport& r) {
  py::dict d;
  d["step"] = r.step, d["total_steps"] = r.total_steps;
  d["loss"] = r.loss, d["lr"] = r.lr, d["grad_norm"] = r.grad_norm;
  for (const auto& [name, value] : r.terms) d[py::str(name)] = value;
  d["tokens"] = r.tokens, d["tokens_this_run"] = r.tokens_this_run;
  d["tokens_per_s"] = r.tokens_per_s, d["elapsed_s"] = r.elapsed_s;
  if (r.peak_mem_gib >= 0) d["peak_mem_gib"] = r.peak_mem_gib;
  return d;
}

}  // namespace

void bind_pipelines(py::module_& m) {
  m.def("recipe_names", [] {
    std::vector<std::string> names;
    for (const auto& r : anvil::recipes::all()) names.push_back(r.name);
    return names;
  }, "The recipes anvil._C.run_recipe runs (recipes/registry.h), in `anvil`'s order.");

  m.def("default_demo_root", &anvil::recipes::default_demo_root,
        "Where the embedded demos' files are by default: the source tree anvil was built from.");

  m.def(
      "resolve_recipe_config",
      [](const std::string& name, const std::string& config_json, const std::vector<std::string>& overrides,
         const std::string& demo_root) {
        const auto& recipe = anvil::recipes::find(name);
        return recipe.resolve(user_config(recipe, config_json, overrides, demo_root)).dump();
      },
      py::arg("name"), py::arg("config_json"), py::arg("overrides"), py::arg("demo_root") = "",
      "The resolved config (JSON text: every key, defaults filled in) of recipe `name` for a user config given as "
      "JSON text ('' for the embedded demo, read from demo_root) and 'section.key=value' overrides; raises "
      "ValueError naming a bad key.");

  m.def(
      "run_recipe",
      [](const std::string& name, const std::string& config_json, const std::vector<std::string>& overrides,
         bool resume, bool dry_run, py::object progress, const std::string& demo_root) {
        const auto& recipe = anvil::recipes::find(name);
        const nlohmann::json user = user_config(recipe, config_json, overrides, demo_root);
        const std::string resolved = recipe.resolve(user).dump();
        tr::RunOptions options;
        options.resume = resume, options.dry_run = dry_run;
        if (!progress.is_none())
          options.on_step = [progress](const tr::StepReport& r) {
            py::gil_scoped_acquire gil;
            progress(step_dict(r));  // an exception it raises stops the run and arrives as itself
          };
        int stop_status = 0;
        std::string stop_message;
        options.on_stop = [&](int status, const std::string& message) { stop_status = status, stop_message = message; };
        int status;
        {
          py::gil_scoped_release release;
          status = recipe.run(user, options);
        }
        py::dict out;
        out["status"] = status;
        out["message"] = status == stop_status ? stop_message : std::string();
        out["config"] = resolved;
        return out;
      },
      py::arg("name"), py::arg("config_json"), py::arg("overrides"), py::arg("resume") = false,
      py::arg("dry_run") = false, py::arg("progress") = py::none(), py::arg("demo_root") = "",
      "Runs recipe `name` as `anvil <name>` does. Returns {'status': exit status (0 finished, 1 failed, 130 "
      "interrupted), 'message': why it stopped early, 'config': the resolved config as JSON text}. progress(dict) "
      "is called on every logged step (output.log_every) in place of the progress line on stderr.");
}
