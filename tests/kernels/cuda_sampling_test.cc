// Device sampling (kernels/cuda/sampling.cu through CudaBackend::SampleLogits) against the CPU
// sampler (engine/sampler.cc) on random rows of odd vocab sizes, for each option combination:
// greedy and its logprobs exactly, seeded draws the same token (a draw may land within float
// rounding of a bucket edge: such rows are counted and must be rare), logprobs within 1e-4.
// Then the engine on the GPU with device sampling on and off gives the same outputs.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "runtime/cuda_backend.h"

namespace qilin {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device"

ModelConfig TinyConfig(int64_t vocab) {
  ModelConfig c;
  c.arch = ModelArch::kQwen2;
  c.vocab_size = vocab;
  c.hidden_size = 128;
  c.intermediate_size = 256;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.max_position_embeddings = 512;
  c.rope_theta = 10000;
  c.attention_bias = true;
  c.rms_norm_eps = 1e-6;
  return c;
}

struct Case {
  std::string name;
  SamplingParams p;
  bool penalties = false;
  bool masked = false;
};

std::vector<Case> Cases() {
  std::vector<Case> cs;
  auto add = [&](std::string name, auto set, bool pen = false, bool mask = false) {
    Case c;
    c.name = std::move(name);
    set(c.p);
    c.penalties = pen;
    c.masked = mask;
    cs.push_back(c);
  };
  add("greedy", [](SamplingParams& p) { p.temperature = 0; });
  add(
      "greedy+logprobs5+penalties+mask",
      [](SamplingParams& p) {
        p.temperature = 0;
        p.logprobs = 5;
      },
      true, true);
  add("top_k=1", [](SamplingParams& p) {
    p.top_k = 1;
    p.logprobs = 0;
  });
  add("temperature 0.7", [](SamplingParams& p) {
    p.temperature = 0.7f;
    p.logprobs = 0;
  });
  add(
      "temperature 1.3 + penalties", [](SamplingParams& p) { p.temperature = 1.3f; }, true, true);
  add("min_p 0.05", [](SamplingParams& p) { p.min_p = 0.05f; });
  add("top_k 40 t 0.8", [](SamplingParams& p) {
    p.top_k = 40;
    p.temperature = 0.8f;
    p.logprobs = 3;
  });
  add(
      "top_k 50 top_p 0.9 min_p 0.02",
      [](SamplingParams& p) {
        p.top_k = 50;
        p.top_p = 0.9f;
        p.min_p = 0.02f;
      },
      true);
  add(
      "top_k 1500 t 1.2 logprobs 20",
      [](SamplingParams& p) {
        p.top_k = 1500;
        p.temperature = 1.2f;
        p.logprobs = 20;
      },
      true, true);
  add("top_p 0.9 t 0.7", [](SamplingParams& p) {
    p.top_p = 0.9f;
    p.temperature = 0.7f;
  });
  add(
      "top_p 0.5 min_p 0.1 + penalties",
      [](SamplingParams& p) {
        p.top_p = 0.5f;
        p.min_p = 0.1f;
        p.logprobs = 2;
      },
      true, true);
  add("top_p 0.95 min_p 0.01", [](SamplingParams& p) {
    p.top_p = 0.95f;
    p.min_p = 0.01f;
  });
  return cs;
}

// Random logits rows: N(0, sigma) with a few large values, some exact ties at the top.
std::vector<float> RandomLogits(int32_t rows, int32_t vocab, std::mt19937& rng) {
  std::vector<float> x(static_cast<size_t>(rows) * vocab);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (int32_t r = 0; r < rows; ++r) {
    float* row = x.data() + static_cast<size_t>(r) * vocab;
    const float sigma = 1.0f + 3.0f * (r % 4);
    for (int32_t i = 0; i < vocab; ++i) row[i] = nd(rng) * sigma;
    std::uniform_int_distribution<int32_t> id(0, vocab - 1);
    for (int k = 0; k < 5; ++k) row[id(rng)] = 6.0f * sigma + k;  // a short head
    if (r % 3 == 0) {
      // Ties at the top: the lower id must win (greedy) and come first (top logprobs).
      const int32_t a = id(rng), b = id(rng);
      row[a] = row[b] = 6.0f * sigma + 10.0f;
    }
  }
  return x;
}

void CompareWithCpu(int32_t vocab, int32_t rows, uint32_t seed) {
  auto be = CudaBackend::CreateDummy(TinyConfig(vocab), 1);
  ASSERT_TRUE(be.ok()) << be.status().ToString();
  std::mt19937 rng(seed);
  Sampler sampler(vocab);
  int64_t sampled = 0, differ = 0, on_host = 0;
  for (const Case& cs : Cases()) {
    const std::vector<float> logits = RandomLogits(rows, vocab, rng);
    std::vector<std::vector<int32_t>> tokens(rows), masked(rows);
    std::vector<DeviceSampleSpec> specs(rows);
    std::uniform_int_distribution<int32_t> id(0, vocab - 1);
    SamplingParams p = cs.p;
    if (cs.penalties) {
      p.repetition_penalty = 1.3f;
      p.presence_penalty = 0.4f;
      p.frequency_penalty = 0.3f;
    }
    for (int32_t r = 0; r < rows; ++r) {
      for (int i = 0; i < 40; ++i) tokens[r].push_back(id(rng));
      // Repeats among the generated tokens (frequency counts > 1), and the row's best tokens.
      tokens[r].push_back(tokens[r][35]);
      tokens[r].push_back(tokens[r][36]);
      tokens[r].push_back(tokens[r][36]);
      if (cs.masked) masked[r] = {id(rng), id(rng), tokens[r][37]};
      DeviceSampleSpec& d = specs[r];
      d = DeviceSpecOf(p);
      d.tokens = tokens[r];
      d.prompt_len = 30;
      d.masked = masked[r];
      d.seed = seed * 7919u + r;
      d.stream = r % 3;
      d.counter = tokens[r].size() - 30;
    }
    std::vector<DeviceSampleResult> got;
    // Poisoned: every field must be written.
    got.assign(rows, DeviceSampleResult{-7, std::numeric_limits<float>::quiet_NaN(), {}, true, {}});
    ASSERT_TRUE((*be)->SampleLogits(logits.data(), specs, &got).ok());
    ASSERT_EQ(got.size(), static_cast<size_t>(rows));
    for (int32_t r = 0; r < rows; ++r) {
      std::vector<float> row(logits.begin() + static_cast<size_t>(r) * vocab,
                             logits.begin() + static_cast<size_t>(r + 1) * vocab);
      SampleContext ctx{&p,        tokens[r],     30,
                        masked[r], specs[r].seed, static_cast<int32_t>(specs[r].stream)};
      const SampleResult want = sampler.Sample(row.data(), ctx);
      const DeviceSampleResult& g = got[r];
      SCOPED_TRACE(cs.name + " vocab " + std::to_string(vocab) + " row " + std::to_string(r));
      if (g.on_host) {
        // Handed back: the raw row must come back unchanged.
        ++on_host;
        ASSERT_FALSE(p.greedy());
        ASSERT_EQ(g.logits.size(), static_cast<size_t>(vocab));
        for (int32_t i = 0; i < vocab; ++i) {
          ASSERT_EQ(g.logits[i], logits[static_cast<size_t>(r) * vocab + i]) << i;
        }
        continue;
      }
      ASSERT_GE(g.token, 0);
      ASSERT_LT(g.token, vocab);
      if (p.greedy()) {
        EXPECT_EQ(g.token, want.token);
      } else {
        ++sampled;
        if (g.token != want.token) ++differ;
      }
      if (p.logprobs >= 0) {
        ASSERT_FALSE(std::isnan(g.logprob));
        if (g.token == want.token) EXPECT_NEAR(g.logprob, want.logprob, 1e-4);
        ASSERT_EQ(g.top.size(), want.top.size());
        for (size_t j = 0; j < want.top.size(); ++j) {
          EXPECT_EQ(g.top[j].first, want.top[j].first) << j;
          EXPECT_NEAR(g.top[j].second, want.top[j].second, 1e-4) << j;
        }
      }
    }
  }
  std::printf(
      "vocab %d: %lld seeded rows, %lld differ (draw at a rounding edge), %lld handed "
      "to the host\n",
      vocab, static_cast<long long>(sampled), static_cast<long long>(differ),
      static_cast<long long>(on_host));
  // A draw lands within float rounding (~1e-6) of a bucket edge rarely; a wrong rule differs often.
  EXPECT_LE(differ, std::max<int64_t>(1, sampled / 100));
}

TEST(CudaSampling, MatchesCpuSamplerSmallVocab) {
  SKIP_WITHOUT_GPU();
  CompareWithCpu(1003, 37, 1);
}

TEST(CudaSampling, MatchesCpuSamplerMidVocab) {
  SKIP_WITHOUT_GPU();
  CompareWithCpu(5003, 29, 2);
}

TEST(CudaSampling, MatchesCpuSamplerQwenVocab) {
  SKIP_WITHOUT_GPU();
  CompareWithCpu(152064, 19, 3);
}

TEST(CudaSampling, AllMaskedRowGivesTokenZero) {
  SKIP_WITHOUT_GPU();
  const int32_t vocab = 301;
  auto be = CudaBackend::CreateDummy(TinyConfig(vocab), 1);
  ASSERT_TRUE(be.ok());
  std::vector<float> logits(vocab, -std::numeric_limits<float>::infinity());
  logits[7] = std::numeric_limits<float>::quiet_NaN();
  std::vector<DeviceSampleSpec> specs(2);
  specs[1].greedy = false;
  std::vector<DeviceSampleResult> got;
  std::vector<float> two(logits);
  two.insert(two.end(), logits.begin(), logits.end());
  ASSERT_TRUE((*be)->SampleLogits(two.data(), specs, &got).ok());
  EXPECT_EQ(got[0].token, 0);
  EXPECT_EQ(got[1].token, 0);
}

// Forward (logits to the host through the pinned staging, several pieces at this vocab) and
// ForwardSample on the same batch: the device's greedy tokens and logprobs are the host's.
TEST(CudaSampling, ForwardSampleMatchesForwardLogits) {
  SKIP_WITHOUT_GPU();
  const int32_t vocab = 152064, seqs = 40, bs = 8;
  auto be = CudaBackend::CreateDummy(TinyConfig(vocab), 4, 0.05f);
  ASSERT_TRUE(be.ok());
  ASSERT_TRUE((*be)->AllocateKvCache({seqs * 2, bs}).ok());
  ForwardBatch b;
  b.query_start = {0};
  b.max_blocks_per_seq = 1;
  for (int32_t s = 0; s < seqs; ++s) {
    for (int32_t p = 0; p < 3; ++p) {
      b.token_ids.push_back((s * 977 + p * 131) % vocab);
      b.positions.push_back(p);
      b.slot_mapping.push_back(int64_t{s} * bs + p);
    }
    b.query_start.push_back(b.num_tokens());
    b.context_lens.push_back(3);
    b.prompt_lens.push_back(3);
    b.block_tables.push_back(s);
    b.logits_indices.push_back(b.num_tokens() - 1);
  }
  std::vector<float> logits(7, std::numeric_limits<float>::quiet_NaN());
  ASSERT_TRUE((*be)->Forward(b, &logits).ok());
  ASSERT_EQ(logits.size(), static_cast<size_t>(seqs) * vocab);
  std::vector<DeviceSampleSpec> specs(seqs);
  for (auto& d : specs) d.logprobs = 0;
  std::vector<DeviceSampleResult> got;
  ASSERT_TRUE((*be)->ForwardSample(b, specs, &got).ok());
  ASSERT_EQ(got.size(), static_cast<size_t>(seqs));
  for (int32_t s = 0; s < seqs; ++s) {
    const float* row = logits.data() + static_cast<size_t>(s) * vocab;
    int32_t best = 0;
    for (int32_t i = 0; i < vocab; ++i) {
      ASSERT_FALSE(std::isnan(row[i])) << s << " " << i;
      if (row[i] > row[best]) best = i;
    }
    EXPECT_EQ(got[s].token, best) << s;
    EXPECT_NEAR(got[s].logprob, Sampler::LogSoftmaxAt(row, vocab, best), 1e-4) << s;
  }
}

// The engine on the GPU: device sampling on and off give the same tokens and logprobs.
TEST(CudaSampling, EngineSameOutputsWithAndWithoutDeviceSampling) {
  SKIP_WITHOUT_GPU();
  const ModelConfig c = TinyConfig(1003);
  std::vector<Request> reqs;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int32_t> id(0, 1002);
  for (int i = 0; i < 12; ++i) {
    Request r;
    for (int k = 0; k < 5 + 3 * i; ++k) r.prompt.push_back(id(rng));
    r.sampling.max_tokens = 16;
    r.sampling.ignore_eos = true;
    if (i % 3 == 0) {
      r.sampling.temperature = 0;
    } else {
      r.sampling.temperature = 0.8f;
      r.sampling.top_k = i % 3 == 1 ? 20 : 0;
      r.sampling.top_p = 0.9f;
      r.sampling.seed = 1000 + i;
    }
    if (i % 4 == 1) r.sampling.repetition_penalty = 1.2f;
    if (i % 5 == 2) r.sampling.logprobs = 3;
    reqs.push_back(r);
  }
  std::vector<std::vector<int32_t>> outs[2];
  std::vector<std::vector<float>> lps[2];
  for (int mode = 0; mode < 2; ++mode) {
    auto be = CudaBackend::CreateDummy(c, 11, 0.05f);
    ASSERT_TRUE(be.ok());
    EngineConfig ec;
    ec.block_size = 8;
    ec.kv_cache_tokens = 8 * 64;
    ec.device_sampling = mode == 1;
    auto engine = Engine::Create(**be, ec);
    ASSERT_TRUE(engine.ok()) << engine.status().ToString();
    std::vector<std::shared_ptr<ResponseStream>> streams;
    for (const Request& r : reqs) {
      auto s = (*engine)->Submit(r);
      ASSERT_TRUE(s.ok()) << s.status().ToString();
      streams.push_back(*s);
    }
    while ((*engine)->HasWork()) ASSERT_TRUE((*engine)->Step().ok());
    for (auto& s : streams) {
      std::vector<int32_t> got;
      std::vector<float> lp;
      while (auto resp = s->TryPop()) {
        ASSERT_TRUE(resp->error.ok()) << resp->error.ToString();
        got.insert(got.end(), resp->token_ids.begin(), resp->token_ids.end());
        for (const auto& l : resp->logprobs) {
          lp.push_back(l.logprob);
          for (const auto& [t, v] : l.top) {
            lp.push_back(static_cast<float>(t));
            lp.push_back(v);
          }
        }
      }
      outs[mode].push_back(got);
      lps[mode].push_back(lp);
    }
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(outs[0][i].size(), 16u);
    EXPECT_EQ(outs[0][i], outs[1][i]) << "request " << i;
    ASSERT_EQ(lps[0][i].size(), lps[1][i].size());
    for (size_t j = 0; j < lps[0][i].size(); ++j) EXPECT_NEAR(lps[0][i][j], lps[1][i][j], 1e-4);
  }
}

}  // namespace
}  // namespace qilin
