// Helpers for engine tests: collecting a request's responses and a naive, unpaged reference
// generator over FakeLogits (the same stop rules, no batching, no KV cache).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "fake_backend.h"

namespace qilin::test {

struct Collected {
  std::map<int32_t, std::vector<int32_t>> tokens;  // seq_index -> token ids
  std::map<int32_t, FinishReason> reasons;
  std::map<int32_t, int> finishes;  // how many finished responses each sequence got
  std::map<int32_t, std::string> text;
  Status error;
  int responses = 0;
};

// Drains what is queued now.
inline void Drain(ResponseStream& s, Collected* c) {
  while (auto r = s.TryPop()) {
    ++c->responses;
    auto& t = c->tokens[r->seq_index];
    t.insert(t.end(), r->token_ids.begin(), r->token_ids.end());
    c->text[r->seq_index] += r->text;
    if (r->finished()) {
      c->reasons[r->seq_index] = r->finish_reason;
      ++c->finishes[r->seq_index];
    }
    if (!r->error.ok()) c->error = r->error;
  }
}

struct FakeModel {
  int32_t vocab = 97;
  int32_t eos = -1;
  float eos_bias = 0.0f;
  int32_t max_len = 512;
};

// Reference generation: the next token from the full history, every step, no cache.
inline std::vector<int32_t> NaiveGenerate(const FakeModel& m, const std::vector<int32_t>& prompt,
                                          const SamplingParams& p, uint64_t seed,
                                          int32_t stream = 0) {
  Sampler sampler(m.vocab);
  std::vector<int32_t> seq = prompt;
  std::vector<float> logits(m.vocab);
  std::vector<int32_t> out;
  while (true) {
    FakeLogits(seq, m.vocab, m.eos, m.eos_bias, logits.data());
    std::vector<int32_t> masked;
    const int32_t gen = static_cast<int32_t>(out.size());
    if (gen < p.min_tokens) {
      if (m.eos >= 0) masked.push_back(m.eos);
      masked.insert(masked.end(), p.stop_token_ids.begin(), p.stop_token_ids.end());
    }
    SampleContext ctx{&p, seq, static_cast<int32_t>(prompt.size()), masked, seed, stream};
    const int32_t t = sampler.Sample(logits.data(), ctx).token;
    seq.push_back(t);
    out.push_back(t);
    const bool eos = (!p.ignore_eos && t == m.eos) ||
                     std::count(p.stop_token_ids.begin(), p.stop_token_ids.end(), t) > 0;
    if ((eos && gen + 1 >= p.min_tokens) || gen + 1 >= p.max_tokens ||
        static_cast<int32_t>(seq.size()) >= m.max_len) {
      break;
    }
  }
  return out;
}

}  // namespace qilin::test
