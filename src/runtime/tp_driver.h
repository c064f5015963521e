// How the ranks of a tensor-parallel group run the same calls: rank 0 (the process or thread
// that owns the engine) broadcasts each Backend call as a command (and, for Forward, the encoded
// ForwardBatch); ranks 1..N-1 loop on those broadcasts; after each call every rank learns every
// rank's status. Shared by the CPU and CUDA tensor-parallel backends, with ranks as threads
// (InProcessCommGroup) or as processes (socket_comm.h).
#pragma once

#include <cstdint>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "common/status.h"
#include "model/config.h"
#include "model/shard.h"
#include "runtime/backend.h"
#include "runtime/comm.h"
#include "runtime/forward_batch.h"

namespace qilin {

// One rank's share of each Backend call.
class TpRankWorker {
 public:
  virtual ~TpRankWorker() = default;
  virtual Status AllocateKv(int32_t num_blocks, int32_t block_size) = 0;
  virtual Status CopyKv(const std::vector<std::pair<int32_t, int32_t>>& src_dst) = 0;
  // `logits`: rank 0's output (nullptr on the other ranks).
  virtual Status Forward(const ForwardBatch& batch, std::vector<float>* logits) = 0;
};

enum class TpOp : int64_t { kForward = 1, kAllocateKv = 2, kCopyKv = 3, kShutdown = 4 };

// Rank 0: broadcasts the call, runs this rank's share, and returns OK when every rank succeeded,
// else the first failing rank's status naming it. For kForward, `batch` is the step (encoded
// for the other ranks); for kAllocateKv, a = blocks and b = block size; for kCopyKv, `pairs`.
Status TpLead(Communicator& comm, TpRankWorker& worker, TpOp op, int64_t a = 0, int64_t b = 0,
              const ForwardBatch* batch = nullptr,
              const std::vector<std::pair<int32_t, int32_t>>* pairs = nullptr,
              std::vector<float>* logits = nullptr);

// Ranks 1..N-1: run rank 0's calls until it shuts the group down (OK) or the group fails (its
// status). A rank that cannot go on (out of memory) aborts the group, so rank 0 does not hang.
Status TpFollow(Communicator& comm, TpRankWorker& worker);

// Rank 0's record of whether the group still works: the first result of TpLead that says the
// group is over (Cancelled: aborted or a rank lost) stays.
class TpGroupHealth {
 public:
  // Returns `result` unchanged.
  Status Note(Status result) {
    if (result.code() == StatusCode::kCancelled) {
      std::lock_guard<std::mutex> lock(mu_);
      if (broken_.ok()) broken_ = result;
    }
    return result;
  }
  Status Get() const {
    std::lock_guard<std::mutex> lock(mu_);
    return broken_;
  }

 private:
  mutable std::mutex mu_;
  Status broken_;
};

// Rank 0's side of the Backend interface for a tensor-parallel group, shared by the CPU and CUDA
// TP backends: each call is checked, run on every rank (TpLead) and a group that failed for good
// is remembered (Health). A subclass sets lead_comm_ / lead_worker_ to rank 0's, plans_ to every
// rank's, starts follower threads_ (ranks as threads) or sets followers_elsewhere_ (processes),
// and calls StopFollowers() first thing in its destructor.
class TpLeaderBackend : public Backend {
 public:
  const ModelConfig& config() const override { return config_; }
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status AllocateKvCache(const KvCacheLayout& layout) override;
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;
  // The group's failure once a call found it aborted (a rank lost, or one that gave up).
  Status Health() const override { return health_.Get(); }

  int tp() const { return static_cast<int>(plans_.size()); }
  const ShardPlan& plan(int rank) const { return plans_.at(rank); }

 protected:
  explicit TpLeaderBackend(const ModelConfig& config) : config_(config) {}
  // Shuts ranks 1..N-1 down (if any were started) and joins the follower threads.
  void StopFollowers();

  ModelConfig config_;
  KvCacheLayout layout_;
  std::vector<ShardPlan> plans_;  // every rank's
  Communicator* lead_comm_ = nullptr;
  TpRankWorker* lead_worker_ = nullptr;
  std::vector<std::thread> threads_;  // ranks 1..N-1 as threads
  bool followers_elsewhere_ = false;  // ranks 1..N-1 in other processes

 private:
  TpGroupHealth health_;
};

// Every rank (a collective): InvalidArgument naming the first rank whose model differs from rank
// 0's in a shape that the ranks must share (architecture, sizes, heads, vocabulary, rope,
// maximum length) — e.g. mpirun's ranks reading different checkpoints on different nodes.
Status TpCheckSameModel(Communicator& comm, const ModelConfig& config);

// Every rank: `mine` exchanged with every other rank's (a collective). OK when all are OK, else
// the lowest failing rank's status with "tensor parallel rank R" as context. When the group is
// already aborted, the abort's status (which names the rank that aborted and why).
Status TpExchangeStatus(Communicator& comm, const Status& mine);

}  // namespace qilin
