#include "runtime/backend_factory.h"

#include "runtime/cpu_backend.h"

namespace qilin {

Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device, const ModelConfig& config,
                                             ModelWeights weights) {
  if (device == "cpu") {
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<CpuBackend> cpu,
                           CpuBackend::Create(config, std::move(weights)));
    return std::unique_ptr<Backend>(std::move(cpu));
  }
  if (device == "cuda") {
    return Unavailable("device 'cuda': the CUDA backend is not built into this binary yet");
  }
  return InvalidArgument("unknown device '{}' (expected 'cpu' or 'cuda')", device);
}

}  // namespace qilin
