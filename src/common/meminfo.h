// Host memory figures from /proc/meminfo (to size KV pools in host memory).
#pragma once

#include <cstdint>

#include "common/status.h"

namespace qilin {

// Bytes of MemAvailable in /proc/meminfo; Unavailable where the file or the line is missing.
Result<int64_t> MemAvailableBytes();

}  // namespace qilin
