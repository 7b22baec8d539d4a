// The subcommands implemented outside csrc/cli/main.cpp, one line each; main.cpp's table lists them.
// Each takes the arguments after `anvil` (argv[0] is the subcommand's name) and returns the exit status.
#pragma once

namespace anvil::cli {

int cmd_inspect(int argc, char** argv);   // csrc/cli/inspect.cpp
int cmd_generate(int argc, char** argv);  // csrc/cli/generate.cpp
int cmd_eval(int argc, char** argv);      // csrc/cli/eval.cpp
int cmd_export_gguf(int argc, char** argv);  // csrc/cli/export_gguf.cpp

}  // namespace anvil::cli
