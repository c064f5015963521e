#include "kernels/cpu/attention.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/simd.h"

namespace qilin::cpu {
namespace {

// s[j] = q . k[j] for 4 keys at once (one q load feeds 4 FMAs).
inline void Dot4(const float* q, const float* const* k, int64_t koff, int64_t n, float* s) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const float *k0 = k[0] + koff, *k1 = k[1] + koff, *k2 = k[2] + koff, *k3 = k[3] + koff;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + i), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + i), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + i), a3);
  }
  // Horizontal sums of the four accumulators together.
  const __m256 h01 = _mm256_hadd_ps(a0, a1), h23 = _mm256_hadd_ps(a2, a3);
  const __m256 h = _mm256_hadd_ps(h01, h23);  // per 128-bit half: s0 s1 s2 s3
  const __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(s, r);
  for (; i < n; ++i) {
    s[0] += q[i] * k0[i];
    s[1] += q[i] * k1[i];
    s[2] += q[i] * k2[i];
    s[3] += q[i] * k3[i];
  }
}

inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = HorizontalSum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One (token, head): scores, softmax, P.V. `p` has room for ctx floats.
void AttendOne(const float* qh, const float* const* krows, const float* const* vrows, int64_t koff,
               int64_t ctx, int64_t head_dim, float scale, float* p, float* oh) {
  int64_t j = 0;
  for (; j + 4 <= ctx; j += 4) Dot4(qh, krows + j, koff, head_dim, p + j);
  for (; j < ctx; ++j) p[j] = Dot(qh, krows[j] + koff, head_dim);
  // Softmax in f32 with max subtraction.
  __m256 vmax = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 vscale = _mm256_set1_ps(scale);
  j = 0;
  for (; j + 8 <= ctx; j += 8) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(p + j), vscale);
    _mm256_storeu_ps(p + j, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float mx = *std::max_element(lanes, lanes + 8);
  for (; j < ctx; ++j) {
    p[j] *= scale;
    mx = std::max(mx, p[j]);
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  j = 0;
  for (; j + 8 <= ctx; j += 8) {
    const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), vm));
    _mm256_storeu_ps(p + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = HorizontalSum(vsum);
  for (; j < ctx; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  const float inv = 1.0f / sum;
  // out = sum_j p_j V_j, 32 outputs (4 registers) per pass over j.
  int64_t c = 0;
  for (; c + 32 <= head_dim; c += 32) {
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t jj = 0; jj < ctx; ++jj) {
      const __m256 w = _mm256_broadcast_ss(p + jj);
      const float* v = vrows[jj] + koff + c;
      o0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v), o0);
      o1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8), o1);
      o2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 16), o2);
      o3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 24), o3);
    }
    const __m256 vi = _mm256_set1_ps(inv);
    _mm256_storeu_ps(oh + c, _mm256_mul_ps(o0, vi));
    _mm256_storeu_ps(oh + c + 8, _mm256_mul_ps(o1, vi));
    _mm256_storeu_ps(oh + c + 16, _mm256_mul_ps(o2, vi));
    _mm256_storeu_ps(oh + c + 24, _mm256_mul_ps(o3, vi));
  }
  for (; c + 8 <= head_dim; c += 8) {
    __m256 o0 = _mm256_setzero_ps();
    for (int64_t jj = 0; jj < ctx; ++jj)
      o0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + jj), _mm256_loadu_ps(vrows[jj] + koff + c), o0);
    _mm256_storeu_ps(oh + c, _mm256_mul_ps(o0, _mm256_set1_ps(inv)));
  }
  for (; c < head_dim; ++c) {
    float o = 0.0f;
    for (int64_t jj = 0; jj < ctx; ++jj) o += p[jj] * vrows[jj][koff + c];
    oh[c] = o * inv;
  }
}

}  // namespace

void WriteKvCache(const float* k, const float* v, int64_t n, int64_t kv_size,
                  const int64_t* slot_mapping, float* k_cache, float* v_cache) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(k_cache + slot_mapping[i] * kv_size, k + i * kv_size, kv_size * sizeof(float));
    std::memcpy(v_cache + slot_mapping[i] * kv_size, v + i * kv_size, kv_size * sizeof(float));
  }
}

void PagedAttentionHeads(const float* q, const float* k_cache, const float* v_cache,
                         const PagedAttentionBatch& batch, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, float scale, int64_t h_begin, int64_t h_end,
                         float* out) {
  if (h_end <= h_begin) return;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_size = num_heads * head_dim;
  const int64_t kv_size = num_kv_heads * head_dim;
  const int64_t bs = batch.block_size;
  thread_local std::vector<float> scores;
  thread_local std::vector<const float*> krows, vrows;
  for (int32_t s = 0; s < batch.num_seqs; ++s) {
    const int32_t t0 = batch.query_start[s], t1 = batch.query_start[s + 1];
    int64_t max_ctx = 0;
    for (int32_t t = t0; t < t1; ++t) max_ctx = std::max<int64_t>(max_ctx, batch.positions[t] + 1);
    if (static_cast<int64_t>(scores.size()) < max_ctx) {
      scores.resize(max_ctx);
      krows.resize(max_ctx);
      vrows.resize(max_ctx);
    }
    const int32_t* table = batch.block_tables + static_cast<int64_t>(s) * batch.max_blocks_per_seq;
    for (int64_t j = 0; j < max_ctx; ++j) {
      const int64_t slot = static_cast<int64_t>(table[j / bs]) * bs + j % bs;
      krows[j] = k_cache + slot * kv_size;
      vrows[j] = v_cache + slot * kv_size;
    }
    for (int64_t h = h_begin; h < h_end; ++h) {
      const int64_t koff = (h / group) * head_dim;
      for (int32_t t = t0; t < t1; ++t) {
        AttendOne(q + t * q_size + h * head_dim, krows.data(), vrows.data(), koff,
                  batch.positions[t] + 1, head_dim, scale, scores.data(),
                  out + t * q_size + h * head_dim);
      }
    }
  }
}

void PagedAttention(const float* q, const float* k_cache, const float* v_cache,
                    const PagedAttentionBatch& batch, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, float scale, float* out) {
  const int64_t num_tokens = batch.num_seqs > 0 ? batch.query_start[batch.num_seqs] : 0;
  if (num_tokens <= 0) return;
  int64_t work = 0;  // multiply-adds over all (token, head) pairs
  for (int64_t t = 0; t < num_tokens; ++t) work += (batch.positions[t] + 1) * num_heads * head_dim;
#pragma omp parallel for schedule(dynamic, 1) if (work > (1 << 16))
  for (int64_t h = 0; h < num_heads; ++h) {
    PagedAttentionHeads(q, k_cache, v_cache, batch, num_heads, num_kv_heads, head_dim, scale, h,
                        h + 1, out);
  }
}

}  // namespace qilin::cpu
