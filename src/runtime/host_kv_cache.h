// The KV cache of the CPU backends (all of the model's KV heads, or a tensor-parallel rank's):
// per layer, K and V as [slots, kv_size] f32.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace qilin {

struct HostKvCache {
  std::vector<std::vector<float>> k, v;  // [layers][slots * kv_size]
  int64_t slots = 0;
  int64_t kv_size = 0;

  // Zeroed caches for `layers`; false, with everything released, when the memory cannot be had.
  bool Allocate(int64_t layers, int64_t slots, int64_t kv_size);
  void Clear();
  // Copies blocks of `block_size` slots from src to dst in every layer; the pairs must have been
  // checked against the pool (ValidateBlockPairs).
  void CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst, int32_t block_size);
};

}  // namespace qilin
