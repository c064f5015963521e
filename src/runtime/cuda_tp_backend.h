// Tensor parallelism on CUDA: N ranks, each a CudaBackend over its shard of the model
// (model/shard.h) with its share of the KV cache, behind the Backend interface like TpCpuBackend
// (`qilin generate --tp N --device cuda`).
//
// With Create, rank r is a thread on GPU r % device_count; with CreateLeader / Follow each rank
// is a process (socket_comm.h). The calling thread is rank 0: it validates each call and
// broadcasts it (for Forward, the encoded ForwardBatch) to ranks 1..N-1, which loop on those
// broadcasts (runtime/tp_driver.h). Per layer each rank runs its heads and MLP rows;
// the o_proj and down_proj outputs are all-reduced on the device (CudaBackendOptions::tp_comm).
// The embedding is replicated on every rank (no collective); the lm_head is vocab-parallel and
// its logits are all-gathered to the full vocabulary on rank 0.
//
// Collectives: NCCL on each rank's stream when every rank has a GPU of its own and the build has
// NCCL (CUDA graphs stay on: NCCL calls are captured); otherwise "staged" through host memory
// and the host Communicator (exact, rank order; no CUDA graphs). Device sampling is off.
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
#include "runtime/tp_driver.h"

namespace qilin {

struct CudaTpOptions {
  // Staged collectives even where NCCL could run (tests, debugging).
  bool force_staged = false;
  // Options of every rank's CudaBackend (tp_comm and tp_plan are set per rank).
  CudaBackendOptions cuda;
};

class CudaTpBackend : public TpLeaderBackend {
 public:
  // Shards `weights` (the full model on the host, e.g. LoadModelWeights' views) over `tp` ranks
  // and uploads each rank's shard. CheckShardable's errors; Unavailable without a CUDA device;
  // CudaBackend's errors naming the rank.
  static Result<std::unique_ptr<CudaTpBackend>> Create(const ModelConfig& config,
                                                       const ModelWeights& weights, int tp,
                                                       CudaTpOptions options = {});
  // Rank 0 of a group of processes (`qilin serve --tp N --tp-launch process|mpi`): `comm` reaches
  // ranks 1..N-1, each running Follow; this rank runs on CUDA device `device`. Collectives over
  // NCCL (its id sent over `comm`) unless options.force_staged on any rank, a build without
  // NCCL, or two ranks on one GPU (same host and PCI bus id); then staged through `comm`. The KV
  // pool is sized from rank 0's GPU (ranks have equal shares).
  static Result<std::unique_ptr<CudaTpBackend>> CreateLeader(const ModelConfig& config,
                                                             const ModelWeights& weights,
                                                             std::unique_ptr<Communicator> comm,
                                                             int device,
                                                             CudaTpOptions options = {});
  // Rank comm->rank() > 0 of such a group, on CUDA device `device`: uploads its shard, then runs
  // rank 0's calls until rank 0 shuts the group down (OK) or it fails.
  static Status Follow(const ModelConfig& config, const ModelWeights& weights,
                       std::unique_ptr<Communicator> comm, int device, CudaTpOptions options = {});
  ~CudaTpBackend() override;

  std::string name() const override { return "cuda"; }
  // Over all ranks (replicated KV heads count once per rank that holds them).
  int64_t KvBytesPerToken() const override;
  // The fewest blocks any rank can hold; ranks sharing a GPU split its memory.
  Result<int32_t> ProposeNumKvBlocks(int32_t block_size, double memory_fraction,
                                     int32_t max_num_tokens) const override;

  // "nccl" or "staged".
  std::string collectives() const;
  // Ranks in this process only (all of them with Create, rank 0 with CreateLeader).
  int device(int rank) const;
  CudaBackend& rank_backend(int rank);

  struct Rank;

 private:
  explicit CudaTpBackend(const ModelConfig& config);
  // A process's rank: its plan, NCCL (or staged) collectives and uploaded shard, each step
  // agreed with the other ranks (the first failing rank's error on every rank).
  static Result<std::unique_ptr<Rank>> JoinProcessGroup(const ModelConfig& config,
                                                        const ModelWeights& weights,
                                                        std::unique_ptr<Communicator> comm,
                                                        int device, const CudaTpOptions& options);

  std::shared_ptr<InProcessCommGroup> group_;
  std::vector<std::unique_ptr<Rank>> ranks_;  // this process's: rank 0 first
};

}  // namespace qilin
