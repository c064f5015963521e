// Where the ranks of a tensor-parallel group run (`--tp N --tp-launch MODE`):
//   thread   ranks are threads of this process (the default; tp_factory.h);
//   process  rank 0 (this process) spawns ranks 1..N-1 as `qilin tp-worker` processes on this
//            node and joins them over TCP on 127.0.0.1 (socket_comm.h);
//   mpi      every rank was started by `mpirun -np N qilin ...` (OpenMPI's or MPICH's, or any
//            launcher setting QILIN_TP_RANK / QILIN_TP_WORLD_SIZE): the process of rank 0 serves,
//            the others follow; they meet at --tp-master HOST:PORT (rank 0's host; on one node
//            127.0.0.1).
// On "cuda" a process-rank uses GPU (local rank % visible GPUs), with NCCL between them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/dtype.h"
#include "model/config.h"
#include "runtime/backend.h"

namespace qilin {

// How every rank makes the same model.
struct TpModelSource {
  std::string model_dir;  // config.json + safetensors (each rank reads its slices)
  bool dummy_weights = false;
  DType dtype = DType::kBF16;  // of dummy weights
  uint64_t seed = 0;           // of dummy weights
  int64_t max_model_len = 0;   // the config's override (0: config.json's)
};

struct TpLaunchOptions {
  std::string mode = "thread";  // thread | process | mpi
  // Rank 0's address. process: default 127.0.0.1:0 (a free port); mpi: default 127.0.0.1:29531.
  std::string master;
  double join_timeout_s = 300;  // every rank has joined (a worker loading a large model)
  // The binary spawned as `tp-worker` (process mode); empty: this process's own executable.
  std::string worker_binary;
};

// This process's place in an mpirun-launched group: {rank, world size, local rank} from
// OMPI_COMM_WORLD_*, PMI_* / MPI_LOCALRANKID (MPICH), or QILIN_TP_RANK / QILIN_TP_WORLD_SIZE /
// QILIN_TP_LOCAL_RANK; nullopt when none is set.
struct MpiPlace {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
};
std::optional<MpiPlace> MpiPlaceFromEnvironment();

// InvalidArgument naming the flag for a mode other than thread/process/mpi, a master that is
// not HOST:PORT, or mpi without an mpirun environment / with a world size other than `tp`.
Status CheckTpLaunch(const TpLaunchOptions& launch, int tp);

// True when this process is a following rank (> 0) of an mpi launch: it must call RunTpWorker
// instead of serving.
bool IsMpiFollower(const TpLaunchOptions& launch);

// Rank 0's backend for `tp` ranks launched as `launch` says: for "thread" MakeTpBackend /
// MakeDummyTpBackend; otherwise the group of processes (spawned here for "process"), joined
// before it returns, shut down and reaped when the backend is destroyed. A rank that exits or
// fails while loading is reported with its rank and error.
Result<std::unique_ptr<Backend>> LaunchTpBackend(const std::string& device,
                                                 const ModelConfig& config,
                                                 const TpModelSource& source, int tp,
                                                 const TpLaunchOptions& launch);

// RunTpWorker for this process as a following rank of an mpi launch (IsMpiFollower): rank 0 at
// --tp-master (or the mpi default), GPU (local rank mod visible GPUs) as rank 0 picks its own.
Status RunMpiFollower(const std::string& device, const TpModelSource& source, int tp,
                      const TpLaunchOptions& launch);

// A following rank's whole life: join rank 0 at `master` as `rank` of `tp`, make this rank's
// shard on `device` ("cpu" or "cuda", GPU `cuda_device`), then run rank 0's calls until it shuts
// the group down (OK) or the group fails. SIGINT and SIGTERM are ignored from here on: the
// follower ends with rank 0 (a spawned worker also dies with rank 0's process).
Status RunTpWorker(const std::string& device, int cuda_device, const TpModelSource& source, int tp,
                   int rank, const std::string& master, double join_timeout_s);

}  // namespace qilin
