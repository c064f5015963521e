#include "common/meminfo.h"

#include <fstream>
#include <sstream>
#include <string>

namespace qilin {

Result<int64_t> MemAvailableBytes() {
  std::ifstream f("/proc/meminfo");
  if (!f) return Unavailable("cannot read /proc/meminfo to size the KV cache");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) {
      std::istringstream is(line.substr(13));
      int64_t kb = 0;
      is >> kb;
      return kb * 1024;
    }
  }
  return Unavailable("/proc/meminfo has no MemAvailable line");
}

}  // namespace qilin
