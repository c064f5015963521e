// The checks every backend runs on a ForwardBatch before touching memory: sizes, prefix sums,
// positions against context lengths, block tables against the pool, slots against the block
// table, token ids against the vocabulary, logits indices against the tokens.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/config.h"
#include "runtime/backend.h"
#include "runtime/forward_batch.h"

namespace qilin {

// InvalidArgument naming the field, index and value; FailedPrecondition when the pool is empty.
// The same rules as CpuBackend::ValidateBatch. `previous_rows` > 0 (a launched step,
// Backend::LaunchForwardSample) also admits the token ids Backend::PreviousRowToken(r) for r in
// [0, previous_rows).
Status ValidateForwardBatch(const ForwardBatch& batch, const ModelConfig& config,
                            const KvCacheLayout& layout, int32_t previous_rows = 0);

// Backend::CopyKvBlocks' pairs: InvalidArgument naming the first block outside the pool.
Status ValidateBlockPairs(const std::vector<std::pair<int32_t, int32_t>>& src_dst,
                          const KvCacheLayout& layout);

// The arguments of Backend::ProposeNumKvBlocks: InvalidArgument naming the one that is not
// positive (block_size, max_num_tokens) or not in (0, 1] (memory_fraction).
Status ValidateKvProposal(int32_t block_size, double memory_fraction, int32_t max_num_tokens);

}  // namespace qilin
