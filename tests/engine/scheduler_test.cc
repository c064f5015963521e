// Scheduler: token budget, chunked prefill mixed with decodes, priorities, preemption order,
// static batching and the no-evict policy, refusal of requests that can never fit.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

namespace qilin {
namespace {

class SchedulerTest : public ::testing::Test {
 protected:
  void Init(SchedulerConfig cfg, int32_t blocks, int32_t block_size) {
    kv_ = std::make_unique<KvManager>(blocks, block_size, false);
    sched_ = std::make_unique<Scheduler>(cfg, kv_.get());
  }
  SequenceGroup* Add(int64_t id, int32_t prompt_len, int32_t max_tokens, int32_t priority = 0) {
    auto g = std::make_unique<SequenceGroup>();
    g->id = id;
    g->arrival = static_cast<uint64_t>(id);
    g->request.prompt.assign(prompt_len, 1);
    g->request.sampling.max_tokens = max_tokens;
    g->request.priority = priority;
    g->prompt_len = prompt_len;
    auto s = std::make_unique<Sequence>();
    s->tokens = g->request.prompt;
    g->seqs.push_back(std::move(s));
    SequenceGroup* raw = g.get();
    sched_->Add(std::move(g));
    return raw;
  }
  // Applies a step's result as the engine would: computed tokens advance; sampled rows append.
  void Complete(const SchedulerOutput& out) {
    for (const auto& e : out.seqs) {
      e.seq->num_computed += e.num_new_tokens;
      if (e.sample) e.seq->tokens.push_back(2);
    }
  }
  std::unique_ptr<KvManager> kv_;
  std::unique_ptr<Scheduler> sched_;
};

TEST_F(SchedulerTest, ChunkedPrefillMixesWithDecodesUnderTheTokenBudget) {
  SchedulerConfig cfg;
  cfg.max_num_tokens = 10;
  cfg.max_seq_len = 1000;
  Init(cfg, 100, 4);
  SequenceGroup* a = Add(1, 6, 10);
  SchedulerOutput o1 = sched_->Schedule();
  ASSERT_EQ(o1.seqs.size(), 1u);
  EXPECT_EQ(o1.seqs[0].num_new_tokens, 6);
  EXPECT_TRUE(o1.seqs[0].sample);
  Complete(o1);
  Add(2, 25, 10);
  // a decodes (1 token), b prefills a 9-token chunk; not sampled yet.
  SchedulerOutput o2 = sched_->Schedule();
  ASSERT_EQ(o2.seqs.size(), 2u);
  EXPECT_EQ(o2.seqs[0].seq, a->seqs[0].get());
  EXPECT_EQ(o2.seqs[0].num_new_tokens, 1);
  EXPECT_EQ(o2.seqs[1].num_new_tokens, 9);
  EXPECT_FALSE(o2.seqs[1].sample);
  EXPECT_EQ(o2.num_tokens, 10);
  Complete(o2);
  Complete(sched_->Schedule());             // 1 + 9 (18 of 25)
  SchedulerOutput o4 = sched_->Schedule();  // 1 + 7: b's prefill completes and is sampled
  ASSERT_EQ(o4.seqs.size(), 2u);
  EXPECT_EQ(o4.seqs[1].num_new_tokens, 7);
  EXPECT_TRUE(o4.seqs[1].sample);
}

TEST_F(SchedulerTest, HigherPriorityIsAdmittedFirstThenArrivalOrder) {
  SchedulerConfig cfg;
  cfg.max_num_tokens = 4;
  cfg.max_seq_len = 100;
  Init(cfg, 100, 4);
  Add(1, 4, 5, 0);
  Add(2, 4, 5, 1);
  Add(3, 4, 5, 1);
  SchedulerOutput o = sched_->Schedule();
  ASSERT_EQ(o.seqs.size(), 1u);
  EXPECT_EQ(o.seqs[0].group->id, 2);
  Complete(o);
  o = sched_->Schedule();  // 2 decodes (1) + 3 prefills 3 of 4
  ASSERT_EQ(o.seqs.size(), 2u);
  EXPECT_EQ(o.seqs[1].group->id, 3);
}

TEST_F(SchedulerTest, PreemptsTheNewestWhenBlocksRunOut) {
  SchedulerConfig cfg;
  cfg.max_seq_len = 100;
  Init(cfg, 4, 4);  // 16 tokens in all
  SequenceGroup* a = Add(1, 4, 20);
  SequenceGroup* b = Add(2, 4, 20);
  // Each needs 1 block for its prompt plus 1 for its first decode.
  Complete(sched_->Schedule());
  EXPECT_EQ(sched_->num_running(), 2);
  for (int i = 0; i < 8; ++i) Complete(sched_->Schedule());
  EXPECT_GE(sched_->stats().num_preemptions, 1);
  EXPECT_EQ(b->num_preemptions, sched_->stats().num_preemptions);  // always the newest
  EXPECT_EQ(a->num_preemptions, 0);
  EXPECT_EQ(b->seqs[0]->kv.block_table.size(), 0u);
  EXPECT_EQ(b->seqs[0]->num_computed, 0);
  EXPECT_GT(b->seqs[0]->tokens.size(), 4u);  // keeps what it generated
}

TEST_F(SchedulerTest, StaticBatchingAdmitsNothingWhileABatchRuns) {
  SchedulerConfig cfg;
  cfg.max_seq_len = 100;
  cfg.mode = BatchingMode::kStaticV1;
  Init(cfg, 100, 4);
  Add(1, 4, 3);
  Complete(sched_->Schedule());
  Add(2, 4, 3);
  SchedulerOutput o = sched_->Schedule();
  ASSERT_EQ(o.seqs.size(), 1u);
  EXPECT_EQ(o.seqs[0].group->id, 1);
  EXPECT_EQ(sched_->num_waiting(), 1);
}

TEST_F(SchedulerTest, GuaranteedNoEvictReservesPromptPlusMaxTokens) {
  SchedulerConfig cfg;
  cfg.max_seq_len = 100;
  cfg.policy = CapacityPolicy::kGuaranteedNoEvict;
  Init(cfg, 10, 4);
  Add(1, 4, 20);  // 24 tokens: 6 blocks reserved
  Add(2, 4, 20);  // another 6: does not fit in the 4 left
  SchedulerOutput o = sched_->Schedule();
  EXPECT_EQ(o.seqs.size(), 1u);
  EXPECT_EQ(sched_->num_waiting(), 1);
}

TEST_F(SchedulerTest, RefusesWhatCanNeverFit) {
  SchedulerConfig cfg;
  cfg.max_seq_len = 64;
  cfg.max_batch_size = 4;
  Init(cfg, 10, 4);
  Request r;
  r.prompt.assign(30, 1);
  r.sampling.max_tokens = 40;
  EXPECT_NE(sched_->CheckFits(r).message().find("max_seq_len=64"), std::string::npos);
  r.sampling.max_tokens = 20;  // 50 tokens = 13 blocks > 10
  EXPECT_NE(sched_->CheckFits(r).message().find("13 KV blocks"), std::string::npos);
  r.prompt.assign(10, 1);
  r.sampling.max_tokens = 10;
  EXPECT_TRUE(sched_->CheckFits(r).ok());
  r.sampling.n = 5;
  EXPECT_NE(sched_->CheckFits(r).message().find("max_batch_size=4"), std::string::npos);
}

}  // namespace
}  // namespace qilin
