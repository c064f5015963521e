// Tensor parallelism on CUDA: N ranks, each a CudaBackend over its shard of the model
// (model/shard.h) with its share of the KV cache, behind the Backend interface like TpCpuBackend
// (`qilin generate --tp N --device cuda`).
//
// Rank r runs on GPU r % device_count. The calling thread is rank 0: it validates each call and
// broadcasts it (for Forward, the encoded ForwardBatch) over an in-process Communicator to ranks
// 1..N-1, threads looping on those broadcasts. Per layer each rank runs its heads and MLP rows;
// the o_proj and down_proj outputs are all-reduced on the device (CudaBackendOptions::tp_comm).
// The embedding is replicated on every rank (no collective); the lm_head is vocab-parallel and
// its logits are all-gathered to the full vocabulary on rank 0.
//
// Collectives: NCCL on each rank's stream when every rank has a GPU of its own and the build has
// NCCL (CUDA graphs stay on: NCCL calls are captured); otherwise "staged" through host memory
// and the in-process Communicator (exact, rank order; no CUDA graphs). Device sampling is off.
#pragma once

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
#include "runtime/cuda_backend.h"

namespace qilin {

struct CudaTpOptions {
  // Staged collectives even where NCCL could run (tests, debugging).
  bool force_staged = false;
  // Options of every rank's CudaBackend (tp_comm and tp_plan are set per rank).
  CudaBackendOptions cuda;
};

class CudaTpBackend : public Backend {
 public:
  // Shards `weights` (the full model on the host, e.g. LoadModelWeights' views) over `tp` ranks
  // and uploads each rank's shard. CheckShardable's errors; Unavailable without a CUDA device;
  // CudaBackend's errors naming the rank.
  static Result<std::unique_ptr<CudaTpBackend>> Create(const ModelConfig& config,
                                                       const ModelWeights& weights, int tp,
                                                       CudaTpOptions options = {});
  ~CudaTpBackend() override;

  std::string name() const override { return "cuda"; }
  const ModelConfig& config() const override { return config_; }
  // Over all ranks (replicated KV heads count once per rank that holds them).
  int64_t KvBytesPerToken() const override;
  // The fewest blocks any rank can hold; ranks sharing a GPU split its memory.
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;
  Status AllocateKvCache(const KvCacheLayout& layout) override;
  const KvCacheLayout& kv_layout() const override { return layout_; }
  Status Forward(const ForwardBatch& batch, std::vector<float>* logits) override;
  Status CopyKvBlocks(const std::vector<std::pair<int32_t, int32_t>>& src_dst) override;

  int tp() const { return static_cast<int>(ranks_.size()); }
  // "nccl" or "staged".
  std::string collectives() const;
  const ShardPlan& plan(int rank) const;
  int device(int rank) const;
  CudaBackend& rank_backend(int rank);

  struct Rank;

 private:
  explicit CudaTpBackend(const ModelConfig& config);
  Status RunOnAllRanks(int64_t op, int64_t a, int64_t b, std::vector<uint8_t> payload,
                       const ForwardBatch* batch, std::vector<float>* logits);

  ModelConfig config_;
  KvCacheLayout layout_;
  std::shared_ptr<InProcessCommGroup> group_;
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::vector<std::thread> threads_;  // ranks 1..N-1
};

}  // namespace qilin
