// Backends with tensor parallelism: `--tp N` on top of backend_factory.h.
#pragma once

#include <memory>
#include <string>

#include "model/config.h"
#include "model/weights.h"
#include "runtime/backend.h"

namespace qilin {

// tp == 1: MakeBackend. tp > 1 on "cpu": TpCpuBackend (N ranks as threads, in-process
// collectives). tp > 1 on "cuda": CudaTpBackend (rank r on GPU r % device_count; NCCL with a GPU
// per rank, else collectives staged through the host), Unavailable without a CUDA device or in a
// build without CUDA (docs/tensor-parallel.md). CheckShardable's InvalidArgument when the model's
// shapes do not divide by tp.
Result<std::unique_ptr<Backend>> MakeTpBackend(const std::string& device, const ModelConfig& config,
                                               ModelWeights weights, int tp);

// CheckShardable, then whether `device` ("cpu" or "cuda", resolved) can run `tp` ranks here:
// Unavailable naming --tp and the device without a CUDA device or CUDA build.
Status CheckTpDevice(const std::string& device, const ModelConfig& config, int tp);

// The same with random weights (--dummy-weights), as MakeDummyBackend.
Result<std::unique_ptr<Backend>> MakeDummyTpBackend(const std::string& device,
                                                    const ModelConfig& config, DType dtype,
                                                    uint64_t seed, int tp);

}  // namespace qilin
