// Engine::WarmUp: the backend's batch sizes and the largest prefill run before serving, and
// nothing of the dummy requests stays behind (KV pool, prefix cache, stats, request ids, seeds).
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "engine/engine.h"
#include "engine_test_util.h"
#include "fake_sampling_backend.h"

namespace qilin::test {
namespace {

// The fake with launched steps that asks for a warm-up of `sizes` and records each step's tokens.
class WarmUpBackend : public FakeSamplingBackend {
 public:
  WarmUpBackend(const FakeModel& m, std::vector<int32_t> sizes, std::vector<int32_t> prefills = {})
      : FakeSamplingBackend(m.vocab, m.max_len, m.eos, m.eos_bias),
        sizes_(std::move(sizes)),
        prefills_(std::move(prefills)) {
    launched_steps = true;
  }
  std::vector<int32_t> WarmUpBatchSizes(int32_t max_batch_size) const override {
    std::vector<int32_t> s;
    for (int32_t b : sizes_) s.push_back(std::min(b, max_batch_size));
    return s;
  }
  std::vector<int32_t> WarmUpPrefillTokens(int32_t max_num_tokens) const override {
    return prefills_.empty() ? Backend::WarmUpPrefillTokens(max_num_tokens) : prefills_;
  }
  void SetWarmUpSteps(bool on) override { warm_up_steps = on; }
  Status Forward(const ForwardBatch& b, std::vector<float>* logits) override {
    step_tokens.push_back(b.num_tokens());
    step_warm_up.push_back(warm_up_steps);
    return FakeSamplingBackend::Forward(b, logits);
  }
  std::vector<int32_t> step_tokens;
  std::vector<bool> step_warm_up;  // SetWarmUpSteps at each step
  bool warm_up_steps = false;

 private:
  std::vector<int32_t> sizes_, prefills_;
};

EngineConfig SmallConfig() {
  EngineConfig c;
  c.max_batch_size = 8;
  c.max_num_tokens = 48;
  c.max_seq_len = 20;
  c.block_size = 4;
  c.kv_cache_tokens = 4 * 64;
  c.enable_prefix_caching = true;
  return c;
}

std::vector<Request> SomeRequests() {
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) {
    Request r;
    for (int j = 0; j < 3 + i; ++j) r.prompt.push_back((i * 13 + j * 7) % 97);
    r.sampling.max_tokens = 5 + i;
    if (i % 2) {
      r.sampling.temperature = 0.0f;  // greedy
    } else {
      r.sampling.seed = 1000 + i;  // sampled (two engines draw different unseeded seeds)
    }
    reqs.push_back(r);
  }
  return reqs;
}

std::vector<Collected> RunAll(Engine& e, const std::vector<Request>& reqs) {
  std::vector<std::shared_ptr<ResponseStream>> streams;
  for (const Request& r : reqs) {
    auto s = e.Submit(r);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    streams.push_back(*s);
  }
  EXPECT_TRUE(e.RunUntilIdle().ok());
  std::vector<Collected> out(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) Drain(*streams[i], &out[i]);
  return out;
}

TEST(EngineWarmUp, RunsEachBatchSizeThenTheLargestPrefillAndLeavesNothingBehind) {
  FakeModel m;
  WarmUpBackend backend(m, {1, 3, 8});
  const EngineConfig cfg = SmallConfig();
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  Result<int64_t> steps = (*engine)->WarmUp();
  ASSERT_TRUE(steps.ok()) << steps.status().ToString();
  // Per size b: a prefill of b one-token prompts and a decode step of b rows; then 48 prompt
  // tokens as 2 prompts of 19 (max_seq_len 20 leaves room for the one output token): one step.
  const std::vector<int32_t> want = {1, 1, 3, 3, 8, 8, 38};
  EXPECT_EQ(backend.step_tokens, want);
  EXPECT_GE(*steps, static_cast<int64_t>(want.size()));  // scheduler rounds, answers included
  const EngineStats st = (*engine)->stats();
  EXPECT_EQ(st.steps, 0);
  EXPECT_EQ(st.prefill_tokens, 0);
  EXPECT_EQ(st.generated_tokens, 0);
  EXPECT_EQ(st.requests_finished, 0);
  EXPECT_EQ(st.overlapped_steps, 0);
  EXPECT_EQ(st.prefix_cache_queries, 0);
  EXPECT_EQ(st.kv_blocks_cached, 0);
  EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total);
  EXPECT_TRUE((*engine)->CheckKvInvariants());
  EXPECT_FALSE((*engine)->HasWork());
}

// The backend's prefill sizes run in order, each as one step of at most max_num_tokens (48) and
// as few prompts as max_seq_len (20) allows; a size no larger than the one before is skipped.
TEST(EngineWarmUp, RunsTheBackendsPrefillSizes) {
  FakeModel m;
  WarmUpBackend backend(m, {2}, {8, 16, 16, 12, 100});
  auto engine = Engine::Create(backend, SmallConfig());
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  ASSERT_TRUE((*engine)->WarmUp().ok());
  // 8: one prompt; 16: one; 100 -> 48: two prompts of 19.
  const std::vector<int32_t> want = {2, 2, 8, 16, 38};
  EXPECT_EQ(backend.step_tokens, want);
  // The batch-size waves compute (their graphs serve later steps); the prefill sizes are warm-up
  // steps, and the mode is off again afterwards.
  const std::vector<bool> warm = {false, false, true, true, true};
  EXPECT_EQ(backend.step_warm_up, warm);
  EXPECT_FALSE(backend.warm_up_steps);
  EXPECT_TRUE((*engine)->CheckKvInvariants());
  EXPECT_EQ((*engine)->stats().kv_blocks_free, (*engine)->stats().kv_blocks_total);
}

// Requests after a warm-up get what they get without one: the same tokens (greedy and seeded
// sampling), the same prefix-cache hits and the same request ids.
TEST(EngineWarmUp, OutputsAndIdsAsWithoutWarmUp) {
  FakeModel m;
  const std::vector<Request> reqs = SomeRequests();
  WarmUpBackend cold_backend(m, {1, 3, 8}), warm_backend(m, {1, 3, 8});
  auto cold = Engine::Create(cold_backend, SmallConfig());
  auto warm = Engine::Create(warm_backend, SmallConfig());
  ASSERT_TRUE(cold.ok() && warm.ok());
  ASSERT_TRUE((*warm)->WarmUp().ok());
  const std::vector<Collected> a = RunAll(**cold, reqs), b = RunAll(**warm, reqs);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].tokens, b[i].tokens) << i;
    EXPECT_EQ(a[i].reasons, b[i].reasons) << i;
  }
  EXPECT_EQ((*cold)->stats().requests_finished, (*warm)->stats().requests_finished);
  EXPECT_EQ((*cold)->stats().prefix_cache_hits, (*warm)->stats().prefix_cache_hits);
  auto ida = (*cold)->Submit(reqs[0]), idb = (*warm)->Submit(reqs[0]);
  ASSERT_TRUE(ida.ok() && idb.ok());
  EXPECT_EQ((*ida)->request_id(), (*idb)->request_id());
}

TEST(EngineWarmUp, NothingToDoWhereTheBackendAsksForNothing) {
  FakeModel m;
  WarmUpBackend backend(m, {});
  auto engine = Engine::Create(backend, SmallConfig());
  ASSERT_TRUE(engine.ok());
  Result<int64_t> steps = (*engine)->WarmUp();
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, 0);
  EXPECT_TRUE(backend.step_tokens.empty());
}

TEST(EngineWarmUp, RefusedOnceRequestsAreThereOrTheLoopRuns) {
  FakeModel m;
  WarmUpBackend backend(m, {2});
  auto engine = Engine::Create(backend, SmallConfig());
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->Submit(SomeRequests()[0]).ok());
  Result<int64_t> steps = (*engine)->WarmUp();
  EXPECT_EQ(steps.status().code(), StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*engine)->RunUntilIdle().ok());
  (*engine)->Start();
  steps = (*engine)->WarmUp();
  EXPECT_EQ(steps.status().code(), StatusCode::kFailedPrecondition);
  (*engine)->Stop();
}

}  // namespace
}  // namespace qilin::test
