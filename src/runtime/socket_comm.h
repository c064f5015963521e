// A Communicator between processes (and between nodes) over TCP, for tensor-parallel ranks that
// are processes: `qilin serve --tp N --tp-launch process` (ranks spawned by rank 0) or
// `mpirun -np N qilin serve ... --tp-launch mpi` (docs/tensor-parallel.md).
//
// Rank 0 listens; ranks 1..N-1 connect to it and introduce themselves (rank, world size). The
// group is a star: in every collective each other rank sends rank 0 a header (operation, size)
// and its data, rank 0 checks that every rank called the same operation with the same size,
// computes the result (the all-reduce sums in rank order, as InProcessCommGroup does, so the
// results are bit-identical to the in-process group's) and sends it back. A size that differs is
// InvalidArgument on every rank; a rank that aborts, exits or loses its connection fails every
// rank's pending and later collectives (Cancelled / Unavailable), so no rank hangs.
//
// On the GPU the per-layer all-reduces run over NCCL (cuda_nccl_comm.h); this group carries the
// commands, the step's batch, and NCCL's bootstrap id.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "runtime/comm.h"

namespace qilin {

struct SocketAddress {
  std::string host;
  int port = 0;
};

// "HOST:PORT" (HOST a name or IPv4 address; PORT 0..65535). InvalidArgument naming `what` and the
// value otherwise.
Result<SocketAddress> ParseSocketAddress(const std::string& text, const std::string& what);

// Rank 0's side: binds before the other ranks start (port 0: the kernel picks one, port() says
// which), then accepts them.
class SocketCommListener {
 public:
  // Unavailable naming the address when it cannot be bound (in use, not local).
  static Result<std::unique_ptr<SocketCommListener>> Listen(const SocketAddress& address);
  ~SocketCommListener();

  int port() const { return port_; }

  // Waits until ranks 1..world_size-1 have all joined (Unavailable after `timeout_s`,
  // naming the ranks still missing). A connection that does not introduce itself as a distinct
  // rank of this world size is refused with a message sent back to it, and waiting goes on.
  // `collective_timeout_s`: how long rank 0 waits for another rank inside a collective before
  // failing the group (0: forever). `check`, when set, runs while waiting (every 200 ms); its
  // error ends the wait (a spawned rank that exited).
  Result<std::unique_ptr<Communicator>> Accept(int world_size, double timeout_s,
                                               double collective_timeout_s = 600,
                                               const std::function<Status()>& check = {});

 private:
  SocketCommListener(int fd, int port) : fd_(fd), port_(port) {}
  int fd_ = -1;
  int port_ = 0;
};

// Rank `rank` (1..world_size-1) joins rank 0 at `address`, retrying until `timeout_s` (rank 0 may
// start later). Unavailable naming the address; the refusal's message when
// rank 0 refuses it (a world size that differs, a rank taken).
Result<std::unique_ptr<Communicator>> ConnectSocketComm(const SocketAddress& address, int rank,
                                                        int world_size, double timeout_s);

}  // namespace qilin
