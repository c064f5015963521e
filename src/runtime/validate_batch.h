// The checks every backend runs on a ForwardBatch before touching memory: sizes, prefix sums,
// positions against context lengths, block tables against the pool, slots against the block
// table, token ids against the vocabulary, logits indices against the tokens.
#pragma once

#include "common/status.h"
#include "model/config.h"
#include "runtime/backend.h"
#include "runtime/forward_batch.h"

namespace qilin {

// InvalidArgument naming the field, index and value; FailedPrecondition when the pool is empty.
// The same rules as CpuBackend::ValidateBatch.
Status ValidateForwardBatch(const ForwardBatch& batch, const ModelConfig& config,
                            const KvCacheLayout& layout);

}  // namespace qilin
