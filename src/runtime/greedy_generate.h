// The simplest generation loop: one prompt at a time, prefill then greedy decode on a Backend
// whose KV pool holds the whole sequence. The engine (inflight batching) replaces this for
// serving; `qilin generate` and tests use it directly.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"
#include "runtime/backend.h"

namespace qilin {

struct GreedyRequest {
  std::vector<int32_t> prompt_ids;
  int32_t max_tokens = 16;
  bool ignore_eos = false;
};

// Checks ids against the vocabulary, max_tokens > 0 and prompt + max_tokens against
// max_position_embeddings; `what` names the request in messages (e.g. "prompt 3").
Status ValidateGreedyRequest(const ModelConfig& config, const GreedyRequest& request,
                             const std::string& what);

// Blocks of `block_size` needed to hold prompt + max_tokens tokens.
int32_t GreedyBlocksNeeded(const GreedyRequest& request, int32_t block_size);

// Generates up to max_tokens ids (stopping after an eos id of the config unless ignore_eos).
// The backend's KV pool must hold GreedyBlocksNeeded blocks; blocks 0.. are used and overwritten.
Result<std::vector<int32_t>> GenerateGreedy(Backend& backend, const GreedyRequest& request);

}  // namespace qilin
