// The inflight batching engine: Submit(Request) returns a stream of Responses; one loop thread
// owns the scheduler, the KV manager and the sampler, and runs steps (schedule -> build the
// packed ForwardBatch -> Backend::Forward -> sample -> stop checks -> responses). Submit and
// Cancel cross one queue; Step() runs a step on the caller's thread for deterministic tests.
//
// Overlapped steps (EngineConfig::overlap_steps): with a backend that launches steps
// (Backend::LaunchForwardSample), step N+1 is scheduled, built and launched while the device
// still runs step N; then step N's tokens are taken and answered. Each sampled sequence gets a
// placeholder token (Backend::PreviousRowToken) that the device resolves in step N+1 and the
// engine replaces when step N is waited for. A sequence that stops in step N (eos, stop string)
// had one more row in step N+1, which is dropped; one that step N ends by length is not
// scheduled again. Requests that need the host between steps (beams, n > 1, penalties, bad
// words, top_p < 1 with sampling) turn the overlap off while they are present.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "common/status.h"
#include "engine/detokenizer.h"
#include "engine/kv_manager.h"
#include "engine/request.h"
#include "engine/response_stream.h"
#include "engine/sampler.h"
#include "engine/scheduler.h"
#include "runtime/backend.h"

namespace qilin {

struct EngineConfig {
  int32_t max_batch_size = 256;   // sequences running at once
  int32_t max_num_tokens = 8192;  // tokens per step, prefill chunks and decodes together
  int32_t max_seq_len = 0;        // prompt + output; 0: ModelConfig::MaxModelLen()
  bool enable_chunked_prefill = true;
  BatchingMode mode = BatchingMode::kInflight;
  CapacityPolicy policy = CapacityPolicy::kMaxUtilization;
  int32_t block_size = 32;  // tokens per KV block
  // KV pool size: an explicit token count (rounded down to blocks), or else this fraction of
  // free memory (Backend::ProposeNumKvBlocks).
  int64_t kv_cache_tokens = 0;
  double kv_cache_memory_fraction = 0.9;
  bool enable_prefix_caching = true;
  // End-of-sequence ids; empty: the model config's eos_token_ids.
  std::vector<int32_t> eos_token_ids;
  // Threads that sample rows in parallel; 0: OpenMP's default.
  int32_t sampler_threads = 0;
  // Sample on the backend's device where it can (Backend::ForwardSample): a step uses it when
  // every row it samples is supported (no beam search, no first sample of n > 1, top_k and
  // logprobs within the device limits); otherwise the logits come to the host as before.
  bool device_sampling = true;
  // Overlap the host's work on step N+1 with the device running step N (see the top).
  bool overlap_steps = true;
};

struct EngineStats {
  int32_t running = 0;
  int32_t waiting = 0;
  int32_t kv_blocks_total = 0;
  int32_t kv_blocks_used = 0;
  int32_t kv_blocks_free = 0;
  int32_t kv_blocks_cached = 0;
  int64_t prefix_cache_queries = 0;     // full prompt blocks looked up at admission
  int64_t prefix_cache_hits = 0;        // blocks found
  int64_t prefix_cache_hit_tokens = 0;  // prefill tokens saved
  int64_t prefill_tokens = 0;           // tokens run that were not sampled decodes
  int64_t generated_tokens = 0;
  int64_t steps = 0;
  int64_t overlapped_steps = 0;  // launched while the previous step was still running
  int64_t preemptions = 0;
  int64_t requests_finished = 0;
  // Host time spent per phase over all steps (nanoseconds): scheduling + batch building, the
  // backend (copies + forward), sampling, and stop checks + responses.
  int64_t schedule_ns = 0;
  int64_t forward_ns = 0;
  int64_t sample_ns = 0;
  int64_t output_ns = 0;
  double prefix_cache_hit_rate() const {
    return prefix_cache_queries ? static_cast<double>(prefix_cache_hits) / prefix_cache_queries
                                : 0.0;
  }
};

class Engine {
 public:
  // Sizes and allocates the backend's KV pool; validates the configuration.
  static Result<std::unique_ptr<Engine>> Create(Backend& backend, const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Attaches a detokenizer (text deltas, stop strings). Call before the first Submit.
  void SetDetokenizerFactory(DetokenizerFactory factory) { detok_factory_ = std::move(factory); }
  // As SetDetokenizerFactory, for a factory that reads the request (it takes precedence).
  void SetRequestDetokenizerFactory(RequestDetokenizerFactory factory) {
    request_detok_factory_ = std::move(factory);
  }

  // Validates the request (a request that can never fit is refused here, naming the limit) and
  // queues it. Thread-safe.
  Result<std::shared_ptr<ResponseStream>> Submit(Request request);
  // Aborts a request wherever it is (its stream gets finish_reason abort). Thread-safe.
  void Cancel(int64_t request_id);

  // Before Start() and the first Submit: runs dummy requests through the engine so that the
  // first costs of the backend's step sizes (Backend::WarmUpBatchSizes: CUDA graphs captured,
  // GEMM plans tuned) are paid now and not by the first clients. One wave per batch size b (b
  // one-token prompts, two output tokens: a b-row prefill step, then a b-row decode step), then
  // one prefill per Backend::WarmUpPrefillTokens size (the largest max_num_tokens; as far as the
  // KV pool holds them), run as warm-up steps (Backend::SetWarmUpSteps). Afterwards the KV pool
  // is empty, the prefix cache forgotten, the stats zero and the request ids and unseeded seeds
  // where they were. A no-op where the backend has nothing to warm up. Returns the number
  // of scheduler steps run.
  Result<int64_t> WarmUp();

  // Runs the loop thread / stops it (aborting every unfinished request).
  void Start();
  void Stop();

  // One step on the caller's thread (only while the loop thread is not running): takes queued
  // submits and cancels, schedules, runs the backend, samples and answers. A backend error fails
  // the requests of that step and is returned. With overlapped steps a step is launched and the
  // previous one answered; the last one launched is answered by the next call.
  Status Step();
  // Steps until nothing is waiting or running.
  Status RunUntilIdle();
  bool HasWork() const;

  EngineStats stats() const;
  const EngineConfig& config() const { return config_; }
  // For tests on the calling (loop) thread: block accounting and invariants.
  const KvManager& kv() const { return *kv_; }
  bool CheckKvInvariants() const;

 private:
  Engine(Backend& backend, const EngineConfig& config, int32_t num_blocks);
  void DrainInbox();
  void BuildBatch(const SchedulerOutput& out);
  // `device`: the rows were sampled by Backend::ForwardSample into device_results_.
  void ProcessOutputs(const SchedulerOutput& out, bool device);
  // Fills device_specs_ for the rows `out` samples; false when a row needs the host sampler.
  bool BuildDeviceSpecs(const SchedulerOutput& out);
  // Puts a sampled token at index `at` of the sequence (-1: appends it), checks stop conditions
  // and answers.
  void Accept(SequenceGroup* g, Sequence* s, const SampleResult& r, int32_t at = -1);
  // Overlapped steps: whether this step may be launched before the previous one is answered.
  bool OverlapAllowed() const;
  bool OverlapOk(const SamplingParams& p) const;
  // Launches the built batch_ of `out` (overlapped), then answers the step launched before it.
  Status LaunchStep(SchedulerOutput out);
  // Waits for the oldest launched step and answers it.
  Status FinishLaunched();
  // Aborts the requests (those still present) with `status`.
  void FailIds(std::vector<int64_t> ids, const Status& status);
  // Removes the requests that finished this step.
  void ReleaseFinished();
  void BeamStep(SequenceGroup* g, const std::vector<std::pair<Sequence*, float*>>& rows);
  void FinishBeams(SequenceGroup* g);
  void MaskedFor(const SequenceGroup& g, const Sequence& s, std::vector<int32_t>* out) const;
  bool IsEos(const SequenceGroup& g, int32_t token) const;
  // Whether a sequence of `len` tokens (prompt included) is at max_tokens or the model length.
  bool AtLength(const SequenceGroup& g, int32_t len) const;
  void FailAll(const SchedulerOutput& out, const Status& status);
  // A launched step: what was scheduled (its pointers are checked against the scheduler before
  // use: a request may be gone by the time the step is waited for), per scheduled sequence its
  // request id and its cache length after the step.
  struct LaunchedStep {
    SchedulerOutput out;
    std::vector<int64_t> group_ids;
    std::vector<int32_t> context_end;
  };
  void AbortGroup(std::unique_ptr<SequenceGroup> g, const Status& status);
  void FinishIfDone(SequenceGroup* g);
  void PublishStats();
  void Loop();

  Backend& backend_;
  EngineConfig config_;
  int32_t vocab_;
  std::unique_ptr<KvManager> kv_;
  std::unique_ptr<Scheduler> scheduler_;
  std::vector<std::unique_ptr<Sampler>> samplers_;  // one per sampling thread
  DetokenizerFactory detok_factory_;
  RequestDetokenizerFactory request_detok_factory_;
  bool has_detokenizer() const { return detok_factory_ || request_detok_factory_; }
  std::unique_ptr<IncrementalDetokenizer> MakeDetokenizer(const Request& request) const {
    if (request_detok_factory_) return request_detok_factory_(request);
    return detok_factory_ ? detok_factory_(request.prompt) : nullptr;
  }
  int32_t max_stop_len_ = 0;

  // Loop-thread state.
  ForwardBatch batch_;
  std::vector<float> logits_;
  std::vector<DeviceSampleSpec> device_specs_;
  std::vector<std::vector<int32_t>> device_masked_;  // the specs' masked ids
  std::vector<DeviceSampleResult> device_results_;
  std::vector<SequenceGroup*> finished_groups_;
  std::deque<LaunchedStep> launched_;
  int32_t non_overlap_groups_ = 0;  // requests present with overlap_ok false
  int64_t overlapped_steps_ = 0;
  uint64_t arrival_counter_ = 0;
  int64_t prefill_tokens_ = 0, generated_tokens_ = 0, requests_finished_ = 0;
  int64_t schedule_ns_ = 0, forward_ns_ = 0, sample_ns_ = 0, output_ns_ = 0;

  // The queue between client threads and the loop.
  struct InboxItem {
    std::unique_ptr<SequenceGroup> add;  // or, when null, a cancel of `cancel_id`
    int64_t cancel_id = -1;
  };
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<InboxItem> inbox_;
  bool stopping_ = false;
  bool stopped_ = false;
  std::atomic<int64_t> next_id_{1};
  std::atomic<uint64_t> seed_counter_{0};
  uint64_t seed_base_;
  std::thread loop_;
  std::atomic<bool> loop_running_{false};
  std::atomic<bool> has_work_{false};
  std::atomic<bool> launched_pending_{false};  // launched_ is not empty

  mutable std::mutex stats_mu_;
  EngineStats stats_;
};

}  // namespace qilin
