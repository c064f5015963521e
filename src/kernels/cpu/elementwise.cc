#include "kernels/cpu/elementwise.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/simd.h"

namespace qilin::cpu {
namespace {

template <DType D>
void GatherRow(const void* table, int64_t row, int64_t dim, float* out) {
  const int64_t base = row * dim;
  int64_t j = 0;
  for (; j + 8 <= dim; j += 8) _mm256_storeu_ps(out + j, Load8<D>(table, base + j));
  for (; j < dim; ++j) out[j] = Load1<D>(table, base + j);
}

template <DType D>
void RmsNormRow(const float* xr, int64_t dim, const void* w, float eps, float* yr) {
  {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= dim; j += 8) {
      __m256 v = _mm256_loadu_ps(xr + j);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float ss = HorizontalSum(acc);
    for (; j < dim; ++j) ss += xr[j] * xr[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    j = 0;
    for (; j + 8 <= dim; j += 8) {
      __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xr + j), vinv);
      _mm256_storeu_ps(yr + j, _mm256_mul_ps(v, Load8<D>(w, j)));
    }
    for (; j < dim; ++j) yr[j] = (xr[j] * inv) * Load1<D>(w, j);
  }
}

template <DType D>
void RmsNormImpl(const float* x, int64_t rows, int64_t dim, const void* w, float eps, float* out,
                 bool parallel) {
#pragma omp parallel for schedule(static) if (parallel && rows * dim > 32768)
  for (int64_t i = 0; i < rows; ++i) RmsNormRow<D>(x + i * dim, dim, w, eps, out + i * dim);
}

}  // namespace

void EmbeddingGather(WeightRef table, int64_t dim, const int32_t* ids, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (!DispatchFloatDType(table.dtype, [&]<DType D>() {
          GatherRow<D>(table.data, ids[i], dim, out + i * dim);
        })) {
      GatherRow<DType::kBF16>(table.data, ids[i], dim, out + i * dim);
    }
  }
}

void RmsNorm(const float* x, int64_t rows, int64_t dim, WeightRef weight, float eps, float* out) {
  if (!DispatchFloatDType(weight.dtype, [&]<DType D>() {
        RmsNormImpl<D>(x, rows, dim, weight.data, eps, out, true);
      })) {
    RmsNormImpl<DType::kBF16>(x, rows, dim, weight.data, eps, out, true);
  }
}

void RmsNormSerial(const float* x, int64_t rows, int64_t dim, WeightRef weight, float eps,
                   float* out) {
  if (!DispatchFloatDType(weight.dtype, [&]<DType D>() {
        RmsNormImpl<D>(x, rows, dim, weight.data, eps, out, false);
      })) {
    RmsNormImpl<DType::kBF16>(x, rows, dim, weight.data, eps, out, false);
  }
}

void SiluMulSerial(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = Exp8(_mm256_xor_ps(g, sign));  // e^-g
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void SiluMul(const float* gate, const float* up, int64_t rows, int64_t dim, float* out) {
  const int64_t n = rows * dim;
  constexpr int64_t kChunk = 8192;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kChunk;
    SiluMulSerial(gate + b, up + b, std::min(kChunk, n - b), out + b);
  }
}

void ExpF32(const float* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tmp[8] = {};
    std::copy(x + i, x + n, tmp);
    _mm256_store_ps(tmp, Exp8(_mm256_load_ps(tmp)));
    std::copy(tmp, tmp + (n - i), out + i);
  }
}

double LogSumExp(const float* x, int64_t n) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  if (mx == -INFINITY) return -INFINITY;
  if (std::isnan(mx) || std::isinf(mx)) return mx;
  const __m256 vm = _mm256_set1_ps(mx);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double d[4];
  _mm256_store_pd(d, _mm256_add_pd(s0, s1));
  double sum = (d[0] + d[1]) + (d[2] + d[3]);
  if (i < n) {
    float tail[8];
    const int64_t len = n - i;
    for (int64_t j = 0; j < len; ++j) tail[j] = x[i + j] - mx;
    ExpF32(tail, len, tail);
    for (int64_t j = 0; j < len; ++j) sum += tail[j];
  }
  return static_cast<double>(mx) + std::log(sum);
}

void AddInPlace(float* x, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) x[i] += y[i];
}

}  // namespace qilin::cpu
