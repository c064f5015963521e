#include "runtime/backend_factory.h"

#include "runtime/cpu_backend.h"
#ifdef QILIN_HAVE_CUDA
#include "runtime/cuda_backend.h"
#endif

namespace qilin {

std::string ResolveDevice(const std::string& device) {
  if (device != "auto") return device;
#ifdef QILIN_HAVE_CUDA
  if (CudaDeviceCount() > 0) return "cuda";
#endif
  return "cpu";
}

Result<std::unique_ptr<Backend>> MakeBackend(const std::string& device_name,
                                             const ModelConfig& config, ModelWeights weights) {
  const std::string device = ResolveDevice(device_name);
  if (device == "cpu") {
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<CpuBackend> cpu,
                           CpuBackend::Create(config, std::move(weights)));
    return std::unique_ptr<Backend>(std::move(cpu));
  }
  if (device == "cuda") {
#ifdef QILIN_HAVE_CUDA
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(config, weights));
    return std::unique_ptr<Backend>(std::move(cuda));
#else
    return Unavailable("device 'cuda': this binary was built without the CUDA backend");
#endif
  }
  return InvalidArgument("unknown device '{}' (expected 'cpu', 'cuda' or 'auto')", device);
}

Result<std::unique_ptr<Backend>> MakeDummyBackend(const std::string& device_name,
                                                  const ModelConfig& config, DType dtype,
                                                  uint64_t seed) {
  const std::string device = ResolveDevice(device_name);
#ifdef QILIN_HAVE_CUDA
  if (device == "cuda") {
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda,
                           CudaBackend::CreateDummy(config, seed));
    return std::unique_ptr<Backend>(std::move(cuda));
  }
#endif
  if (device != "cpu") {
    return MakeBackend(device, config, ModelWeights{});  // the same error as MakeBackend
  }
  QILIN_ASSIGN_OR_RETURN(ModelWeights weights, MakeDummyWeights(config, dtype, seed));
  return MakeBackend(device, config, std::move(weights));
}

}  // namespace qilin
