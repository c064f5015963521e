// Collective communication between the ranks of a tensor-parallel group: the four operations
// tensor parallelism needs (all-reduce of partial sums, all-gather of vocab-parallel logits,
// broadcast of each step's batch from rank 0, barrier). Implemented in-process over threads
// (InProcessCommGroup, for the CPU backend and tests) and over NCCL (cuda_nccl_comm.h).
//
// Every rank must call the same operations in the same order with the same sizes (as with MPI
// and NCCL). A size that differs between ranks is reported to every rank as InvalidArgument; a
// group that was aborted reports Cancelled to every pending and later call, so no rank hangs.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"

namespace qilin {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string name() const = 0;  // "inprocess", "nccl"

  // data[i] = sum over ranks of their data[i], for i < count, on every rank. Every rank gets
  // bit-identical results (the sum runs in rank order).
  virtual Status AllReduceSum(float* data, int64_t count) = 0;
  // recv[r * count + i] = rank r's send[i]; recv holds world_size * count floats.
  virtual Status AllGather(const float* send, int64_t count, float* recv) = 0;
  // recv[r * count + i] = rank r's send[i] on rank 0 only (recv may be null on the others): the
  // all-gather when only rank 0 needs the result (a step's logits). By default an AllGather
  // through a scratch buffer; a group between processes sends nothing back.
  virtual Status GatherTo0(const float* send, int64_t count, float* recv);
  // Rank `root`'s `bytes` bytes at `data` copied into every other rank's `data`.
  virtual Status Broadcast(void* data, int64_t bytes, int root) = 0;
  // Returns when every rank has called it.
  virtual Status Barrier() = 0;
  // For a rank that cannot keep the collective order (an error between collectives): fails the
  // pending and later collectives of every rank with Cancelled naming `why`, so none hangs.
  virtual void Abort(const std::string& why) = 0;
};

// One group of `world_size` ranks in this process (one thread per rank). Collectives meet at a
// barrier over shared buffers; the all-reduce is a reduce-scatter (rank r sums its share of the
// elements over all ranks, in rank order) and an all-gather of the sums, so its cost per rank is
// 2 x count floats read and written whatever world_size is.
class InProcessCommGroup {
 public:
  // InvalidArgument unless 1 <= world_size <= 1024.
  static Result<std::shared_ptr<InProcessCommGroup>> Create(int world_size);
  ~InProcessCommGroup();

  int world_size() const;
  // The communicator of rank `rank` (call once per rank; use it from that rank's thread).
  Result<std::unique_ptr<Communicator>> Rank(int rank);
  // Wakes every rank waiting in a collective and fails it and every later one with Cancelled
  // naming `why` (a rank that cannot go on calls this so that the others do not hang).
  void Abort(const std::string& why);

  struct State;

 private:
  explicit InProcessCommGroup(int world_size);
  std::shared_ptr<State> state_;
};

}  // namespace qilin
