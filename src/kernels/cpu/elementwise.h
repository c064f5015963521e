// Small row-wise CPU ops: embedding gather, RMSNorm, SwiGLU, residual add. f32 activations;
// tables and weights in f32, f16 or bf16.
#pragma once

#include <cstdint>

#include "kernels/cpu/linear.h"

namespace qilin::cpu {

// out[i, :] = table[ids[i], :] as f32; table is [vocab, dim]. Ids must be in range (caller checks).
void EmbeddingGather(WeightRef table, int64_t dim, const int32_t* ids, int64_t n, float* out);

// out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * weight, per row of `dim`; sums in f32.
// Also serves Qwen3's per-head q_norm/k_norm (rows = tokens * heads, dim = head_dim).
// `out` may equal `x`.
void RmsNorm(const float* x, int64_t rows, int64_t dim, WeightRef weight, float eps, float* out);

// RmsNorm on the calling thread only (for callers that partition work themselves).
void RmsNormSerial(const float* x, int64_t rows, int64_t dim, WeightRef weight, float eps,
                   float* out);

// out[i] = silu(gate[i]) * up[i] over rows * dim contiguous values. `out` may equal `gate`.
// exp is the 8-lane Exp8 (about 2 ulp).
void SiluMul(const float* gate, const float* up, int64_t rows, int64_t dim, float* out);
// SiluMul over n values on the calling thread.
void SiluMulSerial(const float* gate, const float* up, int64_t n, float* out);

// out[i] = e^x[i] by the 8-lane Exp8 (every element, the tail through a padded vector).
void ExpF32(const float* x, int64_t n, float* out);

// log(sum_i e^x[i]) for n >= 1 values: max subtraction, e^x in f32 (Exp8), the sum of the
// exponentials and the log in double. -inf when every value is -inf.
double LogSumExp(const float* x, int64_t n);

// x[i] += y[i] for i < n.
void AddInPlace(float* x, const float* y, int64_t n);

}  // namespace qilin::cpu
