// KvManager: block accounting, prefix hits through the chained hash, LRU eviction of cached
// blocks, copy-on-write after a fork.
#include "engine/kv_manager.h"

#include <gtest/gtest.h>

#include <numeric>

namespace qilin {
namespace {

std::vector<int32_t> Iota(int32_t n, int32_t start = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}

// Grows a sequence over all its tokens and marks them computed, as a step would.
void Prefill(KvManager& kv, KvSequence* s, const std::vector<int32_t>& tokens, int32_t from = 0) {
  std::vector<std::pair<int32_t, int32_t>> copies;
  ASSERT_TRUE(kv.Grow(s, from, static_cast<int32_t>(tokens.size()), &copies));
  kv.CommitFullBlocks(s, tokens, static_cast<int32_t>(tokens.size()));
}

TEST(KvManagerTest, AllocatesAndFreesBlocks) {
  KvManager kv(10, 4, /*prefix_caching=*/false);
  KvSequence a;
  std::vector<std::pair<int32_t, int32_t>> copies;
  EXPECT_EQ(kv.BlocksNeeded(a, 0, 9), 3);
  ASSERT_TRUE(kv.Grow(&a, 0, 9, &copies));
  EXPECT_EQ(a.block_table.size(), 3u);
  EXPECT_EQ(kv.num_free_blocks(), 7);
  EXPECT_EQ(kv.BlocksNeeded(a, 9, 12), 0);
  EXPECT_EQ(kv.BlocksNeeded(a, 9, 13), 1);
  KvSequence b;
  EXPECT_FALSE(kv.Grow(&b, 0, 29, &copies));  // 8 blocks > 7 free: nothing taken
  EXPECT_TRUE(b.block_table.empty());
  EXPECT_EQ(kv.num_free_blocks(), 7);
  EXPECT_TRUE(kv.CheckInvariants({&a, &b}));
  kv.Free(&a);
  EXPECT_EQ(kv.num_free_blocks(), 10);
  EXPECT_TRUE(kv.CheckInvariants({&a, &b}));
  EXPECT_EQ(kv.Slot(KvSequence{{5, 2}}, 6), 2 * 4 + 2);
}

TEST(KvManagerTest, PrefixHitsNeedTheWholeChainAndLeaveTheLastToken) {
  KvManager kv(20, 4, true);
  KvSequence a;
  const auto prompt = Iota(13);  // 3 full blocks + 1 token
  Prefill(kv, &a, prompt);
  EXPECT_EQ(kv.num_cached_blocks(), 3);
  // Same first 8 tokens, different third block: two hits.
  auto other = prompt;
  other[9] = 99;
  auto m = kv.FindPrefix(other);
  EXPECT_EQ(m.blocks.size(), 2u);
  EXPECT_EQ(m.num_revived, 0);  // still referenced by a
  // A block equal in content but after a different prefix is not a hit (chained hash).
  auto shifted = prompt;
  shifted[0] = 50;
  EXPECT_EQ(kv.FindPrefix(shifted).blocks.size(), 0u);
  // Exactly 12 tokens: the last block is left to compute (its last token gives the logits).
  EXPECT_EQ(kv.FindPrefix(Iota(12)).blocks.size(), 2u);
  EXPECT_EQ(kv.FindPrefix(prompt).blocks.size(), 3u);
  // After a is freed, its blocks stay cached and are revived by a hit.
  kv.Free(&a);
  EXPECT_EQ(kv.num_free_blocks(), 20);
  m = kv.FindPrefix(prompt);
  EXPECT_EQ(m.num_revived, 3);
  KvSequence b;
  EXPECT_EQ(kv.AcquirePrefix(&b, m, 3), 12);
  EXPECT_EQ(kv.num_free_blocks(), 17);
  EXPECT_EQ(kv.stats().prefix_hits, 3);
  Prefill(kv, &b, prompt, 12);
  EXPECT_TRUE(kv.CheckInvariants({&b}));
  kv.Free(&b);
}

TEST(KvManagerTest, EvictsLeastRecentlyUsedCachedBlocksFirst) {
  KvManager kv(6, 2, true);
  KvSequence a, b;
  const auto pa = Iota(5, 0), pb = Iota(5, 100);  // 3 blocks each, 2 full
  Prefill(kv, &a, pa);
  Prefill(kv, &b, pb);
  kv.Free(&a);  // a's blocks are the least recently used
  kv.Free(&b);
  EXPECT_EQ(kv.num_cached_blocks(), 4);
  // Two fresh blocks: the uncached partial blocks go first, no eviction.
  KvSequence c;
  std::vector<std::pair<int32_t, int32_t>> copies;
  ASSERT_TRUE(kv.Grow(&c, 0, 4, &copies));
  EXPECT_EQ(kv.stats().evictions, 0);
  EXPECT_EQ(kv.num_cached_blocks(), 4);
  // Two more: a's blocks are evicted, b's survive.
  KvSequence d;
  ASSERT_TRUE(kv.Grow(&d, 0, 4, &copies));
  EXPECT_EQ(kv.stats().evictions, 2);
  EXPECT_EQ(kv.FindPrefix(pa).blocks.size(), 0u);
  EXPECT_EQ(kv.FindPrefix(pb).blocks.size(), 2u);
  kv.Free(&c);
  kv.Free(&d);
  EXPECT_TRUE(kv.CheckInvariants({}));
}

TEST(KvManagerTest, ForkSharesBlocksAndCopiesOnWrite) {
  KvManager kv(10, 4, false);
  KvSequence parent;
  Prefill(kv, &parent, Iota(6));  // blocks: full + partial (2 tokens)
  KvSequence child;
  kv.Fork(parent, &child);
  EXPECT_EQ(kv.ref_count(parent.block_table[1]), 2);
  EXPECT_EQ(kv.num_free_blocks(), 8);
  // Writing position 6 goes into the shared partial block: the child gets a copy.
  EXPECT_EQ(kv.BlocksNeeded(child, 6, 7), 1);
  std::vector<std::pair<int32_t, int32_t>> copies;
  const int32_t shared = parent.block_table[1];
  ASSERT_TRUE(kv.Grow(&child, 6, 7, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].first, shared);
  EXPECT_EQ(copies[0].second, child.block_table[1]);
  EXPECT_EQ(child.block_table[0], parent.block_table[0]);  // the full block stays shared
  EXPECT_EQ(kv.ref_count(shared), 1);
  // The parent now owns its block alone: no copy.
  copies.clear();
  ASSERT_TRUE(kv.Grow(&parent, 6, 7, &copies));
  EXPECT_TRUE(copies.empty());
  EXPECT_TRUE(kv.CheckInvariants({&parent, &child}));
  kv.Free(&parent);
  kv.Free(&child);
  EXPECT_EQ(kv.num_free_blocks(), 10);
}

}  // namespace
}  // namespace qilin
