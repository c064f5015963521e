// What a backend that samples on its own device needs per logits row, and what it returns: the
// engine's SamplingParams flattened (runtime does not see requests), the row's tokens for the
// penalties, and the token ids banned this step. Semantics are engine/sampler.cc's.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace qilin {

// Limits of device sampling; rows beyond them are sampled on the host.
constexpr int32_t kDeviceSampleMaxTopK = 2048;
constexpr int32_t kDeviceSampleMaxLogprobs = 20;

struct DeviceSampleSpec {
  bool greedy = true;  // temperature <= 0 or top_k == 1
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int32_t logprobs = -1;            // -1 none, 0 the chosen token's, N also the N most likely
  std::span<const int32_t> tokens;  // prompt + generated so far
  int32_t prompt_len = 0;
  std::span<const int32_t> masked;  // banned this step (eos before min_tokens, bad words)
  uint64_t seed = 0, stream = 0, counter = 0;  // the draw is UniformAt(seed, stream, counter)
};

struct DeviceSampleResult {
  int32_t token = -1;
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;  // best first
  // The device could not decide (top-p nucleus beyond its candidates): `logits` holds the raw
  // row and the caller samples it on the host.
  bool on_host = false;
  std::vector<float> logits;
};

// Whether a row with these parameters can be sampled on the device at all.
inline bool DeviceSamplingSupports(const DeviceSampleSpec& s, int64_t vocab) {
  return s.logprobs <= kDeviceSampleMaxLogprobs &&
         (s.greedy || s.top_k <= 0 || s.top_k >= vocab || s.top_k <= kDeviceSampleMaxTopK);
}

}  // namespace qilin
