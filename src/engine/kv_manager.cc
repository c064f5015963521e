#include "engine/kv_manager.h"

#include <algorithm>
#include <cassert>

namespace qilin {
namespace {

uint64_t Mix(uint64_t x) {  // splitmix64 finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

int32_t CeilDiv(int32_t a, int32_t b) { return (a + b - 1) / b; }

}  // namespace

KvManager::KvManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching)
    : num_blocks_(num_blocks),
      block_size_(block_size),
      prefix_caching_(enable_prefix_caching),
      blocks_(num_blocks) {
  for (int32_t b = 0; b < num_blocks_; ++b) PushFree(b, /*at_head=*/false);
}

uint64_t KvManager::ChainHash(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = Mix(parent + 0x9e3779b97f4a7c15ULL);
  for (int32_t t : tokens) h = Mix(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(t)) + 1));
  return h == 0 ? 1 : h;  // 0 means "no parent"
}

void KvManager::PushFree(int32_t b, bool at_head) {
  Block& blk = blocks_[b];
  assert(!blk.in_free_list);
  blk.in_free_list = true;
  if (free_head_ < 0) {
    blk.prev = blk.next = -1;
    free_head_ = free_tail_ = b;
  } else if (at_head) {
    blk.prev = -1;
    blk.next = free_head_;
    blocks_[free_head_].prev = b;
    free_head_ = b;
  } else {
    blk.next = -1;
    blk.prev = free_tail_;
    blocks_[free_tail_].next = b;
    free_tail_ = b;
  }
  ++num_free_;
}

void KvManager::UnlinkFree(int32_t b) {
  Block& blk = blocks_[b];
  assert(blk.in_free_list);
  if (blk.prev >= 0)
    blocks_[blk.prev].next = blk.next;
  else
    free_head_ = blk.next;
  if (blk.next >= 0)
    blocks_[blk.next].prev = blk.prev;
  else
    free_tail_ = blk.prev;
  blk.prev = blk.next = -1;
  blk.in_free_list = false;
  --num_free_;
}

int32_t KvManager::PopFree() {
  int32_t b = free_head_;
  assert(b >= 0);
  UnlinkFree(b);
  Block& blk = blocks_[b];
  if (blk.cached) {
    auto it = cache_.find(blk.hash);
    if (it != cache_.end() && it->second == b) cache_.erase(it);
    blk.cached = false;
    ++stats_.evictions;
  }
  blk.hash = 0;
  blk.tokens.clear();
  blk.ref_count = 1;
  return b;
}

void KvManager::Release(int32_t b) {
  Block& blk = blocks_[b];
  assert(blk.ref_count > 0);
  if (--blk.ref_count == 0) {
    // Uncached blocks are worthless once free: reuse them first. Cached ones queue for LRU.
    PushFree(b, /*at_head=*/!blk.cached);
  }
}

int32_t KvManager::LookupBlock(uint64_t parent, uint64_t hash,
                               std::span<const int32_t> tokens) const {
  auto it = cache_.find(hash);
  if (it == cache_.end()) return -1;
  const Block& blk = blocks_[it->second];
  if (blk.parent_hash != parent ||
      !std::equal(tokens.begin(), tokens.end(), blk.tokens.begin(), blk.tokens.end())) {
    return -1;
  }
  return it->second;
}

KvManager::PrefixMatch KvManager::FindPrefix(std::span<const int32_t> tokens) const {
  PrefixMatch m;
  if (!prefix_caching_ || tokens.empty()) return m;
  const int32_t n = static_cast<int32_t>(tokens.size());
  const int32_t max_blocks = (n - 1) / block_size_;  // never the last token
  uint64_t parent = 0;
  for (int32_t i = 0; i < max_blocks; ++i) {
    auto blk_tokens = tokens.subspan(static_cast<size_t>(i) * block_size_, block_size_);
    uint64_t h = ChainHash(parent, blk_tokens);
    int32_t b = LookupBlock(parent, h, blk_tokens);
    if (b < 0) break;
    m.blocks.push_back(b);
    m.hashes.push_back(h);
    if (blocks_[b].ref_count == 0) ++m.num_revived;
    parent = h;
  }
  return m;
}

int32_t KvManager::AcquirePrefix(KvSequence* seq, const PrefixMatch& match,
                                 int32_t num_full_prompt_blocks) {
  assert(seq->block_table.empty());
  stats_.prefix_queries += num_full_prompt_blocks;
  stats_.prefix_hits += static_cast<int64_t>(match.blocks.size());
  for (size_t i = 0; i < match.blocks.size(); ++i) {
    int32_t b = match.blocks[i];
    Block& blk = blocks_[b];
    if (blk.ref_count == 0) UnlinkFree(b);
    ++blk.ref_count;
    seq->block_table.push_back(b);
  }
  seq->num_hashed_blocks = static_cast<int32_t>(match.blocks.size());
  seq->last_hash = match.hashes.empty() ? 0 : match.hashes.back();
  int32_t tokens = static_cast<int32_t>(match.blocks.size()) * block_size_;
  stats_.prefix_hit_tokens += tokens;
  return tokens;
}

int32_t KvManager::BlocksNeeded(const KvSequence& seq, int32_t num_computed,
                                int32_t new_total) const {
  const int32_t have = static_cast<int32_t>(seq.block_table.size());
  int32_t need = std::max(0, CeilDiv(new_total, block_size_) - have);
  // The block the first new token goes into, if already held and shared, is copied.
  const int32_t first = num_computed / block_size_;
  if (new_total > num_computed && first < have && blocks_[seq.block_table[first]].ref_count > 1) {
    ++need;
  }
  return need;
}

bool KvManager::Grow(KvSequence* seq, int32_t num_computed, int32_t new_total,
                     std::vector<std::pair<int32_t, int32_t>>* copies) {
  if (BlocksNeeded(*seq, num_computed, new_total) > num_free_) return false;
  const int32_t have = static_cast<int32_t>(seq->block_table.size());
  const int32_t first = num_computed / block_size_;
  if (new_total > num_computed && first < have) {
    int32_t old = seq->block_table[first];
    if (blocks_[old].ref_count > 1) {
      int32_t fresh = PopFree();
      copies->emplace_back(old, fresh);
      seq->block_table[first] = fresh;
      Release(old);
      ++stats_.cow_copies;
    }
  }
  const int32_t want = CeilDiv(new_total, block_size_);
  while (static_cast<int32_t>(seq->block_table.size()) < want) {
    seq->block_table.push_back(PopFree());
  }
  return true;
}

void KvManager::CommitFullBlocks(KvSequence* seq, std::span<const int32_t> tokens,
                                 int32_t num_computed) {
  if (!prefix_caching_) return;
  const int32_t full =
      std::min<int32_t>(num_computed / block_size_, static_cast<int32_t>(seq->block_table.size()));
  while (seq->num_hashed_blocks < full) {
    const int32_t i = seq->num_hashed_blocks;
    auto blk_tokens = tokens.subspan(static_cast<size_t>(i) * block_size_, block_size_);
    const uint64_t h = ChainHash(seq->last_hash, blk_tokens);
    Block& blk = blocks_[seq->block_table[i]];
    if (!blk.cached) {
      auto [it, inserted] = cache_.try_emplace(h, seq->block_table[i]);
      if (inserted) {
        blk.cached = true;
        blk.hash = h;
        blk.parent_hash = seq->last_hash;
        blk.tokens.assign(blk_tokens.begin(), blk_tokens.end());
      }
      // Else an equal block is cached already (computed concurrently): keep ours private.
    }
    seq->last_hash = h;
    ++seq->num_hashed_blocks;
  }
}

void KvManager::Fork(const KvSequence& src, KvSequence* dst) {
  assert(dst->block_table.empty());
  *dst = src;
  for (int32_t b : dst->block_table) ++blocks_[b].ref_count;
}

void KvManager::Free(KvSequence* seq) {
  // Last blocks first, so that a sequence's tail is evicted before its (more shared) head.
  for (auto it = seq->block_table.rbegin(); it != seq->block_table.rend(); ++it) Release(*it);
  seq->block_table.clear();
  seq->num_hashed_blocks = 0;
  seq->last_hash = 0;
}

bool KvManager::CheckInvariants(const std::vector<const KvSequence*>& tables) const {
  std::vector<int32_t> refs(num_blocks_, 0);
  for (const KvSequence* s : tables) {
    for (int32_t b : s->block_table) {
      if (b < 0 || b >= num_blocks_) return false;
      ++refs[b];
    }
  }
  int32_t free_count = 0;
  for (int32_t b = 0; b < num_blocks_; ++b) {
    if (refs[b] != blocks_[b].ref_count) return false;
    if ((refs[b] == 0) != blocks_[b].in_free_list) return false;
    if (refs[b] == 0) ++free_count;
  }
  if (free_count != num_free_) return false;
  int32_t walked = 0;
  for (int32_t b = free_head_; b >= 0; b = blocks_[b].next) {
    if (++walked > num_blocks_) return false;
  }
  if (walked != num_free_) return false;
  for (const auto& [h, b] : cache_) {
    if (!blocks_[b].cached || blocks_[b].hash != h) return false;
  }
  return true;
}

void KvManager::ResetCacheAndStats() {
  assert(num_free_ == num_blocks_);
  for (Block& b : blocks_) {
    b.cached = false;
    b.hash = b.parent_hash = 0;
    b.tokens.clear();
  }
  cache_.clear();
  stats_ = KvStats{};
}

}  // namespace qilin
