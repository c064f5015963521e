// The engine on the real CPU backend (tiny random models): under random arrivals, chunk sizes,
// batch limits, small KV pools (preemption) and prefix caching, every greedy request's tokens
// equal those of the simple one-request greedy loop (runtime/greedy_generate) on its own.
#include <gtest/gtest.h>

#include <random>

#include "engine/engine.h"
#include "engine_test_util.h"
#include "model/weights.h"
#include "runtime/cpu_backend.h"
#include "runtime/greedy_generate.h"

namespace qilin {
namespace {

ModelConfig TinyModel(ModelArch arch) {
  ModelConfig c;
  c.arch = arch;
  c.vocab_size = 83;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.max_position_embeddings = 160;
  c.rope_theta = 10000.0;
  c.attention_bias = arch == ModelArch::kQwen2;
  c.qk_norm = arch == ModelArch::kQwen3;
  c.eos_token_ids = {5};
  return c;
}

std::unique_ptr<CpuBackend> MakeCpu(const ModelConfig& c, uint64_t seed) {
  auto w = MakeDummyWeights(c, DType::kBF16, seed, 0.3f, 0.1f);
  EXPECT_TRUE(w.ok()) << w.status().ToString();
  auto b = CpuBackend::Create(c, std::move(*w));
  EXPECT_TRUE(b.ok()) << b.status().ToString();
  return std::move(*b);
}

std::vector<int32_t> Alone(const ModelConfig& c, uint64_t seed, const Request& r) {
  auto backend = MakeCpu(c, seed);
  GreedyRequest g{r.prompt, r.sampling.max_tokens, r.sampling.ignore_eos};
  EXPECT_TRUE(backend->AllocateKvCache({GreedyBlocksNeeded(g, 16), 16}).ok());
  auto out = GenerateGreedy(*backend, g);
  EXPECT_TRUE(out.ok()) << out.status().ToString();
  return *out;
}

struct Case {
  EngineConfig cfg;
  bool random_arrivals;
};

void RunAndCompare(const ModelConfig& c, uint64_t wseed, const std::vector<Request>& reqs,
                   const std::vector<std::vector<int32_t>>& ref, const EngineConfig& cfg,
                   std::mt19937_64* rng, EngineStats* stats) {
  auto backend = MakeCpu(c, wseed);
  auto engine = Engine::Create(*backend, cfg);
  ASSERT_TRUE(engine.ok()) << engine.status().ToString();
  Engine& e = **engine;
  std::vector<std::shared_ptr<ResponseStream>> streams;
  std::vector<test::Collected> out(reqs.size());
  size_t next = 0;
  while (next < reqs.size() || e.HasWork()) {
    size_t k = rng ? std::min<size_t>(reqs.size() - next, (*rng)() % 3) : reqs.size() - next;
    if (k == 0 && !e.HasWork()) k = 1;
    for (size_t i = 0; i < k; ++i, ++next) {
      auto s = e.Submit(reqs[next]);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      streams.push_back(*s);
    }
    Status st = e.Step();
    ASSERT_TRUE(st.ok()) << st.ToString();
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    test::Drain(*streams[i], &out[i]);
    EXPECT_EQ(out[i].tokens[0], ref[i]) << "request " << i;
  }
  *stats = e.stats();
  EXPECT_EQ(stats->kv_blocks_free, stats->kv_blocks_total);
}

class EngineCpuTest : public ::testing::TestWithParam<ModelArch> {};

TEST_P(EngineCpuTest, GreedyOutputsEqualAloneUnderBatchingPreemptionAndPrefixCaching) {
  const ModelConfig c = TinyModel(GetParam());
  const uint64_t wseed = 17;
  std::mt19937_64 rng(static_cast<uint64_t>(GetParam()) + 1);
  // Half the prompts share a 40-token system prompt (prefix caching hits).
  std::vector<int32_t> system(40);
  for (auto& t : system) t = static_cast<int32_t>(rng() % c.vocab_size);
  std::vector<Request> reqs;
  int64_t need = 0;
  for (int i = 0; i < 12; ++i) {
    Request r;
    if (i % 2 == 0) r.prompt = system;
    const int32_t n = 1 + static_cast<int32_t>(rng() % 30);
    for (int32_t j = 0; j < n; ++j) r.prompt.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    r.sampling.temperature = 0.0f;
    r.sampling.max_tokens = 1 + static_cast<int32_t>(rng() % 24);
    r.sampling.ignore_eos = i % 3 == 0;
    need += static_cast<int64_t>(r.prompt.size()) + r.sampling.max_tokens;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> ref;
  for (const auto& r : reqs) ref.push_back(Alone(c, wseed, r));

  for (int trial = 0; trial < 4; ++trial) {
    SCOPED_TRACE(::testing::Message() << "trial " << trial);
    EngineConfig cfg;
    cfg.block_size = std::vector<int32_t>{4, 8, 16, 3}[trial];
    cfg.max_batch_size = 1 + static_cast<int32_t>(rng() % 8);
    cfg.max_num_tokens = 5 + static_cast<int32_t>(rng() % 60);
    cfg.kv_cache_tokens = trial == 2 ? need / 10 + 70 : 4 * need;  // trial 2: preemption
    cfg.enable_prefix_caching = trial != 3;
    if (trial == 2) cfg.max_batch_size = 12;
    EngineStats st;
    // Trial 2 submits everything at once so that the small pool must preempt.
    RunAndCompare(c, wseed, reqs, ref, cfg, trial == 2 ? nullptr : &rng, &st);
    if (trial == 2) {
      EXPECT_GT(st.preemptions, 0);
    }
    if (trial == 0) {
      EXPECT_GT(st.prefix_cache_hits, 0);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Archs, EngineCpuTest,
                         ::testing::Values(ModelArch::kQwen2, ModelArch::kQwen3));

// n > 1 seeded samples on the CPU backend: copy-on-write of the shared prompt blocks must give
// the same samples as running the request with a pool too small to keep anything shared.
TEST(EngineCpuSampling, SeededSamplesAreTheSameAcrossBatchCompositions) {
  const ModelConfig c = TinyModel(ModelArch::kQwen2);
  std::mt19937_64 rng(3);
  std::vector<Request> reqs;
  for (int i = 0; i < 5; ++i) {
    Request r;
    for (int j = 0; j < 7 + i * 5; ++j) r.prompt.push_back(static_cast<int32_t>(rng() % 83));
    r.sampling.temperature = 0.9f;
    r.sampling.top_p = 0.95f;
    r.sampling.max_tokens = 12;
    r.sampling.n = 2;
    r.sampling.seed = 10 + i;
    reqs.push_back(r);
  }
  std::vector<std::map<int32_t, std::vector<int32_t>>> first;
  for (int trial = 0; trial < 3; ++trial) {
    auto backend = MakeCpu(c, 5);
    EngineConfig cfg;
    cfg.block_size = trial == 0 ? 4 : 8;
    cfg.max_batch_size = trial == 1 ? 2 : 16;
    cfg.max_num_tokens = trial == 2 ? 9 : 256;
    cfg.kv_cache_tokens = trial == 2 ? 8 * 12 : 4096;
    auto engine = Engine::Create(*backend, cfg);
    ASSERT_TRUE(engine.ok());
    std::vector<std::shared_ptr<ResponseStream>> streams;
    // Trial 1 submits in reverse order: different neighbours in every step.
    for (size_t i = 0; i < reqs.size(); ++i) {
      streams.push_back(*(*engine)->Submit(reqs[trial == 1 ? reqs.size() - 1 - i : i]));
    }
    if (trial == 1) std::reverse(streams.begin(), streams.end());
    ASSERT_TRUE((*engine)->RunUntilIdle().ok());
    for (size_t i = 0; i < reqs.size(); ++i) {
      test::Collected col;
      test::Drain(*streams[i], &col);
      ASSERT_EQ(col.tokens.size(), 2u);
      if (trial == 0) {
        first.push_back(col.tokens);
      } else {
        EXPECT_EQ(col.tokens, first[i]) << "request " << i << " trial " << trial;
      }
    }
    EXPECT_EQ((*engine)->stats().kv_blocks_free, (*engine)->stats().kv_blocks_total);
  }
}

}  // namespace
}  // namespace qilin
