// Paged KV cache ops on the CPU: write new K/V at their slots, and causal GQA attention of each new
// token over its sequence's cached tokens, read through the block table. f32 cache.
#pragma once

#include <cstdint>

namespace qilin::cpu {

// k_cache/v_cache[slot_mapping[i], :] = k/v[i, :] for i < n; rows of kv_size floats.
void WriteKvCache(const float* k, const float* v, int64_t n, int64_t kv_size,
                  const int64_t* slot_mapping, float* k_cache, float* v_cache);

// The batch layout attention needs (a view of the runtime's ForwardBatch; indices checked by the
// caller).
struct PagedAttentionBatch {
  int32_t num_seqs = 0;
  const int32_t* query_start = nullptr;   // [num_seqs + 1]
  const int32_t* positions = nullptr;     // [num_tokens]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t block_size = 0;
};

// out[t, h, :] = softmax_j(q[t, h] . K[j, h / group] * scale) V[j, h / group], over the cached
// tokens j of t's sequence at positions 0 .. positions[t]; softmax in f32 with max subtraction.
// q and out: [num_tokens, num_heads * head_dim]; caches: [slots, num_kv_heads * head_dim].
// Reads (positions[t] + 1) * 2 * head_dim floats per (token, head).
void PagedAttention(const float* q, const float* k_cache, const float* v_cache,
                    const PagedAttentionBatch& batch, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, float scale, float* out);

// PagedAttention for the query heads [h_begin, h_end) of every token, on the calling thread
// (for callers that split heads over threads themselves). Scores 4 keys per pass, exp 8 lanes at
// a time (Exp8), and accumulates P.V in registers per 32-wide slice of the head.
void PagedAttentionHeads(const float* q, const float* k_cache, const float* v_cache,
                         const PagedAttentionBatch& batch, int64_t num_heads, int64_t num_kv_heads,
                         int64_t head_dim, float scale, int64_t h_begin, int64_t h_end, float* out);

}  // namespace qilin::cpu
