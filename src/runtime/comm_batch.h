// A step's ForwardBatch as bytes, and its broadcast from the rank that schedules (rank 0) to
// the ranks that follow: how every tensor-parallel rank runs the same batch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/status.h"
#include "runtime/comm.h"
#include "runtime/forward_batch.h"

namespace qilin {

// Little-endian: magic "QFB1", max_blocks_per_seq, then each vector as its u64 length and its
// elements (token_ids, positions, slot_mapping, query_start, context_lens, prompt_lens,
// block_tables, logits_indices).
std::vector<uint8_t> EncodeForwardBatch(const ForwardBatch& batch);

// DataLoss naming the field when the bytes are truncated, too long, or not an encoded batch
// (lengths are checked against the bytes left before anything is allocated). The batch itself
// is not validated against a model: backends do that.
Result<ForwardBatch> DecodeForwardBatch(const uint8_t* data, size_t size);

// Rank `root` encodes `*batch` and broadcasts its size and bytes; the other ranks decode it into
// `*batch`. Two broadcasts per step.
Status BroadcastForwardBatch(Communicator& comm, ForwardBatch* batch, int root);

}  // namespace qilin
