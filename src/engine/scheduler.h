// Inflight (continuous) batching: which sequences run this step and how many of their tokens.
// Running requests first (oldest first), then waiting ones by priority and arrival; prefills are
// chunked to fit the per-step token budget and mixed with decodes; when KV blocks run out the
// newest running request is preempted (blocks freed, recomputed later from prompt + generated).
// Static batching (V1: a batch runs to completion before the next is admitted) is a mode of the
// same class. Capacity policies follow Triton's names.
#pragma once

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common/status.h"
#include "engine/detokenizer.h"
#include "engine/kv_manager.h"
#include "engine/request.h"
#include "engine/response_stream.h"

namespace qilin {

enum class BatchingMode { kInflight, kStaticV1 };
enum class CapacityPolicy {
  kMaxUtilization,     // admit greedily, preempt when blocks run out
  kGuaranteedNoEvict,  // admit only if prompt + max_tokens of every running request fit
};
Result<CapacityPolicy> ParseCapacityPolicy(const std::string& name);
Result<BatchingMode> ParseBatchingMode(const std::string& name);

struct SchedulerConfig {
  int32_t max_batch_size = 256;   // sequences running at once
  int32_t max_num_tokens = 8192;  // tokens per step (prefill chunks + decodes)
  int32_t max_seq_len = 0;        // prompt + generated; the model's length
  bool enable_chunked_prefill = true;
  BatchingMode mode = BatchingMode::kInflight;
  CapacityPolicy policy = CapacityPolicy::kMaxUtilization;
};

// One sequence of a request (a request has n samples or beam_width beams).
struct Sequence {
  int32_t index = 0;
  std::vector<int32_t> tokens;  // prompt + generated
  int32_t num_computed = 0;     // leading tokens whose K/V are in the cache
  KvSequence kv;
  bool finished = false;
  // Overlapped steps: the last token is still being sampled by a launched step and will end the
  // sequence (max_tokens or the model length): nothing more is scheduled for it.
  bool final_pending = false;
  FinishReason finish_reason = FinishReason::kNone;
  float cumulative_logprob = 0.0f;
  // With a detokenizer: the output text so far and how much of it was sent (the rest is held
  // back while it could be the start of a stop string).
  std::unique_ptr<IncrementalDetokenizer> detok;
  std::string text;
  size_t emitted_text = 0;
};

// One request and its sequences; the unit of admission and preemption.
struct SequenceGroup {
  int64_t id = 0;
  uint64_t arrival = 0;  // FCFS order; kept across preemption
  Request request;
  uint64_t seed = 0;
  int32_t prompt_len = 0;
  std::vector<std::unique_ptr<Sequence>> seqs;
  std::shared_ptr<ResponseStream> stream;
  bool forked = false;  // n > 1 / beams: sequences created from the first sample
  // Its steps may overlap (the engine needs no host work between them): see EngineConfig.
  bool overlap_ok = false;
  int32_t num_preemptions = 0;
  // Beam search: finished hypotheses (tokens generated, score, cumulative logprob).
  struct Hypothesis {
    std::vector<int32_t> tokens;
    float score;
    float cumulative_logprob;
    FinishReason reason;
  };
  std::vector<Hypothesis> hypotheses;

  bool beam() const { return request.sampling.beam_width > 1; }
  int32_t width() const { return std::max(request.sampling.n, request.sampling.beam_width); }
  int32_t num_live() const;
  bool all_finished() const { return num_live() == 0; }
};

// What one step runs: per sequence, how many new tokens and whether its last one is sampled.
struct ScheduledSeq {
  SequenceGroup* group;
  Sequence* seq;
  int32_t num_new_tokens;
  bool sample;
};

struct SchedulerOutput {
  std::vector<ScheduledSeq> seqs;
  std::vector<std::pair<int32_t, int32_t>> copies;  // KV blocks to copy before the forward
  int32_t num_tokens = 0;
  int32_t num_prefill_tokens = 0;
  std::vector<SequenceGroup*> preempted;
  bool empty() const { return seqs.empty(); }
};

struct SchedulerStats {
  int64_t num_preemptions = 0;
  int64_t num_steps = 0;
};

class Scheduler {
 public:
  Scheduler(const SchedulerConfig& config, KvManager* kv);

  const SchedulerConfig& config() const { return config_; }

  // Whether a request can ever run (model length, pool size, batch size); thread-safe (reads
  // only the immutable configuration).
  Status CheckFits(const Request& request) const;

  void Add(std::unique_ptr<SequenceGroup> group);
  // Removes the request wherever it is, freeing its blocks. Returns it, or null if unknown.
  std::unique_ptr<SequenceGroup> Abort(int64_t id);
  // Decides the next step and reserves its KV blocks.
  SchedulerOutput Schedule();
  // Frees the blocks of a finished sequence.
  void FreeSequence(Sequence* seq) { kv_->Free(&seq->kv); }
  // Adds a sequence sharing `parent`'s blocks and tokens.
  Sequence* Fork(SequenceGroup* group, const Sequence& parent);
  // Removes a request whose sequences all finished; returns it.
  std::unique_ptr<SequenceGroup> Release(SequenceGroup* group);
  // The request with this id, or null once it was removed.
  SequenceGroup* Find(int64_t id) const {
    auto it = groups_.find(id);
    return it == groups_.end() ? nullptr : it->second.get();
  }

  int32_t num_running() const { return static_cast<int32_t>(running_.size()); }
  int32_t num_waiting() const { return static_cast<int32_t>(waiting_.size()); }
  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  const SchedulerStats& stats() const { return stats_; }
  void ResetStats() { stats_ = SchedulerStats{}; }
  // Every sequence's KV state (for invariant checks in tests).
  std::vector<const KvSequence*> AllKvSequences() const;
  std::vector<int64_t> AllRequestIds() const;

 private:
  struct WaitingOrder {
    bool operator()(const SequenceGroup* a, const SequenceGroup* b) const {
      if (a->request.priority != b->request.priority) {
        return a->request.priority > b->request.priority;
      }
      return a->arrival < b->arrival;
    }
  };

  // Plans and reserves this step's tokens for a running group; false if its blocks do not fit.
  bool ScheduleGroup(SequenceGroup* g, int32_t* budget, SchedulerOutput* out);
  void Preempt(SequenceGroup* g, SchedulerOutput* out);
  // Blocks the group may still take before it finishes (guaranteed_no_evict reservations).
  int64_t FutureBlocks(const SequenceGroup& g) const;
  int32_t LiveSeqsRunning() const;

  SchedulerConfig config_;
  KvManager* kv_;
  std::unordered_map<int64_t, std::unique_ptr<SequenceGroup>> groups_;
  std::set<SequenceGroup*, WaitingOrder> waiting_;
  std::vector<SequenceGroup*> running_;  // admission order (preempt from the back)
  SchedulerStats stats_;
};

}  // namespace qilin
