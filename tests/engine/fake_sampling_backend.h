// The fake backend with "device" sampling and launched steps, for the engine's overlapped steps:
// ForwardSample samples each row with the engine's Sampler from the spec (as a device sampler
// would), LaunchForwardSample resolves Backend::PreviousRowToken ids from the step launched just
// before, runs the step at once and keeps its results until WaitForwardSample. Everything the
// engine may get wrong with placeholders (a token read before its step ran, a wrong row, a slot
// of a sequence that is gone) changes the fake's KV cells and so the outputs.
#pragma once

#include <algorithm>
#include <deque>
#include <utility>
#include <vector>

#include "engine/sampler.h"
#include "fake_backend.h"

namespace qilin::test {

class FakeSamplingBackend : public FakeBackend {
 public:
  FakeSamplingBackend(int32_t vocab, int32_t max_len, int32_t eos = -1, float eos_bias = 0.0f)
      : FakeBackend(vocab, max_len, eos, eos_bias), vocab_(vocab), sampler_(vocab) {}

  bool SupportsDeviceSampling() const override { return true; }
  bool SupportsLaunchedSteps() const override { return launched_steps; }

  Status ForwardSample(const ForwardBatch& batch, std::span<const DeviceSampleSpec> specs,
                       std::vector<DeviceSampleResult>* results) override {
    if (!pending_.empty()) {
      return FailedPrecondition("fake: ForwardSample with {} launched steps", pending_.size());
    }
    ++sync_steps;
    return Run(batch, specs, results);
  }

  Status LaunchForwardSample(const ForwardBatch& batch,
                             std::span<const DeviceSampleSpec> specs) override {
    if (static_cast<int>(pending_.size()) >= kMaxLaunchedSteps) {
      return FailedPrecondition("fake: {} launched steps not waited for", pending_.size());
    }
    if (fail_next_launch) {
      fail_next_launch = false;
      return Internal("fake backend: injected launch failure");
    }
    ForwardBatch b = batch;
    for (int32_t& t : b.token_ids) {
      if (t >= 0) continue;
      const int32_t row = PreviousRowOf(t);
      if (row >= static_cast<int32_t>(previous_.size())) {
        return InvalidArgument("fake: token {} stands for row {} of a step of {} rows", t, row,
                               previous_.size());
      }
      t = previous_[row];
      ++resolved_tokens;
    }
    for (const DeviceSampleSpec& s : specs) {
      if (!s.greedy && s.top_p < 1.0f) return InvalidArgument("fake: launched row with top_p");
    }
    std::vector<DeviceSampleResult> res;
    QILIN_RETURN_IF_ERROR(Run(b, specs, &res));
    pending_.push_back(std::move(res));
    ++launched;
    max_pending = std::max(max_pending, static_cast<int>(pending_.size()));
    return Status::Ok();
  }

  Status WaitForwardSample(std::vector<DeviceSampleResult>* results) override {
    if (pending_.empty()) return FailedPrecondition("fake: no launched step");
    *results = std::move(pending_.front());
    pending_.pop_front();
    if (fail_next_wait) {
      fail_next_wait = false;
      return Internal("fake backend: injected failure of a launched step");
    }
    return Status::Ok();
  }

  bool launched_steps = true;
  bool fail_next_launch = false;
  bool fail_next_wait = false;
  int64_t launched = 0;
  int64_t sync_steps = 0;
  int64_t resolved_tokens = 0;
  int max_pending = 0;
  int pending() const { return static_cast<int>(pending_.size()); }

 private:
  Status Run(const ForwardBatch& b, std::span<const DeviceSampleSpec> specs,
             std::vector<DeviceSampleResult>* results) {
    std::vector<float> logits;
    QILIN_RETURN_IF_ERROR(Forward(b, &logits));
    results->assign(specs.size(), DeviceSampleResult{});
    previous_.clear();
    for (size_t r = 0; r < specs.size(); ++r) {
      const DeviceSampleSpec& s = specs[r];
      SamplingParams p;
      p.temperature = s.greedy ? 0.0f : s.temperature;
      p.top_k = s.top_k;
      p.top_p = s.top_p;
      p.min_p = s.min_p;
      p.repetition_penalty = s.repetition_penalty;
      p.presence_penalty = s.presence_penalty;
      p.frequency_penalty = s.frequency_penalty;
      p.logprobs = s.logprobs;
      if (s.counter != s.tokens.size() - static_cast<size_t>(s.prompt_len)) {
        return InvalidArgument("fake: row {} counter {} for {} generated tokens", r, s.counter,
                               s.tokens.size() - s.prompt_len);
      }
      SampleContext ctx{&p,       s.tokens, s.prompt_len,
                        s.masked, s.seed,   static_cast<int32_t>(s.stream)};
      SampleResult x = sampler_.Sample(logits.data() + r * static_cast<size_t>(vocab_), ctx);
      DeviceSampleResult& d = (*results)[r];
      d.token = x.token;
      d.logprob = x.logprob;
      d.top = std::move(x.top);
      previous_.push_back(x.token);
    }
    return Status::Ok();
  }

  int32_t vocab_;
  Sampler sampler_;
  std::deque<std::vector<DeviceSampleResult>> pending_;
  std::vector<int32_t> previous_;  // the last step's tokens, per row
};

}  // namespace qilin::test
