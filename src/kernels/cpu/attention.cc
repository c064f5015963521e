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

inline float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = HorizontalSum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

void WriteKvCache(const float* k, const float* v, int64_t n, int64_t kv_size,
                  const int64_t* slot_mapping, float* k_cache, float* v_cache) {
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(k_cache + slot_mapping[i] * kv_size, k + i * kv_size, kv_size * sizeof(float));
    std::memcpy(v_cache + slot_mapping[i] * kv_size, v + i * kv_size, kv_size * sizeof(float));
  }
}

void PagedAttention(const float* q, const float* k_cache, const float* v_cache,
                    const PagedAttentionBatch& batch, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, float scale, float* out) {
  const int64_t num_tokens = batch.num_seqs > 0 ? batch.query_start[batch.num_seqs] : 0;
  if (num_tokens <= 0) return;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t q_size = num_heads * head_dim;
  const int64_t kv_size = num_kv_heads * head_dim;
  const int64_t bs = batch.block_size;

  // Token -> sequence, and the longest context any token sees.
  std::vector<int32_t> seq_of(num_tokens);
  int64_t max_ctx = 0;
  for (int32_t s = 0; s < batch.num_seqs; ++s) {
    for (int32_t t = batch.query_start[s]; t < batch.query_start[s + 1]; ++t) {
      seq_of[t] = s;
      max_ctx = std::max<int64_t>(max_ctx, batch.positions[t] + 1);
    }
  }

  int64_t work = 0;  // multiply-adds over all (token, head) pairs
  for (int64_t t = 0; t < num_tokens; ++t) work += (batch.positions[t] + 1) * num_heads * head_dim;
#pragma omp parallel if (work > (1 << 16))
  {
    std::vector<float> scores(max_ctx);
    std::vector<const float*> krows(max_ctx), vrows(max_ctx);
    int64_t rows_of = -1;  // the token whose K/V row pointers are in krows/vrows
#pragma omp for schedule(dynamic, 1)
    for (int64_t th = 0; th < num_tokens * num_heads; ++th) {
      const int64_t t = th / num_heads, h = th % num_heads;
      const int64_t ctx = batch.positions[t] + 1;
      if (rows_of != t) {
        const int32_t* table =
            batch.block_tables + static_cast<int64_t>(seq_of[t]) * batch.max_blocks_per_seq;
        for (int64_t j = 0; j < ctx; ++j) {
          const int64_t slot = static_cast<int64_t>(table[j / bs]) * bs + j % bs;
          krows[j] = k_cache + slot * kv_size;
          vrows[j] = v_cache + slot * kv_size;
        }
        rows_of = t;
      }
      {
        const float* qh = q + t * q_size + h * head_dim;
        const int64_t koff = (h / group) * head_dim;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < ctx; ++j) {
          scores[j] = Dot(qh, krows[j] + koff, head_dim) * scale;
          mx = std::max(mx, scores[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < ctx; ++j) {
          scores[j] = std::exp(scores[j] - mx);
          sum += scores[j];
        }
        float* oh = out + t * q_size + h * head_dim;
        std::fill(oh, oh + head_dim, 0.0f);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < ctx; ++j) Axpy(scores[j] * inv, vrows[j] + koff, oh, head_dim);
      }
    }
  }
}

}  // namespace qilin::cpu
