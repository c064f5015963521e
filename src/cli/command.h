// Subcommands of the `qilin` binary register themselves here: each lives in its own
// cli/<name>_cmd.cc and adds its flags to a CLI11 sub-app, returning the function that runs it.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace qilin::cli {

// Runs the command after parsing; returns the process exit code. Errors a user can act on are
// thrown as qilin::Error (printed as one line, exit 1) or returned as a non-zero code.
using RunFn = std::function<int()>;
using SetupFn = std::function<RunFn(CLI::App& sub)>;

struct CommandInfo {
  std::string name;
  std::string help;
  SetupFn setup;
};

std::vector<CommandInfo>& Commands();

struct RegisterCommand {
  RegisterCommand(std::string name, std::string help, SetupFn setup) {
    Commands().push_back({std::move(name), std::move(help), std::move(setup)});
  }
};

}  // namespace qilin::cli
