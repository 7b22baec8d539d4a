// What the model-using subcommands (generate, eval, and the pipelines' recipes) share: the options that
// pick a model, its device and dtype, and loading it with its tokenizer.
#pragma once

#include "anvil/data/tokenizer.h"
#include "anvil/model/transformer.h"

#include <cxxopts.hpp>

#include <memory>

namespace anvil::cli {

struct LoadedModel {
  std::shared_ptr<model::CausalLM> model;
  std::unique_ptr<data::Tokenizer> tokenizer;
};

/// --model, --tokenizer, --device, --dtype.
void add_model_options(cxxopts::Options& opts);

/// Loads the model and tokenizer the options name; errors name the option and the rule.
LoadedModel load_model_and_tokenizer(const cxxopts::ParseResult& args);

}  // namespace anvil::cli
