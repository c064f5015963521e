// Communicator over NCCL: one rank per GPU, in one process (a thread per rank) or one process
// per GPU across nodes. The unique id that ties the ranks together is made by rank 0
// (NcclUniqueId) and handed to the others by whatever launched them (shared memory in-process;
// MPI or a TCP store across processes), then every rank calls NcclCommunicator::Create at the
// same time (ncclCommInitRank blocks until all have joined).
//
// Buffers of AllReduceSum and AllGather are device memory on the rank's GPU; Broadcast also takes
// host memory (a step's batch metadata), staged through a device buffer. Operations run on the
// communicator's stream and, with `synchronous` (the default), wait for it, so a returned OK means
// the data is in place; a backend that orders them on its own stream turns that off.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <string>

#include "runtime/comm.h"

namespace qilin {

// A fresh ncclUniqueId as its NCCL_UNIQUE_ID_BYTES bytes.
Result<std::string> NcclUniqueId();

class NcclCommunicator : public Communicator {
 public:
  // Joins the group `unique_id` as `rank` of `world_size` on CUDA device `device`, with a stream of
  // its own. InvalidArgument for a rank outside [0, world_size), a device outside the visible
  // ones, or a unique id of the wrong size; Internal with NCCL's message when NCCL fails.
  static Result<std::unique_ptr<NcclCommunicator>> Create(int world_size, int rank,
                                                          const std::string& unique_id, int device,
                                                          bool synchronous = true);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string name() const override { return "nccl"; }
  Status AllReduceSum(float* data, int64_t count) override;
  Status AllGather(const float* send, int64_t count, float* recv) override;
  Status Broadcast(void* data, int64_t bytes, int root) override;
  Status Barrier() override;
  void Abort(const std::string& why) override;

  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }
  ncclComm_t comm() const { return comm_; }

 private:
  NcclCommunicator() = default;
  Status Check(ncclResult_t r, const char* what) const;
  Status Finish(const char* what);  // synchronizes when synchronous_

  int world_size_ = 0;
  int rank_ = 0;
  int device_ = 0;
  bool synchronous_ = true;
  bool aborted_ = false;
  std::string abort_reason_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* staging_ = nullptr;  // device buffer for host broadcasts and the barrier
  size_t staging_bytes_ = 0;
};

}  // namespace qilin
