// `anvil merge`: a PEFT-format LoRA/DoRA adapter folded into its base model and written as a plain
// Hugging Face checkpoint (what transformers' PeftModel.merge_and_unload().save_pretrained() gives).
// The CLI's table (csrc/cli/main.cpp) calls cmd_merge; options in docs/CLI.md "anvil merge".
#pragma once

namespace anvil::lora {

/// `anvil merge --base MODEL --adapter DIR --out DIR [--dtype ...] [--device ...] [--force]`.
/// argv[0] is "merge"; returns the exit status. Errors are thrown (std::invalid_argument /
/// std::runtime_error naming the option or path), as every subcommand does.
int cmd_merge(int argc, char** argv);

}  // namespace anvil::lora
