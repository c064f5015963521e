#include <cstdio>

#include "cli/command.h"

namespace qilin::cli {
namespace {
RegisterCommand reg("version", "Print the version and the backends built in", [](CLI::App&) {
  return []() {
#ifdef QILIN_HAVE_CUDA
    std::printf("qilin 0.1.0 (backends: cpu, cuda)\n");
#else
    std::printf("qilin 0.1.0 (backends: cpu)\n");
#endif
    return 0;
  };
});
}  // namespace
}  // namespace qilin::cli
