// bf16 GEMMs through cuBLASLt: y[n, out] = x[n, in] * W[out, in]^T (+ bias[out]), f32
// accumulation, y in bf16 or f32. Algorithms are chosen once per shape by the cuBLASLt heuristic
// and cached; a fixed workspace keeps the calls capturable in CUDA graphs.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "common/status.h"

namespace qilin::cuda {

// Maps a CUDA error to a Status naming `what` (Ok for cudaSuccess).
Status CudaStatus(cudaError_t err, const char* what);

class Gemm {
 public:
  ~Gemm();
  Status Init(size_t workspace_bytes = 32u << 20);

  // x, w bf16; y bf16 (y_f32 = false) or f32; bias (may be null) of y's type.
  Status Linear(const void* x, int64_t n, int64_t in, const void* w, int64_t out, const void* bias,
                void* y, bool y_f32, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  Result<Plan*> GetPlan(int64_t n, int64_t in, int64_t out, bool bias, bool y_f32);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, Plan> plans_;
};

}  // namespace qilin::cuda
