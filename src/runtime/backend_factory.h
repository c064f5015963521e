// Builds the backend for a device name.
#pragma once

#include <memory>
#include <string>

#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend.h"

namespace qilin {

// `device`: "cpu", "cuda" or "auto" (cuda where this build has the CUDA backend and a GPU is
// visible, else cpu). InvalidArgument for other names; Unavailable for "cuda" when this build has
// no CUDA backend or no GPU.
Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device, const ModelConfig& config,
                                             ModelWeights weights);

// "auto" resolved to "cuda" or "cpu"; other names unchanged.
std::string ResolveDevice(const std::string& device);

// A backend with random weights (--dummy-weights): on "cuda" they are made on the device (no host
// memory; N(0, 0.02) matrices, 1 + N(0, 0.1) norms, bf16); on "cpu" by MakeDummyWeights in `dtype`.
Result<std::unique_ptr<Backend>> MakeDummyBackend(const std::string& device,
                                                  const ModelConfig& config, DType dtype,
                                                  uint64_t seed);

}  // namespace qilin
