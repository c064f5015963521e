// Collectives on device buffers for the CUDA tensor-parallel ranks (cuda_tp_backend.h): the sum
// all-reduce of the row-parallel layers' partial outputs and the all-gather of the vocab-parallel
// logits, issued on the backend's own stream.
//
// Two implementations:
//   StagedDeviceComm  device -> host, the in-process Communicator's collective (exact, in rank
//                     order), host -> device. Synchronizes the stream, so it cannot be captured
//                     in a CUDA graph. For tests and for ranks that share one GPU.
//   NcclDeviceComm    NCCL on the backend's stream (one GPU per rank), capturable.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "common/status.h"
#include "runtime/comm.h"

namespace qilin {

class DeviceComm {
 public:
  virtual ~DeviceComm() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual const char* name() const = 0;  // "staged", "nccl"
  // Whether the collectives may be recorded into a CUDA graph (no host synchronization).
  virtual bool capturable() const = 0;
  // data[i] = sum over ranks of data[i], for i < count; `data` is device memory; ordered on
  // `stream` (the call may return before the result is in place when capturable()).
  virtual Status AllReduceSum(float* data, int64_t count, cudaStream_t stream) = 0;
  // recv[r * count + i] = rank r's send[i] (device memory), ordered on `stream`.
  virtual Status AllGather(const float* send, int64_t count, float* recv, cudaStream_t stream) = 0;
};

// Over a host Communicator (not owned; typically InProcessCommGroup's): each collective waits for
// `stream`, copies to a host buffer, runs the host collective and copies the result back.
class StagedDeviceComm : public DeviceComm {
 public:
  explicit StagedDeviceComm(Communicator* comm) : comm_(comm) {}
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }
  const char* name() const override { return "staged"; }
  bool capturable() const override { return false; }
  Status AllReduceSum(float* data, int64_t count, cudaStream_t stream) override;
  Status AllGather(const float* send, int64_t count, float* recv, cudaStream_t stream) override;

 private:
  Communicator* comm_;
  std::vector<float> send_, recv_;
};

#ifdef QILIN_HAVE_NCCL
// ncclAllReduce / ncclAllGather of an NcclCommunicator's ncclComm_t (not owned) on the caller's
// stream. Untested across GPUs in this repository's CI (docs/tensor-parallel.md).
class NcclCommunicator;
class NcclDeviceComm : public DeviceComm {
 public:
  explicit NcclDeviceComm(NcclCommunicator* comm) : comm_(comm) {}
  int rank() const override;
  int world_size() const override;
  const char* name() const override { return "nccl"; }
  bool capturable() const override { return true; }
  Status AllReduceSum(float* data, int64_t count, cudaStream_t stream) override;
  Status AllGather(const float* send, int64_t count, float* recv, cudaStream_t stream) override;

 private:
  NcclCommunicator* comm_;
};
#endif

}  // namespace qilin
