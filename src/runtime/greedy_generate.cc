#include "runtime/greedy_generate.h"

#include <algorithm>

namespace qilin {

Status ValidateGreedyRequest(const ModelConfig& config, const GreedyRequest& r,
                             const std::string& what) {
  if (r.prompt_ids.empty()) return InvalidArgument("{}: the prompt is empty", what);
  for (size_t i = 0; i < r.prompt_ids.size(); ++i) {
    if (r.prompt_ids[i] < 0 || r.prompt_ids[i] >= config.vocab_size) {
      return InvalidArgument("{}: token id {} at index {} is outside the vocabulary [0, {})", what,
                             r.prompt_ids[i], i, config.vocab_size);
    }
  }
  if (r.max_tokens <= 0) {
    return InvalidArgument("{}: max_tokens = {} must be at least 1", what, r.max_tokens);
  }
  const int64_t total = static_cast<int64_t>(r.prompt_ids.size()) + r.max_tokens;
  if (config.max_position_embeddings > 0 && total > config.max_position_embeddings) {
    return OutOfRange(
        "{}: prompt of {} tokens + max_tokens {} = {} exceeds max_position_embeddings {}", what,
        r.prompt_ids.size(), r.max_tokens, total, config.max_position_embeddings);
  }
  return Status::Ok();
}

int32_t GreedyBlocksNeeded(const GreedyRequest& r, int32_t block_size) {
  const int64_t total = static_cast<int64_t>(r.prompt_ids.size()) + r.max_tokens;
  return static_cast<int32_t>((total + block_size - 1) / block_size);
}

Result<std::vector<int32_t>> GenerateGreedy(Backend& backend, const GreedyRequest& r) {
  const ModelConfig& config = backend.config();
  QILIN_RETURN_IF_ERROR(ValidateGreedyRequest(config, r, "request"));
  const int32_t bs = backend.kv_layout().block_size;
  const int32_t blocks = GreedyBlocksNeeded(r, bs);
  if (blocks > backend.kv_layout().num_blocks) {
    return ResourceExhausted("request needs {} KV blocks of {} tokens; the pool has {}", blocks, bs,
                             backend.kv_layout().num_blocks);
  }
  const int32_t prompt_len = static_cast<int32_t>(r.prompt_ids.size());
  ForwardBatch b;
  b.max_blocks_per_seq = blocks;
  b.block_tables.resize(blocks);
  for (int32_t i = 0; i < blocks; ++i) b.block_tables[i] = i;  // block i holds positions i*bs..
  b.prompt_lens = {prompt_len};

  std::vector<int32_t> out;
  std::vector<float> logits;
  std::vector<int32_t> step_ids = r.prompt_ids;
  int32_t cached = 0;
  while (static_cast<int32_t>(out.size()) < r.max_tokens) {
    const int32_t k = static_cast<int32_t>(step_ids.size());
    b.token_ids = step_ids;
    b.positions.resize(k);
    b.slot_mapping.resize(k);
    for (int32_t i = 0; i < k; ++i) {
      b.positions[i] = cached + i;
      b.slot_mapping[i] = cached + i;  // contiguous blocks: slot == position
    }
    b.query_start = {0, k};
    b.context_lens = {cached + k};
    b.logits_indices = {k - 1};
    QILIN_RETURN_IF_ERROR(backend.Forward(b, &logits));
    cached += k;
    const int32_t next =
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    out.push_back(next);
    if (!r.ignore_eos && std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(),
                                   next) != config.eos_token_ids.end()) {
      break;
    }
    step_ids = {next};
  }
  return out;
}

}  // namespace qilin
