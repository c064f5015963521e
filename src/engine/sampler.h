// Turns one row of logits into one token: logits processors (penalties, bans, min_tokens mask),
// then greedy or temperature / top-k / top-p / min-p sampling with a per-sequence counter-based
// RNG, so that a seeded request samples the same tokens whatever else is in the batch.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "engine/request.h"
#include "runtime/device_sampling.h"

namespace qilin {

// Everything the sampler needs to know about one sequence.
struct SampleContext {
  const SamplingParams* params = nullptr;
  std::span<const int32_t> tokens;  // prompt + generated so far
  int32_t prompt_len = 0;
  // Tokens masked for this step (eos/stop ids before min_tokens). Bad words are added inside.
  std::span<const int32_t> masked;
  uint64_t seed = 0;
  int32_t stream = 0;  // sample / beam index: n samples of one request draw independent numbers
};

struct SampleResult {
  int32_t token = -1;
  float logprob = 0.0f;                        // log p(token) under the model's distribution
  std::vector<std::pair<int32_t, float>> top;  // params->logprobs best (token, logprob)
};

// Uniform [0, 1) number `counter` of stream (seed, stream): a counter-based generator (splitmix64
// over the three words), so that draws never depend on the order rows are sampled in.
double UniformAt(uint64_t seed, uint64_t stream, uint64_t counter);

// The sampling options of `p` as the device sampler takes them (tokens, masks and the draw's
// seed, stream and counter are the caller's to set).
DeviceSampleSpec DeviceSpecOf(const SamplingParams& p);

class Sampler {
 public:
  explicit Sampler(int32_t vocab_size);

  int32_t vocab_size() const { return vocab_; }

  // Samples from `logits` (vocab floats), which it may overwrite (the processors work in place).
  SampleResult Sample(float* logits, const SampleContext& ctx);

  // Applies penalties and masks (no temperature) in place: what beam search scores with.
  void ApplyProcessors(float* logits, const SampleContext& ctx);
  // Appends the last token of each bad word whose other tokens end `tokens` (what ApplyProcessors
  // bans for p.bad_words).
  static void FiredBadWords(const SamplingParams& p, std::span<const int32_t> tokens,
                            std::vector<int32_t>* out);
  // The k most likely tokens under log_softmax(logits), best first (ties: lower id first).
  void TopLogprobs(const float* logits, int32_t k, std::vector<std::pair<int32_t, float>>* out);
  // log_softmax(logits)[token].
  static float LogSoftmaxAt(const float* logits, int32_t vocab, int32_t token);

 private:
  int32_t SampleFiltered(float* logits, const SampleContext& ctx, uint64_t counter);
  int32_t SampleNucleus(const float* logits, double m, double inv_t, double total, double u,
                        const SamplingParams& p);

  int32_t vocab_;
  // Scratch, reused across calls.
  std::vector<int32_t> idx_;
  std::vector<float> probs_;
  std::vector<std::pair<float, int32_t>> cand_;
  std::vector<int32_t> counts_token_;
  std::vector<int32_t> counts_;
  std::vector<int32_t> bin_start_, bin_of_, order_;
  std::vector<double> bin_mass_;
  std::vector<char> bin_sorted_;
};

}  // namespace qilin
