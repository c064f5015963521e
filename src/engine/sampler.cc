#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace qilin {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint64_t Mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Index of the largest value, lowest index on ties; NaN never wins. -1 when all are -inf/NaN.
int32_t ArgMax(const float* x, int32_t n) {
  int32_t best = -1;
  float best_v = kNegInf;
  for (int32_t i = 0; i < n; ++i) {
    if (x[i] > best_v) {
      best_v = x[i];
      best = i;
    }
  }
  return best;
}

// log(sum(exp(x))) in double, skipping NaN.
double LogSumExp(const float* x, int32_t n) {
  float m = kNegInf;
  for (int32_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == kNegInf) return kNegInf;
  double s = 0.0;
  for (int32_t i = 0; i < n; ++i) {
    if (x[i] > kNegInf) s += std::exp(static_cast<double>(x[i]) - m);
  }
  return m + std::log(s);
}

}  // namespace

double UniformAt(uint64_t seed, uint64_t stream, uint64_t counter) {
  uint64_t h = Mix64(Mix64(Mix64(seed) ^ stream) ^ counter);
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

Sampler::Sampler(int32_t vocab_size) : vocab_(vocab_size), counts_(vocab_size, 0) {}

float Sampler::LogSoftmaxAt(const float* logits, int32_t vocab, int32_t token) {
  return static_cast<float>(logits[token] - LogSumExp(logits, vocab));
}

void Sampler::TopLogprobs(const float* logits, int32_t k,
                          std::vector<std::pair<int32_t, float>>* out) {
  out->clear();
  k = std::min(k, vocab_);
  if (k <= 0) return;
  const double lse = LogSumExp(logits, vocab_);
  // Keep the k best in `cand_`, sorted best first (value desc, id asc); one pass over the row.
  cand_.clear();
  for (int32_t i = 0; i < vocab_; ++i) {
    const float v = logits[i];
    if (!(v > kNegInf) && static_cast<int32_t>(cand_.size()) >= k) continue;
    if (static_cast<int32_t>(cand_.size()) == k && !(v > cand_.back().first)) continue;
    auto pos = std::upper_bound(
        cand_.begin(), cand_.end(), std::make_pair(v, i), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
    cand_.insert(pos, {v, i});
    if (static_cast<int32_t>(cand_.size()) > k) cand_.pop_back();
  }
  for (const auto& [v, i] : cand_) out->emplace_back(i, static_cast<float>(v - lse));
}

void Sampler::ApplyProcessors(float* logits, const SampleContext& ctx) {
  const SamplingParams& p = *ctx.params;
  const int32_t n = static_cast<int32_t>(ctx.tokens.size());
  if (p.repetition_penalty != 1.0f) {
    // Each distinct token of prompt + output once (HF's rule: divide positive, multiply negative).
    counts_token_.clear();
    for (int32_t t : ctx.tokens) {
      if (counts_[t]++ == 0) counts_token_.push_back(t);
    }
    for (int32_t t : counts_token_) {
      float& l = logits[t];
      l = l > 0 ? l / p.repetition_penalty : l * p.repetition_penalty;
      counts_[t] = 0;
    }
  }
  if (p.presence_penalty != 0.0f || p.frequency_penalty != 0.0f) {
    counts_token_.clear();
    for (int32_t i = ctx.prompt_len; i < n; ++i) {
      int32_t t = ctx.tokens[i];
      if (counts_[t]++ == 0) counts_token_.push_back(t);
    }
    for (int32_t t : counts_token_) {
      logits[t] -= p.frequency_penalty * static_cast<float>(counts_[t]) + p.presence_penalty;
      counts_[t] = 0;
    }
  }
  for (int32_t t : ctx.masked) logits[t] = kNegInf;
  for (const auto& w : p.bad_words) {
    const int32_t m = static_cast<int32_t>(w.size());
    if (m == 0 || m - 1 > n) continue;
    if (std::equal(w.begin(), w.end() - 1, ctx.tokens.end() - (m - 1))) logits[w.back()] = kNegInf;
  }
}

SampleResult Sampler::Sample(float* logits, const SampleContext& ctx) {
  const SamplingParams& p = *ctx.params;
  SampleResult r;
  double lse = 0.0;
  if (p.logprobs >= 0) {
    lse = LogSumExp(logits, vocab_);
    if (p.logprobs > 0) TopLogprobs(logits, p.logprobs, &r.top);
  }
  // Remember raw values the processors change, for the chosen token's logprob.
  const bool processed = p.repetition_penalty != 1.0f || p.presence_penalty != 0.0f ||
                         p.frequency_penalty != 0.0f || !ctx.masked.empty() || !p.bad_words.empty();
  float raw_chosen = 0.0f;
  std::vector<float> saved;
  if (processed && p.logprobs >= 0) saved.assign(logits, logits + vocab_);
  if (processed) ApplyProcessors(logits, ctx);

  const uint64_t counter = static_cast<uint64_t>(ctx.tokens.size()) - ctx.prompt_len;
  if (p.greedy()) {
    r.token = ArgMax(logits, vocab_);
  } else {
    r.token = SampleFiltered(logits, ctx, counter);
  }
  if (r.token < 0) r.token = 0;  // every token banned: nothing sensible left
  if (p.logprobs >= 0) {
    raw_chosen = processed ? saved[r.token] : logits[r.token];
    r.logprob = static_cast<float>(raw_chosen - lse);
  }
  return r;
}

int32_t Sampler::SampleFiltered(float* logits, const SampleContext& ctx, uint64_t counter) {
  const SamplingParams& p = *ctx.params;
  const double inv_t = 1.0 / p.temperature;
  const int32_t top = ArgMax(logits, vocab_);
  if (top < 0) return -1;
  const double m = logits[top];
  const double u = UniformAt(ctx.seed, static_cast<uint64_t>(ctx.stream), counter);
  auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };

  // Candidates as (unnormalised prob, id), sorted best first; `total` is the mass they are a
  // part of (the whole vocab, or the top-k set).
  cand_.clear();
  double total = 0.0;
  bool sorted = false;
  if (p.top_k > 0 && p.top_k < vocab_) {
    idx_.resize(vocab_);
    std::iota(idx_.begin(), idx_.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    std::nth_element(idx_.begin(), idx_.begin() + p.top_k, idx_.end(), by_logit);
    for (int32_t j = 0; j < p.top_k; ++j) {
      const int32_t i = idx_[j];
      const float pr = static_cast<float>(std::exp((logits[i] - m) * inv_t));
      if (pr > 0.0f) cand_.emplace_back(pr, i);
    }
    std::sort(cand_.begin(), cand_.end(), better);
    for (const auto& c : cand_) total += c.first;
    sorted = true;
  } else {
    probs_.resize(vocab_);
    for (int32_t i = 0; i < vocab_; ++i) {
      const float pr =
          logits[i] > kNegInf ? static_cast<float>(std::exp((logits[i] - m) * inv_t)) : 0.0f;
      probs_[i] = pr;
      total += pr;
    }
    if (p.top_p < 1.0f) {
      // The nucleus is a prefix of the sorted distribution: gather tokens above a threshold,
      // lowering it until their mass reaches top_p (then every nucleus token is among them).
      for (double t = 1e-3;; t *= 1e-4) {
        cand_.clear();
        double mass = 0.0;
        const bool last = t < 1e-40;
        for (int32_t i = 0; i < vocab_; ++i) {
          if (probs_[i] > 0.0f && (last || probs_[i] >= t)) {
            cand_.emplace_back(probs_[i], i);
            mass += probs_[i];
          }
        }
        if (last || mass >= p.top_p * total) break;
      }
      std::sort(cand_.begin(), cand_.end(), better);
      sorted = true;
    } else if (p.min_p > 0.0f) {
      for (int32_t i = 0; i < vocab_; ++i) {
        if (probs_[i] > 0.0f) cand_.emplace_back(probs_[i], i);
      }
    } else {
      // Plain temperature sampling: inverse CDF over the vocab in id order.
      double target = u * total, acc = 0.0;
      int32_t last_nonzero = top;
      for (int32_t i = 0; i < vocab_; ++i) {
        if (probs_[i] <= 0.0f) continue;
        acc += probs_[i];
        last_nonzero = i;
        if (acc > target) return i;
      }
      return last_nonzero;
    }
  }
  size_t keep = cand_.size();
  if (sorted && p.top_p < 1.0f) {
    double acc = 0.0;
    for (size_t j = 0; j < cand_.size(); ++j) {
      acc += cand_[j].first;
      if (acc >= p.top_p * total) {
        keep = j + 1;
        break;
      }
    }
  }
  // min_p: relative to the most likely token, whose unnormalised prob is 1.
  double mass = 0.0;
  size_t out = 0;
  for (size_t j = 0; j < keep; ++j) {
    if (p.min_p > 0.0f && cand_[j].first < p.min_p) continue;
    cand_[out++] = cand_[j];
    mass += cand_[j].first;
  }
  if (out == 0) return top;
  const double target = u * mass;
  double acc = 0.0;
  for (size_t j = 0; j < out; ++j) {
    acc += cand_[j].first;
    if (acc > target) return cand_[j].second;
  }
  return cand_[out - 1].second;
}

}  // namespace qilin
