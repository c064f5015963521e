// Sampler tests against exact probabilities computed naively here: chi-square goodness of fit
// for temperature / top-k / top-p / min-p with fixed seeds, exact inverse-CDF agreement on a
// large vocabulary, penalties, bans and logprobs.
#include "engine/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

namespace qilin {
namespace {

// The distribution a request's parameters define, by the book: softmax(l / T), then top-k,
// then top-p (smallest most-likely set reaching p), then min-p (relative to the max), renormalised.
std::vector<double> ExactProbs(const std::vector<float>& logits, const SamplingParams& p) {
  const size_t n = logits.size();
  std::vector<double> pr(n);
  double mx = *std::max_element(logits.begin(), logits.end());
  double z = 0;
  for (size_t i = 0; i < n; ++i) z += pr[i] = std::exp((logits[i] - mx) / p.temperature);
  for (auto& x : pr) x /= z;
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return pr[a] > pr[b]; });
  std::vector<bool> keep(n, true);
  if (p.top_k > 0) {
    for (size_t r = p.top_k; r < n; ++r) keep[order[r]] = false;
  }
  if (p.top_p < 1.0f) {
    double kept = 0;
    for (size_t i = 0; i < n; ++i) kept += keep[i] ? pr[i] : 0;
    double acc = 0;
    bool reached = false;
    for (size_t r = 0; r < n; ++r) {
      if (!keep[order[r]]) continue;
      if (reached) keep[order[r]] = false;
      acc += pr[order[r]] / kept;
      if (acc >= p.top_p) reached = true;
    }
  }
  if (p.min_p > 0.0f) {
    const double pmax = pr[order[0]];
    for (size_t i = 0; i < n; ++i) {
      if (pr[i] < p.min_p * pmax) keep[i] = false;
    }
  }
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += keep[i] ? pr[i] : 0;
  for (size_t i = 0; i < n; ++i) pr[i] = keep[i] ? pr[i] / s : 0;
  return pr;
}

// Upper critical value of chi-square with `df` degrees of freedom at alpha = 0.001
// (Wilson-Hilferty, z = 3.0902).
double ChiSquareCritical(int df) {
  const double z = 3.0902, k = df;
  const double t = 1.0 - 2.0 / (9 * k) + z * std::sqrt(2.0 / (9 * k));
  return k * t * t * t;
}

void ExpectDistribution(const std::vector<float>& logits, const SamplingParams& p,
                        const char* what) {
  const std::vector<double> expected = ExactProbs(logits, p);
  Sampler sampler(static_cast<int32_t>(logits.size()));
  const int kDraws = 40000;
  std::vector<int> counts(logits.size(), 0);
  const std::vector<int32_t> prompt{0};
  for (int d = 0; d < kDraws; ++d) {
    std::vector<float> row = logits;
    SampleContext ctx{&p, prompt, 1, {}, static_cast<uint64_t>(d) * 7919 + 17, 0};
    ++counts[sampler.Sample(row.data(), ctx).token];
  }
  double chi = 0;
  int df = -1;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (expected[i] == 0) {
      EXPECT_EQ(counts[i], 0) << what << ": token " << i << " is outside the allowed set";
      continue;
    }
    const double e = expected[i] * kDraws;
    chi += (counts[i] - e) * (counts[i] - e) / e;
    ++df;
  }
  if (df > 0) {
    EXPECT_LT(chi, ChiSquareCritical(df)) << what << " df=" << df;
  }
}

const std::vector<float> kLogits{1.0f, 2.5f, -0.5f, 0.3f, 2.0f, -1.2f,
                                 0.9f, 1.7f, -3.0f, 0.0f, 1.1f, 2.2f};

TEST(SamplerTest, TemperatureMatchesSoftmax) {
  SamplingParams p;
  for (float t : {0.5f, 1.0f, 1.7f}) {
    p.temperature = t;
    ExpectDistribution(kLogits, p, "temperature");
  }
}

TEST(SamplerTest, TopKTopPMinPMatchTheirExactDistributions) {
  SamplingParams p;
  p.temperature = 0.9f;
  p.top_k = 4;
  ExpectDistribution(kLogits, p, "top_k=4");
  p.top_k = 0;
  for (float top_p : {0.3f, 0.75f, 0.95f}) {
    p.top_p = top_p;
    ExpectDistribution(kLogits, p, "top_p");
  }
  p.top_p = 1.0f;
  p.min_p = 0.2f;
  ExpectDistribution(kLogits, p, "min_p=0.2");
  p.top_k = 6;
  p.top_p = 0.8f;
  p.min_p = 0.3f;
  ExpectDistribution(kLogits, p, "top_k+top_p+min_p");
}

// A naive sorted inverse-CDF pick with the sampler's own uniform number: the large-vocab paths
// (threshold search for the nucleus, nth_element for top-k) must pick exactly the same token.
TEST(SamplerTest, LargeVocabMatchesANaiveSortedInverseCdf) {
  const int32_t vocab = 20000;
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Sampler sampler(vocab);
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<float> logits(vocab);
    const float scale = trial % 3 == 0 ? 0.1f : (trial % 3 == 1 ? 2.0f : 8.0f);  // flat..peaked
    for (auto& l : logits) l = normal(rng) * scale;
    SamplingParams p;
    p.temperature = 0.6f + 0.1f * (trial % 5);
    p.top_p = trial % 2 ? 0.9f : 1.0f;
    p.top_k = trial % 4 == 0 ? 50 : 0;
    p.min_p = trial % 5 == 0 ? 0.01f : 0.0f;
    if (p.top_p == 1.0f && p.top_k == 0 && p.min_p == 0.0f) p.top_p = 0.5f;
    const std::vector<int32_t> prompt{1, 2, 3};
    const uint64_t seed = 100 + trial;
    std::vector<float> row = logits;
    SampleContext ctx{&p, prompt, 3, {}, seed, 0};
    const int32_t got = sampler.Sample(row.data(), ctx).token;
    std::vector<double> pr = ExactProbs(logits, p);
    std::vector<int32_t> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    // The sampler walks a truncated (top-k / top-p) set best first, otherwise in id order.
    if (p.top_k > 0 || p.top_p < 1.0f) {
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    }
    const double u = UniformAt(seed, 0, 0);
    double acc = 0;
    int32_t want = -1;
    for (int32_t i : order) {
      if (pr[i] == 0) continue;
      acc += pr[i];
      want = i;
      if (acc > u) break;
    }
    EXPECT_EQ(got, want) << "trial " << trial;
  }
}

TEST(SamplerTest, GreedyIsArgmaxWithLowestIdOnTies) {
  Sampler sampler(6);
  SamplingParams p;
  p.temperature = 0.0f;
  std::vector<float> row{0.0f, 3.0f, 1.0f, 3.0f, -1.0f, NAN};
  const std::vector<int32_t> prompt{0};
  EXPECT_EQ(sampler.Sample(row.data(), {&p, prompt, 1, {}, 0, 0}).token, 1);
  p.temperature = 1.0f;
  p.top_k = 1;
  row = {0.0f, 3.0f, 1.0f, 5.0f, -1.0f, 2.0f};
  EXPECT_EQ(sampler.Sample(row.data(), {&p, prompt, 1, {}, 0, 0}).token, 3);
}

TEST(SamplerTest, PenaltiesAndBansFollowTheirFormulas) {
  const int32_t vocab = 8;
  Sampler sampler(vocab);
  SamplingParams p;
  p.repetition_penalty = 1.5f;
  p.presence_penalty = 0.25f;
  p.frequency_penalty = 0.5f;
  p.bad_words = {{6}, {2, 4}, {3, 5}};
  const std::vector<int32_t> tokens{1, 2, 7, 2, 2, 3, 1, 2};  // prompt: first 3
  const std::vector<int32_t> masked{0};
  std::vector<float> row{1.0f, 2.0f, -2.0f, 0.5f, 1.5f, 0.7f, 3.0f, -1.0f};
  const std::vector<float> orig = row;
  sampler.ApplyProcessors(row.data(), {&p, tokens, 3, masked, 0, 0});
  std::vector<float> want = orig;
  for (int32_t t : {1, 2, 7, 3}) want[t] = want[t] > 0 ? want[t] / 1.5f : want[t] * 1.5f;
  // generated: 2,2,3,1,2 -> counts 2:3, 3:1, 1:1
  want[2] -= 0.5f * 3 + 0.25f;
  want[3] -= 0.5f * 1 + 0.25f;
  want[1] -= 0.5f * 1 + 0.25f;
  want[0] = -INFINITY;  // masked
  want[6] = -INFINITY;  // single-token bad word
  want[4] = -INFINITY;  // [2, 4]: the sequence ends with 2
  for (int32_t v = 0; v < vocab; ++v) EXPECT_FLOAT_EQ(row[v], want[v]) << "token " << v;
}

TEST(SamplerTest, LogprobsAreTheModelsLogSoftmax) {
  Sampler sampler(12);
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = 3;
  p.repetition_penalty = 2.0f;  // processors must not change the reported logprobs
  std::vector<float> row = kLogits;
  const std::vector<int32_t> prompt{1};
  SampleResult r = sampler.Sample(row.data(), {&p, prompt, 1, {}, 0, 0});
  double z = 0;
  for (float l : kLogits) z += std::exp(static_cast<double>(l));
  auto lp = [&](int i) { return static_cast<float>(kLogits[i] - std::log(z)); };
  EXPECT_EQ(r.token, 11);  // token 1 (2.5) is penalised to 1.25; 11 (2.2) wins
  EXPECT_NEAR(r.logprob, lp(11), 1e-5);
  ASSERT_EQ(r.top.size(), 3u);
  EXPECT_EQ(r.top[0].first, 1);
  EXPECT_EQ(r.top[1].first, 11);
  EXPECT_EQ(r.top[2].first, 4);
  EXPECT_NEAR(r.top[0].second, lp(1), 1e-5);
  EXPECT_NEAR(r.top[2].second, lp(4), 1e-5);
}

TEST(SamplerTest, UniformStreamsAreIndependentAndUniform) {
  double sum = 0;
  int equal = 0;
  for (uint64_t c = 0; c < 100000; ++c) {
    const double u = UniformAt(42, 0, c);
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
    equal += UniformAt(42, 1, c) == u;
  }
  EXPECT_NEAR(sum / 100000, 0.5, 0.005);
  EXPECT_EQ(equal, 0);
}

}  // namespace
}  // namespace qilin

namespace qilin {
namespace {

TEST(SamplerTest, GreedyOnLargeRowsMatchesANaiveScan) {
  std::mt19937_64 rng(9);
  std::uniform_real_distribution<float> u(-5.0f, 5.0f);
  SamplingParams p;
  p.temperature = 0.0f;
  const std::vector<int32_t> prompt{0};
  for (int trial = 0; trial < 200; ++trial) {
    const int32_t vocab = 64 + static_cast<int32_t>(rng() % 3000);
    std::vector<float> row(vocab);
    for (auto& x : row) x = std::round(u(rng) * 4) / 4;  // many ties
    if (trial % 3 == 0) row[rng() % vocab] = NAN;
    if (trial % 5 == 0) row[vocab - 1] = 100.0f;  // the max in the scalar tail
    int32_t want = -1;
    float best = -INFINITY;
    for (int32_t i = 0; i < vocab; ++i) {
      if (row[i] > best) {
        best = row[i];
        want = i;
      }
    }
    Sampler sampler(vocab);
    EXPECT_EQ(sampler.Sample(row.data(), {&p, prompt, 1, {}, 0, 0}).token, want) << trial;
  }
}

}  // namespace
}  // namespace qilin
