// Builds the backend for a device name.
#pragma once

#include <memory>
#include <string>

#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend.h"

namespace qilin {

// `device`: "cpu" or "cuda". InvalidArgument for other names; Unavailable for "cuda" when this
// build has no CUDA backend or no GPU.
Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device, const ModelConfig& config,
                                             ModelWeights weights);

}  // namespace qilin
