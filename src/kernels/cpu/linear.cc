#include "kernels/cpu/linear.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/simd.h"

namespace qilin::cpu {
namespace {

constexpr int64_t kParallelMinWork = 1 << 16;

// ---- GEMV: WR weight rows x XR activation rows per inner loop (8 accumulators at most). ----
template <DType D, int WR, int XR>
void GemvTile(const float* x, int64_t ldx, const void* w, int64_t o0, int64_t in, float* sums) {
  __m256 acc[WR][XR];
  for (int a = 0; a < WR; ++a)
    for (int b = 0; b < XR; ++b) acc[a][b] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    __m256 xv[XR];
    for (int b = 0; b < XR; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + k);
    for (int a = 0; a < WR; ++a) {
      __m256 wv = Load8<D>(w, (o0 + a) * in + k);
      for (int b = 0; b < XR; ++b) acc[a][b] = _mm256_fmadd_ps(wv, xv[b], acc[a][b]);
    }
  }
  for (int a = 0; a < WR; ++a) {
    for (int b = 0; b < XR; ++b) {
      float s = HorizontalSum(acc[a][b]);
      for (int64_t kk = k; kk < in; ++kk) s += Load1<D>(w, (o0 + a) * in + kk) * x[b * ldx + kk];
      sums[a * XR + b] = s;
    }
  }
}

template <DType D, int WR>
void GemvRows(const float* x, int64_t n, int64_t in, const void* w, int64_t o0, int64_t out,
              const float* bias, float* y) {
  float sums[WR * 2];
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    GemvTile<D, WR, 2>(x + i * in, in, w, o0, in, sums);
    for (int a = 0; a < WR; ++a)
      for (int b = 0; b < 2; ++b) y[(i + b) * out + o0 + a] = sums[a * 2 + b] + bias[a];
  }
  if (i < n) {
    GemvTile<D, WR, 1>(x + i * in, in, w, o0, in, sums);
    for (int a = 0; a < WR; ++a) y[i * out + o0 + a] = sums[a] + bias[a];
  }
}

template <DType D>
void GemvImpl(const float* x, int64_t n, int64_t in, const void* w, int64_t out, WeightRef bias,
              float* y) {
  constexpr int64_t kWr = 4;
  const int64_t groups = (out + kWr - 1) / kWr;
  // Threads only pay off past ~64K multiply-adds (a barrier costs microseconds, more when the
  // cores are shared).
#pragma omp parallel for schedule(static) if (n * in * out > kParallelMinWork)
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t o0 = g * kWr;
    const int64_t rows = std::min(kWr, out - o0);
    float b[kWr] = {0, 0, 0, 0};
    if (bias.data != nullptr)
      for (int64_t a = 0; a < rows; ++a) b[a] = LoadScalar(bias.dtype, bias.data, o0 + a);
    if (rows == kWr) {
      GemvRows<D, 4>(x, n, in, w, o0, out, b, y);
    } else {
      for (int64_t a = 0; a < rows; ++a) GemvRows<D, 1>(x, n, in, w, o0 + a, out, b + a, y);
    }
  }
}

// ---- Blocked GEMM for many rows. ----
constexpr int64_t kMr = 6;    // x rows per micro tile
constexpr int64_t kNr = 16;   // outputs per micro tile (two ymm)
constexpr int64_t kNc = 64;   // outputs per packed tile (4 micro panels)
constexpr int64_t kKc = 256;  // reduction depth per packed tile

// 8x8 transpose of rows r[0..7] in place.
inline void Transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Packs W[o0 .. o0+nc)[k0 .. k0+kc) to f32 as [panel][kk][16], zero-padding missing outputs.
template <DType D>
void PackW(const void* w, int64_t in, int64_t o0, int64_t nc, int64_t k0, int64_t kc, float* pack) {
  const int64_t panels = (nc + kNr - 1) / kNr;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = pack + p * kKc * kNr;
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t ob = p * kNr + half * 8;  // first output of these 8 lanes, relative to o0
      const int64_t valid = std::clamp<int64_t>(nc - ob, 0, 8);
      int64_t kk = 0;
      if (valid == 8) {
        for (; kk + 8 <= kc; kk += 8) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = Load8<D>(w, (o0 + ob + j) * in + k0 + kk);
          Transpose8(r);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (kk + j) * kNr + half * 8, r[j]);
        }
      }
      for (; kk < kc; ++kk) {
        for (int64_t j = 0; j < 8; ++j) {
          dst[kk * kNr + half * 8 + j] =
              j < valid ? Load1<D>(w, (o0 + ob + j) * in + k0 + kk) : 0.0f;
        }
      }
    }
  }
}

// acc[MR x 16] = x[MR rows, kc] * pack[kc][16]; then y (+)= acc over `cols` valid columns.
template <int MR>
void MicroKernel(const float* x, int64_t ldx, const float* pack, int64_t kc, float* y, int64_t ldy,
                 int64_t cols, bool accumulate) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t kk = 0; kk < kc; ++kk) {
    __m256 b0 = _mm256_loadu_ps(pack + kk * kNr);
    __m256 b1 = _mm256_loadu_ps(pack + kk * kNr + 8);
    for (int r = 0; r < MR; ++r) {
      __m256 a = _mm256_broadcast_ss(x + r * ldx + kk);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  if (cols == kNr) {
    for (int r = 0; r < MR; ++r) {
      float* yr = y + r * ldy;
      if (accumulate) {
        acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(yr));
        acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(yr + 8));
      }
      _mm256_storeu_ps(yr, acc[r][0]);
      _mm256_storeu_ps(yr + 8, acc[r][1]);
    }
  } else {
    alignas(32) float tmp[kNr];
    for (int r = 0; r < MR; ++r) {
      _mm256_store_ps(tmp, acc[r][0]);
      _mm256_store_ps(tmp + 8, acc[r][1]);
      float* yr = y + r * ldy;
      for (int64_t c = 0; c < cols; ++c) yr[c] = accumulate ? yr[c] + tmp[c] : tmp[c];
    }
  }
}

void MicroKernelRows(int64_t mr, const float* x, int64_t ldx, const float* pack, int64_t kc,
                     float* y, int64_t ldy, int64_t cols, bool accumulate) {
  switch (mr) {
    case 6:
      return MicroKernel<6>(x, ldx, pack, kc, y, ldy, cols, accumulate);
    case 5:
      return MicroKernel<5>(x, ldx, pack, kc, y, ldy, cols, accumulate);
    case 4:
      return MicroKernel<4>(x, ldx, pack, kc, y, ldy, cols, accumulate);
    case 3:
      return MicroKernel<3>(x, ldx, pack, kc, y, ldy, cols, accumulate);
    case 2:
      return MicroKernel<2>(x, ldx, pack, kc, y, ldy, cols, accumulate);
    default:
      return MicroKernel<1>(x, ldx, pack, kc, y, ldy, cols, accumulate);
  }
}

template <DType D>
void BlockedImpl(const float* x, int64_t n, int64_t in, const void* w, int64_t out, WeightRef bias,
                 float* y) {
  const int64_t groups = (out + kNc - 1) / kNc;
#pragma omp parallel if (n * in * out > kParallelMinWork)
  {
    std::vector<float> pack_buf(kNc * kKc + 8);
    float* pack = pack_buf.data();
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t o0 = g * kNc;
      const int64_t nc = std::min(kNc, out - o0);
      const int64_t panels = (nc + kNr - 1) / kNr;
      for (int64_t k0 = 0; k0 < in; k0 += kKc) {
        const int64_t kc = std::min(kKc, in - k0);
        PackW<D>(w, in, o0, nc, k0, kc, pack);
        for (int64_t i0 = 0; i0 < n; i0 += kMr) {
          const int64_t mr = std::min(kMr, n - i0);
          for (int64_t p = 0; p < panels; ++p) {
            const int64_t cols = std::min(kNr, nc - p * kNr);
            MicroKernelRows(mr, x + i0 * in + k0, in, pack + p * kKc * kNr, kc,
                            y + i0 * out + o0 + p * kNr, out, cols, k0 > 0);
          }
        }
      }
      if (bias.data != nullptr) {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t o = o0; o < o0 + nc; ++o)
            y[i * out + o] += LoadScalar(bias.dtype, bias.data, o);
      }
    }
  }
}

}  // namespace

void LinearGemv(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                float* y) {
  if (n <= 0 || out <= 0) return;
  if (in <= 0) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t o = 0; o < out; ++o)
        y[i * out + o] = bias.data ? LoadScalar(bias.dtype, bias.data, o) : 0.0f;
    return;
  }
  if (!DispatchFloatDType(w.dtype,
                          [&]<DType D>() { GemvImpl<D>(x, n, in, w.data, out, bias, y); })) {
    GemvImpl<DType::kBF16>(x, n, in, w.data, out, bias, y);
  }
}

void LinearBlocked(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                   float* y) {
  if (n <= 0 || out <= 0) return;
  if (in <= 0) return LinearGemv(x, n, in, w, out, bias, y);
  if (!DispatchFloatDType(w.dtype,
                          [&]<DType D>() { BlockedImpl<D>(x, n, in, w.data, out, bias, y); })) {
    BlockedImpl<DType::kBF16>(x, n, in, w.data, out, bias, y);
  }
}

void Linear(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
            float* y) {
  if (n >= kLinearBlockedMinRows) {
    LinearBlocked(x, n, in, w, out, bias, y);
  } else {
    LinearGemv(x, n, in, w, out, bias, y);
  }
}

}  // namespace qilin::cpu
