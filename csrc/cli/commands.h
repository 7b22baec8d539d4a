// The subcommands implemented outside csrc/cli/main.cpp, one line each; main.cpp's table lists them.
// Each takes the arguments after `anvil` (argv[0] is the subcommand's name) and returns the exit status.
#pragma once

namespace anvil::cli {

int cmd_inspect(int argc, char** argv);  // csrc/cli/inspect.cpp

}  // namespace anvil::cli
