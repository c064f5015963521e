#include "runtime/tp_factory.h"

#include "model/shard.h"
#include "runtime/backend_factory.h"
#include "runtime/tp_cpu_backend.h"

#ifdef QILIN_HAVE_CUDA
#include "runtime/cuda_backend.h"
#include "runtime/cuda_tp_backend.h"
#endif

namespace qilin {

Status CheckTpDevice(const std::string& device, const ModelConfig& config, int tp) {
  QILIN_RETURN_IF_ERROR(CheckShardable(config, tp));
  if (device == "cuda") {
#ifdef QILIN_HAVE_CUDA
    if (CudaDeviceCount() == 0) {
      return Unavailable(
          "--tp {} on device 'cuda': no CUDA device is visible; use --device cpu (see "
          "docs/tensor-parallel.md)",
          tp);
    }
    return Status::Ok();
#else
    return Unavailable(
        "--tp {} on device 'cuda': this binary was built without the CUDA backend; use --device "
        "cpu (see docs/tensor-parallel.md)",
        tp);
#endif
  }
  if (device != "cpu") {
    return InvalidArgument("unknown device '{}' (expected 'cpu', 'cuda' or 'auto')", device);
  }
  return Status::Ok();
}

Result<std::unique_ptr<Backend>> MakeTpBackend(const std::string& device_name,
                                               const ModelConfig& config, ModelWeights weights,
                                               int tp) {
  if (tp == 1) return MakeBackend(device_name, config, std::move(weights));
  const std::string device = ResolveDevice(device_name);
  QILIN_RETURN_IF_ERROR(CheckTpDevice(device, config, tp));
#ifdef QILIN_HAVE_CUDA
  if (device == "cuda") {
    QILIN_ASSIGN_OR_RETURN(std::unique_ptr<CudaTpBackend> cuda,
                           CudaTpBackend::Create(config, weights, tp));
    return std::unique_ptr<Backend>(std::move(cuda));
  }
#endif
  QILIN_ASSIGN_OR_RETURN(std::unique_ptr<TpCpuBackend> b,
                         TpCpuBackend::Create(config, weights, tp));
  return std::unique_ptr<Backend>(std::move(b));
}

Result<std::unique_ptr<Backend>> MakeDummyTpBackend(const std::string& device_name,
                                                    const ModelConfig& config, DType dtype,
                                                    uint64_t seed, int tp) {
  if (tp == 1) return MakeDummyBackend(device_name, config, dtype, seed);
  const std::string device = ResolveDevice(device_name);
  QILIN_RETURN_IF_ERROR(CheckTpDevice(device, config, tp));
  QILIN_ASSIGN_OR_RETURN(ModelWeights weights, MakeDummyWeights(config, dtype, seed));
  return MakeTpBackend(device, config, std::move(weights), tp);
}

}  // namespace qilin
