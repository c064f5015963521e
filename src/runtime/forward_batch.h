// The one structure a backend sees: the packed new tokens of many sequences (no padding), where
// their K/V go in the paged cache, and which rows' logits to compute. Backends never see
// requests, only batches.
#pragma once

#include <cstdint>
#include <vector>

namespace qilin {

struct ForwardBatch {
  // Per token, concatenated over sequences in order: [num_tokens].
  std::vector<int32_t> token_ids;
  std::vector<int32_t> positions;     // 0-based position of each token in its sequence
  std::vector<int64_t> slot_mapping;  // KV slot = block_id * block_size + offset, per token

  // Per sequence: [num_seqs + 1] prefix sums; sequence s owns tokens
  // [query_start[s], query_start[s + 1]).
  std::vector<int32_t> query_start;
  // Per sequence: tokens in the cache after this step, new ones included. The new tokens of a
  // sequence are its last (query_start[s+1] - query_start[s]) positions; earlier ones are cached.
  std::vector<int32_t> context_lens;
  // Per sequence: the full prompt length (for Qwen v1 dynamic NTK and dynamic rope scaling,
  // which choose their rope base from it so that chunked prefill equals one-shot prefill).
  std::vector<int32_t> prompt_lens;
  // Per sequence block tables, flattened [num_seqs, max_blocks_per_seq]; unused entries -1.
  std::vector<int32_t> block_tables;
  int32_t max_blocks_per_seq = 0;

  // Token indices (into token_ids) whose logits are computed, in output row order.
  std::vector<int32_t> logits_indices;

  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_seqs() const {
    return query_start.empty() ? 0 : static_cast<int32_t>(query_start.size()) - 1;
  }
};

}  // namespace qilin
