#include "runtime/host_kv_cache.h"

#include <algorithm>
#include <new>

namespace qilin {

bool HostKvCache::Allocate(int64_t layers, int64_t num_slots, int64_t size) {
  Clear();
  try {
    k.resize(layers);
    v.resize(layers);
    for (int64_t l = 0; l < layers; ++l) {
      k[l].assign(num_slots * size, 0.0f);
      v[l].assign(num_slots * size, 0.0f);
    }
  } catch (const std::bad_alloc&) {
    Clear();
    return false;
  }
  slots = num_slots;
  kv_size = size;
  return true;
}

void HostKvCache::Clear() {
  k.clear();
  v.clear();
  slots = 0;
  kv_size = 0;
}

void HostKvCache::CopyBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst,
                             int32_t block_size) {
  const int64_t block_floats = static_cast<int64_t>(block_size) * kv_size;
  for (const auto& [src, dst] : src_dst) {
    if (src == dst) continue;
    for (size_t l = 0; l < k.size(); ++l) {
      for (auto* cache : {&k[l], &v[l]}) {
        std::copy_n(cache->data() + src * block_floats, block_floats,
                    cache->data() + dst * block_floats);
      }
    }
  }
}

}  // namespace qilin
