// The engine on the CUDA backend (GPU only; skipped without one): inflight batching, chunked
// prefill, preemption with recompute, prefix caching and cancellation must give every greedy
// request the tokens it gets when it runs alone. A query token's logits depend on which kernels
// ran it (a one-token chunk goes through the decode attention, a longer one through the prefill
// kernel; steps of more than 8 tokens through cuBLASLt instead of the skinny GEMM), so tokens may
// differ only where the alone run's top two candidates were within kMargin of each other, and the
// comparison of a request stops at such a point. Steps overlap (EngineConfig::overlap_steps)
// except where a test turns it off.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>
#include <vector>

#include "engine/engine.h"
#include "model/weights.h"
#include "runtime/cuda_backend.h"

namespace qilin {
namespace {

constexpr float kMargin = 0.05f;  // logprob gap between the best two tokens

// Qwen2 layout with head_dim 64: the tensor-core prefill and decode attention kernels.
ModelConfig SmallModel() {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = 503;
  c.hidden_size = 256;
  c.intermediate_size = 384;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.max_position_embeddings = 256;
  c.rope_theta = 10000.0;
  c.attention_bias = true;
  c.rms_norm_eps = 1e-6;
  c.eos_token_ids = {5};
  return c;
}

// One request's output: tokens, and the gap between the best two logprobs at each step.
struct Output {
  std::vector<int32_t> tokens;
  std::vector<float> margin;
  FinishReason reason = FinishReason::kNone;
};

void DrainInto(ResponseStream& s, Output* o) {
  while (auto r = s.TryPop()) {
    EXPECT_TRUE(r->error.ok()) << r->error.ToString();
    o->tokens.insert(o->tokens.end(), r->token_ids.begin(), r->token_ids.end());
    for (const TokenLogprob& lp : r->logprobs) {
      o->margin.push_back(lp.top.size() >= 2 ? lp.top[0].second - lp.top[1].second : 1e9f);
    }
    if (r->finished()) o->reason = r->finish_reason;
  }
}

struct EngineRun {
  std::vector<Output> out;
  EngineStats stats;
};

// Runs `reqs` through a fresh backend + engine: submitting 0-2 requests before each step when
// `rng` is given (all at once otherwise) and cancelling request `cancel` (if >= 0) after
// `cancel_step` steps.
EngineRun RunEngine(const ModelConfig& c, const ModelWeights& w, const std::vector<Request>& reqs,
                    const EngineConfig& cfg, std::mt19937_64* rng, int cancel = -1,
                    int cancel_step = 0) {
  EngineRun run;
  auto backend = CudaBackend::Create(c, w);
  EXPECT_TRUE(backend.ok()) << backend.status().ToString();
  if (!backend.ok()) return run;
  auto engine = Engine::Create(**backend, cfg);
  EXPECT_TRUE(engine.ok()) << engine.status().ToString();
  if (!engine.ok()) return run;
  Engine& e = **engine;
  std::vector<std::shared_ptr<ResponseStream>> streams;
  size_t next = 0;
  for (int step = 0; next < reqs.size() || e.HasWork(); ++step) {
    size_t k = rng ? std::min<size_t>(reqs.size() - next, (*rng)() % 3) : reqs.size() - next;
    if (k == 0 && !e.HasWork()) k = 1;
    for (size_t i = 0; i < k; ++i, ++next) {
      auto s = e.Submit(reqs[next]);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      if (!s.ok()) return run;
      streams.push_back(*s);
    }
    if (cancel >= 0 && step == cancel_step && static_cast<size_t>(cancel) < streams.size()) {
      e.Cancel(streams[cancel]->request_id());
    }
    Status st = e.Step();
    EXPECT_TRUE(st.ok()) << st.ToString();
    if (!st.ok()) return run;
  }
  run.out.resize(reqs.size());
  for (size_t i = 0; i < streams.size(); ++i) DrainInto(*streams[i], &run.out[i]);
  run.stats = e.stats();
  EXPECT_TRUE(e.CheckKvInvariants());
  EXPECT_EQ(run.stats.kv_blocks_free, run.stats.kv_blocks_total) << "blocks leaked";
  return run;
}

// `got` must equal `want` up to the first step where `want` had two candidates within kMargin.
void ExpectSameWhereTheMarginAllows(const Output& got, const Output& want, size_t request) {
  ASSERT_EQ(want.tokens.size(), want.margin.size());
  for (size_t i = 0; i < want.tokens.size(); ++i) {
    if (i >= got.tokens.size() || got.tokens[i] != want.tokens[i]) {
      ASSERT_LT(want.margin[i], kMargin) << "request " << request << " differs at token " << i
                                         << " with a margin of " << want.margin[i];
      return;  // a near tie went the other way; what follows may differ
    }
  }
  EXPECT_EQ(got.tokens.size(), want.tokens.size()) << "request " << request;
  EXPECT_EQ(got.reason, want.reason) << "request " << request;
}

class CudaEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    auto w = MakeDummyWeights(c_, DType::kBF16, 23, 0.05f, 0.1f);
    ASSERT_TRUE(w.ok()) << w.status().ToString();
    weights_ = std::make_unique<ModelWeights>(std::move(w).value());
    std::mt19937_64 rng(7);
    // Half the prompts share a 40-token system prompt (prefix cache hits).
    std::vector<int32_t> system(40);
    for (auto& t : system) t = static_cast<int32_t>(rng() % c_.vocab_size);
    for (int i = 0; i < 12; ++i) {
      Request r;
      if (i % 2 == 0) r.prompt = system;
      const int32_t n = 1 + static_cast<int32_t>(rng() % 30);
      for (int32_t j = 0; j < n; ++j) {
        r.prompt.push_back(static_cast<int32_t>(rng() % c_.vocab_size));
      }
      r.sampling.temperature = 0.0f;
      r.sampling.logprobs = 2;
      r.sampling.max_tokens = 1 + static_cast<int32_t>(rng() % 24);
      r.sampling.ignore_eos = i % 3 == 0;
      need_ += static_cast<int64_t>(r.prompt.size()) + r.sampling.max_tokens;
      reqs_.push_back(r);
    }
    // Each request alone: one sequence at a time, no prefix caching, a pool that holds it.
    EngineConfig alone;
    alone.block_size = 16;
    alone.max_batch_size = 1;
    alone.enable_prefix_caching = false;
    alone.kv_cache_tokens = 4 * need_;
    for (const Request& r : reqs_) {
      EngineRun one = RunEngine(c_, *weights_, {r}, alone, nullptr);
      ASSERT_EQ(one.out.size(), 1u);
      ASSERT_FALSE(one.out[0].tokens.empty());
      ref_.push_back(one.out[0]);
    }
  }

  const ModelConfig c_ = SmallModel();
  std::unique_ptr<ModelWeights> weights_;
  std::vector<Request> reqs_;
  std::vector<Output> ref_;
  int64_t need_ = 0;
};

TEST_F(CudaEngineTest, GreedyOutputsEqualAloneUnderBatchingPreemptionAndPrefixCaching) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    EngineConfig cfg;
    cfg.block_size = std::vector<int32_t>{4, 8, 16, 3}[trial];
    cfg.max_batch_size = trial == 2 ? 12 : 1 + static_cast<int32_t>(rng() % 8);
    cfg.max_num_tokens = 5 + static_cast<int32_t>(rng() % 60);
    cfg.kv_cache_tokens = trial == 2 ? need_ / 10 + 70 : 4 * need_;  // trial 2: preemption
    cfg.enable_prefix_caching = trial != 3;
    // Overlapped steps (the default, and how the alone runs ran) except in trial 1.
    cfg.overlap_steps = trial != 1;
    // Trial 2 submits everything at once so that the small pool must preempt.
    EngineRun run = RunEngine(c_, *weights_, reqs_, cfg, trial == 2 ? nullptr : &rng);
    ASSERT_EQ(run.out.size(), reqs_.size());
    for (size_t i = 0; i < reqs_.size(); ++i)
      ExpectSameWhereTheMarginAllows(run.out[i], ref_[i], i);
    if (trial == 2) {
      EXPECT_GT(run.stats.preemptions, 0);
    }
    if (trial == 0) {
      EXPECT_GT(run.stats.prefix_cache_hits, 0);
    }
    if (cfg.overlap_steps) {
      EXPECT_GT(run.stats.overlapped_steps, run.stats.steps / 2);
    } else {
      EXPECT_EQ(run.stats.overlapped_steps, 0);
    }
  }
}

// A request cancelled while waiting, mid-prefill, decoding or preempted finishes "abort" once,
// every block comes back, and the other requests' tokens are those they get alone.
TEST_F(CudaEngineTest, CancellationAtEveryStageFreesEveryBlock) {
  for (int stage = 0; stage < 4; ++stage) {
    SCOPED_TRACE(::testing::Message() << "stage " << stage);
    EngineConfig cfg;
    cfg.block_size = 4;
    cfg.max_num_tokens = 16;
    cfg.max_batch_size = stage == 0 ? 1 : 8;
    cfg.kv_cache_tokens = stage == 3 ? need_ / 10 + 70 : 4 * need_;
    // Stage 0: the last request, still waiting behind batch size 1; 1: the first, after one step
    // of its 16-token chunks; 2: the first, decoding by step 12; 3: the last, in a pool a tenth of
    // what all need (preemptions).
    const int victim = stage == 0 || stage == 3 ? static_cast<int>(reqs_.size()) - 1 : 0;
    const int at = stage == 0 ? 2 : stage == 1 ? 1 : stage == 2 ? 12 : 6;
    EngineRun run = RunEngine(c_, *weights_, reqs_, cfg, nullptr, victim, at);
    ASSERT_EQ(run.out.size(), reqs_.size());
    for (size_t i = 0; i < reqs_.size(); ++i) {
      if (static_cast<int>(i) == victim) {
        EXPECT_TRUE(run.out[i].reason == FinishReason::kAbort ||
                    run.out[i].tokens.size() == ref_[i].tokens.size())
            << "the cancelled request neither aborted nor had finished";
        continue;
      }
      ExpectSameWhereTheMarginAllows(run.out[i], ref_[i], i);
    }
  }
}

}  // namespace
}  // namespace qilin
