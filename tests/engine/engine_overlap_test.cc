// The engine tests of engine_test.cc again, on a fake backend that samples "on the device" and
// launches steps: every step the engine can overlap is launched before the previous one is
// answered, with placeholder tokens resolved by the backend (fake_sampling_backend.h).
#include "fake_sampling_backend.h"

#define QILIN_TEST_BACKEND FakeSamplingBackend
#define QILIN_ENGINE_TEST EngineOverlapTest
#define QILIN_ENGINE_TOKENIZER_TEST EngineOverlapTokenizerTest
#include "engine_test.cc"  // NOLINT(bugprone-suspicious-include)

namespace qilin::test {
namespace {

struct OverlapRun {
  std::vector<Collected> out;
  EngineStats stats;
  int64_t tokens_seen = 0, launched = 0, sync_steps = 0, resolved = 0;
  int max_pending = 0;
};

// All requests at once, stepped to the end; `launched_steps` false runs the same backend one
// step at a time (the reference for the backend's work).
OverlapRun RunOverlap(const FakeModel& m, const EngineConfig& cfg, const std::vector<Request>& reqs,
                      bool launched_steps) {
  FakeSamplingBackend backend(m.vocab, m.max_len, m.eos, m.eos_bias);
  backend.launched_steps = launched_steps;
  auto engine = Engine::Create(backend, cfg);
  EXPECT_TRUE(engine.ok());
  std::vector<std::shared_ptr<ResponseStream>> streams;
  for (const Request& r : reqs) streams.push_back(*(*engine)->Submit(r));
  OverlapRun res;
  res.out.resize(reqs.size());
  int guard = 0;
  while ((*engine)->HasWork() && ++guard < 100000) {
    EXPECT_TRUE((*engine)->Step().ok());
    EXPECT_TRUE((*engine)->CheckKvInvariants());
    EXPECT_LE(backend.pending(), 1) << "a step stayed launched past the next one";
  }
  for (size_t i = 0; i < reqs.size(); ++i) Drain(*streams[i], &res.out[i]);
  res.stats = (*engine)->stats();
  EXPECT_EQ(res.stats.kv_blocks_free, res.stats.kv_blocks_total);
  EXPECT_EQ(backend.pending(), 0);
  res.tokens_seen = backend.tokens_seen;
  res.launched = backend.launched;
  res.sync_steps = backend.sync_steps;
  res.resolved = backend.resolved_tokens;
  res.max_pending = backend.max_pending;
  return res;
}

TEST(EngineOverlap, StepsOverlapAndRunNoRowPastALengthFinish) {
  FakeModel m{.vocab = 97, .max_len = 256};
  std::mt19937_64 rng(41);
  std::vector<Request> reqs;
  for (int i = 0; i < 20; ++i) {
    reqs.push_back(Greedy(RandomTokens(rng, 1 + rng() % 50, m.vocab), 1 + rng() % 30));
  }
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.max_num_tokens = 64;
  cfg.kv_cache_tokens = 8 * 400;
  const OverlapRun one = RunOverlap(m, cfg, reqs, false);
  const OverlapRun ovl = RunOverlap(m, cfg, reqs, true);
  EXPECT_EQ(one.launched, 0);
  EXPECT_EQ(ovl.sync_steps, 0);
  // Every step after the first is launched while the one before it runs.
  EXPECT_EQ(ovl.max_pending, 2);
  EXPECT_GE(ovl.stats.overlapped_steps, ovl.launched - 2) << ovl.launched << " launched";
  EXPECT_GT(ovl.resolved, 0);
  // Only max_tokens ends these requests: the overlap runs exactly the same rows.
  EXPECT_EQ(ovl.tokens_seen, one.tokens_seen);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(ovl.out[i].tokens.at(0), one.out[i].tokens.at(0)) << "request " << i;
    EXPECT_EQ(ovl.out[i].tokens.at(0), NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, 0));
  }
}

TEST(EngineOverlap, AStopTokenCostsAtMostOneDroppedRow) {
  FakeModel m{.vocab = 61, .eos = 4, .eos_bias = 2.0f, .max_len = 256};
  std::mt19937_64 rng(43);
  std::vector<Request> reqs;
  for (int i = 0; i < 24; ++i) {
    Request r = Greedy(RandomTokens(rng, 1 + rng() % 40, m.vocab), 40);
    if (i % 3 == 0) r.sampling.min_tokens = 5;
    if (i % 4 == 0) r.sampling.stop_token_ids = {7, 9};
    if (i % 5 == 0) {
      r.sampling.temperature = 0.9f;
      r.sampling.top_k = 20;
      r.sampling.seed = 1000 + i;
    }
    reqs.push_back(r);
  }
  EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_cache_tokens = 4 * 500;
  const OverlapRun one = RunOverlap(m, cfg, reqs, false);
  const OverlapRun ovl = RunOverlap(m, cfg, reqs, true);
  int stopped = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(ovl.out[i].tokens.at(0), one.out[i].tokens.at(0)) << "request " << i;
    EXPECT_EQ(ovl.out[i].tokens.at(0),
              NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, *reqs[i].sampling.seed))
        << "request " << i;
    stopped += ovl.out[i].reasons.at(0) == FinishReason::kStop;
  }
  EXPECT_GT(stopped, 5);
  EXPECT_GE(ovl.tokens_seen, one.tokens_seen);
  EXPECT_LE(ovl.tokens_seen, one.tokens_seen + stopped);
}

TEST(EngineOverlap, RequestsThatNeedTheHostTurnTheOverlapOffWhilePresent) {
  FakeModel m{.vocab = 89, .eos = 2, .eos_bias = 0.5f, .max_len = 256};
  std::mt19937_64 rng(47);
  FakeSamplingBackend backend(m.vocab, m.max_len, m.eos, m.eos_bias);
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.kv_cache_tokens = 8 * 400;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  std::vector<Request> reqs;
  std::vector<std::shared_ptr<ResponseStream>> streams;
  auto submit = [&](Request r) {
    r.sampling.seed = rng();
    reqs.push_back(r);
    streams.push_back(*e.Submit(r));
  };
  for (int i = 0; i < 4; ++i) submit(Greedy(RandomTokens(rng, 20, m.vocab), 30));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(e.Step().ok());
  const int64_t launched_before = backend.launched;
  EXPECT_GT(launched_before, 3);
  // A repetition penalty reads the previous token: the next steps run one at a time.
  Request pen = Greedy(RandomTokens(rng, 12, m.vocab), 6);
  pen.sampling.repetition_penalty = 1.3f;
  submit(pen);
  ASSERT_TRUE(e.Step().ok());
  EXPECT_EQ(backend.pending(), 0);
  EXPECT_EQ(backend.launched, launched_before);
  EXPECT_GT(backend.sync_steps, 0);
  // Top-p sampling may need the host sampler; n > 1 forks on the host.
  Request nucleus = Greedy(RandomTokens(rng, 9, m.vocab), 8);
  nucleus.sampling.temperature = 0.8f;
  nucleus.sampling.top_p = 0.9f;
  submit(nucleus);
  ASSERT_TRUE(e.RunUntilIdle().ok());
  const int64_t sync_after = backend.sync_steps;
  // Alone again, the overlap comes back.
  submit(Greedy(RandomTokens(rng, 15, m.vocab), 12));
  ASSERT_TRUE(e.RunUntilIdle().ok());
  EXPECT_EQ(backend.sync_steps, sync_after);
  EXPECT_GT(backend.launched, launched_before);
  for (size_t i = 0; i < reqs.size(); ++i) {
    Collected c;
    Drain(*streams[i], &c);
    EXPECT_EQ(c.tokens.at(0),
              NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, *reqs[i].sampling.seed))
        << "request " << i;
  }
  EXPECT_EQ(e.stats().kv_blocks_free, e.stats().kv_blocks_total);
}

TEST(EngineOverlap, AFailedLaunchedStepFailsItsRequestsAndTheRestGoOn) {
  FakeModel m{.vocab = 50, .max_len = 100};
  for (int where = 0; where < 2; ++where) {
    FakeSamplingBackend backend(m.vocab, m.max_len);
    EngineConfig cfg;
    cfg.block_size = 4;
    cfg.kv_cache_tokens = 400;
    auto engine = Engine::Create(backend, cfg);
    ASSERT_TRUE(engine.ok());
    Engine& e = **engine;
    auto a = *e.Submit(Greedy({1, 2, 3, 4, 5, 6}, 10));
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(e.Step().ok());
    (where == 0 ? backend.fail_next_launch : backend.fail_next_wait) = true;
    EXPECT_FALSE(e.Step().ok());
    Collected c;
    Drain(*a, &c);
    EXPECT_EQ(c.reasons[0], FinishReason::kAbort) << "where " << where;
    EXPECT_FALSE(c.error.ok());
    EXPECT_TRUE(a->closed());
    ASSERT_TRUE(e.RunUntilIdle().ok());
    EXPECT_EQ(backend.pending(), 0);
    EXPECT_EQ(e.stats().kv_blocks_free, e.stats().kv_blocks_total);
    // The engine still serves.
    const Request r = Greedy({7, 8, 9}, 5);
    auto b = *e.Submit(r);
    ASSERT_TRUE(e.RunUntilIdle().ok());
    Collected cb;
    Drain(*b, &cb);
    EXPECT_EQ(cb.tokens.at(0), NaiveGenerate(m, r.prompt, r.sampling, 0));
  }
}

}  // namespace
}  // namespace qilin::test
