#include "engine/sampler.h"

#include <immintrin.h>

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
// Reads the row twice at most (a vector max, then the first index holding it): memory bound.
int32_t ArgMax(const float* x, int32_t n) {
#ifdef __AVX2__
  if (n >= 64) {
    __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
      // MAXPS returns its second operand when either is NaN: NaN never enters the maximum.
      m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
      m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
    float m = kNegInf;
    for (float v : lanes) m = std::max(m, v);
    for (; i < n; ++i) {
      if (x[i] > m) m = x[i];
    }
    if (m == kNegInf) return -1;
    const __m256 target = _mm256_set1_ps(m);
    int32_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const int mask =
          _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
      if (mask) return j + __builtin_ctz(static_cast<unsigned>(mask));
    }
    for (; j < n; ++j) {
      if (x[j] == m) return j;
    }
    return -1;
  }
#endif
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

#ifdef __AVX2__
// exp(x) for 8 floats, x <= 0 (Cephes' expf: range reduction by ln 2, degree-5 polynomial;
// relative error about 2 ulp). Below -87.3 the result is flushed to 0.
inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}
#endif

// out[i] = exp((x[i] - m) * inv_t) (0 for -inf and NaN); returns the sum in double.
double ExpShifted(const float* x, int32_t n, float m, float inv_t, float* out) {
  int32_t i = 0;
  double total = 0.0;
#ifdef __AVX2__
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
  const __m256 ninf = _mm256_set1_ps(kNegInf);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 valid = _mm256_cmp_ps(v, ninf, _CMP_GT_OQ);  // false for -inf and NaN
    const __m256 e = _mm256_and_ps(Exp8(_mm256_mul_ps(_mm256_sub_ps(v, vm), vt)), valid);
    _mm256_storeu_ps(out + i, e);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; i < n; ++i) {
    out[i] = x[i] > kNegInf ? std::exp((x[i] - m) * inv_t) : 0.0f;
    total += out[i];
  }
  return total;
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
  if (!p.bad_words.empty()) {
    counts_token_.clear();
    FiredBadWords(p, ctx.tokens, &counts_token_);
    for (int32_t t : counts_token_) logits[t] = kNegInf;
  }
}

void Sampler::FiredBadWords(const SamplingParams& p, std::span<const int32_t> tokens,
                            std::vector<int32_t>* out) {
  const int32_t n = static_cast<int32_t>(tokens.size());
  for (const auto& w : p.bad_words) {
    const int32_t m = static_cast<int32_t>(w.size());
    if (m == 0 || m - 1 > n) continue;
    if (std::equal(w.begin(), w.end() - 1, tokens.end() - (m - 1))) out->push_back(w.back());
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

// Top-p over the whole vocabulary without sorting it: tokens are bucketed by their distance from
// the best logit (the buckets are in probability order), bucket masses locate the nucleus edge
// and the sample, and only the (few) buckets holding those are sorted. The result equals a walk
// over the fully sorted distribution.
int32_t Sampler::SampleNucleus(const float* logits, double m, double inv_t, double total, double u,
                               const SamplingParams& p) {
  // Buckets over 64 nats below the best logit (p below e^-64 share the last one); about 16
  // tokens per bucket on average, at most 4096 buckets.
  const int kBins = std::clamp(vocab_ / 16, 64, 4096);
  const double kScale = kBins / 64.0;
  bin_start_.assign(kBins + 1, 0);
  bin_mass_.assign(kBins, 0.0);
  bin_sorted_.assign(kBins, 0);
  bin_of_.resize(vocab_);
  int32_t num_minp = 0;
  for (int32_t i = 0; i < vocab_; ++i) {
    if (probs_[i] <= 0.0f) {
      bin_of_[i] = -1;
      continue;
    }
    const int b = static_cast<int>(std::min<double>(kBins - 1, (m - logits[i]) * inv_t * kScale));
    bin_of_[i] = b;
    ++bin_start_[b + 1];
    bin_mass_[b] += probs_[i];
    num_minp += probs_[i] >= p.min_p;
  }
  for (int b = 0; b < kBins; ++b) bin_start_[b + 1] += bin_start_[b];
  order_.resize(bin_start_[kBins]);
  {
    std::vector<int32_t>& fill = idx_;  // next free slot per bin
    fill.assign(bin_start_.begin(), bin_start_.end() - 1);
    for (int32_t i = 0; i < vocab_; ++i) {
      if (bin_of_[i] >= 0) order_[fill[bin_of_[i]]++] = i;
    }
  }
  auto sort_bin = [&](int b) {
    if (bin_sorted_[b]) return;
    std::sort(order_.begin() + bin_start_[b], order_.begin() + bin_start_[b + 1],
              [&](int32_t x, int32_t y) {
                return logits[x] > logits[y] || (logits[x] == logits[y] && x < y);
              });
    bin_sorted_[b] = 1;
  };
  // Walks the sorted order: the first position where the running mass passes `target` (strictly
  // when `strict`), never past `limit`. Returns that position; *mass gets the mass up to it.
  auto walk = [&](double target, bool strict, int32_t limit, double* mass) -> int32_t {
    double acc = 0.0;
    int32_t pos = 0;
    for (int b = 0; b < kBins && pos < limit; ++b) {
      const int32_t n = bin_start_[b + 1] - bin_start_[b];
      if (n == 0) continue;
      const bool passes = strict ? acc + bin_mass_[b] > target : acc + bin_mass_[b] >= target;
      if (pos + n < limit && !passes) {
        acc += bin_mass_[b];
        pos += n;
        continue;
      }
      sort_bin(b);
      for (int32_t k = bin_start_[b]; k < bin_start_[b + 1] && pos < limit; ++k, ++pos) {
        acc += probs_[order_[k]];
        if (strict ? acc > target : acc >= target) {
          *mass = acc;
          return pos;
        }
      }
    }
    *mass = acc;
    return std::max(0, pos - 1);
  };
  const int32_t count = bin_start_[kBins];
  if (count == 0) return -1;
  double mass = 0.0;
  // Nucleus: the shortest sorted prefix reaching top_p; min_p keeps a prefix too.
  int32_t keep = walk(p.top_p * total, /*strict=*/false, count, &mass) + 1;
  if (p.min_p > 0.0f) keep = std::max(1, std::min(keep, num_minp));
  walk(std::numeric_limits<double>::infinity(), true, keep, &mass);  // mass of the kept prefix
  double unused;
  const int32_t pos = walk(u * mass, /*strict=*/true, keep, &unused);
  // Position -> token: the bins before it are counted, its own bin is sorted by now.
  int b = 0;
  while (bin_start_[b + 1] <= pos) ++b;
  sort_bin(b);
  return order_[pos];
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
    total =
        ExpShifted(logits, vocab_, static_cast<float>(m), static_cast<float>(inv_t), probs_.data());
    if (p.top_p < 1.0f) {
      return SampleNucleus(logits, m, inv_t, total, u, p);
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

DeviceSampleSpec DeviceSpecOf(const SamplingParams& p) {
  DeviceSampleSpec d;
  d.greedy = p.greedy();
  d.temperature = p.temperature;
  d.top_k = p.top_k;
  d.top_p = p.top_p;
  d.min_p = p.min_p;
  d.repetition_penalty = p.repetition_penalty;
  d.presence_penalty = p.presence_penalty;
  d.frequency_penalty = p.frequency_penalty;
  d.logprobs = p.logprobs;
  return d;
}

}  // namespace qilin
