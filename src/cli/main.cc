// qilin: one binary; each subcommand registers itself (cli/command.h).
#include <algorithm>
#include <cstdio>
#include <map>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "cli/command.h"
#include "common/status.h"

namespace qilin::cli {
std::vector<CommandInfo>& Commands() {
  static std::vector<CommandInfo> commands;
  return commands;
}
}  // namespace qilin::cli

int main(int argc, char** argv) {
  using namespace qilin::cli;
  // Logs go to stderr so that stdout carries only a command's output (JSON lines).
  auto logger = spdlog::stderr_color_mt("qilin");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");

  CLI::App app{"qilin: an LLM inference server for the Qwen model family"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "qilin 0.1.0");
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  auto& commands = Commands();
  std::sort(commands.begin(), commands.end(),
            [](const CommandInfo& a, const CommandInfo& b) { return a.name < b.name; });
  std::map<CLI::App*, RunFn> runs;
  for (auto& cmd : commands) {
    CLI::App* sub = app.add_subcommand(cmd.name, cmd.help);
    runs[sub] = cmd.setup(*sub);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  spdlog::set_level(spdlog::level::from_str(log_level));
  for (auto& [sub, run] : runs) {
    if (!sub->parsed()) continue;
    try {
      return run();
    } catch (const qilin::Error& e) {
      std::fprintf(stderr, "qilin %s: error: %s\n", sub->get_name().c_str(),
                   e.status().message().c_str());
      return 1;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "qilin %s: error: %s\n", sub->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 0;
}
