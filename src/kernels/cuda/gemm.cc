#include "kernels/cuda/gemm.h"

#include <algorithm>
#include <cstdlib>
#include <functional>

#include "kernels/cuda/ops.h"

namespace qilin::cuda {
namespace {

Status LtStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return Internal("cuBLASLt: {} failed with status {}", what, static_cast<int>(s));
}

}  // namespace

int64_t Gemm::TuneBucket(int64_t n) {
  if (n < 64) return n;
  int64_t step = 1;
  while (step * 16 <= n) step *= 2;  // n in [8 step, 16 step): eight buckets per octave
  return (n + step - 1) / step * step;
}

Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Internal("CUDA: {} failed: {} ({})", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

Gemm::~Gemm() {
  for (auto& [key, p] : plans_) {
    if (p.desc) cublasLtMatmulDescDestroy(p.desc);
    if (p.a) cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) cublasLtMatrixLayoutDestroy(p.c);
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

Status Gemm::Init(size_t workspace_bytes) {
  if (const char* e = std::getenv("QILIN_GEMM_TUNE_CANDIDATES")) {
    tune_candidates_ = std::clamp(std::atoi(e), 1, kMaxTuneCandidates);
  }
  if (const char* e = std::getenv("QILIN_GEMM_TUNE_MIN_ROWS")) {
    tune_min_rows_ = std::max<int64_t>(1, std::atoll(e));
  }
  if (const char* e = std::getenv("QILIN_SWIGLU_BF16_MIN_ROWS")) {
    swiglu_bf16_min_rows_ = std::max<int64_t>(0, std::atoll(e));
  }
  QILIN_RETURN_IF_ERROR(LtStatus(cublasLtCreate(&handle_), "cublasLtCreate"));
  QILIN_RETURN_IF_ERROR(
      CudaStatus(cudaMalloc(&workspace_, workspace_bytes), "cudaMalloc(cuBLASLt workspace)"));
  workspace_bytes_ = workspace_bytes;
  return Status::Ok();
}

float Gemm::TimeMedian(const std::function<cublasStatus_t()>& run, int runs, cudaStream_t stream) {
  runs = std::clamp(runs, 1, kTimedRuns);
  cudaEvent_t ev[2 * kTimedRuns] = {};
  float result = -1.0f;
  bool ok = run() == CUBLAS_STATUS_SUCCESS;  // warm-up (first launch); skip algorithms that fail
  for (int r = 0; r < 2 * runs && ok; ++r) ok = cudaEventCreate(&ev[r]) == cudaSuccess;
  for (int r = 0; r < runs && ok; ++r) {
    ok = cudaEventRecord(ev[2 * r], stream) == cudaSuccess && run() == CUBLAS_STATUS_SUCCESS &&
         cudaEventRecord(ev[2 * r + 1], stream) == cudaSuccess;
  }
  if (ok && cudaEventSynchronize(ev[2 * runs - 1]) == cudaSuccess) {
    float ms[kTimedRuns];
    for (int r = 0; r < runs && ok; ++r) {
      ok = cudaEventElapsedTime(&ms[r], ev[2 * r], ev[2 * r + 1]) == cudaSuccess;
    }
    if (ok) {
      std::sort(ms, ms + runs);
      result = ms[runs / 2];  // the median: one slow run (a clock change) does not decide
    }
  }
  for (cudaEvent_t e : ev) {
    if (e) cudaEventDestroy(e);
  }
  cudaGetLastError();
  return result;
}

// Row-major y[n, out] = x[n, in] W^T is column-major C[out, n] = op(A)[out, in] * B[in, n] with
// A = W viewed column-major [in, out] (transposed) and B = x viewed column-major [in, n].
Result<Gemm::Plan*> Gemm::GetPlan(int64_t n, int64_t in, int64_t out, const void* x, const void* w,
                                  const void* bias_ptr, void* y, bool y_f32, cudaStream_t stream) {
  const bool bias = bias_ptr != nullptr;
  auto key = std::make_tuple(n, in, out, bias, y_f32);
  auto it = plans_.find(key);
  if (it != plans_.end()) return &it->second;
  Plan p;
  QILIN_RETURN_IF_ERROR(LtStatus(cublasLtMatmulDescCreate(&p.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                                 "cublasLtMatmulDescCreate"));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  if (bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = y_f32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi));
    cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                   sizeof(bias_type));
  }
  const cudaDataType_t ct = y_f32 ? CUDA_R_32F : CUDA_R_16BF;
  QILIN_RETURN_IF_ERROR(
      LtStatus(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, in, out, in), "layout A"));
  QILIN_RETURN_IF_ERROR(
      LtStatus(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, in, n, in), "layout B"));
  QILIN_RETURN_IF_ERROR(LtStatus(cublasLtMatrixLayoutCreate(&p.c, ct, out, n, out), "layout C"));
  cublasLtMatmulPreference_t pref;
  QILIN_RETURN_IF_ERROR(LtStatus(cublasLtMatmulPreferenceCreate(&pref), "preference"));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                       &workspace_bytes_, sizeof(workspace_bytes_));
  cublasLtMatmulHeuristicResult_t results[kMaxTuneCandidates] = {};
  int found = 0;
  cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(handle_, p.desc, p.a, p.b, p.c, p.c, pref,
                                                    tune_candidates_, results, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || found == 0) {
    return Internal("cuBLASLt: no algorithm for bf16 GEMM n={} in={} out={} (status {})", n, in,
                    out, static_cast<int>(s));
  }
  p.algo = results[0].algo;
  // A row count near one already tuned (same bucket) takes that algorithm where cuBLASLt accepts
  // it for these layouts: variable prompt lengths would otherwise tune anew at every new n.
  // Nothing is taken across buckets: 16384 rows on 8192's algorithm ran a 2048/128 prefill step
  // 18% slower than 16384's own (H200), and decode at 64 rows on 128's 13% slower.
  const auto tuned_key = std::make_tuple(TuneBucket(n), in, out, bias, y_f32);
  const auto t = tuned_.find(tuned_key);
  if (t != tuned_.end()) {
    cublasLtMatmulHeuristicResult_t check{};
    if (cublasLtMatmulAlgoCheck(handle_, p.desc, p.a, p.b, p.c, p.c, &t->second, &check) ==
            CUBLAS_STATUS_SUCCESS &&
        check.workspaceSize <= workspace_bytes_) {
      p.algo = t->second;
      return &plans_.emplace(key, p).first->second;
    }
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (found > 1 && n >= tune_min_rows_ && cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
      capture == cudaStreamCaptureStatusNone) {
    if (bias) {
      cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr,
                                     sizeof(bias_ptr));
    }
    // Each candidate's median of several runs: one slow run (a clock change) does not decide.
    // (Timing with L2 flushed before each run, as the model's layers meet their weights, picked
    // the same: 64 x 128/128 77.8-78.3% either way on the H200.)
    const float alpha = 1.0f, beta = 0.0f;
    float best = -1.0f;
    for (int i = 0; i < found; ++i) {
      const float ms = TimeMedian(
          [&] {
            return cublasLtMatmul(handle_, p.desc, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c,
                                  &results[i].algo, workspace_, workspace_bytes_, stream);
          },
          n >= 1024 ? 3 : kTimedRuns, stream);
      if (ms >= 0.0f && (best < 0.0f || ms < best)) {
        best = ms;
        p.algo = results[i].algo;
      }
    }
    if (best >= 0.0f) {
      tuned_[tuned_key] = p.algo;
      ++tunings_;
    }
    cudaGetLastError();
  }
  return &plans_.emplace(key, p).first->second;
}

Status Gemm::Linear(const void* x, int64_t n, int64_t in, const void* w, int64_t out,
                    const void* bias, void* y, bool y_f32, cudaStream_t stream) {
  if (n == 0) return Status::Ok();
  if (n <= gemv_max_rows_ && GemvSupported(n, in, x, w)) {
    return CudaStatus(Gemv(static_cast<const bf16_t*>(x), n, in, static_cast<const bf16_t*>(w), out,
                           bias, y, y_f32, stream),
                      "skinny GEMM");
  }
  QILIN_ASSIGN_OR_RETURN(Plan * p, GetPlan(n, in, out, x, w, bias, y, y_f32, stream));
  if (bias) {
    cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias));
  }
  const float alpha = 1.0f, beta = 0.0f;
  return LtStatus(cublasLtMatmul(handle_, p->desc, &alpha, w, p->a, x, p->b, &beta, y, p->c, y,
                                 p->c, &p->algo, workspace_, workspace_bytes_, stream),
                  "cublasLtMatmul");
}

Status Gemm::LinearSwiGlu(const void* x, int64_t n, int64_t in, const void* w_gate_up,
                          int64_t inter, void* gu, void* out, cudaStream_t stream) {
  if (n == 0) return Status::Ok();
  if (n <= gemv_max_rows_ && GemvSupported(n, in, x, w_gate_up)) {
    return CudaStatus(
        GemvSwiGlu(static_cast<const bf16_t*>(x), n, in, static_cast<const bf16_t*>(w_gate_up),
                   inter, static_cast<bf16_t*>(out), stream),
        "skinny gate|up GEMM + SwiGLU");
  }
  const bool bf16 = n >= swiglu_bf16_min_rows_;
  QILIN_RETURN_IF_ERROR(Linear(x, n, in, w_gate_up, 2 * inter, nullptr, gu, !bf16, stream));
  auto* o = static_cast<bf16_t*>(out);
  return CudaStatus(bf16 ? SiluMul(static_cast<const bf16_t*>(gu), n, inter, o, stream)
                         : SiluMul(static_cast<const float*>(gu), n, inter, o, stream),
                    "SiluMul");
}

}  // namespace qilin::cuda
