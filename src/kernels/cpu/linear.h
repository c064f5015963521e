// Linear layer on the CPU: y[n, out] = x[n, in] (f32) * W[out, in]^T (+ bias), W in bf16, f16 or
// f32, accumulated in f32.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace qilin::cpu {

// A weight or bias: dtype and data, shape given by the caller.
struct WeightRef {
  DType dtype = DType::kBF16;
  const void* data = nullptr;
};

// Picks the path by row count: LinearGemv for few rows (decode), LinearBlocked for many (prefill).
// `bias` may have data == nullptr. `x` and `y` must not overlap. W/bias dtypes must be F32, F16 or
// BF16 (checked by the caller; others are treated as BF16).
void Linear(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
            float* y);

// One thread's share of a linear layer, run serially (the caller partitions the work, e.g. inside
// one OpenMP region per step): outputs [o_begin, o_end) over the input columns [k_begin, k_begin +
// in) of W, whose rows are `ldw` elements apart:
//   y[i * ldy + o - o_begin] = sum_k x[i * ldx + k] * W[o * ldw + k_begin + k] (+ bias[o]).
// Row-split (o range) and column-split (k range, partial sums reduced by the caller) are both
// slices. Picks GEMV or the blocked GEMM by n as Linear does.
struct LinearSliceArgs {
  const float* x = nullptr;
  int64_t ldx = 0;
  int64_t n = 0;
  int64_t in = 0;
  WeightRef w;
  int64_t ldw = 0;
  int64_t k_begin = 0;
  int64_t o_begin = 0;
  int64_t o_end = 0;
  WeightRef bias;  // indexed by o; may have data == nullptr
  float* y = nullptr;
  int64_t ldy = 0;
};
void LinearSlice(const LinearSliceArgs& a);

// Rows at or above which Linear uses the blocked path.
inline constexpr int64_t kLinearBlockedMinRows = 12;

// Decode path: streams each W row once and dots it with every x row (bound: weight bytes / memory
// bandwidth).
void LinearGemv(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                float* y);
// Prefill path: converts a [64 x 256] tile of W to f32 once and reuses it for all rows with a 6x16
// register-blocked FMA kernel (bound: 2*n*in*out FLOP / FMA rate).
void LinearBlocked(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                   float* y);

}  // namespace qilin::cpu
