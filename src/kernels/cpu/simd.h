// AVX2/FMA/F16C helpers shared by the CPU ops: widen 8 weights of any float dtype to f32.
// bf16 -> f32 is a 16-bit shift; f16 uses F16C; f32 is a plain load.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "common/dtype.h"

namespace qilin::cpu {

template <DType D>
inline __m256 Load8(const void* base, int64_t idx) {
  if constexpr (D == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + idx);
  } else {
    __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + idx));
    if constexpr (D == DType::kBF16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}

template <DType D>
inline float Load1(const void* base, int64_t idx) {
  if constexpr (D == DType::kF32) {
    return static_cast<const float*>(base)[idx];
  } else if constexpr (D == DType::kBF16) {
    return Bf16ToF32(static_cast<const uint16_t*>(base)[idx]);
  } else {
    return _cvtsh_ss(static_cast<const uint16_t*>(base)[idx]);
  }
}

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  lo = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, lo);
  lo = _mm_add_ss(lo, sh);
  return _mm_cvtss_f32(lo);
}

// e^x for 8 lanes: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 Taylor polynomial
// (relative error < 2e-7, about 2 ulp), 2^n through the exponent bits. Inputs below -87.3 give 0
// (softmax and SiLU only need the underflow to be clean); above 88.7 give +inf; NaN stays NaN.
inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.7f), lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 over = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2 in two steps (Cody-Waite) to keep r exact enough.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n for n in [-126, 128]: split in two factors so n = 128 does not overflow the exponent.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_andnot_ps(under, y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), over);
  // NaN in, NaN out.
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_ps(y, x, nan);
}

// Element i of a float tensor of dtype `dtype` (f32, f16 or bf16) as f32.
inline float LoadScalar(DType dtype, const void* base, int64_t idx) {
  switch (dtype) {
    case DType::kF32:
      return Load1<DType::kF32>(base, idx);
    case DType::kF16:
      return Load1<DType::kF16>(base, idx);
    default:
      return Load1<DType::kBF16>(base, idx);
  }
}

// Dispatches a template on a float weight dtype; false for other dtypes.
template <typename F>
inline bool DispatchFloatDType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      f.template operator()<DType::kF32>();
      return true;
    case DType::kF16:
      f.template operator()<DType::kF16>();
      return true;
    case DType::kBF16:
      f.template operator()<DType::kBF16>();
      return true;
    default:
      return false;
  }
}

inline bool IsFloatWeightDType(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kF16 || dtype == DType::kBF16;
}

}  // namespace qilin::cpu
