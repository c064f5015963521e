// Tensor parallelism on the CPU: N ranks, one thread each, every rank holding only its shard of
// the model (model/shard.h) and its share of the KV cache (its KV heads), talking through a
// Communicator exactly as GPU ranks do through NCCL. Behind the Backend interface, so the engine
// and `qilin generate --tp N --device cpu` run it unchanged.
//
// The calling thread is rank 0: it validates each call and broadcasts it (for Forward, the
// encoded ForwardBatch) to ranks 1..N-1, which loop on those broadcasts as the ranks of a
// multi-process server would. Per layer: q/k/v, rope, the KV-cache write and attention for the
// rank's heads, o_proj over its heads' columns, one all-reduce; then gate/up for its MLP rows,
// down_proj over those columns, a second all-reduce. The embedding is vocab-parallel (one
// all-reduce), and the lm_head's logits for the rank's vocabulary rows are all-gathered.
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

namespace qilin {

class TpCpuBackend : public Backend {
 public:
  // Shards `weights` (the full model, e.g. LoadModelWeights' views) over `tp` ranks.
  // CheckShardable's errors for a shape that does not divide; the CPU backend's checks of the
  // config and weights.
  static Result<std::unique_ptr<TpCpuBackend>> Create(const ModelConfig& config,
                                                      const ModelWeights& weights, int tp);
  // Each rank loads only its slices of the checkpoint in `model_dir`.
  static Result<std::unique_ptr<TpCpuBackend>> Load(const ModelConfig& config,
                                                    const std::filesystem::path& model_dir, int tp);
  ~TpCpuBackend() override;

  std::string name() const override { return "cpu"; }
  const ModelConfig& config() const override { return config_; }
  // Over all ranks (replicated KV heads count once per rank that holds them).
  int64_t KvBytesPerToken() const override;
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;
  Status AllocateKvCache(const KvCacheLayout& layout) override;
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;

  int tp() const { return static_cast<int>(ranks_.size()); }
  const ShardPlan& plan(int rank) const;
  const ModelWeights& shard(int rank) const;

  struct Rank;

 private:
  TpCpuBackend(const ModelConfig& config, std::vector<std::unique_ptr<Rank>> ranks);
  // Rank 0's side of a call: broadcast it, run it on rank 0, collect every rank's status.
  // `batch` is rank 0's batch of a Forward (the other ranks decode `payload`).
  Status RunOnAllRanks(int64_t op, int64_t a, int64_t b, std::vector<uint8_t> payload,
                       const ForwardBatch* batch, std::vector<float>* logits);

  ModelConfig config_;
  KvCacheLayout layout_;
  std::shared_ptr<InProcessCommGroup> group_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<std::thread> threads_;  // ranks 1..N-1
};

}  // namespace qilin
