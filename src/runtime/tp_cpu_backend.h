// Tensor parallelism on the CPU: N ranks, one thread each, every rank holding only its shard of
// the model (model/shard.h) and its share of the KV cache (its KV heads), talking through a
// Communicator exactly as GPU ranks do through NCCL. Behind the Backend interface, so the engine
// and `qilin generate --tp N --device cpu` run it unchanged.
//
// The calling thread is rank 0: it validates each call and broadcasts it (for Forward, the
// encoded ForwardBatch) to ranks 1..N-1, which loop on those broadcasts (runtime/tp_driver.h):
// threads of this process (Create), or processes joined over a socket_comm.h group
// (CreateLeader in rank 0's process, Follow in each other rank's). Per layer: q/k/v, rope, the
// KV-cache write and attention for the rank's heads, o_proj over its heads' columns, one
// all-reduce; then gate/up for its MLP rows, down_proj over those columns, a second all-reduce. The
// embedding is vocab-parallel (one all-reduce), and the lm_head's logits for the rank's vocabulary
// rows are all-gathered.
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/shard.h"
#include "model/weights.h"
#include "runtime/backend.h"
#include "runtime/comm.h"
#include "runtime/tp_driver.h"

namespace qilin {

class TpCpuBackend : public TpLeaderBackend {
 public:
  // Shards `weights` (the full model, e.g. LoadModelWeights' views) over `tp` ranks.
  // CheckShardable's errors for a shape that does not divide; the CPU backend's checks of the
  // config and weights.
  static Result<std::unique_ptr<TpCpuBackend>> Create(const ModelConfig& config,
                                                      const ModelWeights& weights, int tp);
  // Each rank loads only its slices of the checkpoint in `model_dir`.
  static Result<std::unique_ptr<TpCpuBackend>> Load(const ModelConfig& config,
                                                    const std::filesystem::path& model_dir, int tp);
  // Rank 0 of a group of processes: `comm` reaches ranks 1..N-1 (N = its world size), each of
  // which runs Follow. Returns once every rank has made its shard (or the first rank's error).
  static Result<std::unique_ptr<TpCpuBackend>> CreateLeader(const ModelConfig& config,
                                                            const ModelWeights& weights,
                                                            std::unique_ptr<Communicator> comm);
  // Rank comm->rank() > 0 of a group of processes: makes its shard of `weights` (only its slices
  // are read), then runs rank 0's calls until rank 0 shuts the group down (OK) or it fails.
  static Status Follow(const ModelConfig& config, const ModelWeights& weights,
                       std::unique_ptr<Communicator> comm);
  ~TpCpuBackend() override;

  std::string name() const override { return "cpu"; }
  // Over all ranks (replicated KV heads count once per rank that holds them).
  int64_t KvBytesPerToken() const override;
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;

  // Ranks in this process only (all of them with Create, rank 0 with CreateLeader).
  const ModelWeights& shard(int rank) const;

  struct Rank;

 private:
  explicit TpCpuBackend(const ModelConfig& config);
  static Status CheckModel(const ModelConfig& config, const ModelWeights& weights, int tp);
  static Result<std::unique_ptr<Rank>> MakeRank(const ModelConfig* config,
                                                const ModelWeights& weights, int tp, int rank);
  Status SetPlans(int tp);

  std::shared_ptr<InProcessCommGroup> group_;
  std::vector<std::unique_ptr<Rank>> ranks_;  // this process's: rank 0 first
};

}  // namespace qilin
