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
