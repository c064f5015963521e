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
