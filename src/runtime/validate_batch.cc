#include "runtime/validate_batch.h"

#include <fmt/format.h>

namespace qilin {

Status ValidateForwardBatch(const ForwardBatch& b, const ModelConfig& config,
                            const KvCacheLayout& layout, int32_t previous_rows) {
  const int64_t num_slots = static_cast<int64_t>(layout.num_blocks) * layout.block_size;
  if (num_slots == 0) return FailedPrecondition("Forward: the KV cache is not allocated");
  const int64_t n = b.num_tokens();
  if (n == 0) return InvalidArgument("batch: token_ids is empty");
  if (static_cast<int64_t>(b.positions.size()) != n) {
    return InvalidArgument("batch: positions has {} entries, token_ids has {}", b.positions.size(),
                           n);
  }
  if (static_cast<int64_t>(b.slot_mapping.size()) != n) {
    return InvalidArgument("batch: slot_mapping has {} entries, token_ids has {}",
                           b.slot_mapping.size(), n);
  }
  if (b.query_start.size() < 2) {
    return InvalidArgument("batch: query_start has {} entries; need num_seqs + 1 >= 2",
                           b.query_start.size());
  }
  const int32_t seqs = b.num_seqs();
  if (b.query_start[0] != 0) {
    return InvalidArgument("batch: query_start[0] = {}, expected 0", b.query_start[0]);
  }
  if (b.query_start[seqs] != n) {
    return InvalidArgument("batch: query_start[{}] = {}, expected num_tokens = {}", seqs,
                           b.query_start[seqs], n);
  }
  if (static_cast<int32_t>(b.context_lens.size()) != seqs) {
    return InvalidArgument("batch: context_lens has {} entries for {} sequences",
                           b.context_lens.size(), seqs);
  }
  if (static_cast<int32_t>(b.prompt_lens.size()) != seqs) {
    return InvalidArgument("batch: prompt_lens has {} entries for {} sequences",
                           b.prompt_lens.size(), seqs);
  }
  if (b.max_blocks_per_seq <= 0) {
    return InvalidArgument("batch: max_blocks_per_seq = {} must be positive", b.max_blocks_per_seq);
  }
  if (static_cast<int64_t>(b.block_tables.size()) !=
      static_cast<int64_t>(seqs) * b.max_blocks_per_seq) {
    return InvalidArgument("batch: block_tables has {} entries, expected {} sequences x {} = {}",
                           b.block_tables.size(), seqs, b.max_blocks_per_seq,
                           static_cast<int64_t>(seqs) * b.max_blocks_per_seq);
  }
  const int64_t bs = layout.block_size;
  for (int32_t s = 0; s < seqs; ++s) {
    const int32_t q0 = b.query_start[s], q1 = b.query_start[s + 1];
    if (q1 <= q0 || q1 > n) {
      return InvalidArgument(
          "batch: sequence {} has query_start {} .. {}; each sequence needs "
          "at least one new token within the {} tokens",
          s, q0, q1, n);
    }
    const int64_t ctx = b.context_lens[s], qlen = q1 - q0;
    if (ctx < qlen) {
      return InvalidArgument("batch: context_lens[{}] = {} is less than its {} new tokens", s, ctx,
                             qlen);
    }
    if (ctx > static_cast<int64_t>(b.max_blocks_per_seq) * bs) {
      return InvalidArgument(
          "batch: context_lens[{}] = {} exceeds max_blocks_per_seq {} x block_size {}", s, ctx,
          b.max_blocks_per_seq, bs);
    }
    if (b.prompt_lens[s] <= 0) {
      return InvalidArgument("batch: prompt_lens[{}] = {} must be positive", s, b.prompt_lens[s]);
    }
    const int32_t* table = b.block_tables.data() + static_cast<int64_t>(s) * b.max_blocks_per_seq;
    const int64_t used_blocks = (ctx + bs - 1) / bs;
    for (int64_t j = 0; j < used_blocks; ++j) {
      if (table[j] < 0 || table[j] >= layout.num_blocks) {
        return InvalidArgument("batch: block_tables[{}][{}] = {} is outside the pool of {} blocks",
                               s, j, table[j], layout.num_blocks);
      }
    }
    for (int32_t t = q0; t < q1; ++t) {
      const int64_t want_pos = ctx - qlen + (t - q0);
      if (b.positions[t] != want_pos) {
        return InvalidArgument(
            "batch: positions[{}] = {}, expected {} (context_lens[{}] = {} with {} new tokens)", t,
            b.positions[t], want_pos, s, ctx, qlen);
      }
      const int64_t want_slot = static_cast<int64_t>(table[want_pos / bs]) * bs + want_pos % bs;
      if (b.slot_mapping[t] != want_slot) {
        return InvalidArgument(
            "batch: slot_mapping[{}] = {} (pool has {} slots), but the block table puts position "
            "{} at slot {}",
            t, b.slot_mapping[t], num_slots, want_pos, want_slot);
      }
    }
  }
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = b.token_ids[t];
    if (id < 0 && Backend::PreviousRowOf(id) < previous_rows) continue;
    if (id < 0 || id >= config.vocab_size) {
      if (id < 0 && previous_rows > 0) {
        return InvalidArgument(
            "batch: token_ids[{}] = {} stands for row {} of the previous step, which sampled {} "
            "rows",
            t, id, Backend::PreviousRowOf(id), previous_rows);
      }
      return InvalidArgument("batch: token_ids[{}] = {} is outside the vocabulary [0, {})", t, id,
                             config.vocab_size);
    }
  }
  for (size_t i = 0; i < b.logits_indices.size(); ++i) {
    if (b.logits_indices[i] < 0 || b.logits_indices[i] >= n) {
      return InvalidArgument("batch: logits_indices[{}] = {} is outside the {} tokens", i,
                             b.logits_indices[i], n);
    }
  }
  return Status::Ok();
}

Status ValidateBlockPairs(const std::vector<std::pair<int32_t, int32_t>>& src_dst,
                          const KvCacheLayout& layout) {
  for (const auto& [src, dst] : src_dst) {
    for (int32_t b : {src, dst}) {
      if (b < 0 || b >= layout.num_blocks) {
        return InvalidArgument("CopyKvBlocks: block {} is outside the pool of {} blocks", b,
                               layout.num_blocks);
      }
    }
  }
  return Status::Ok();
}

Status ValidateKvProposal(int32_t block_size, double memory_fraction, int32_t max_num_tokens) {
  if (block_size <= 0) return InvalidArgument("block_size = {} must be positive", block_size);
  if (!(memory_fraction > 0.0 && memory_fraction <= 1.0)) {
    return InvalidArgument("memory fraction = {} must be in (0, 1]", memory_fraction);
  }
  if (max_num_tokens <= 0) {
    return InvalidArgument("max_num_tokens = {} must be positive", max_num_tokens);
  }
  return Status::Ok();
}

}  // namespace qilin
