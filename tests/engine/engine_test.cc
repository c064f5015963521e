// Engine tests on the KV-honest fake backend: batch invariance under random arrivals and limits,
// preemption, prefix caching, cancellation, n > 1, beams, stop conditions, refusal, threads.
// engine_overlap_test.cc runs the same tests again with overlapped steps (QILIN_TEST_BACKEND).
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "engine/tokenizer_detokenizer.h"
#include "engine_test_util.h"
#include "fake_backend.h"

#ifndef QILIN_TEST_BACKEND
#define QILIN_TEST_BACKEND FakeBackend
#define QILIN_ENGINE_TEST EngineTest
#define QILIN_ENGINE_TOKENIZER_TEST EngineTokenizerTest
#endif

namespace qilin::test {
namespace {

using TestBackend = QILIN_TEST_BACKEND;

struct RunResult {
  std::vector<Collected> out;
  EngineStats stats;
  int64_t blocks_copied = 0;
  int32_t max_tokens_in_step = 0;
  int32_t max_seqs_in_step = 0;
};

// Submits `reqs` over a random arrival schedule (all at once when rng is null), steps the engine
// to completion checking the KV invariants after every step, and returns what each request got.
RunResult RunEngine(const FakeModel& m, const EngineConfig& cfg, const std::vector<Request>& reqs,
                    std::mt19937_64* rng) {
  TestBackend backend(m.vocab, m.max_len, m.eos, m.eos_bias);
  auto engine = Engine::Create(backend, cfg);
  EXPECT_TRUE(engine.ok()) << engine.status().ToString();
  RunResult res;
  res.out.resize(reqs.size());
  std::vector<std::shared_ptr<ResponseStream>> streams;
  size_t next = 0;
  int guard = 0;
  while (next < reqs.size() || (*engine)->HasWork()) {
    size_t k = reqs.size() - next;
    if (rng) {
      k = std::min<size_t>(k, (*rng)() % 4);
      if (k == 0 && !(*engine)->HasWork()) k = 1;
    }
    for (size_t i = 0; i < k; ++i, ++next) {
      auto s = (*engine)->Submit(reqs[next]);
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      streams.push_back(*s);
    }
    Status st = (*engine)->Step();
    EXPECT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE((*engine)->CheckKvInvariants());
    for (size_t i = 0; i < streams.size(); ++i) Drain(*streams[i], &res.out[i]);
    if (++guard > 200000) {
      ADD_FAILURE() << "engine did not finish";
      break;
    }
  }
  res.stats = (*engine)->stats();
  EXPECT_EQ(res.stats.kv_blocks_free, res.stats.kv_blocks_total) << "KV blocks leaked";
  EXPECT_EQ(res.stats.running + res.stats.waiting, 0);
  for (auto& s : streams) EXPECT_TRUE(s->closed());
  res.blocks_copied = backend.blocks_copied;
  res.max_tokens_in_step = backend.max_tokens_in_step;
  res.max_seqs_in_step = backend.max_seqs_in_step;
  return res;
}

std::vector<int32_t> RandomTokens(std::mt19937_64& rng, int32_t len, int32_t vocab) {
  std::vector<int32_t> t(len);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

Request Greedy(std::vector<int32_t> prompt, int32_t max_tokens) {
  Request r;
  r.prompt = std::move(prompt);
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = max_tokens;
  return r;
}

void ExpectMatchesReference(const FakeModel& m, const std::vector<Request>& reqs,
                            const RunResult& res) {
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto ref =
        NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, reqs[i].sampling.seed.value_or(0));
    ASSERT_EQ(res.out[i].finishes.size(), 1u) << "request " << i;
    EXPECT_EQ(res.out[i].finishes.at(0), 1) << "request " << i << " finished twice";
    EXPECT_EQ(res.out[i].tokens.at(0), ref) << "request " << i;
  }
}

TEST(QILIN_ENGINE_TEST, GreedyBatchInvarianceUnderRandomSchedules) {
  FakeModel m{.vocab = 97, .eos = 3, .eos_bias = 1.5f, .max_len = 256};
  for (int trial = 0; trial < 12; ++trial) {
    std::mt19937_64 rng(1000 + trial);
    EngineConfig cfg;
    cfg.block_size = std::vector<int32_t>{1, 4, 16, 32}[trial % 4];
    cfg.max_batch_size = 1 + static_cast<int32_t>(rng() % 12);
    cfg.max_num_tokens = 1 + static_cast<int32_t>(rng() % 80);
    cfg.kv_cache_tokens = 64 * 256;
    cfg.enable_prefix_caching = trial % 3 != 0;
    std::vector<Request> reqs;
    for (int i = 0; i < 25; ++i) {
      reqs.push_back(Greedy(RandomTokens(rng, 1 + rng() % 70, m.vocab), 1 + rng() % 40));
    }
    RunResult res = RunEngine(m, cfg, reqs, &rng);
    SCOPED_TRACE(::testing::Message()
                 << "trial " << trial << " block " << cfg.block_size << " batch "
                 << cfg.max_batch_size << " tokens " << cfg.max_num_tokens);
    ExpectMatchesReference(m, reqs, res);
    EXPECT_LE(res.max_tokens_in_step, cfg.max_num_tokens);
    EXPECT_LE(res.max_seqs_in_step, cfg.max_batch_size);
  }
}

TEST(QILIN_ENGINE_TEST, StaticBatchingAndNoEvictPolicyGiveTheSameOutputs) {
  FakeModel m{.vocab = 61, .eos = 5, .eos_bias = 1.0f, .max_len = 200};
  std::mt19937_64 rng(7);
  std::vector<Request> reqs;
  for (int i = 0; i < 20; ++i) {
    reqs.push_back(Greedy(RandomTokens(rng, 1 + rng() % 50, m.vocab), 1 + rng() % 30));
  }
  for (int mode = 0; mode < 2; ++mode) {
    EngineConfig cfg;
    cfg.block_size = 8;
    cfg.max_batch_size = 6;
    cfg.max_num_tokens = 40;
    cfg.kv_cache_tokens = 8 * 40;  // tight: a few requests at a time
    cfg.mode = mode == 0 ? BatchingMode::kStaticV1 : BatchingMode::kInflight;
    cfg.policy = CapacityPolicy::kGuaranteedNoEvict;
    RunResult res = RunEngine(m, cfg, reqs, &rng);
    ExpectMatchesReference(m, reqs, res);
    EXPECT_EQ(res.stats.preemptions, 0) << "guaranteed_no_evict preempted";
  }
}

TEST(QILIN_ENGINE_TEST, PreemptionWithATenthOfThePoolGivesTheSameOutputs) {
  FakeModel m{.vocab = 89, .max_len = 512};
  std::mt19937_64 rng(11);
  std::vector<Request> reqs;
  int64_t need_tokens = 0;
  for (int i = 0; i < 24; ++i) {
    reqs.push_back(Greedy(RandomTokens(rng, 20 + rng() % 60, m.vocab), 20 + rng() % 40));
    need_tokens +=
        static_cast<int64_t>(reqs.back().prompt.size()) + reqs.back().sampling.max_tokens;
  }
  EngineConfig big;
  big.block_size = 8;
  big.kv_cache_tokens = need_tokens * 2;
  RunResult ref = RunEngine(m, big, reqs, nullptr);
  EngineConfig small = big;
  small.kv_cache_tokens = std::max<int64_t>(need_tokens / 10, 8 * 13);
  RunResult res = RunEngine(m, small, reqs, nullptr);
  EXPECT_GT(res.stats.preemptions, 0);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(res.out[i].tokens.at(0), ref.out[i].tokens.at(0)) << "request " << i;
  }
  ExpectMatchesReference(m, reqs, res);
  // Without prefix caching the recomputation is complete, too.
  small.enable_prefix_caching = false;
  ExpectMatchesReference(m, reqs, RunEngine(m, small, reqs, nullptr));
}

TEST(QILIN_ENGINE_TEST, PrefixCachingPrefillsASharedSystemPromptOnce) {
  FakeModel m{.vocab = 101, .max_len = 512};
  std::mt19937_64 rng(5);
  const auto system = RandomTokens(rng, 128, m.vocab);  // 8 blocks of 16
  std::vector<Request> reqs;
  for (int i = 0; i < 10; ++i) {
    auto p = system;
    auto user = RandomTokens(rng, 5 + rng() % 20, m.vocab);
    p.insert(p.end(), user.begin(), user.end());
    reqs.push_back(Greedy(p, 10));
  }
  EngineConfig cfg;
  cfg.block_size = 16;
  cfg.kv_cache_tokens = 16 * 200;
  // First request alone, then the rest: each of them finds the 8 system blocks cached.
  TestBackend backend(m.vocab, m.max_len);
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  std::vector<Collected> out(reqs.size());
  std::vector<std::shared_ptr<ResponseStream>> streams;
  streams.push_back(*(*engine)->Submit(reqs[0]));
  ASSERT_TRUE((*engine)->RunUntilIdle().ok());
  const int64_t tokens_first = backend.tokens_seen;
  for (size_t i = 1; i < reqs.size(); ++i) streams.push_back(*(*engine)->Submit(reqs[i]));
  ASSERT_TRUE((*engine)->RunUntilIdle().ok());
  for (size_t i = 0; i < reqs.size(); ++i) Drain(*streams[i], &out[i]);
  EngineStats st = (*engine)->stats();
  EXPECT_EQ(st.prefix_cache_hits, 9 * 8);
  EXPECT_EQ(st.prefix_cache_hit_tokens, 9 * 128);
  EXPECT_GT(st.prefix_cache_hit_rate(), 0.5);
  EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total);
  EXPECT_GT(st.kv_blocks_cached, 0);
  // The backend saw the system prompt once: the other 9 requests ran only their own tokens.
  int64_t expected_rest = 0;
  for (size_t i = 1; i < reqs.size(); ++i) {
    expected_rest += static_cast<int64_t>(reqs[i].prompt.size()) - 128 + 10 - 1;
  }
  EXPECT_EQ(backend.tokens_seen - tokens_first, expected_rest);
  // Caching on and off: identical outputs, both equal to the reference.
  cfg.enable_prefix_caching = false;
  RunResult off = RunEngine(m, cfg, reqs, nullptr);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(out[i].tokens.at(0), off.out[i].tokens.at(0));
  }
  ExpectMatchesReference(m, reqs, off);
  EXPECT_EQ(off.stats.prefix_cache_hits, 0);
}

TEST(QILIN_ENGINE_TEST, CancellationAtEveryStageFreesEveryBlock) {
  FakeModel m{.vocab = 71, .max_len = 512};
  std::mt19937_64 rng(3);
  // Stage: 0 waiting, 1 prefilling (chunked), 2 decoding, 3 preempted.
  for (int stage = 0; stage < 4; ++stage) {
    TestBackend backend(m.vocab, m.max_len);
    EngineConfig cfg;
    cfg.block_size = 4;
    cfg.max_num_tokens = 16;
    cfg.max_batch_size = stage == 0 ? 1 : 8;
    cfg.kv_cache_tokens = stage == 3 ? 4 * 30 : 4 * 400;
    auto engine = Engine::Create(backend, cfg);
    ASSERT_TRUE(engine.ok());
    Engine& e = **engine;
    std::vector<std::shared_ptr<ResponseStream>> streams;
    for (int i = 0; i < 4; ++i) {
      streams.push_back(*e.Submit(Greedy(RandomTokens(rng, 40, m.vocab), 60)));
    }
    int64_t victim = streams.back()->request_id();
    if (stage == 1) victim = streams[0]->request_id();
    for (int step = 0; step < 200; ++step) {
      const EngineStats st = e.stats();
      bool now = false;
      if (stage == 0) now = step == 2 && st.waiting > 0;
      if (stage == 1) now = step == 1;  // 40-token prompt, 16 per step: mid-prefill
      if (stage == 2) now = step == 30;
      if (stage == 3) now = st.preemptions > 0;
      if (now) {
        e.Cancel(victim);
        break;
      }
      ASSERT_TRUE(e.Step().ok());
    }
    ASSERT_TRUE(e.RunUntilIdle().ok());
    EXPECT_TRUE(e.CheckKvInvariants());
    const EngineStats st = e.stats();
    EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total) << "stage " << stage;
    if (stage == 3) {
      EXPECT_GT(st.preemptions, 0);
    }
    for (auto& s : streams) {
      Collected c;
      Drain(*s, &c);
      ASSERT_EQ(c.finishes.size(), 1u);
      EXPECT_EQ(c.finishes.at(0), 1);
      EXPECT_EQ(c.reasons.at(0) == FinishReason::kAbort, s->request_id() == victim)
          << "stage " << stage;
      EXPECT_TRUE(s->closed());
    }
  }
}

TEST(QILIN_ENGINE_TEST, RandomizedWorkloadLosesNothingAndLeaksNothing) {
  FakeModel m{.vocab = 53, .eos = 2, .eos_bias = 0.5f, .max_len = 128};
  std::mt19937_64 rng(99);
  for (int trial = 0; trial < 3; ++trial) {
    TestBackend backend(m.vocab, m.max_len, m.eos, m.eos_bias);
    EngineConfig cfg;
    cfg.block_size = 1 + static_cast<int32_t>(rng() % 16);
    cfg.max_batch_size = 1 + static_cast<int32_t>(rng() % 64);
    cfg.max_num_tokens = 8 + static_cast<int32_t>(rng() % 256);
    cfg.kv_cache_tokens = 128 * 3 + static_cast<int64_t>(rng() % 2000);
    cfg.policy = trial == 1 ? CapacityPolicy::kGuaranteedNoEvict : CapacityPolicy::kMaxUtilization;
    auto engine = Engine::Create(backend, cfg);
    ASSERT_TRUE(engine.ok());
    Engine& e = **engine;
    const int kRequests = 1500;
    std::vector<std::shared_ptr<ResponseStream>> streams;
    std::vector<Collected> out(kRequests);
    std::vector<Request> reqs;
    int submitted = 0;
    int64_t steps = 0;
    while (submitted < kRequests || e.HasWork()) {
      const int k = submitted < kRequests ? static_cast<int>(rng() % 6) : 0;
      for (int i = 0; i < k && submitted < kRequests; ++i, ++submitted) {
        Request r;
        r.prompt = RandomTokens(rng, 1 + rng() % 60, m.vocab);
        r.sampling.max_tokens = 1 + rng() % 60;
        r.sampling.temperature = rng() % 2 ? 0.0f : 0.8f;
        r.sampling.n = rng() % 8 == 0 ? 2 : 1;
        r.sampling.seed = rng();
        r.priority = static_cast<int32_t>(rng() % 3);
        auto s = e.Submit(r);
        ASSERT_TRUE(s.ok()) << s.status().ToString();
        streams.push_back(*s);
        reqs.push_back(r);
      }
      const int cancels = rng() % 3 == 0 ? 1 : 0;
      for (int i = 0; i < cancels && !streams.empty(); ++i) {
        e.Cancel(streams[rng() % streams.size()]->request_id());
      }
      ASSERT_TRUE(e.Step().ok());
      ++steps;
      if (steps % 16 == 0) {
        ASSERT_TRUE(e.CheckKvInvariants());
      }
      ASSERT_LT(steps, 200000);
    }
    ASSERT_TRUE(e.CheckKvInvariants());
    const EngineStats st = e.stats();
    EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total);
    EXPECT_EQ(st.requests_finished, kRequests);
    for (int i = 0; i < kRequests; ++i) {
      Drain(*streams[i], &out[i]);
      ASSERT_TRUE(streams[i]->closed()) << "request " << i << " lost";
      ASSERT_EQ(static_cast<int32_t>(out[i].finishes.size()), reqs[i].sampling.n);
      for (const auto& [seq, count] : out[i].finishes) EXPECT_EQ(count, 1);
      // Unless cancelled, a request's output equals its reference (greedy and seeded alike).
      if (out[i].reasons.at(0) != FinishReason::kAbort && reqs[i].sampling.n == 1) {
        EXPECT_EQ(out[i].tokens.at(0),
                  NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, *reqs[i].sampling.seed));
      }
    }
  }
}

TEST(QILIN_ENGINE_TEST, SeededSamplingIsReproducibleAcrossBatchCompositions) {
  FakeModel m{.vocab = 97, .eos = 1, .eos_bias = 0.0f, .max_len = 256};
  std::mt19937_64 rng(21);
  std::vector<Request> reqs;
  for (int i = 0; i < 16; ++i) {
    Request r;
    r.prompt = RandomTokens(rng, 1 + rng() % 40, m.vocab);
    r.sampling.max_tokens = 30;
    r.sampling.temperature = 0.7f + 0.1f * (i % 4);
    r.sampling.top_k = i % 3 == 0 ? 20 : 0;
    r.sampling.top_p = i % 2 == 0 ? 0.9f : 1.0f;
    r.sampling.min_p = i % 5 == 0 ? 0.05f : 0.0f;
    r.sampling.repetition_penalty = i % 4 == 0 ? 1.2f : 1.0f;
    r.sampling.frequency_penalty = i % 6 == 0 ? 0.5f : 0.0f;
    r.sampling.seed = 1234 + i;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> first;
  for (int trial = 0; trial < 4; ++trial) {
    EngineConfig cfg;
    cfg.block_size = 1 << (trial + 1);
    cfg.max_batch_size = 1 + trial * 5;
    cfg.max_num_tokens = 7 + trial * 30;
    cfg.kv_cache_tokens = 4096;
    RunResult res = RunEngine(m, cfg, reqs, &rng);
    ExpectMatchesReference(m, reqs, res);
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (trial == 0)
        first.push_back(res.out[i].tokens.at(0));
      else
        EXPECT_EQ(res.out[i].tokens.at(0), first[i]);
    }
  }
  // Different seeds give different samples (a check that the seed is used at all).
  int differ = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    SamplingParams p = reqs[i].sampling;
    differ += NaiveGenerate(m, reqs[i].prompt, p, *p.seed + 777) != first[i];
  }
  EXPECT_GT(differ, 12);
}

TEST(QILIN_ENGINE_TEST, NSamplesShareThePromptBlocksCopyOnWrite) {
  FakeModel m{.vocab = 97, .max_len = 256};
  std::mt19937_64 rng(8);
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) {
    Request r;
    r.prompt = RandomTokens(rng, 10 + rng() % 30, m.vocab);  // partial last block: copied
    r.sampling.max_tokens = 12;
    r.sampling.temperature = 1.0f;
    r.sampling.n = 3;
    r.sampling.seed = 50 + i;
    reqs.push_back(r);
  }
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.kv_cache_tokens = 8 * 300;
  for (int tight = 0; tight < 2; ++tight) {
    if (tight) cfg.kv_cache_tokens = 8 * 24;  // preempts forked groups too
    RunResult res = RunEngine(m, cfg, reqs, &rng);
    for (size_t i = 0; i < reqs.size(); ++i) {
      ASSERT_EQ(res.out[i].tokens.size(), 3u);
      for (int k = 0; k < 3; ++k) {
        EXPECT_EQ(res.out[i].tokens.at(k),
                  NaiveGenerate(m, reqs[i].prompt, reqs[i].sampling, *reqs[i].sampling.seed, k))
            << "request " << i << " sample " << k;
      }
      EXPECT_NE(res.out[i].tokens.at(0), res.out[i].tokens.at(1));
    }
    if (!tight) {
      EXPECT_GT(res.blocks_copied, 0);
    }
    if (tight) {
      EXPECT_GT(res.stats.preemptions, 0);
    }
  }
}

// Reference beam search over FakeLogits: keep the beam_width best (cumulative logprob) among
// every extension of every beam; eos-terminated extensions become hypotheses when in the top
// beam_width; done when beam_width hypotheses exist or at max_tokens.
std::vector<std::vector<int32_t>> NaiveBeamSearch(const FakeModel& m,
                                                  const std::vector<int32_t>& prompt, int32_t width,
                                                  int32_t max_tokens, float length_penalty) {
  struct Beam {
    std::vector<int32_t> gen;
    double cum;
  };
  std::vector<Beam> beams{{{}, 0.0}};
  std::vector<std::pair<double, std::vector<int32_t>>> hyps;
  std::vector<float> logits(m.vocab);
  for (int32_t step = 0; step < max_tokens; ++step) {
    struct C {
      double score;
      size_t beam;
      int32_t tok;
    };
    std::vector<C> cands;
    for (size_t b = 0; b < beams.size(); ++b) {
      auto hist = prompt;
      hist.insert(hist.end(), beams[b].gen.begin(), beams[b].gen.end());
      FakeLogits(hist, m.vocab, m.eos, m.eos_bias, logits.data());
      double mx = *std::max_element(logits.begin(), logits.end()), s = 0;
      for (float l : logits) s += std::exp(l - mx);
      std::vector<std::pair<double, int32_t>> lp;
      for (int32_t v = 0; v < m.vocab; ++v) lp.push_back({logits[v] - mx - std::log(s), v});
      std::sort(lp.begin(), lp.end(), [](auto& a, auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      for (int32_t k = 0; k < 2 * width; ++k)
        cands.push_back({beams[b].cum + lp[k].first, b, lp[k].second});
    }
    std::stable_sort(cands.begin(), cands.end(),
                     [](const C& a, const C& b) { return a.score > b.score; });
    std::vector<Beam> next;
    for (size_t r = 0; r < cands.size() && static_cast<int32_t>(next.size()) < width; ++r) {
      auto gen = beams[cands[r].beam].gen;
      gen.push_back(cands[r].tok);
      if (cands[r].tok == m.eos) {
        if (static_cast<int32_t>(r) < width) {
          hyps.push_back({cands[r].score / std::pow(gen.size(), length_penalty), gen});
        }
        continue;
      }
      next.push_back({gen, cands[r].score});
    }
    beams = next;
    if (static_cast<int32_t>(hyps.size()) >= width) break;
    if (step + 1 == max_tokens) {
      for (auto& b : beams) hyps.push_back({b.cum / std::pow(b.gen.size(), length_penalty), b.gen});
    }
  }
  std::stable_sort(hyps.begin(), hyps.end(), [](auto& a, auto& b) { return a.first > b.first; });
  std::vector<std::vector<int32_t>> out;
  for (int32_t i = 0; i < width && i < static_cast<int32_t>(hyps.size()); ++i)
    out.push_back(hyps[i].second);
  return out;
}

TEST(QILIN_ENGINE_TEST, BeamSearchMatchesANaiveBeamSearch) {
  FakeModel m{.vocab = 41, .eos = 4, .eos_bias = 2.0f, .max_len = 256};
  std::mt19937_64 rng(13);
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) {
    Request r;
    r.prompt = RandomTokens(rng, 3 + rng() % 30, m.vocab);
    r.sampling.max_tokens = 6 + i;
    r.sampling.beam_width = 2 + i % 3;
    r.sampling.length_penalty = i % 2 ? 1.0f : 0.5f;
    reqs.push_back(r);
  }
  for (int tight = 0; tight < 2; ++tight) {
    EngineConfig cfg;
    cfg.block_size = 4;
    cfg.max_num_tokens = 13;
    cfg.kv_cache_tokens = tight ? 4 * 40 : 4 * 400;
    RunResult res = RunEngine(m, cfg, reqs, &rng);
    for (size_t i = 0; i < reqs.size(); ++i) {
      auto ref = NaiveBeamSearch(m, reqs[i].prompt, reqs[i].sampling.beam_width,
                                 reqs[i].sampling.max_tokens, reqs[i].sampling.length_penalty);
      ASSERT_EQ(res.out[i].tokens.size(), static_cast<size_t>(reqs[i].sampling.beam_width));
      for (size_t k = 0; k < ref.size(); ++k) {
        EXPECT_EQ(res.out[i].tokens.at(static_cast<int32_t>(k)), ref[k]) << "request " << i;
      }
    }
  }
}

TEST(QILIN_ENGINE_TEST, StopConditions) {
  FakeModel m{.vocab = 50, .eos = 7, .eos_bias = 0.0f, .max_len = 64};
  TestBackend backend(m.vocab, m.max_len, m.eos);
  EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_cache_tokens = 4 * 100;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  std::mt19937_64 rng(4);
  const auto prompt = RandomTokens(rng, 10, m.vocab);
  SamplingParams base;
  base.temperature = 0.0f;
  base.max_tokens = 40;
  base.ignore_eos = true;
  const auto free_run = NaiveGenerate(m, prompt, base, 0);
  ASSERT_EQ(free_run.size(), 40u);
  auto run = [&](SamplingParams p) {
    Request r;
    r.prompt = prompt;
    r.sampling = p;
    auto s = e.Submit(r);
    EXPECT_TRUE(s.ok()) << s.status().ToString();
    EXPECT_TRUE(e.RunUntilIdle().ok());
    Collected c;
    Drain(**s, &c);
    return c;
  };
  {  // stop token id: stops at its first occurrence, token kept
    SamplingParams p = base;
    p.stop_token_ids = {free_run[5]};
    Collected c = run(p);
    const size_t first =
        std::find(free_run.begin(), free_run.end(), free_run[5]) - free_run.begin();
    EXPECT_EQ(c.tokens[0], std::vector<int32_t>(free_run.begin(), free_run.begin() + first + 1));
    EXPECT_EQ(c.reasons[0], FinishReason::kStop);
  }
  {  // max_tokens
    SamplingParams p = base;
    p.max_tokens = 9;
    Collected c = run(p);
    EXPECT_EQ(c.tokens[0].size(), 9u);
    EXPECT_EQ(c.reasons[0], FinishReason::kLength);
  }
  {  // model length: 10 prompt + 54 = 64
    SamplingParams p = base;
    p.max_tokens = 54;
    Collected c = run(p);
    EXPECT_EQ(c.tokens[0].size(), 54u);
    EXPECT_EQ(c.reasons[0], FinishReason::kLength);
  }
  {  // min_tokens masks stop ids until reached
    SamplingParams p = base;
    p.stop_token_ids = {free_run[0]};
    p.min_tokens = 3;
    Collected c = run(p);
    EXPECT_EQ(c.tokens[0].size() >= 3u, true);
    EXPECT_NE(c.tokens[0][0], free_run[0]);
    EXPECT_EQ(c.tokens[0], NaiveGenerate(m, prompt, p, 0));
  }
  {  // bad words: a single token is never produced; a pair's second token never follows the first
    SamplingParams p = base;
    p.bad_words = {{free_run[0]}, {free_run[1], free_run[2]}};
    Collected c = run(p);
    EXPECT_EQ(std::count(c.tokens[0].begin(), c.tokens[0].end(), free_run[0]), 0);
    for (size_t i = 1; i < c.tokens[0].size(); ++i) {
      EXPECT_FALSE(c.tokens[0][i - 1] == free_run[1] && c.tokens[0][i] == free_run[2]);
    }
  }
  {  // eos stops unless ignore_eos
    SamplingParams p = base;
    p.ignore_eos = false;
    p.max_tokens = 54;
    Collected c = run(p);
    EXPECT_EQ(c.tokens[0], NaiveGenerate(m, prompt, p, 0));
  }
  const EngineStats st = e.stats();
  EXPECT_EQ(st.kv_blocks_free, st.kv_blocks_total);
}

// Token t reads as "<t>" except a few multi-byte ones.
class TableDetokenizer : public IncrementalDetokenizer {
 public:
  std::string Push(int32_t id) override { return Text(id); }
  std::string Flush() override { return ""; }
  static std::string Text(int32_t id) {
    if (id % 10 == 3) return "\xE4\xBD\xA0";  // a CJK char
    std::string s = "t";
    s += std::to_string(id);
    s += ' ';
    return s;
  }
};

TEST(QILIN_ENGINE_TEST, StopStringsAndTextDeltasThroughADetokenizer) {
  FakeModel m{.vocab = 50, .max_len = 128};
  TestBackend backend(m.vocab, m.max_len);
  EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_cache_tokens = 4 * 100;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  e.SetDetokenizerFactory(
      [](const std::vector<int32_t>&) { return std::make_unique<TableDetokenizer>(); });
  std::mt19937_64 rng(6);
  const auto prompt = RandomTokens(rng, 10, m.vocab);
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = 30;
  const auto toks = NaiveGenerate(m, prompt, p, 0);
  std::string full;
  for (int32_t t : toks) full += TableDetokenizer::Text(t);
  // A stop string spanning tokens 4 and 5: the text ends right before it.
  std::string t4 = TableDetokenizer::Text(toks[4]), t5 = TableDetokenizer::Text(toks[5]);
  std::string stop = t4.substr(t4.size() / 2) + t5.substr(0, 2);
  const size_t at = full.find(stop);
  ASSERT_NE(at, std::string::npos);
  p.stop = {stop, "never-appears-xyz"};
  Request r;
  r.prompt = prompt;
  r.sampling = p;
  auto s = e.Submit(r);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_TRUE(e.RunUntilIdle().ok());
  Collected c;
  Drain(**s, &c);
  EXPECT_EQ(c.text[0], full.substr(0, at));
  EXPECT_EQ(c.reasons[0], FinishReason::kStop);
  // Without the stop string: the concatenated deltas are the whole text.
  r.sampling.stop = {"never-appears-xyz"};
  s = e.Submit(r);
  ASSERT_TRUE(e.RunUntilIdle().ok());
  Collected c2;
  Drain(**s, &c2);
  EXPECT_EQ(c2.text[0], full);
  // Beams get their whole text with the final response.
  r.sampling.stop.clear();
  r.sampling.beam_width = 2;
  r.sampling.max_tokens = 4;
  s = e.Submit(r);
  ASSERT_TRUE(e.RunUntilIdle().ok());
  Collected c3;
  Drain(**s, &c3);
  ASSERT_EQ(c3.tokens.size(), 2u);
  for (int k = 0; k < 2; ++k) {
    std::string want;
    for (int32_t t : c3.tokens[k]) want += TableDetokenizer::Text(t);
    EXPECT_EQ(c3.text[k], want);
  }
}

TEST(QILIN_ENGINE_TEST, RefusesWhatCanNeverFitNamingTheLimit) {
  TestBackend backend(50, 100);
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.kv_cache_tokens = 8 * 10;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  Request r = Greedy(std::vector<int32_t>(90, 1), 20);
  auto s = e.Submit(r);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("max_seq_len=100"), std::string::npos);
  r = Greedy(std::vector<int32_t>(70, 1), 20);  // 90 tokens > 80 in the pool
  s = e.Submit(r);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("10 blocks"), std::string::npos) << s.status().message();
  r = Greedy({1, 2, 50}, 5);
  s = e.Submit(r);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("token 50"), std::string::npos);
  r = Greedy({}, 5);
  EXPECT_FALSE(e.Submit(r).ok());
  r = Greedy({1}, 5);
  r.sampling.top_p = 0.0f;
  EXPECT_FALSE(e.Submit(r).ok());
  r.sampling.top_p = 1.0f;
  r.sampling.stop = {"x"};
  EXPECT_FALSE(e.Submit(r).ok()) << "stop strings without a detokenizer";
  EXPECT_FALSE(e.HasWork());
  cfg.kv_cache_tokens = 3;  // under one block
  EXPECT_FALSE(Engine::Create(backend, cfg).ok());
}

TEST(QILIN_ENGINE_TEST, BackendErrorFailsTheStepsRequestsAndFreesTheirBlocks) {
  TestBackend backend(50, 100);
  EngineConfig cfg;
  cfg.block_size = 4;
  cfg.kv_cache_tokens = 400;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  auto s = *e.Submit(Greedy({1, 2, 3, 4, 5, 6}, 10));
  ASSERT_TRUE(e.Step().ok());
  backend.fail_next = true;
  EXPECT_FALSE(e.Step().ok());
  Collected c;
  Drain(*s, &c);
  EXPECT_EQ(c.reasons[0], FinishReason::kAbort);
  EXPECT_FALSE(c.error.ok());
  EXPECT_TRUE(s->closed());
  EXPECT_EQ(e.stats().kv_blocks_free, e.stats().kv_blocks_total);
}

TEST(QILIN_ENGINE_TEST, LoopThreadServesConcurrentClientsAndCancels) {
  FakeModel m{.vocab = 97, .eos = 3, .eos_bias = 0.5f, .max_len = 256};
  TestBackend backend(m.vocab, m.max_len, m.eos, m.eos_bias);
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.max_batch_size = 16;
  cfg.kv_cache_tokens = 8 * 200;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  e.Start();
  std::vector<std::thread> clients;
  std::atomic<int> mismatches{0}, done{0};
  for (int c = 0; c < 4; ++c) {
    clients.emplace_back([&, c] {
      std::mt19937_64 rng(500 + c);
      for (int i = 0; i < 25; ++i) {
        Request r = Greedy(RandomTokens(rng, 1 + rng() % 40, m.vocab), 1 + rng() % 30);
        auto s = e.Submit(r);
        if (!s.ok()) {
          ++mismatches;
          continue;
        }
        const bool cancel = i % 7 == 3;
        std::vector<int32_t> got;
        FinishReason reason = FinishReason::kNone;
        while (auto resp = (*s)->Pop()) {
          got.insert(got.end(), resp->token_ids.begin(), resp->token_ids.end());
          if (cancel && got.size() == 1) e.Cancel((*s)->request_id());
          if (resp->finished()) reason = resp->finish_reason;
        }
        if (reason != FinishReason::kAbort && got != NaiveGenerate(m, r.prompt, r.sampling, 0)) {
          ++mismatches;
        }
        ++done;
      }
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_EQ(done.load(), 100);
  EXPECT_EQ(mismatches.load(), 0);
  e.Stop();
  EXPECT_EQ(e.stats().kv_blocks_free, e.stats().kv_blocks_total);
  EXPECT_FALSE(e.Submit(Greedy({1}, 1)).ok());
}

TEST(QILIN_ENGINE_TEST, StopAbortsEverythingInFlight) {
  TestBackend backend(50, 100);
  EngineConfig cfg;
  cfg.kv_cache_tokens = 1000;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  auto s1 = *(*engine)->Submit(Greedy({1, 2, 3}, 50));
  ASSERT_TRUE((*engine)->Step().ok());
  auto s2 = *(*engine)->Submit(Greedy({1, 2, 3}, 50));
  (*engine)->Stop();
  for (auto& s : {s1, s2}) {
    Collected c;
    Drain(*s, &c);
    EXPECT_EQ(c.reasons[0], FinishReason::kAbort);
    EXPECT_TRUE(s->closed());
  }
}

}  // namespace
}  // namespace qilin::test

namespace qilin::test {
namespace {

// The real Qwen tokenizer's streaming decoder through the engine: deltas concatenate to the
// tokenizer's own Decode, and a stop string spanning tokens cuts the text right before it.
TEST(QILIN_ENGINE_TOKENIZER_TEST, TextDeltasAndStopStringsWithTheQwenTokenizer) {
  auto tok =
      tokenizer::Tokenizer::Load(std::string(QILIN_SOURCE_DIR) + "/../shared/data/tokenizer");
  if (!tok.ok()) GTEST_SKIP() << "no tokenizer data: " << tok.status().ToString();
  auto text_ids = (*tok)->Encode("Hello, 世界! The quick brown fox jumps over the lazy dog.");
  ASSERT_TRUE(text_ids.ok());
  // Vocab of the tokenizer's ordinary tokens; bad words keep specials out.
  const int32_t vocab = 151643;
  TestBackend backend(vocab, 256);
  EngineConfig cfg;
  cfg.block_size = 8;
  cfg.kv_cache_tokens = 8 * 40;
  auto engine = Engine::Create(backend, cfg);
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  e.SetDetokenizerFactory(MakeTokenizerDetokenizerFactory(*tok));
  Request r;
  r.prompt = *text_ids;
  r.sampling.temperature = 0.0f;
  r.sampling.max_tokens = 12;
  r.sampling.stop = {"\x01never"};
  auto s = e.Submit(r);
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_TRUE(e.RunUntilIdle().ok());
  Collected c;
  Drain(**s, &c);
  auto full = (*tok)->Decode(c.tokens[0]);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(c.text[0], *full);
  ASSERT_GE(full->size(), 8u);
  // Stop at a string made of the end of token 3's text and the start of token 4's.
  auto upto3 = (*tok)->Decode(std::span<const int32_t>(c.tokens[0].data(), 4));
  ASSERT_TRUE(upto3.ok());
  const size_t cut = upto3->size() - 1;
  std::string stop = full->substr(cut, 3);
  r.sampling.stop = {stop};
  s = e.Submit(r);
  ASSERT_TRUE(e.RunUntilIdle().ok());
  Collected c2;
  Drain(**s, &c2);
  EXPECT_EQ(c2.text[0], full->substr(0, full->find(stop)));
  EXPECT_EQ(c2.reasons[0], FinishReason::kStop);
}

}  // namespace
}  // namespace qilin::test
