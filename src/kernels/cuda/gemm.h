// bf16 GEMMs through cuBLASLt: y[n, out] = x[n, in] * W[out, in]^T (+ bias[out]), f32
// accumulation, y in bf16 or f32. Algorithms are chosen once per shape by the cuBLASLt heuristic
// and cached; a fixed workspace keeps the calls capturable in CUDA graphs. Steps of at most
// gemv_max_rows() tokens go to the bandwidth-bound skinny kernel of gemv.cu instead.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
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

  // SwiGLU's fused gate|up projection: out[n, inter] = bf16(silu(x gate^T) * (x up^T)), with
  // w_gate_up [2 * inter, in]. Small n: one skinny kernel; else a GEMM into `gu` ([n, 2 * inter],
  // room for f32) and SiluMul: gate and up in f32, or in bf16 from swiglu_bf16_min_rows() rows on
  // (prefill: half the bytes written and read back; golden qwen2 error 1.69e-2 vs 1.96e-2 in f32).
  Status LinearSwiGlu(const void* x, int64_t n, int64_t in, const void* w_gate_up, int64_t inter,
                      void* gu, void* out, cudaStream_t stream);

  // Smallest n whose gate|up output is bf16 (0: always; a huge value: never). Default: prefill-
  // sized steps; smaller (decode) batches keep f32 gate|up, one rounding fewer.
  // QILIN_SWIGLU_BF16_MIN_ROWS overrides it (for benchmarks).
  static constexpr int64_t kSwiGluBf16MinRows = 256;
  int64_t swiglu_bf16_min_rows() const { return swiglu_bf16_min_rows_; }
  void set_swiglu_bf16_min_rows(int64_t rows) { swiglu_bf16_min_rows_ = rows; }

  // Largest n sent to the skinny kernel (0: cuBLASLt always; at most kGemvMaxRows).
  int gemv_max_rows() const { return gemv_max_rows_; }
  void set_gemv_max_rows(int rows) { gemv_max_rows_ = rows; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
  };
  // The plan of this shape; made on first use. Shapes of at least tune_min_rows_ rows met
  // outside graph capture time up to tune_candidates_ heuristic algorithms on the call's own
  // buffers and keep the fastest (the heuristic's first pick ran 636 TFLOP/s on Qwen2.5-7B's
  // gate_up at 4096 rows where 8192^3 runs ~790). QILIN_GEMM_TUNE_CANDIDATES and
  // QILIN_GEMM_TUNE_MIN_ROWS override the defaults (for benchmarks).
  Result<Plan*> GetPlan(int64_t n, int64_t in, int64_t out, const void* x, const void* w,
                        const void* bias, void* y, bool y_f32, cudaStream_t stream);
  static constexpr int kMaxTuneCandidates = 64;
  static constexpr int kTimedRuns = 5;  // at most; 3 from 1024 rows (a run of 1 ms or more)
  // The median of `runs` runs of `run` (after one untimed); -1 where a run or the timing failed.
  float TimeMedian(const std::function<cublasStatus_t()>& run, int runs, cudaStream_t stream);
  int64_t tunings_ = 0;
  // Row counts tuned together: n itself below 64, else n rounded up to one of eight steps per
  // octave (8193..9216 share, as do 97..104). The first n of a bucket met outside capture is
  // timed; later ones reuse its algorithm where cuBLASLt accepts it (cublasLtMatmulAlgoCheck).
 public:
  static int64_t TuneBucket(int64_t n);
  // Shapes timed so far (each a tuning of up to tune_candidates_ algorithms).
  int64_t tunings() const { return tunings_; }

 private:
  int tune_candidates_ = 8;
  int64_t tune_min_rows_ = 64;

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  int gemv_max_rows_ = 2;  // H200: the skinny kernel wins at n <= 2, cuBLASLt from 4
  int64_t swiglu_bf16_min_rows_ = kSwiGluBf16MinRows;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, Plan> plans_;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool, bool>, cublasLtMatmulAlgo_t> tuned_;
};

}  // namespace qilin::cuda
