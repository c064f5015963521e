#include "kernels/cpu/linear.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/cpu/simd.h"

namespace qilin::cpu {
namespace {

constexpr int64_t kParallelMinWork = 1 << 16;

constexpr int64_t kPrefetchRows = 32;

// ---- GEMV: WR weight rows x XR activation rows per inner loop (8 accumulators at most). ----
// W(o, k) is element o * ldw + koff + k.
template <DType D, int WR, int XR>
void GemvTile(const float* x, int64_t ldx, const void* w, int64_t ldw, int64_t koff, int64_t o0,
              int64_t in, float* sums) {
  __m256 acc[WR][XR];
  for (int a = 0; a < WR; ++a)
    for (int b = 0; b < XR; ++b) acc[a][b] = _mm256_setzero_ps();
  int64_t row[WR];
  for (int a = 0; a < WR; ++a) row[a] = (o0 + a) * ldw + koff;
  int64_t k = 0;
  for (; k + 8 <= in; k += 8) {
    if constexpr (D != DType::kF32) {
      // The same cache line of the next tile's rows: the hardware prefetcher alone reaches only
      // about half the read bandwidth of one core on these short interleaved streams.
      if ((k & 31) == 0) {
        for (int a = 0; a < WR; ++a)
          _mm_prefetch(static_cast<const char*>(w) + 2 * (row[a] + k + kPrefetchRows * ldw),
                       _MM_HINT_T0);
      }
    }
    __m256 xv[XR];
    for (int b = 0; b < XR; ++b) xv[b] = _mm256_loadu_ps(x + b * ldx + k);
    for (int a = 0; a < WR; ++a) {
      __m256 wv = Load8<D>(w, row[a] + k);
      for (int b = 0; b < XR; ++b) acc[a][b] = _mm256_fmadd_ps(wv, xv[b], acc[a][b]);
    }
  }
  for (int a = 0; a < WR; ++a) {
    for (int b = 0; b < XR; ++b) {
      float s = HorizontalSum(acc[a][b]);
      for (int64_t kk = k; kk < in; ++kk) s += Load1<D>(w, row[a] + kk) * x[b * ldx + kk];
      sums[a * XR + b] = s;
    }
  }
}

// Outputs o0 .. o0 + WR of the slice for all n rows.
template <DType D, int WR>
void GemvRows(const LinearSliceArgs& s, int64_t o0, const float* bias) {
  float sums[WR * 2];
  float* y = s.y + (o0 - s.o_begin);
  int64_t i = 0;
  for (; i + 2 <= s.n; i += 2) {
    GemvTile<D, WR, 2>(s.x + i * s.ldx, s.ldx, s.w.data, s.ldw, s.k_begin, o0, s.in, sums);
    for (int a = 0; a < WR; ++a)
      for (int b = 0; b < 2; ++b) y[(i + b) * s.ldy + a] = sums[a * 2 + b] + bias[a];
  }
  if (i < s.n) {
    GemvTile<D, WR, 1>(s.x + i * s.ldx, s.ldx, s.w.data, s.ldw, s.k_begin, o0, s.in, sums);
    for (int a = 0; a < WR; ++a) y[i * s.ldy + a] = sums[a] + bias[a];
  }
}

template <DType D>
void GemvSlice(const LinearSliceArgs& s) {
  constexpr int64_t kWr = 4;
  for (int64_t o0 = s.o_begin; o0 < s.o_end; o0 += kWr) {
    const int64_t rows = std::min(kWr, s.o_end - o0);
    float b[kWr] = {0, 0, 0, 0};
    if (s.bias.data != nullptr)
      for (int64_t a = 0; a < rows; ++a) b[a] = LoadScalar(s.bias.dtype, s.bias.data, o0 + a);
    if (rows == kWr) {
      GemvRows<D, 4>(s, o0, b);
    } else {
      for (int64_t a = 0; a < rows; ++a) GemvRows<D, 1>(s, o0 + a, b + a);
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

// Packs W[o0 .. o0+nc)[k0 .. k0+kc) (W(o, k) at o * ldw + k) to f32 as [panel][kk][16],
// zero-padding missing outputs.
template <DType D>
void PackW(const void* w, int64_t ldw, int64_t o0, int64_t nc, int64_t k0, int64_t kc,
           float* pack) {
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
          for (int j = 0; j < 8; ++j) r[j] = Load8<D>(w, (o0 + ob + j) * ldw + k0 + kk);
          Transpose8(r);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (kk + j) * kNr + half * 8, r[j]);
        }
      }
      for (; kk < kc; ++kk) {
        for (int64_t j = 0; j < 8; ++j) {
          dst[kk * kNr + half * 8 + j] =
              j < valid ? Load1<D>(w, (o0 + ob + j) * ldw + k0 + kk) : 0.0f;
        }
      }
    }
  }
}

// acc[MR x 16] = x[MR rows, kc] * pack[kc][16]; then y (+)= acc over `cols` valid columns.
// 2 MR accumulators + 2 panel registers + 1 broadcast fit the 16 ymm registers; every loop over
// r is unrolled so the accumulators stay in registers (a rolled loop made GCC spill them to the
// stack on every step, halving the FMA rate).
template <int MR>
void MicroKernel(const float* x, int64_t ldx, const float* pack, int64_t kc, float* y, int64_t ldy,
                 int64_t cols, bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* xr[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const __m256 b0 = _mm256_loadu_ps(pack + kk * kNr);
    const __m256 b1 = _mm256_loadu_ps(pack + kk * kNr + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(xr[r] + kk);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  alignas(32) float tmp[MR][kNr];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    _mm256_store_ps(tmp[r], acc[r][0]);
    _mm256_store_ps(tmp[r] + 8, acc[r][1]);
  }
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    if (cols == kNr) {
      __m256 v0 = _mm256_load_ps(tmp[r]), v1 = _mm256_load_ps(tmp[r] + 8);
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(yr));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(yr + 8));
      }
      _mm256_storeu_ps(yr, v0);
      _mm256_storeu_ps(yr + 8, v1);
    } else {
      for (int64_t c = 0; c < cols; ++c) yr[c] = accumulate ? yr[c] + tmp[r][c] : tmp[r][c];
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

// One slice by packed tiles: for each 64-output group and 256-deep chunk, W is packed once and
// each 16-wide panel (16 KB, L1-resident) meets every 6-row block of x.
template <DType D>
void BlockedSlice(const LinearSliceArgs& s) {
  thread_local std::vector<float> pack_buf;
  if (pack_buf.size() < static_cast<size_t>(kNc * kKc)) pack_buf.resize(kNc * kKc);
  float* pack = pack_buf.data();
  for (int64_t o0 = s.o_begin; o0 < s.o_end; o0 += kNc) {
    const int64_t nc = std::min(kNc, s.o_end - o0);
    const int64_t panels = (nc + kNr - 1) / kNr;
    float* y = s.y + (o0 - s.o_begin);
    for (int64_t k0 = 0; k0 < s.in; k0 += kKc) {
      const int64_t kc = std::min(kKc, s.in - k0);
      PackW<D>(s.w.data, s.ldw, o0, nc, s.k_begin + k0, kc, pack);
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t cols = std::min(kNr, nc - p * kNr);
        for (int64_t i0 = 0; i0 < s.n; i0 += kMr) {
          const int64_t mr = std::min(kMr, s.n - i0);
          MicroKernelRows(mr, s.x + i0 * s.ldx + k0, s.ldx, pack + p * kKc * kNr, kc,
                          y + i0 * s.ldy + p * kNr, s.ldy, cols, k0 > 0);
        }
      }
    }
    if (s.bias.data != nullptr) {
      for (int64_t i = 0; i < s.n; ++i)
        for (int64_t o = 0; o < nc; ++o)
          y[i * s.ldy + o] += LoadScalar(s.bias.dtype, s.bias.data, o0 + o);
    }
  }
}

template <DType D>
void SliceImpl(const LinearSliceArgs& s) {
  if (s.n <= 0 || s.o_end <= s.o_begin) return;
  if (s.in <= 0) {
    for (int64_t i = 0; i < s.n; ++i)
      for (int64_t o = s.o_begin; o < s.o_end; ++o)
        s.y[i * s.ldy + o - s.o_begin] =
            s.bias.data ? LoadScalar(s.bias.dtype, s.bias.data, o) : 0.0f;
    return;
  }
  if (s.n >= kLinearBlockedMinRows) {
    BlockedSlice<D>(s);
  } else {
    GemvSlice<D>(s);
  }
}

template <DType D>
void GemvOrBlocked(const LinearSliceArgs& s, bool blocked) {
  if (s.in > 0 && blocked) return BlockedSlice<D>(s);
  if (s.in > 0) return GemvSlice<D>(s);
  SliceImpl<D>(s);
}

// Splits the outputs over the threads in multiples of `align` (threads only pay off past ~64K
// multiply-adds: a fork/join costs microseconds, more when the cores are shared).
void ParallelLinear(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                    float* y, bool blocked) {
  if (n <= 0 || out <= 0) return;
  const int64_t align = blocked ? kNr : 4;
#pragma omp parallel if (n * in * out > kParallelMinWork)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t units = (out + align - 1) / align;
    const int64_t u0 = units * t / nt, u1 = units * (t + 1) / nt;
    LinearSliceArgs s{
        x,    in,      n,  in, w, in, 0, std::min(out, u0 * align), std::min(out, u1 * align),
        bias, nullptr, out};
    s.y = y + s.o_begin;
    if (!DispatchFloatDType(w.dtype, [&]<DType D>() { GemvOrBlocked<D>(s, blocked); })) {
      GemvOrBlocked<DType::kBF16>(s, blocked);
    }
  }
}

}  // namespace

void LinearSlice(const LinearSliceArgs& a) {
  if (!DispatchFloatDType(a.w.dtype, [&]<DType D>() { SliceImpl<D>(a); })) {
    SliceImpl<DType::kBF16>(a);
  }
}

void LinearGemv(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                float* y) {
  ParallelLinear(x, n, in, w, out, bias, y, false);
}

void LinearBlocked(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
                   float* y) {
  ParallelLinear(x, n, in, w, out, bias, y, true);
}

void Linear(const float* x, int64_t n, int64_t in, WeightRef w, int64_t out, WeightRef bias,
            float* y) {
  ParallelLinear(x, n, in, w, out, bias, y, n >= kLinearBlockedMinRows);
}

}  // namespace qilin::cpu
