// The paged KV cache's bookkeeping (the backend owns the memory): a pool of fixed-size blocks,
// per-sequence block tables, reference counts, prefix caching and copy-on-write.
//
// Prefix caching: a full block is named by a hash chained over every token before and in it, so
// equal prefixes map to equal blocks. Blocks whose reference count drops to zero keep their hash
// and sit in an LRU free list; they are reused on a prefix hit or evicted (hash dropped) when the
// pool needs a fresh block. Forked sequences (n > 1, beams) share blocks; the first write into a
// shared block copies it (Backend::CopyKvBlocks).
#pragma once

#include <cstdint>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qilin {

// A sequence's KV state. Owned by the sequence, changed only through KvManager.
struct KvSequence {
  std::vector<int32_t> block_table;
  // Leading full blocks whose chained hash is known (registered in, or found in, the cache).
  int32_t num_hashed_blocks = 0;
  uint64_t last_hash = 0;  // chain hash of block num_hashed_blocks - 1 (0 before the first)
};

struct KvStats {
  int64_t prefix_queries = 0;     // full prompt blocks looked up
  int64_t prefix_hits = 0;        // of which found in the cache
  int64_t prefix_hit_tokens = 0;  // tokens whose prefill was skipped
  int64_t cow_copies = 0;         // blocks copied on write
  int64_t evictions = 0;          // cached blocks whose hash was dropped for reuse
};

class KvManager {
 public:
  KvManager(int32_t num_blocks, int32_t block_size, bool enable_prefix_caching);

  int32_t num_blocks() const { return num_blocks_; }
  int32_t block_size() const { return block_size_; }
  bool prefix_caching() const { return prefix_caching_; }
  // Blocks that can be handed out: never used, or unreferenced (cached or not).
  int32_t num_free_blocks() const { return num_free_; }
  int32_t num_used_blocks() const { return num_blocks_ - num_free_; }
  int32_t num_cached_blocks() const { return static_cast<int32_t>(cache_.size()); }
  const KvStats& stats() const { return stats_; }
  int32_t ref_count(int32_t block) const { return blocks_[block].ref_count; }

  // Prefix lookup for a sequence that holds no blocks: the cached blocks equal to its leading
  // full blocks, never covering the last token (its logits must be computed). No state change.
  struct PrefixMatch {
    std::vector<int32_t> blocks;
    std::vector<uint64_t> hashes;
    int32_t num_revived = 0;  // matched blocks now unreferenced (they leave the free list)
  };
  PrefixMatch FindPrefix(std::span<const int32_t> tokens) const;
  // Takes the matched blocks into `seq` (empty) and counts the lookup in the stats. Returns the
  // number of tokens covered.
  int32_t AcquirePrefix(KvSequence* seq, const PrefixMatch& match, int32_t num_full_prompt_blocks);

  // Blocks that Grow(seq, num_computed, new_total) would take from the free list.
  int32_t BlocksNeeded(const KvSequence& seq, int32_t num_computed, int32_t new_total) const;
  // Makes room for tokens [num_computed, new_total): appends blocks and copies a shared block
  // that a new token is written into (appending (src, dst) to `copies`). Returns false, changing
  // nothing, when the pool has too few free blocks.
  bool Grow(KvSequence* seq, int32_t num_computed, int32_t new_total,
            std::vector<std::pair<int32_t, int32_t>>* copies);
  // Registers the sequence's newly completed full blocks (tokens [0, num_computed) are in the
  // cache) under their chain hashes.
  void CommitFullBlocks(KvSequence* seq, std::span<const int32_t> tokens, int32_t num_computed);
  // `dst` shares every block of `src`.
  void Fork(const KvSequence& src, KvSequence* dst);
  // Drops the sequence's references; the table is cleared.
  void Free(KvSequence* seq);

  // Slot of token position `pos` of a sequence: block_id * block_size + offset.
  int64_t Slot(const KvSequence& seq, int32_t pos) const {
    return static_cast<int64_t>(seq.block_table[pos / block_size_]) * block_size_ +
           pos % block_size_;
  }

  // With every block free: forgets every cached prefix and zeroes the stats (Engine::WarmUp's
  // dummy requests leave nothing behind).
  void ResetCacheAndStats();

  // Consistency check for tests: reference counts equal the references in `tables`, the free
  // list holds exactly the unreferenced blocks, the hash map points at blocks with that hash.
  bool CheckInvariants(const std::vector<const KvSequence*>& tables) const;

 private:
  struct Block {
    int32_t ref_count = 0;
    bool cached = false;  // registered in cache_ under `hash`
    uint64_t hash = 0;
    uint64_t parent_hash = 0;
    std::vector<int32_t> tokens;   // the block's tokens, to rule out hash collisions
    int32_t prev = -1, next = -1;  // free-list links
    bool in_free_list = false;
  };

  static uint64_t ChainHash(uint64_t parent, std::span<const int32_t> tokens);
  int32_t PopFree();  // from the head; evicts its hash
  void PushFree(int32_t block, bool at_head);
  void UnlinkFree(int32_t block);
  void Release(int32_t block);
  int32_t LookupBlock(uint64_t parent, uint64_t hash, std::span<const int32_t> tokens) const;

  int32_t num_blocks_;
  int32_t block_size_;
  bool prefix_caching_;
  std::vector<Block> blocks_;
  int32_t free_head_ = -1, free_tail_ = -1, num_free_ = 0;
  std::unordered_map<uint64_t, int32_t> cache_;
  KvStats stats_;
};

}  // namespace qilin
