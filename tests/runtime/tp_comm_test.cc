// The communicators (in-process, and over TCP between ranks as socket_comm.h joins processes)
// against naive references (sums in rank order, concatenation, copies), their errors
// (mismatched sizes reach every rank, abort releases waiting ranks: no hang), and the step
// batch's encoding (round trip, every truncation refused).
#include <atomic>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "runtime/comm.h"
#include "runtime/comm_batch.h"
#include "runtime/socket_comm.h"
#include "socket_group.h"

namespace qilin {
namespace {

// Runs body(rank, comm) on `n` threads, one per rank, over a group of `kind`.
void RunRanks(const std::string& kind, int n, const std::function<void(int, Communicator&)>& body) {
  std::vector<std::unique_ptr<Communicator>> comms;
  if (kind == "socket") {
    comms = SocketGroup(n);
  } else {
    auto group = InProcessCommGroup::Create(n);
    ASSERT_TRUE(group.ok()) << group.status().ToString();
    for (int r = 0; r < n; ++r) {
      auto c = (*group)->Rank(r);
      ASSERT_TRUE(c.ok());
      comms.push_back(std::move(*c));
    }
  }
  ASSERT_EQ(static_cast<int>(comms.size()), n);
  for (const auto& c : comms) ASSERT_NE(c, nullptr);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) threads.emplace_back([&, r] { body(r, *comms[r]); });
  for (auto& t : threads) t.join();
}

std::vector<float> RankData(int rank, int64_t count) {
  std::mt19937 rng(1234 + rank);
  std::normal_distribution<float> d(0.0f, 3.0f);
  std::vector<float> v(count);
  for (float& x : v) x = d(rng);
  return v;
}

class CommSizeTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {
 protected:
  const std::string kind = std::get<0>(GetParam());
  void RunRanks(int n, const std::function<void(int, Communicator&)>& body) {
    qilin::RunRanks(kind, n, body);
  }
};

TEST_P(CommSizeTest, AllReduceSumEqualsTheSumInRankOrderOnEveryRank) {
  const int n = std::get<1>(GetParam());
  for (int64_t count : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{4099}}) {
    std::vector<float> want(count, 0.0f);
    for (int r = 0; r < n; ++r) {
      const std::vector<float> v = RankData(r, count);
      for (int64_t i = 0; i < count; ++i) want[i] = r == 0 ? v[i] : want[i] + v[i];
    }
    std::vector<std::vector<float>> got(n);
    RunRanks(n, [&](int r, Communicator& c) {
      EXPECT_EQ(c.rank(), r);
      EXPECT_EQ(c.world_size(), n);
      got[r] = RankData(r, count);
      // Twice in a row: the second reuses the scratch of the first.
      std::vector<float> again = got[r];
      EXPECT_TRUE(c.AllReduceSum(got[r].data(), count).ok());
      EXPECT_TRUE(c.AllReduceSum(again.data(), count).ok());
      EXPECT_EQ(again, got[r]);
    });
    for (int r = 0; r < n; ++r) {
      ASSERT_EQ(got[r], want) << "rank " << r << " count " << count;  // bit-identical
    }
  }
}

TEST_P(CommSizeTest, AllGatherConcatenatesInRankOrder) {
  const int n = std::get<1>(GetParam());
  const int64_t count = 37;
  std::vector<float> want;
  for (int r = 0; r < n; ++r) {
    auto v = RankData(r, count);
    want.insert(want.end(), v.begin(), v.end());
  }
  std::vector<std::vector<float>> got(n);
  RunRanks(n, [&](int r, Communicator& c) {
    const auto mine = RankData(r, count);
    got[r].assign(n * count, -1.0f);
    EXPECT_TRUE(c.AllGather(mine.data(), count, got[r].data()).ok());
  });
  for (int r = 0; r < n; ++r) EXPECT_EQ(got[r], want) << "rank " << r;
}

TEST_P(CommSizeTest, GatherTo0ConcatenatesOnRankZeroOnly) {
  const int n = std::get<1>(GetParam());
  const int64_t count = 53;
  std::vector<float> want;
  for (int r = 0; r < n; ++r) {
    auto v = RankData(r, count);
    want.insert(want.end(), v.begin(), v.end());
  }
  std::vector<std::vector<float>> got(n);
  RunRanks(n, [&](int r, Communicator& c) {
    const auto mine = RankData(r, count);
    got[r].assign(n * count, -1.0f);
    EXPECT_TRUE(c.GatherTo0(mine.data(), count, got[r].data()).ok());
    // And with no buffer on the ranks that receive nothing.
    std::vector<float> again(r == 0 ? n * count : 0);
    EXPECT_TRUE(c.GatherTo0(mine.data(), count, r == 0 ? again.data() : nullptr).ok());
    if (r == 0) {
      EXPECT_EQ(again, got[0]);
    }
  });
  EXPECT_EQ(got[0], want);
}

TEST_P(CommSizeTest, BroadcastCopiesTheRootsBytes) {
  const int n = std::get<1>(GetParam());
  for (int root = 0; root < n; ++root) {
    std::vector<std::vector<float>> got(n);
    RunRanks(n, [&](int r, Communicator& c) {
      got[r] = RankData(r, 100);
      EXPECT_TRUE(c.Broadcast(got[r].data(), 100 * sizeof(float), root).ok());
      EXPECT_TRUE(c.Barrier().ok());
    });
    for (int r = 0; r < n; ++r) EXPECT_EQ(got[r], RankData(root, 100));
  }
}

TEST_P(CommSizeTest, MismatchedSizesFailOnEveryRankWithoutHanging) {
  const int n = std::get<1>(GetParam());
  if (n == 1) GTEST_SKIP() << "one rank has nobody to disagree with";
  std::vector<Status> st(n);
  RunRanks(n, [&](int r, Communicator& c) {
    std::vector<float> v(10 + r);
    st[r] = c.AllReduceSum(v.data(), 10 + r);
    // The group is still usable afterwards.
    std::vector<float> ok(5, 1.0f);
    EXPECT_TRUE(c.AllReduceSum(ok.data(), 5).ok());
    EXPECT_EQ(ok[0], static_cast<float>(n));
  });
  for (int r = 0; r < n; ++r) {
    EXPECT_EQ(st[r].code(), StatusCode::kInvalidArgument) << st[r].ToString();
    EXPECT_NE(st[r].message().find("rank 1 passed 11 elements, rank 0 passed 10"),
              std::string::npos)
        << st[r].message();
  }
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommSizeTest,
                         ::testing::Combine(::testing::Values("inprocess", "socket"),
                                            ::testing::Values(1, 2, 3, 4, 8)),
                         [](const auto& info) {
                           return std::get<0>(info.param) + "_" +
                                  std::to_string(std::get<1>(info.param));
                         });

class CommKindTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CommKindTest, AbortReleasesRanksWaitingInACollective) {
  std::vector<Status> st(3);
  RunRanks(GetParam(), 3, [&](int r, Communicator& c) {
    if (r == 2) {
      // Rank 2 never joins; it gives up instead.
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      c.Abort("rank 2 failed to load its shard");
      return;
    }
    std::vector<float> v(4, 1.0f);
    st[r] = c.AllReduceSum(v.data(), 4);
  });
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(st[r].code(), StatusCode::kCancelled);
    EXPECT_NE(st[r].message().find("rank 2: rank 2 failed to load its shard"), std::string::npos)
        << st[r].message();
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, CommKindTest, ::testing::Values("inprocess", "socket"));

TEST(CommTest, BadArguments) {
  EXPECT_FALSE(InProcessCommGroup::Create(0).ok());
  EXPECT_FALSE(InProcessCommGroup::Create(100000).ok());
  auto g = InProcessCommGroup::Create(2);
  ASSERT_TRUE(g.ok());
  auto bad = (*g)->Rank(2);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("rank 2"), std::string::npos);
  auto c = (*g)->Rank(0);
  ASSERT_TRUE(c.ok());
  float x = 0;
  EXPECT_EQ((*c)->AllReduceSum(&x, -1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*c)->Broadcast(&x, 4, 5).code(), StatusCode::kInvalidArgument);
}

ForwardBatch SampleBatch() {
  ForwardBatch b;
  b.token_ids = {5, 9, 13, 2, 7};
  b.positions = {0, 1, 2, 7, 3};
  b.slot_mapping = {32, 33, 34, 71, 100000000000};
  b.query_start = {0, 3, 4, 5};
  b.context_lens = {3, 8, 4};
  b.prompt_lens = {3, 6, 4};
  b.max_blocks_per_seq = 2;
  b.block_tables = {1, -1, 2, -1, 3, -1};
  b.logits_indices = {2, 3, 4};
  return b;
}

void ExpectSameBatch(const ForwardBatch& a, const ForwardBatch& b) {
  EXPECT_EQ(a.token_ids, b.token_ids);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.slot_mapping, b.slot_mapping);
  EXPECT_EQ(a.query_start, b.query_start);
  EXPECT_EQ(a.context_lens, b.context_lens);
  EXPECT_EQ(a.prompt_lens, b.prompt_lens);
  EXPECT_EQ(a.max_blocks_per_seq, b.max_blocks_per_seq);
  EXPECT_EQ(a.block_tables, b.block_tables);
  EXPECT_EQ(a.logits_indices, b.logits_indices);
}

TEST(CommBatchTest, RoundTripAndEveryTruncationIsRefused) {
  const ForwardBatch b = SampleBatch();
  const std::vector<uint8_t> bytes = EncodeForwardBatch(b);
  auto back = DecodeForwardBatch(bytes.data(), bytes.size());
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  ExpectSameBatch(b, *back);
  for (size_t len = 0; len < bytes.size(); ++len) {
    auto cut = DecodeForwardBatch(bytes.data(), len);
    ASSERT_FALSE(cut.ok()) << "length " << len;
    EXPECT_EQ(cut.status().code(), StatusCode::kDataLoss);
  }
  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  auto extra = DecodeForwardBatch(longer.data(), longer.size());
  ASSERT_FALSE(extra.ok());
  EXPECT_NE(extra.status().message().find("1 bytes after"), std::string::npos);
  // A length field claiming far more elements than bytes: refused before any allocation.
  std::vector<uint8_t> huge = bytes;
  const uint64_t big = uint64_t{1} << 62;
  std::memcpy(huge.data() + 8, &big, sizeof(big));
  auto claimed = DecodeForwardBatch(huge.data(), huge.size());
  ASSERT_FALSE(claimed.ok());
  EXPECT_NE(claimed.status().message().find("token_ids"), std::string::npos)
      << claimed.status().message();
  std::vector<uint8_t> wrong = bytes;
  wrong[0] = 'X';
  EXPECT_FALSE(DecodeForwardBatch(wrong.data(), wrong.size()).ok());
}

TEST(CommBatchTest, BroadcastForwardBatchFromRankZero) {
  for (const char* kind : {"inprocess", "socket"}) {
    std::vector<ForwardBatch> got(3);
    RunRanks(kind, 3, [&](int r, Communicator& c) {
      if (r == 0) got[r] = SampleBatch();
      EXPECT_TRUE(BroadcastForwardBatch(c, &got[r], 0).ok());
    });
    for (int r = 0; r < 3; ++r) ExpectSameBatch(got[r], SampleBatch());
  }
}

}  // namespace
}  // namespace qilin
